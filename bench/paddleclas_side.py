"""The PaddleClas side of bench/bench_vs_paddleclas.py: runs in the peer's own environment.

Not for direct use: the bench starts it as ``<peer python> bench/paddleclas_side.py STEP --spec spec.json``
and reads the JSON object it prints on its last line. Every step calls PaddleClas's own code
(``ppcls.engine.engine.Engine``, ``deploy/python``'s ``RecPredictor``, ``GalleryBuilder``,
``SystemPredictor``) from a checkout named in the spec; nothing of PaddleClas is copied here.

Two run-time adjustments, both needed on Paddle 3.3.1 and neither changing what is measured:
``paddle.inference.Config.enable_memory_optim`` becomes a no-op (it breaks PIR ``inference.json``
models), and nothing is drawn (``predict_system.py``'s visualiser needs a font the checkout lacks),
so the system step times ``SystemPredictor.predict`` on decoded photos, as its ``main`` does minus
the drawing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

SPEC: dict = {}


def import_paddleclas(spec: dict) -> None:
    """Make ``ppcls`` and ``paddleclas.deploy`` importable from the checkout, then patch Paddle."""
    sys.path[:0] = [spec["pkgroot"], spec["paddleclas"]]  # pkgroot/paddleclas -> the checkout
    import paddle.inference

    paddle.inference.Config.enable_memory_optim = lambda self, *args, **kwargs: None


def rec_model_config(spec: dict) -> dict:
    """MobileNetV1 x1.0 + FC neck (1024 -> 512) + ArcMargin: PaddleClas's quick-start retrieval config."""
    base = yaml.safe_load(Path(spec["paddleclas"], "ppcls/configs/quick_start/MobileNetV1_retrieval.yaml").read_text())
    size, cub = int(spec["size"]), spec["cub_dir"]
    cfg = copy.deepcopy(base)
    glob = cfg["Global"]
    # One evaluation, after the last epoch: what visrec's training does too (it picks best_model).
    glob.update(device="cpu", epochs=int(spec["epochs"]), eval_during_train=True, eval_interval=int(spec["epochs"]),
                save_interval=int(spec["epochs"]),
                output_dir=spec["out_dir"], image_shape=[3, size, size], print_batch_step=10, use_visualdl=False,
                seed=int(spec.get("seed", 0)), sim_block_size=100000)
    cfg["Arch"]["Head"]["class_num"] = int(spec["train_classes"])
    train = cfg["DataLoader"]["Train"]
    train["dataset"].update(image_root=cub, cls_label_path=spec["train_list"], relabel=True)
    for op in train["dataset"]["transform_ops"]:
        if "ResizeImage" in op:
            op["ResizeImage"]["size"] = size
    train["sampler"].update(batch_size=int(spec["p"]) * int(spec["k"]), num_instances=int(spec["k"]))
    for part in ("Query", "Gallery"):
        block = cfg["DataLoader"]["Eval"][part]
        block["dataset"].update(image_root=cub, cls_label_path=spec["test_list"])
        for op in block["dataset"]["transform_ops"]:
            if "ResizeImage" in op:
                op["ResizeImage"]["size"] = size
        block["sampler"]["batch_size"] = int(spec["eval_batch"])
    for loader in (train, cfg["DataLoader"]["Eval"]["Query"], cfg["DataLoader"]["Eval"]["Gallery"]):
        loader["loader"]["num_workers"] = int(spec["workers"])
    return cfg


def get_config(cfg: dict, name: str):
    from ppcls.utils import config as ppcls_config

    path = Path(SPEC["work"]) / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    config = ppcls_config.get_config(str(path), overrides=[], show=False)
    config.profiler_options = None  # what tools/train.py sets when --profiler_options is not given
    return config


