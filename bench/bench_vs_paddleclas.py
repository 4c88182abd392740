"""visrec side by side with PaddleClas (PP-ShiTu tools): same models, same photos, one run.

    .venv/bin/python bench/bench_vs_paddleclas.py --paddleclas /work/peer/PaddleClas \\
        ../shared/data/cub_subset/CUB_200_2011                    # full run (quiet machine: ~40 min)
    .venv/bin/python bench/bench_vs_paddleclas.py --quick --paddleclas DIR CUB_DIR   # smoke run, a few minutes

DIR is a PaddleClas checkout obtained by hand (never copied into this repository), e.g. from a
bare mirror: ``git --git-dir=MIRROR archive COMMIT | tar -x -C DIR`` (or a clone); the table names
its commit (``git rev-parse`` in a clone, else the first word of ``DIR/.peer-commit``). PaddleClas
runs in its own environment (``--peer-env``, made with uv on first use, pinned for Paddle 3.3.1:
numpy 1.24.4, faiss-cpu 1.8.0.post1, opencv-python-headless 4.6.0.66, gast 0.3.3, ...) through
``bench/paddleclas_side.py``; visrec runs in this process. Both read the same CUB folder (the
first ``--train-classes`` classes train, the rest are the unseen test classes) through the same
``path label uid`` lists, and each comparison runs the two sides alternately (``--repeats``
rounds, the order flipped every round; medians are reported), so machine noise hits both.

1. training: MobileNetV1 x1.0 + FC neck 512 + ArcMargin (m 0.15, s 30), CE + triplet loss,
   momentum 0.01, the same input size, P x K batches and epochs, from scratch, whole photos;
   images/s over the whole training call (model and data set-up, the loop, checkpoints and the one
   evaluation after the last epoch that both sides make) and over the epoch loop alone;
2. evaluation: each side's own evaluator on its own trained model (visrec: the exported model,
   query = gallery once; PaddleClas: dygraph ``Engine.eval`` with its query and gallery loaders),
   recall@1/5, mAP and images/s; then both evaluators on the same (visrec's) embeddings;
3. inference: visrec's exported model through ``visrec.inference.Extractor`` and PaddleClas's
   ``RecPredictor``: ms per image at batch 1 (preprocessing included), images/s at batch 32;
4. recognition system, no detector on either side (PaddleClas's ``DetPredictor`` takes a
   PaddleDetection export, which visrec's detector is not): ``RecognitionSystem`` (visrec
   recognize) vs ``SystemPredictor`` (predict_system.py) on the same photos, model and gallery
   list: ms per photo one at a time; photos/s under ``--concurrency`` requests (visrec: the
   BentoML service with that many client threads; PaddleClas: ``--peer-procs`` processes
   sharing the cores, which has no HTTP server);
5. gallery building from the same list with the same model (load + embed + index + save).

Ratios are visrec / PaddleClas; for ms rows lower is better. Everything lands in ``--work``
(default /work/peer/bench-work) and ``results.json`` there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import requests
import yaml

# visrec's public entry points, all in one place (module moves on other branches land here only).
from visrec.config import load_config
from visrec.data.cub import read_cub
from visrec.imaging import load_image
from visrec.data.split import write_split
from visrec.evaluation.retrieval_eval import eval_dataset_for, evaluate_embeddings
from visrec.index.faiss_index import index_params
from visrec.inference.export import export_extractor, read_model_json
from visrec.inference.extractor_runtime import Extractor
from visrec.inference.gallery_ops import GalleryItem, build_gallery
from visrec.inference.pipeline import RecognitionSystem
from visrec.inference.predictors import Predictor
from visrec.metrics.retrieval import retrieval_metrics
from visrec.training.extractor_training import model_config, train_extractor
from visrec.utils.logs import setup_logging

from bench_service import run_level  # noqa: E402  (bench/ is this script's folder)

ROOT = Path(__file__).resolve().parents[1]
SIDE = Path(__file__).resolve().with_name("paddleclas_side.py")
PEER_PINS = ["paddlepaddle==3.3.1", "numpy==1.24.4", "faiss-cpu==1.8.0.post1", "opencv-python-headless==4.6.0.66",
             "gast==0.3.3", "visualdl", "setuptools", "prettytable", "ujson", "pillow", "tqdm", "PyYAML", "scipy",
             "scikit-learn", "easydict"]


@dataclass(frozen=True)
class Settings:
    size: int = 128
    p: int = 16                 # classes per batch
    k: int = 2                  # images per class (batch 32, PaddleClas's num_instances 2)
    epochs: int = 2
    train_per_class: int = 0    # 0: every training image
    test_per_class: int = 0
    eval_batch: int = 64
    peer_workers: int = 2       # PaddleClas DataLoader workers (its config says 4; the machine has 2 cores)
    threads: int = 2
    infer_images: int = 200     # images timed per batch size
    gallery_per_class: int = 5
    system_photos: int = 200    # photos recognised one at a time
    concurrency: int = 16
    concurrent_requests: int = 320
    peer_procs: int = 2
    repeats: int = 2


QUICK = dict(epochs=1, train_per_class=4, test_per_class=4, infer_images=32, gallery_per_class=2, system_photos=10,
             concurrent_requests=32, repeats=1)


# ----------------------------------------------------------------------------- set-up


def commit_of(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short=9", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        marker = path / ".peer-commit"
        return marker.read_text().split()[0][:9] if marker.is_file() else "unknown"


def peer_python(env: Path, uv: str) -> Path:
    """The peer environment's python: made with uv on first use, reused while the pins are unchanged."""
    stamp = env / ".visrec-bench-pins"
    pins = hashlib.sha1(" ".join(PEER_PINS).encode()).hexdigest()[:12]
    python = env / "bin" / "python"
    if python.exists() and stamp.is_file() and stamp.read_text().strip() == pins:
        return python
    print(f"making the PaddleClas environment in {env} (uv, pinned for Paddle 3.3.1)", flush=True)
    if not python.exists():
        subprocess.run([uv, "venv", "--python", "3.11", str(env)], check=True)
    subprocess.run([uv, "pip", "install", "--python", str(python), *PEER_PINS], check=True)
    stamp.write_text(pins + "\n")
    return python


