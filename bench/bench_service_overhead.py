"""What the service adds to its models: crops/s through ``/recognize`` vs the extractor's own batch-32 images/s.

Issue 18's bar: at 16 clients, ``/recognize`` embeds crops at >= 0.7x the exported extractor's
own batch-32 images/s on the same machine, in one run. Both sides use the models of
``params.yaml``'s ``recognition`` section (``make repro`` makes them):

- the extractor alone: ``Extractor.embed`` on batches of 32 photos (its own preprocessing
  included), images/s;
- the service: ``bentoml serve`` of bento/service.py on 127.0.0.1, ``--clients`` threads each
  posting photos to ``/recognize``; crops/s = the crops those photos make (detections + the
  whole photo, counted with the same detector and settings in this process) / wall time.

The two are measured alternately, ``--rounds`` times (the service idles while the extractor
runs), and the medians are compared.

    make repro
    .venv/bin/python bench/bench_service_overhead.py ../shared/data/cub_subset/CUB_200_2011/images
    .venv/bin/python bench/bench_service_overhead.py PHOTOS --photos 400 --clients 16 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import yaml

from bench_backend_parity import REPO, Service, free_port
from visrec.config import load_config
from visrec.imaging import load_image
from visrec.inference.pipeline import load_detector, load_extractor

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


def service_photos_per_s(service: Service, photos: list[Path], clients: int) -> tuple[float, int]:
    local = threading.local()
    errors = 0
    lock = threading.Lock()

    def send(photo: Path) -> None:
        nonlocal errors
        if not hasattr(local, "session"):
            local.session = requests.Session()
        try:
            service.recognize(photo, local.session)
        except requests.RequestException:
            with lock:
                errors += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, photos))
    return len(photos) / (time.perf_counter() - start), errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos_dir", type=Path, help="a folder of photos (searched recursively)")
    parser.add_argument("--photos", type=int, default=320)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = parser.parse_args()

    cfg = load_config(args.params)
    rec = cfg.recognition
    photos = pick_photos(args.photos_dir, args.photos)
    images = [load_image(p) for p in photos]
    extractor, detector = load_extractor(rec), load_detector(rec)
    crops = 0
    for image in images:  # what the service will embed: detections above det_threshold + the whole photo
        dets = detector.detect_arrays([image])[0] if detector is not None else np.zeros((0, 5))
        kept = dets[dets[:, 4] >= rec.det_threshold][: rec.max_det]
        crops += len(kept) + (1 if detector is None or rec.whole_image_box or len(kept) == 0 else 0)
    print(f"{len(photos)} photos, {crops} crops ({crops / len(photos):.2f} a photo); extractor {rec.extractor}, "
          f"detector {rec.detector}, backend {rec.backend}")

    with tempfile.TemporaryDirectory(prefix="visrec-overhead-") as tmp:
        params = yaml.safe_load(args.params.read_text(encoding="utf-8"))
        for key in ("extractor", "detector", "gallery"):
            if params["recognition"][key]:
                params["recognition"][key] = str((REPO / params["recognition"][key]).resolve())
        port = free_port()
        params["serve"].update(champion=False, port=port, upload_dir=str(Path(tmp) / "uploads"))
        params["tracking"]["enabled"] = False
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
        service = Service(params_file, port, Path(tmp) / "service.log")
        try:
            service_photos_per_s(service, photos[: args.clients * 2], args.clients)  # warm-up
            own, served = [], []
            for round_no in range(1, args.rounds + 1):
                own.append(extractor_images_per_s(extractor, images))
                photos_per_s, errors = service_photos_per_s(service, photos, args.clients)
                served.append(photos_per_s * crops / len(photos))
                print(f"round {round_no}: extractor batch-32 {own[-1]:.1f} img/s; /recognize at {args.clients} "
                      f"clients {photos_per_s:.1f} photos/s = {served[-1]:.1f} crops/s; errors {errors}",
                      flush=True)
        finally:
            service.close()
    ratio = statistics.median(served) / statistics.median(own)
    print(f"\nmedian: extractor {statistics.median(own):.1f} img/s, service {statistics.median(served):.1f} "
          f"crops/s: ratio {ratio:.2f} (bar >= 0.70)")


if __name__ == "__main__":
    sys.exit(main())
