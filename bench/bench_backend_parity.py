"""Issue 19's service-level bars, measured on the real service (``bentoml serve``) on 127.0.0.1:

1. **Parity**: the pipeline's gallery served from Faiss, and a copy moved to Milvus with
   ``visrec gallery migrate --to milvus``: ``/recognize`` on the same query photos must give the
   same labels and boxes, scores within ``--tolerance`` (1e-4). Each engine builds its own HNSW
   graph, so approximate neighbours could differ; galleries under ``index.exact_below`` entries
   (the ``make repro`` one has 1,000) are searched exhaustively on both. ``--index-type FLAT``
   re-indexes the gallery as FLAT first.
2. **Promotion under load** (Milvus): the service serves champion A; ``--clients`` clients send
   ``--requests`` ``/recognize`` requests while champion B (same models, a gallery without
   ``--drop-labels`` labels, so some answers differ) is published, moving the alias. Every answer
   must be A's or B's answer for that photo (by the gallery version it names), with 0 errors.

    make repro                                      # data/export, data/gallery, data/index
    .venv/bin/python bench/bench_backend_parity.py  # --photos 200 --requests 1000 --clients 8
    .venv/bin/python bench/bench_backend_parity.py --index-type FLAT --skip-load

Work files go to ``data/parity/`` (wiped at start). A Milvus Lite server is started on
127.0.0.1 for the run (``--milvus-uri`` to use another server) and stopped at the end, as are the
services (each its own process group).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check, what: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        try:
            if check():
                return
        except (OSError, requests.RequestException):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout:.0f} s")
        time.sleep(0.3)


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child in its own process group (stopped with :func:`stop`), output to ``log``."""
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def write_params(path: Path, work: Path, gallery: Path, milvus_uri: str, champion: bool, port: int) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["recognition"].update(extractor=str(REPO / "data/export/extractor"),
                                 detector=str(REPO / "data/export/detector"), gallery=str(gallery))
    params["paths"]["champion"] = str(work / "champion")
    params["serve"].update(champion=champion, port=port, upload_dir=str(work / "uploads"))
    params["index"]["milvus"]["uri"] = milvus_uri
    params["tracking"]["enabled"] = False
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return path