def step_train(spec: dict) -> dict:
    from ppcls.engine.engine import Engine

    start = time.perf_counter()
    engine = Engine(get_config(rec_model_config(spec), "paddleclas_train.yaml"), mode="train")
    epochs = {"seconds": 0.0, "images": 0}
    inner = engine.train_epoch_func

    def timed_epoch(eng, epoch_id, print_batch_step):
        tic = time.perf_counter()
        inner(eng, epoch_id, print_batch_step)
        epochs["seconds"] += time.perf_counter() - tic
        epochs["images"] += eng.iter_per_epoch * int(spec["p"]) * int(spec["k"])

    engine.train_epoch_func = timed_epoch
    engine.train()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "loop_s": epochs["seconds"], "images": epochs["images"],
            "img_s": epochs["images"] / wall, "loop_img_s": epochs["images"] / epochs["seconds"],
            "weights": str(Path(spec["out_dir"]) / f"epoch_{int(spec['epochs'])}")}  # its latest.pdparams may be absent


class _Recorder:
    """Wraps PaddleClas's metric function and keeps the last metric dict it returned."""

    def __init__(self, inner):
        self.inner, self.last = inner, {}

    def __call__(self, *args, **kwargs):
        result = self.inner(*args, **kwargs)
        self.last = {k: float(v) for k, v in result.items()}
        return result


def step_eval(spec: dict) -> dict:
    from ppcls.engine.engine import Engine

    cfg = rec_model_config(spec)
    cfg["Global"]["pretrained_model"] = spec["weights"]
    start = time.perf_counter()
    engine = Engine(get_config(cfg, "paddleclas_eval.yaml"), mode="eval")
    built = time.perf_counter()
    recorder = _Recorder(engine.eval_metric_func)
    engine.eval_metric_func = recorder
    engine.eval(0)
    end = time.perf_counter()
    images = len(engine.query_dataloader.dataset)
    return {**metric_names(recorder.last), "images": images, "eval_s": end - built, "wall_s": end - start,
            "img_s": images / (end - built), "embedded": images + len(engine.gallery_dataloader.dataset)}


def metric_names(raw: dict) -> dict:
    return {"recall@1": raw.get("recall1"), "recall@5": raw.get("recall5"), "mAP": raw.get("mAP")}


def step_crosscheck(spec: dict) -> dict:
    """PaddleClas's ``retrieval_eval`` on embeddings computed elsewhere (query = gallery, uid as camera)."""
    import paddle
    from ppcls.engine.evaluation.retrieval import retrieval_eval
    from ppcls.metric import build_metrics
    from ppcls.utils import logger

    logger.init_logger()  # Engine does this; retrieval_eval logs through it
    data = np.load(spec["npz"])
    feats, labels, ids = data["features"].astype("float32"), data["labels"], data["ids"]

    class Model:
        def eval(self):
            return self

        def __call__(self, x, y):
            return {"features": x}

    class Loader(list):
        dataset = range(len(feats))

    batches = Loader([feats[i:i + 64], labels[i:i + 64], ids[i:i + 64]] for i in range(0, len(feats), 64))
    engine = argparse.Namespace(
        model=Model(), gallery_query_dataloader=batches, is_rec=True, use_dali=False, eval_loss_func=object(),
        auto_cast=lambda is_eval: contextlib.nullcontext(),
        config={"Global": {"print_batch_step": 10 ** 9, "sim_block_size": len(feats), "feature_normalize": True}})
    recorder = _Recorder(build_metrics([{"Recallk": {"topk": [1, 5]}}, {"mAP": {}}]))
    engine.eval_metric_func = recorder
    with paddle.no_grad():
        retrieval_eval(engine)
    return metric_names(recorder.last)


def predictor_config(spec: dict, threads: int, batch_size: int = 1) -> dict:
    """``deploy/configs/inference_general.yaml`` pointed at the shared export, on CPU with oneDNN."""
    cfg = yaml.safe_load(Path(spec["paddleclas"], "deploy/configs/inference_general.yaml").read_text())
    size = int(spec["size"])
    cfg["Global"].update(rec_inference_model_dir=spec["model"], det_inference_model_dir="", use_gpu=False,
                         enable_mkldnn=True, cpu_num_threads=int(threads), batch_size=batch_size,
                         enable_benchmark=False)
    for op in cfg["RecPreProcess"]["transform_ops"]:
        if "ResizeImage" in op:
            op["ResizeImage"]["size"] = [size, size]
    index = cfg["IndexProcess"]
    index.update(index_method=spec.get("index_method", "HNSW32"), image_root=spec.get("image_root", ""),
                 index_dir=spec.get("index_dir", ""), data_file=spec.get("gallery_list", ""),
                 embedding_size=int(spec.get("embedding_size", 512)), batch_size=int(spec.get("gallery_batch", 32)),
                 score_thres=float(spec.get("score_thres", 0.5)))
    return cfg


