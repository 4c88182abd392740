"""Per-image latency of the recognition system, split into detect / extract / search / the rest.

Two settings: 1 box per image (no detector: the whole image is the object) and 5 boxes
(detector threshold 0, 4 detections + the whole image). "rest" is everything else the
pipeline does (decode is excluded: images are decoded before timing; crops, resizing,
thresholding, NMS, building the JSON). Needs the outputs of `make repro` (exports + gallery).

    .venv/bin/python bench/bench_recognition.py
    .venv/bin/python bench/bench_recognition.py --images 200 -o recognition.backend=onnx
"""

from __future__ import annotations

import argparse
import dataclasses

from visrec.config import load_config
from visrec.imaging import load_image
from visrec.evaluation.system_eval import QUERIES_FILE, read_queries
from visrec.inference.pipeline import RecognitionSystem
from visrec.utils.logs import setup_logging


def measure(system: RecognitionSystem, images, repeats: int) -> dict[str, float]:
    for image in images[:5]:
        system.predict(image)  # warm-up: oneDNN primitive caches for each input shape
    system.timings = type(system.timings)()
    for _ in range(repeats):
        for image in images:
            system.predict(image)
    return system.timings.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-o", "--override", action="append", default=[])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    setup_logging("WARNING")
    cfg = load_config(args.params, args.override)
    queries = read_queries(f"{cfg.paths.index}/{QUERIES_FILE}")[: args.images]
    images = [load_image(q.path) for q in queries]

    settings = {
        "1 box (no detector)": dataclasses.replace(cfg.recognition, detector=None),
        "5 boxes (4 detections + whole image)": dataclasses.replace(cfg.recognition, det_threshold=0.0, max_det=4),
    }
    print(f"\n{len(images)} query images x {args.repeats}, backend {cfg.recognition.backend}, "
          f"{cfg.recognition.num_threads} threads; milliseconds per image\n")
    print("| setting | boxes/img | detect | extract | search | rest | total | rest share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rec_cfg in settings.items():
        system = RecognitionSystem.from_config(rec_cfg)
        t = measure(system, images, args.repeats)
        n = t["images"]
        ms = {k: 1000 * t[k] / n for k in ("detect", "extract", "search", "rest", "total")}
        print(f"| {name} | {t['boxes'] / n:.1f} | {ms['detect']:.2f} | {ms['extract']:.2f} | {ms['search']:.3f} | "
              f"{ms['rest']:.2f} | {ms['total']:.2f} | {100 * ms['rest'] / ms['total']:.1f}% |")


if __name__ == "__main__":
    main()