def find_uv(arg: str | None) -> str:
    for candidate in (arg, ROOT / ".tools/bin/uv", ROOT / ".venv/bin/uv", shutil.which("uv")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise SystemExit("error: no uv found: run `make env` (it installs .tools/bin/uv) or pass --uv")


def first_per_class(entries: list[str], per_class: int) -> list[str]:
    if per_class <= 0:
        return entries
    counts: dict[str, int] = defaultdict(int)
    kept = []
    for line in entries:
        label = line.rsplit(" ", 2)[1]
        if counts[label] < per_class:
            counts[label] += 1
            kept.append(line)
    return kept


def prepare_data(cub: Path, work: Path, train_classes: int, s: Settings) -> dict:
    """The lists both sides read: ``path label uid`` (train, test), the gallery list and the photos."""
    meta = read_cub(cub)
    split = work / "split"
    write_split(meta, train_classes, split)
    lists = work / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    out = {"lists": lists}
    for name, per_class in (("train", s.train_per_class), ("test", s.test_per_class)):
        lines = first_per_class((split / f"{name}_list.txt").read_text().splitlines(), per_class)
        (lists / f"{name}_list.txt").write_text("".join(f"{line}\n" for line in lines))
        out[name] = [line.rsplit(" ", 2) for line in lines]
    by_class: dict[str, list[str]] = defaultdict(list)
    for rel, label, _ in out["test"]:
        by_class[label].append(rel)
    gallery, photos = [], []
    for label, rels in by_class.items():
        gallery += [(rel, label) for rel in rels[:s.gallery_per_class]]
        photos += [str(cub / rel) for rel in rels[s.gallery_per_class:]]
    (lists / "gallery_list.txt").write_text("".join(f"{rel}\t{label}\n" for rel, label in gallery))
    out.update(gallery=gallery, photos=photos[:: max(1, len(photos) // s.system_photos)][:s.system_photos],
               infer=[str(cub / rel) for rel, _, _ in out["test"]][:max(32, s.infer_images)],
               train_classes=len({label for _, label, _ in out["train"]}))
    return out


class Peer:
    """Runs one step of bench/paddleclas_side.py in the peer environment; returns its JSON."""

    def __init__(self, python: Path, base_spec: dict, work: Path):
        self.python, self.base, self.work = python, base_spec, work

    def __call__(self, step: str, **spec) -> dict:
        path = self.work / f"spec_{step}.json"
        path.write_text(json.dumps({**self.base, **spec}, indent=1))
        log = self.work / f"paddleclas_{step}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        with log.open("a") as err:
            proc = subprocess.run([str(self.python), str(SIDE), step, "--spec", str(path)], stdout=subprocess.PIPE,
                                  stderr=err, text=True, cwd=self.work, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"error: PaddleClas step {step} failed (exit {proc.returncode}); see {log}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- visrec side


def visrec_overrides(s: Settings, epochs: int) -> list[str]:
    """The PaddleClas quick-start retrieval recipe in visrec's terms: from scratch, whole photos."""
    return [
        f"extractor.backbone={{name: mobilenet_v1, scale: 1.0}}", "extractor.pretrained=null",
        "extractor.neck={name: FCNeck, embedding_size: 512}",
        "extractor.head={name: ArcMarginHead, margin: 0.15, scale: 30.0}",
        "extractor.losses=[{name: CELoss, weight: 1.0}, {name: TripletLossV2, weight: 1.0, margin: 0.5}]",
        "extractor.finetune=always", "extractor.frozen_units=0", "extractor.freeze_bn=false",
        "extractor.head_warmup_steps=0", "extractor.eval_before_training=false", f"extractor.eval_every={epochs}",
        f"extractor.epochs={epochs}", f"extractor.image.size={s.size}", "extractor.image.crop_to_bbox=false",
        "extractor.image.mean=[0.485, 0.456, 0.406]", "extractor.image.std=[0.229, 0.224, 0.225]",
        "extractor.augment.resize_scale=1.0", "extractor.augment.color_jitter=0.0", "extractor.augment.erase_prob=0.5",
        "extractor.augment.rotate_prob=0.0", "extractor.augment.flip_prob=0.5",
        f"extractor.sampler.classes_per_batch={s.p}", f"extractor.sampler.images_per_class={s.k}",
        "extractor.optimizer={name: momentum, lr: 0.01, momentum: 0.9, weight_decay: 0.0005, backbone_lr_mult: 1.0, "
        "schedule: constant}",
        f"runtime.num_threads={s.threads}", f"recognition.num_threads={s.threads}", "recognition.detector=null",
        "recognition.gallery_views=[whole]", "index.index_type=HNSW32", "tracking.enabled=false",
    ]


def visrec_train(cfg, cub: Path, lists: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    model, _ = train_extractor(cfg.extractor, cub, lists, out)
    wall = time.perf_counter() - start
    rows = [row for row in _csv_rows(out / "history.csv") if row.get("seconds")]
    loop = sum(float(r["seconds"]) for r in rows)
    images = sum(float(r["seconds"]) * float(r["images_per_s"]) for r in rows)
    return {"wall_s": wall, "loop_s": loop, "images": round(images), "img_s": images / wall,
            "loop_img_s": images / loop, "_model": model}


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def visrec_eval(export: Path, cub: Path, lists: Path, s: Settings, npz: Path) -> dict:
    start = time.perf_counter()
    dataset = eval_dataset_for(read_model_json(export), cub, lists / "test_list.txt")
    predictor = Predictor(export, backend="paddle", num_threads=s.threads)
    result = evaluate_embeddings(lambda b: predictor(b)[0], dataset, s.eval_batch, 5, "visrec eval")
    seconds = time.perf_counter() - start
    np.savez(npz, features=result.features, labels=result.labels, ids=result.ids)
    return {"recall@1": result.metrics["recall@1"], "recall@5": result.metrics["recall@5"],
            "mAP": result.metrics["mAP"], "images": len(dataset), "eval_s": seconds, "img_s": len(dataset) / seconds}


def visrec_infer(export: Path, paths: list[str], s: Settings) -> dict:
    extractor = Extractor(export, backend="paddle", num_threads=s.threads, batch_size=32)
    images = [load_image(p) for p in paths]
    out = {}
    for batch in (1, 32):
        chunks = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
        extractor.embed(chunks[0])  # warm-up: oneDNN builds its kernels per shape
        reps = max(1, s.infer_images // batch)
        start = time.perf_counter()
        for r in range(reps):
            extractor.embed(chunks[r % len(chunks)])
        seconds = time.perf_counter() - start
        out[f"b{batch}_ms"] = 1000 * seconds / (reps * batch)
        out[f"b{batch}_img_s"] = reps * batch / seconds
    return out


def visrec_gallery(cfg, export: Path, cub: Path, gallery: list, out: Path, s: Settings) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    items = [GalleryItem(cub / rel, label) for rel, label in gallery]
    start = time.perf_counter()
    extractor = Extractor(export, backend="paddle", num_threads=s.threads)
    built = build_gallery(extractor, items, cfg.index.index_type, s.threads, 32, progress=False,
                          views=["whole"], **index_params(cfg.index))
    built.save(out)
    seconds = time.perf_counter() - start
    return {"wall_s": seconds, "images": len(items), "img_s": len(items) / seconds}


def visrec_system(cfg, photos: list[str], params_file: Path, s: Settings) -> dict:
    system = RecognitionSystem.from_config(cfg.recognition)
    system.predict(load_image(photos[0]))  # warm-up
    start = time.perf_counter()
    for path in photos:
        system.predict(load_image(path))
    sequential = time.perf_counter() - start
    return {"ms_per_photo": 1000 * sequential / len(photos), "photos": len(photos),
            **visrec_service(params_file, photos, s)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def visrec_service(params_file: Path, photos: list[str], s: Settings) -> dict:
    """The BentoML service on a free loopback port, ``s.concurrency`` client threads, then stopped."""
    port = free_port()
    env = {**os.environ, "VISREC_PARAMS": str(params_file), "BENTOML_HOME": str(params_file.parent / "bentoml_home")}
    log = (params_file.parent / "visrec_service.log").open("a")
    command = [str(Path(sys.executable).with_name("bentoml")), "serve", "bento.service:VisrecRecognition",
               "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"error: the visrec service did not start; see {log.name}")
            time.sleep(0.5)
        images = [Path(p).read_bytes() for p in photos]
        run_level(url, "recognize", images, s.concurrency, 2 * s.concurrency, 120.0)  # warm-up
        level = run_level(url, "recognize", images, s.concurrency, s.concurrent_requests, 120.0)
        if level["errors"]:
            raise SystemExit(f"error: the visrec service answered {level['errors']} errors: {level['first_error']}")
        return {"concurrent_photos_s": level["rps"], "p50_ms": level["p50"]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def service_params(work: Path, overrides: list[str], export: Path, gallery: Path) -> Path:
    """A params file for the service (it reads VISREC_PARAMS, not overrides)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = load_config(ROOT / "params.yaml", overrides)  # validates the overrides once more
    raw["recognition"].update(extractor=str(export), gallery=str(gallery), detector=None, gallery_views=["whole"],
                              num_threads=cfg.recognition.num_threads)
    raw["serve"]["champion"] = False
    raw["tracking"]["enabled"] = False
    path = work / "visrec_service_params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- both sides


def alternate(name: str, repeats: int, visrec_fn, peer_fn) -> dict[str, list[dict]]:
    """Run the sides alternately, the order flipped every round; each run's dict per side."""
    runs: dict[str, list[dict]] = {"visrec": [], "paddleclas": []}
    for r in range(repeats):
        order = [("visrec", visrec_fn), ("paddleclas", peer_fn)]
        for side, fn in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            runs[side].append(fn(r))
            print(f"  {name} round {r + 1}/{repeats}: {side} done in {time.perf_counter() - start:.0f} s", flush=True)
    return runs


def synthetic_embeddings(npz: Path, labels: np.ndarray, ids: np.ndarray, dim: int = 64) -> dict:
    """Tie-free clustered unit vectors with the test set's labels and ids, and visrec's metrics on them.

    A model trained for a few steps (``--quick``) embeds every photo almost alike, so ties decide
    its ranking and the two evaluators may break them differently; these vectors check the
    evaluators themselves.
    """
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(int(labels.max()) + 1, dim))
    feats = centres[labels] + 1.5 * rng.normal(size=(len(labels), dim))
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype("float32")
    np.savez(npz, features=feats, labels=labels, ids=ids)
    return retrieval_metrics(feats, labels, feats, labels, query_ids=ids, gallery_ids=ids, ks=(1, 5), progress=False)


def median(runs: list[dict], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cub_dir", type=Path, help="a CUB_200_2011 folder (images.txt, images/, ...)")
    parser.add_argument("--paddleclas", type=Path, required=True, help="a PaddleClas checkout (never this repo)")
    parser.add_argument("--peer-env", type=Path, default=Path("/work/peer/.venv-paddleclas"))
    parser.add_argument("--work", type=Path, default=Path("/work/peer/bench-work"))
    parser.add_argument("--uv", help="uv executable (default: .tools/bin/uv, .venv/bin/uv, PATH)")
    parser.add_argument("--train-classes", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 epoch on 4 photos a class, few timings")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"change a setting ({', '.join(Settings.__dataclass_fields__)})")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("-o", "--override", action="append", default=[], help="visrec dotted override, last word")
    args = parser.parse_args()
    setup_logging("WARNING")
    changes = dict(QUICK) if args.quick else {}
    for text in args.set:
        key, _, value = text.partition("=")
        if key not in Settings.__dataclass_fields__:
            raise SystemExit(f"error: --set {text}: no setting {key!r}")
        changes[key] = int(value)
    s = Settings(**changes)
    cub, pc = args.cub_dir.resolve(), args.paddleclas.resolve()
    if not (pc / "ppcls").is_dir() or not (pc / "deploy/python/predict_system.py").is_file():
        raise SystemExit(f"error: {pc} is not a PaddleClas checkout (ppcls/, deploy/python/)")
    if pc == ROOT or ROOT in pc.parents:
        raise SystemExit("error: keep the PaddleClas checkout outside this repository")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = peer_python(args.peer_env.resolve(), find_uv(args.uv))
    pkgroot = work / "pkgroot"  # pkgroot/paddleclas -> the checkout: its deploy code imports paddleclas.deploy
    pkgroot.mkdir(exist_ok=True)
    if not (pkgroot / "paddleclas").is_symlink():
        (pkgroot / "paddleclas").symlink_to(pc)
    commits = {"visrec": commit_of(ROOT), "paddleclas": commit_of(pc)}
    print(f"visrec {commits['visrec']} vs PaddleClas {commits['paddleclas']}; {asdict(s)}", flush=True)

    data = prepare_data(cub, work, args.train_classes, s)
    lists = data["lists"]
    overrides = visrec_overrides(s, s.epochs) + args.override
    cfg = load_config(args.params, overrides)
    peer = Peer(python, {"paddleclas": str(pc), "pkgroot": str(pkgroot), "work": str(work), "cub_dir": str(cub),
                         "size": s.size, "p": s.p, "k": s.k, "epochs": s.epochs, "eval_batch": s.eval_batch,
                         "workers": s.peer_workers, "threads": s.threads, "train_classes": data["train_classes"],
                         "train_list": str(lists / "train_list.txt"), "test_list": str(lists / "test_list.txt")},
                work)
    export = work / "visrec_export"
    results: dict[str, dict] = {}

    def save(complete: bool = False) -> None:  # after every step: a late failure keeps what was measured
        (work / "results.json").write_text(json.dumps({"commits": commits, "settings": asdict(s), "results": results,
                                                       "complete": complete}, indent=1, default=str) + "\n")

    print("1/5 training", flush=True)
    trained = {}

    def visrec_train_round(r):
        run = visrec_train(cfg, cub, lists, work / f"visrec_train_{r}")
        trained.setdefault("model", run.pop("_model"))
        return run

    results["train"] = alternate("training", s.repeats, visrec_train_round,
                                 lambda r: peer("train", out_dir=str(work / f"paddleclas_train_{r}")))
    export_extractor(trained["model"], model_config(cfg.extractor, data["train_classes"]), export, onnx=False)
    peer_weights = results["train"]["paddleclas"][0]["weights"]

    save()
    print("2/5 evaluation", flush=True)
    npz = work / "visrec_embeddings.npz"
    results["eval"] = alternate("evaluation", s.repeats, lambda r: visrec_eval(export, cub, lists, s, npz),
                                lambda r: peer("eval", out_dir=str(work / "paddleclas_eval"), weights=peer_weights))
    results["crosscheck"] = {"visrec": results["eval"]["visrec"][0], "paddleclas": peer("crosscheck", npz=str(npz))}
    saved, synthetic = np.load(npz), work / "synthetic_embeddings.npz"
    results["crosscheck_synthetic"] = {"visrec": synthetic_embeddings(synthetic, saved["labels"], saved["ids"]),
                                       "paddleclas": peer("crosscheck", npz=str(synthetic))}

    save()
    print("3/5 inference", flush=True)
    infer = data["infer"]
    results["infer"] = alternate("inference", s.repeats, lambda r: visrec_infer(export, infer, s),
                                 lambda r: peer("infer", model=str(export), images=infer,
                                                infer_images=s.infer_images))

    save()
    print("4/5 gallery building", flush=True)
    gallery_dirs = {"visrec": work / "visrec_gallery", "paddleclas": work / "paddleclas_gallery"}
    peer_gallery = dict(model=str(export), image_root=str(cub), gallery_list=str(lists / "gallery_list.txt"),
                        index_dir=str(gallery_dirs["paddleclas"]), index_method="HNSW32",
                        embedding_size=int(read_model_json(export)["embedding_dim"]))
    results["gallery"] = alternate(
        "gallery", s.repeats, lambda r: visrec_gallery(cfg, export, cub, data["gallery"], gallery_dirs["visrec"], s),
        lambda r: peer("gallery", **peer_gallery))

    save()
    print("5/5 recognition system", flush=True)
    sys_overrides = overrides + [f"recognition.extractor={export}", f"recognition.gallery={gallery_dirs['visrec']}"]
    sys_cfg = load_config(args.params, sys_overrides)
    params_file = service_params(work, sys_overrides, export, gallery_dirs["visrec"])
    results["system"] = alternate("system", s.repeats,
                                  lambda r: visrec_system(sys_cfg, data["photos"], params_file, s),
                                  lambda r: peer("system", **peer_gallery, photos=data["photos"], procs=s.peer_procs,
                                                 concurrent_requests=s.concurrent_requests))

    save(complete=True)
    print_table(results, commits, s, data)


def print_table(results: dict, commits: dict, s: Settings, data: dict) -> None:
    rows = [
        ("training img/s (whole run)", "train", "img_s", "higher"),
        ("training img/s (loop incl. data)", "train", "loop_img_s", "higher"),
        ("evaluation img/s (own evaluator)", "eval", "img_s", "higher"),
        ("inference ms/image, batch 1", "infer", "b1_ms", "lower"),
        ("inference img/s, batch 32", "infer", "b32_img_s", "higher"),
        ("system ms/photo (one at a time)", "system", "ms_per_photo", "lower"),
        (f"system photos/s, {s.concurrency} concurrent", "system", "concurrent_photos_s", "higher"),
        ("gallery building img/s", "gallery", "img_s", "higher"),
    ]
    print(f"\nvisrec {commits['visrec']} vs PaddleClas {commits['paddleclas']}: MobileNetV1 x1.0 + FC 512 + ArcMargin, "
          f"{s.size} px, batch {s.p}x{s.k}, {s.epochs} epoch(s) from scratch, {len(data['train'])} train / "
          f"{len(data['test'])} test images, {s.threads} threads, median of {s.repeats} alternating round(s)")
    print(f"{'':<36}{'visrec':>10}{'PaddleClas':>12}{'ratio':>8}  better")
    for label, phase, key, better in rows:
        v, p = median(results[phase]["visrec"], key), median(results[phase]["paddleclas"], key)
        print(f"{label:<36}{v:>10.2f}{p:>12.2f}{v / p:>7.2f}x  {better}")
    for key in ("recall@1", "recall@5", "mAP"):
        v, p = results["eval"]["visrec"][0][key], results["eval"]["paddleclas"][0][key]
        print(f"{key + ' (own model, own evaluator)':<36}{v:>10.4f}{p:>12.4f}{'':>8}  (different models)")
    for name, label in (("crosscheck", "visrec's"), ("crosscheck_synthetic", "synthetic")):
        cross = results[name]
        for key in ("recall@1", "mAP"):
            v, p = float(cross["visrec"][key]), float(cross["paddleclas"][key])
            verdict = f"diff {abs(v - p):.4f}" + ((" ok" if abs(v - p) <= 0.005 else " OVER 0.005")
                                                  if key == "recall@1" else "")
            print(f"{f'{key}, {label} embeddings':<36}{v:>10.4f}{p:>12.4f}{'':>8}  {verdict}")
    sysp = results["system"]["paddleclas"][0]
    print(f"(system: no detector on either side; visrec = BentoML service + {s.concurrency} client threads, "
          f"PaddleClas = {sysp['procs']} processes x {sysp['threads_per_proc']} thread(s), no HTTP)")


if __name__ == "__main__":
    main()
