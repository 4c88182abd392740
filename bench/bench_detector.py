"""Detector throughput at the default input size: images/s for dygraph, Paddle Inference
(oneDNN) and ONNX Runtime, at batch 1 and 8, network only (dense outputs, before NMS),
plus the whole exported ``Detector`` call (preprocess + network + NMS) on one image.

    .venv/bin/python bench/bench_detector.py                         # params.yaml's detector
    .venv/bin/python bench/bench_detector.py -o detector.image.size=160
    .venv/bin/python bench/bench_detector.py --export data/export/detector   # a trained export

Without --export a freshly initialised detector (BN statistics warmed on noise) is exported
to a temporary folder: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import paddle

from visrec.config import load_config
from visrec.inference.detector_runtime import Detector, dygraph_predict_fn, export_detector
from visrec.inference.predictors import Predictor
from visrec.training.detector import build_model, model_config
from visrec.utils.logs import setup_logging
from visrec.utils.timing import rate



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-o", "--override", action="append", default=[])
    parser.add_argument("--export", type=Path, default=None, help="an exported detector to time instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    setup_logging("WARNING")
    cfg = load_config(args.params, args.override).detector
    size = cfg.image.size
    rng = np.random.default_rng(0)

    model = build_model(cfg)
    model.train()
    with paddle.no_grad():
        for _ in range(3):
            model(paddle.to_tensor(rng.normal(size=(4, 3, size, size)).astype("float32")))
    model.eval()
    export_dir = args.export
    tmp = None
    if export_dir is None:
        tmp = tempfile.TemporaryDirectory()
        export_dir = Path(tmp.name) / "detector"
        export_detector(model, model_config(cfg), export_dir, onnx=True)

    rows = []
    dygraph = dygraph_predict_fn(model)
    for batch in (1, 8):
        x = rng.normal(size=(batch, 3, size, size)).astype("float32")
        rows.append(("dygraph", batch, rate(lambda: dygraph(x), batch, args.repeats)))
        for backend in ("paddle", "onnx"):
            predictor = Predictor(export_dir, backend=backend, num_threads=args.threads)
            rows.append((f"{backend} (exported)", batch, rate(lambda: predictor(x), batch, args.repeats)))
    image = rng.integers(0, 255, size=(375, 500, 3), dtype=np.uint8)  # a typical CUB photo size
    detector = Detector(export_dir, num_threads=args.threads)
    rows.append(("Detector() end to end, 500x375 photo", 1, rate(lambda: detector(image), 1, args.repeats)))

    print(f"\ndetector {cfg.backbone} FPN {cfg.neck_channels} ch, input {size} px, {args.threads} threads\n")
    print(f"| {'path':<40} | batch | img/s |")
    print(f"|{'-' * 42}|-------|-------|")
    for name, batch, value in rows:
        print(f"| {name:<40} | {batch:>5} | {value:>5.1f} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
