"""What the service adds to its models: crops/s through ``/recognize`` vs the extractor's own batch-32 images/s.

Issue 18's bar: at 16 clients, ``/recognize`` embeds crops at >= 0.7x the exported extractor's
own batch-32 images/s on the same machine, in one run. Both sides use the models of
``params.yaml``'s ``recognition`` section (``make repro`` makes them):

- the extractor alone: ``Extractor.embed`` on batches of 32 photos (its own preprocessing
  included), images/s;
- the service: ``bentoml serve`` of bento/service.py on 127.0.0.1, ``--clients`` threads each
  posting photos to ``/recognize`` (bodies encoded once, keep-alive connections: the clients
  share the cores); crops/s = the crops those photos make (the boxes the same recognition
  system gives them in this process, its cascade included) / wall time.

The two are measured alternately, ``--rounds`` times (the service idles while the extractor
runs), and the medians are compared. A third figure says what HTTP costs: the same recognition
(decode, detect, embed, search) in as many processes, with as many threads, as the service's
workers, called in-process.

    make repro
    .venv/bin/python bench/bench_service_overhead.py ../shared/data/cub_subset/CUB_200_2011/images
    .venv/bin/python bench/bench_service_overhead.py PHOTOS --photos 400 --clients 16 --rounds 3
    .venv/bin/python bench/bench_service_overhead.py PHOTOS --workers 2 --request-threads 1   # other serving set-ups
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from bench_backend_parity import REPO, Service, free_port
from bench_service import KeepAliveClient
from visrec.config import load_config
from visrec.imaging import load_image
from visrec.inference.pipeline import RecognitionSystem

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def pick_photos(folder: Path, count: int) -> list[Path]:
    photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise SystemExit(f"no .jpg/.png photo under {folder}")
    step = max(1, len(photos) // count)  # spread over every class folder, not the first few
    return photos[::step][:count]


def extractor_images_per_s(extractor, images: list[np.ndarray], batch: int = 32) -> float:
    extractor.embed(images[:batch])  # warm-up: first-call allocations are not throughput
    start = time.perf_counter()
    done = 0
    for first in range(0, len(images) - batch + 1, batch):
        extractor.embed(images[first:first + batch])
        done += batch
    return done / (time.perf_counter() - start)


def _in_process_share(task: tuple[str, int, list[str]]) -> int:
    """One process of the in-process figure: load the system, recognise its photos (decode included)."""
    import dataclasses

    from visrec.config import load_config as load
    from visrec.inference.pipeline import RecognitionSystem
    from visrec.serving.images import decode_image

    params, threads, paths = task
    rec = dataclasses.replace(load(params).recognition, num_threads=threads)
    system = RecognitionSystem.from_config(rec)
    blobs = [Path(path).read_bytes() for path in paths]
    system.predict(decode_image(blobs[0], 1 << 30, 1 << 30).array)  # warm-up
    barrier.wait()
    for blob in blobs:
        system.predict(decode_image(blob, 1 << 30, 1 << 30).array)
    return len(blobs)


def _init_share(shared_barrier) -> None:
    global barrier
    barrier = shared_barrier


def in_process_photos_per_s(params: Path, photos: list[Path], processes: int, threads: int) -> float:
    """The same recognition with no HTTP: ``processes`` processes of ``RecognitionSystem.predict``.

    Timed from the moment every process has loaded its models (a barrier) to the last photo.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start_barrier = context.Barrier(processes + 1)
    shares = [[str(p) for p in photos[i::processes]] for i in range(processes)]
    pool = context.Pool(processes, initializer=_init_share, initargs=(start_barrier,))
    pending = pool.map_async(_in_process_share, [(str(params), threads, share) for share in shares])
    start_barrier.wait()
    start = time.perf_counter()
    done = sum(pending.get())
    elapsed = time.perf_counter() - start
    pool.close()  # not terminate(): Paddle prints a fatal-error banner on SIGTERM
    pool.join()
    return done / elapsed