class Service:
    """``bentoml serve`` of bento/service.py over a params file, on 127.0.0.1."""

    def __init__(self, params: Path, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = start([str(VENV_BIN / "bentoml"), "serve", "bento.service:VisrecRecognition", "--host",
                              "127.0.0.1", "--port", str(port)], log, {"VISREC_PARAMS": str(params)})
        wait_for(lambda: requests.get(f"{self.url}/readyz", timeout=2).status_code == 200, "the service", 180,
                 self.process)

    def recognize(self, photo: Path, session: requests.Session | None = None) -> dict:
        with photo.open("rb") as handle:
            answer = (session or requests).post(f"{self.url}/recognize", files={"image": handle}, timeout=120)
        answer.raise_for_status()
        return answer.json()

    def close(self) -> None:
        stop(self.process)


def same_answer(a: list[dict], b: list[dict], tolerance: float) -> bool:
    return len(a) == len(b) and all(
        x["rec_docs"] == y["rec_docs"] and abs(x["rec_scores"] - y["rec_scores"]) <= tolerance
        and all(abs(p - q) <= 1e-3 for p, q in zip(x["bbox"], y["bbox"], strict=True))
        for x, y in zip(a, b, strict=True))


def copy_gallery(source: Path, target: Path, index_type: str | None) -> None:
    """The pipeline's gallery, as it is or re-indexed as ``index_type`` (same ids, labels, vectors)."""
    if index_type is None:
        shutil.copytree(source, target, symlinks=True)
        return
    from visrec.index import Gallery

    old = Gallery.load(source)
    vectors = {int(i): v for ids, chunk in old.vector_chunks() for i, v in zip(ids, chunk, strict=True)}
    if sorted(vectors) != list(range(old.next_id)):
        raise SystemExit(f"{source} has gaps in its ids: re-indexing would renumber them; use its own index type")
    new = Gallery.build([vectors[i] for i in range(old.next_id)], [old.label_of(i) for i in range(old.next_id)],
                        [dict(old.metadata_of(i)) for i in range(old.next_id)], index_type=index_type,
                        fingerprint=old.fingerprint, meta_extra=old.meta_extra)
    new.save(target)


def parity(args, work: Path, photos: list[Path], milvus_uri: str) -> dict:
    faiss_gallery, milvus_gallery = work / "faiss" / "gallery", work / "milvus" / "gallery"
    copy_gallery(REPO / "data" / "gallery", faiss_gallery, args.index_type)
    copy_gallery(REPO / "data" / "gallery", milvus_gallery, args.index_type)
    port = free_port()
    params = {name: write_params(work / f"params_{name}.yaml", work, gallery, milvus_uri, False, port)
              for name, gallery in (("faiss", faiss_gallery), ("milvus", milvus_gallery))}
    migrate = subprocess.run([str(VENV_BIN / "visrec"), "gallery", "migrate", "--to", "milvus", "--gallery",
                              str(milvus_gallery), "--params", str(params["milvus"])],
                             cwd=REPO, capture_output=True, text=True, check=False)
    if migrate.returncode:
        raise RuntimeError(f"visrec gallery migrate failed: {migrate.stderr}")
    print("migrated:", json.dumps(json.loads(migrate.stdout)["to"]))
    answers = {}
    for name in ("faiss", "milvus"):
        service = Service(params[name], port, work / f"service_{name}.log")
        try:
            start_time = time.perf_counter()
            answers[name] = [service.recognize(p)["results"] for p in photos]
            print(f"{name}: {len(photos)} photos in {time.perf_counter() - start_time:.1f} s")
        finally:
            service.close()
    diffs = [str(p) for p, a, b in zip(photos, answers["faiss"], answers["milvus"], strict=True)
             if not same_answer(a, b, args.tolerance)]
    max_delta = max((abs(x["rec_scores"] - y["rec_scores"]) for a, b in zip(answers["faiss"], answers["milvus"])
                     for x, y in zip(a, b) if x["rec_docs"] == y["rec_docs"]), default=0.0)
    results = sum(len(a) for a in answers["faiss"])
    print(f"parity: {len(photos) - len(diffs)}/{len(photos)} photos identical (labels, boxes, scores within "
          f"{args.tolerance}); {results} results; largest score difference {max_delta:.2e}")
    for photo in diffs[:5]:
        print("  differs:", photo)
    return {"photos": len(photos), "identical": len(photos) - len(diffs), "max_score_delta": max_delta,
            "milvus_params": params["milvus"]}


def promotion_under_load(args, work: Path, photos: list[Path], milvus_params: Path) -> dict:
    from visrec.index.factory import open_gallery
    from visrec.workflows.champion import publish_champion

    milvus_gallery, champion_root = work / "milvus" / "gallery", work / "champion"
    first = publish_champion(REPO / "data/export", milvus_gallery, champion_root, {"recall_at_1": 0.0, "run": "A"})
    # Champion B: the same models, its gallery without some labels, so its answers differ on their photos.
    candidate = open_gallery(milvus_gallery).working_copy()
    dropped = sorted(candidate.labels())[: args.drop_labels]
    for label in dropped:
        candidate.remove_label(label)
    candidate.save(work / "candidate_b" / "gallery")

    params = yaml.safe_load(milvus_params.read_text(encoding="utf-8"))
    params["serve"]["champion"] = True
    served = work / "params_champion.yaml"
    served.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    service = Service(served, params["serve"]["port"], work / "service_champion.log")
    try:
        expected_a = {p: service.recognize(p) for p in photos}
        versions_a = {a["gallery_version"] for a in expected_a.values()}
        local, lock, trigger = threading.local(), threading.Lock(), threading.Event()
        answers, errors, published = [], [], {}

        def promote() -> None:  # beside the clients, once a third of the requests are sent
            trigger.wait()
            start_time = time.perf_counter()
            published["name"] = publish_champion(REPO / "data/export", work / "candidate_b" / "gallery",
                                                 champion_root, {"recall_at_1": 0.1, "run": "B"})
            published["seconds"] = time.perf_counter() - start_time

        def one(i: int) -> None:
            if i == args.requests // 3:
                trigger.set()
            session = getattr(local, "session", None) or requests.Session()
            local.session = session
            photo = photos[i % len(photos)]
            try:
                answer = service.recognize(photo, session)
            except requests.RequestException as exc:
                with lock:
                    errors.append(f"{photo}: {exc}")
                return
            with lock:
                answers.append((photo, answer))

        promoter = threading.Thread(target=promote)
        promoter.start()
        start_time = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.requests)))
        seconds = time.perf_counter() - start_time
        promoter.join()
        expected_b = {p: service.recognize(p) for p in photos}
    finally:
        service.close()
    versions_b = {a["gallery_version"] for a in expected_b.values()}
    from_a = [(p, a) for p, a in answers if a["gallery_version"] in versions_a]
    from_b = [(p, a) for p, a in answers if a["gallery_version"] in versions_b]
    wrong = [p for p, a in from_a if not same_answer(a["results"], expected_a[p]["results"], args.tolerance)]
    wrong += [p for p, a in from_b if not same_answer(a["results"], expected_b[p]["results"], args.tolerance)]
    unknown = len(answers) - len(from_a) - len(from_b)
    differing = sum(not same_answer(expected_a[p]["results"], expected_b[p]["results"], args.tolerance)
                    for p in photos)
    print(f"promotion under load: {len(answers) + len(errors)} requests at {args.clients} clients in {seconds:.1f} s, "
          f"{len(errors)} errors; {len(from_a)} answers from champion A ({first}), {len(from_b)} from B "
          f"({published.get('name')}, published in {published.get('seconds', 0):.1f} s during the load), "
          f"{unknown} from neither gallery version, {len(wrong)} not equal to their champion's answer; "
          f"A and B differ on {differing} of {len(photos)} photos ({len(dropped)} labels dropped)")
    for line in errors[:5]:
        print("  error:", line)
    return {"requests": len(answers) + len(errors), "errors": len(errors), "from_a": len(from_a),
            "from_b": len(from_b), "unknown": unknown, "wrong": len(wrong)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--load-photos", type=int, default=50, help="distinct photos cycled by the load phase")
    parser.add_argument("--drop-labels", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--index-type", choices=["HNSW32", "IVF", "FLAT"],
                        help="re-index the pipeline's gallery first (FLAT: exact search on both backends)")
    parser.add_argument("--skip-load", action="store_true", help="only the parity part")
    parser.add_argument("--milvus-uri", help="an existing Milvus server (default: Milvus Lite started here)")
    args = parser.parse_args()
    queries = REPO / "data" / "index" / "queries.jsonl"
    if not (queries.is_file() and (REPO / "data" / "gallery").is_dir() and (REPO / "data" / "export").is_dir()):
        raise SystemExit("needs the pipeline's outputs (data/export, data/gallery, data/index): run `make repro`")
    photos = [REPO / json.loads(line)["path"] for line in queries.read_text(encoding="utf-8").splitlines()]
    photos = photos[: args.photos]
    work = REPO / "data" / "parity"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server = None
    uri = args.milvus_uri
    if uri is None:
        port = free_port()
        server = start([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(work / "milvus.db"),
                        "--host", "127.0.0.1", "--port", str(port)], work / "milvus.log", {"OMP_NUM_THREADS": "2"})
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None,
                 "Milvus Lite", 60, server)
        uri = f"http://127.0.0.1:{port}"
    try:
        found = parity(args, work, photos, uri)
        milvus_params = found.pop("milvus_params")
        under_load = None if args.skip_load else promotion_under_load(args, work, photos[: args.load_photos],
                                                                       milvus_params)
    finally:
        if server is not None:
            stop(server, signal.SIGINT)
    print(json.dumps({"parity": found, "promotion_under_load": under_load}))


if __name__ == "__main__":
    main()
