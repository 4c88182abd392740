"""EfficientNet-Lite0 backbone (ImageNet weights) throughput: dygraph vs exported Paddle
Inference (oneDNN) and ONNX Runtime, pooled 1280-d features. Prints a table.

    .venv/bin/python bench/bench_efficientnet_lite.py                  # batch 32, 224 px, 2 threads
    .venv/bin/python bench/bench_efficientnet_lite.py --batch 8 --size 160
    .venv/bin/python bench/bench_efficientnet_lite.py --eager-threads 2   # OMP threads for dygraph

Paddle pins OMP_NUM_THREADS=1 at import when it is unset, so dygraph runs on one thread by
default; ``--eager-threads`` sets it before Paddle is imported. The exported predictors get
``--threads`` explicitly.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager-threads", type=int, default=None, help="OMP_NUM_THREADS for dygraph")
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    if args.eager_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.eager_threads)
    import paddle  # after OMP_NUM_THREADS: Paddle reads it at import

    from visrec.inference.export import export_layer
    from visrec.inference.predictors import Predictor
    from visrec.models.registry import create_backbone
    from visrec.utils.logs import setup_logging
    from visrec.utils.timing import rate

    setup_logging("WARNING")
    eager_threads = os.environ.get("OMP_NUM_THREADS", "?")

    model = create_backbone("efficientnet_lite0", pretrained="imagenet")
    model.eval()
    inputs = np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, args.size, args.size)).astype("float32")
    tensor = paddle.to_tensor(inputs)

    def eager():
        with paddle.no_grad():
            model(tensor).numpy()

    rows = [(f"dygraph (OMP threads {eager_threads})", rate(eager, args.batch, args.repeats))]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m"
        export_layer(model, out, [None, 3, args.size, args.size], {"kind": "backbone"}, onnx=not args.no_onnx)
        backends = ["paddle"] + ([] if args.no_onnx else ["onnx"])
        for backend in backends:
            pred = Predictor(out, backend=backend, num_threads=args.threads)
            name = "Paddle Inference (oneDNN)" if backend == "paddle" else "ONNX Runtime"
            rows.append((name, rate(lambda p=pred: p(inputs), args.batch, args.repeats * 2)))

    base = rows[0][1]
    print(f"\nEfficientNet-Lite0 pooled features, batch {args.batch}, {args.size} px, {args.threads} threads")
    print(f"{'path':<30}{'img/s':>10}{'x eager':>10}")
    for name, value in rows:
        print(f"{name:<30}{value:>10.1f}{value / base:>10.2f}")


if __name__ == "__main__":
    main()