def _attr(value):
    from paddleclas.deploy.utils.config import AttrDict

    if isinstance(value, dict):
        return AttrDict({k: _attr(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_attr(v) for v in value]
    return value


def read_images(paths: list[str]) -> list[np.ndarray]:
    import cv2

    return [cv2.imread(p)[:, :, ::-1] for p in paths]


def step_infer(spec: dict) -> dict:
    from paddleclas.deploy.python.predict_rec import RecPredictor

    predictor = RecPredictor(_attr(predictor_config(spec, spec["threads"])))
    images = read_images(spec["images"])
    out = {}
    for batch in (1, 32):
        chunks = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images[:batch]]
        predictor.predict([im.copy() for im in chunks[0]])  # warm-up: oneDNN builds its kernels per shape
        reps = max(1, int(spec["infer_images"]) // batch)
        start = time.perf_counter()
        for r in range(reps):
            predictor.predict([im.copy() for im in chunks[r % len(chunks)]])
        seconds = time.perf_counter() - start
        out[f"b{batch}_ms"] = 1000 * seconds / (reps * batch)
        out[f"b{batch}_img_s"] = reps * batch / seconds
    return out


def step_gallery(spec: dict) -> dict:
    from paddleclas.deploy.python.build_gallery import GalleryBuilder

    start = time.perf_counter()
    GalleryBuilder(_attr(predictor_config(spec, spec["threads"])))  # loads the model, embeds, indexes, saves
    seconds = time.perf_counter() - start
    images = sum(1 for line in Path(spec["gallery_list"]).read_text().splitlines() if line.strip())
    return {"wall_s": seconds, "images": images, "img_s": images / seconds}


_SYSTEM = None


def _system_init(spec: dict, threads: int) -> None:
    global _SYSTEM, SPEC
    SPEC = spec
    import_paddleclas(spec)
    from paddleclas.deploy.python.predict_system import SystemPredictor

    _SYSTEM = SystemPredictor(_attr(predictor_config(spec, threads)))


def _system_one(path: str) -> float:
    import cv2

    start = time.perf_counter()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        _SYSTEM.predict(cv2.imread(path)[:, :, ::-1])
    return time.perf_counter() - start


def step_system(spec: dict) -> dict:
    photos = spec["photos"]
    _system_init(spec, int(spec["threads"]))
    _system_one(photos[0])  # warm-up
    start = time.perf_counter()
    for path in photos:
        _system_one(path)
    sequential = time.perf_counter() - start
    procs = int(spec["procs"])
    threads = max(1, int(spec["threads"]) // procs)
    requests = [photos[i % len(photos)] for i in range(int(spec["concurrent_requests"]))]
    with mp.get_context("spawn").Pool(procs, initializer=_system_init, initargs=(spec, threads)) as pool:
        pool.map(_system_one, photos[:procs], chunksize=1)  # every worker loaded and warm
        start = time.perf_counter()
        pool.map(_system_one, requests, chunksize=1)
        concurrent = time.perf_counter() - start
    return {"ms_per_photo": 1000 * sequential / len(photos), "photos": len(photos),
            "concurrent_photos_s": len(requests) / concurrent, "procs": procs, "threads_per_proc": threads}


STEPS = {"train": step_train, "eval": step_eval, "crosscheck": step_crosscheck, "infer": step_infer,
         "gallery": step_gallery, "system": step_system}


def main() -> None:
    global SPEC
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--spec", type=Path, required=True, help="JSON written by bench_vs_paddleclas.py")
    args = parser.parse_args()
    SPEC = json.loads(args.spec.read_text())
    import_paddleclas(SPEC)
    result = STEPS[args.step](SPEC)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