def service_photos_per_s(service: Service, bodies: list[tuple[bytes, str]], clients: int
                         ) -> tuple[float, int, float]:
    """Photos/s of ``clients`` threads posting the bodies (:class:`KeepAliveClient`), the number
    of failed requests, and the clients' own CPU ms a request."""
    client = KeepAliveClient(service.url, 120.0)
    errors = 0
    lock = threading.Lock()

    def send(body: tuple[bytes, str]) -> None:
        nonlocal errors
        try:
            ok = client.post("/recognize", body)[0] == 200
        except (OSError, http.client.HTTPException):
            ok = False
        if not ok:
            with lock:
                errors += 1

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, bodies))
    elapsed = time.perf_counter() - start
    client_cpu_ms = (time.process_time() - cpu) / len(bodies) * 1000
    return len(bodies) / elapsed, errors, client_cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos_dir", type=Path, help="a folder of photos (searched recursively)")
    parser.add_argument("--photos", type=int, default=320)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--workers", type=int, default=None, help="serve.workers (default: the params file's)")
    parser.add_argument("--model-threads", type=int, default=None, help="serve.model_threads (default: params)")
    parser.add_argument("--no-in-process", action="store_true",
                        help="skip the third figure: the same recognition in-process, without HTTP")
    parser.add_argument("--request-threads", type=int, default=None, help="serve.request_threads (default: params)")
    args = parser.parse_args()

    cfg = load_config(args.params)
    rec = cfg.recognition
    photos = pick_photos(args.photos_dir, args.photos)
    images = [load_image(p) for p in photos]
    system = RecognitionSystem.from_config(rec)
    extractor = system.extractor
    # What the service will embed: the same system's boxes for each photo, in the served gallery
    # (the cascade, recognition.detect_unless_whole_margin, searches it before detecting).
    crops = sum(len(system.describe(image)[0]) for image in images)
    print(f"{len(photos)} photos, {crops} crops ({crops / len(photos):.2f} a photo); extractor {rec.extractor}, "
          f"detector {rec.detector}, backend {rec.backend}, gallery {rec.gallery}")
    bodies = KeepAliveClient.bodies([p.read_bytes() for p in photos])

    with tempfile.TemporaryDirectory(prefix="visrec-overhead-") as tmp:
        params = yaml.safe_load(args.params.read_text(encoding="utf-8"))
        for key in ("extractor", "detector", "gallery"):
            if params["recognition"][key]:
                params["recognition"][key] = str((REPO / params["recognition"][key]).resolve())
        port = free_port()
        params["serve"].update(champion=False, port=port, upload_dir=str(Path(tmp) / "uploads"))
        for key, value in (("workers", args.workers), ("model_threads", args.model_threads),
                           ("request_threads", args.request_threads)):
            if value is not None:
                params["serve"][key] = value
        print("service: " + ", ".join(f"{key} {params['serve'].get(key)}"
                                      for key in ("workers", "model_threads", "request_threads")), flush=True)
        params["tracking"]["enabled"] = False
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
        from visrec.serving.api import ServeSettings

        served_cfg = ServeSettings.from_env({"VISREC_PARAMS": str(params_file)})
        workers, threads = served_cfg.workers, served_cfg.config.recognition.num_threads
        service = Service(params_file, port, Path(tmp) / "service.log")
        try:
            service_photos_per_s(service, bodies[: args.clients * 2], args.clients)  # warm-up
            own, served, direct = [], [], []
            for round_no in range(1, args.rounds + 1):
                own.append(extractor_images_per_s(extractor, images))
                photos_per_s, errors, client_ms = service_photos_per_s(service, bodies, args.clients)
                served.append(photos_per_s)
                if not args.no_in_process:
                    direct.append(in_process_photos_per_s(params_file, photos, workers, threads))
                print(f"round {round_no}: extractor batch-32 {own[-1]:.1f} img/s; /recognize at {args.clients} "
                      f"clients {photos_per_s:.1f} photos/s = {photos_per_s * crops / len(photos):.1f} crops/s; "
                      f"errors {errors}; the clients' own CPU {client_ms:.1f} ms a request" + (f"; in-process ({workers} x {threads} thread(s), no HTTP) "
                                            f"{direct[-1]:.1f} photos/s" if direct else ""), flush=True)
        finally:
            service.close()
    crops_per_s = statistics.median(served) * crops / len(photos)
    ratio = crops_per_s / statistics.median(own)
    print(f"\nmedian: extractor {statistics.median(own):.1f} img/s, service {crops_per_s:.1f} "
          f"crops/s: ratio {ratio:.2f} (bar >= 0.70)")
    if direct:
        print(f"the same recognition in-process, no HTTP: {statistics.median(direct):.1f} photos/s; the service "
              f"serves {statistics.median(served) / statistics.median(direct):.2f}x that")


if __name__ == "__main__":
    sys.exit(main())
