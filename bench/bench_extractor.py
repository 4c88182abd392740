"""Extractor throughput: training img/s, and inference img/s at batch 1 and 32 for
dygraph, Paddle Inference (oneDNN) and ONNX Runtime. Prints a table.

    .venv/bin/python bench/bench_extractor.py                       # params.yaml's extractor
    .venv/bin/python bench/bench_extractor.py -o extractor.image.size=128 -o extractor.backbone.scale=1.0
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import paddle

from visrec.config import load_config
from visrec.inference.export import export_extractor
from visrec.inference.predictors import Predictor
from visrec.models.losses import build_loss
from visrec.training.extractor_training import build_model, model_config
from visrec.utils.logs import setup_logging
from visrec.utils.timing import rate



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-o", "--override", action="append", default=[])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    setup_logging("WARNING")
    cfg = load_config(args.params, args.override).extractor
    size = cfg.image.size
    batch = cfg.sampler.classes_per_batch * cfg.sampler.images_per_class
    rng = np.random.default_rng(0)

    model = build_model(cfg, class_num=args.classes)
    loss_fn = build_loss(cfg.losses)
    opt = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
    x = paddle.to_tensor(rng.normal(size=(batch, 3, size, size)).astype("float32"))
    labels = np.repeat(np.arange(cfg.sampler.classes_per_batch), cfg.sampler.images_per_class)
    y = paddle.to_tensor(labels.astype("int64"))

    def train_step():
        loss, _ = loss_fn(model(x, y), y)
        loss.backward()
        opt.step()
        opt.clear_grad()

    model.train()
    rows = [("training (dygraph)", batch, rate(train_step, batch, 5))]
    model.eval()
    for b in (1, 32):
        inputs = rng.normal(size=(b, 3, size, size)).astype("float32")
        tensor = paddle.to_tensor(inputs)

        def eager(t=tensor):
            with paddle.no_grad():
                model.embed(t)

        rows.append(("inference dygraph", b, rate(eager, b, 20 if b == 1 else 5)))
    with tempfile.TemporaryDirectory() as tmp:
        export_extractor(model, model_config(cfg, args.classes), Path(tmp) / "m")
        for backend in ("paddle", "onnx"):
            pred = Predictor(Path(tmp) / "m", backend=backend, num_threads=args.threads)
            for b in (1, 32):
                inputs = rng.normal(size=(b, 3, size, size)).astype("float32")
                rows.append((f"inference {'Paddle Inference' if backend == 'paddle' else 'ONNX Runtime'}", b,
                             rate(lambda i=inputs: pred(i), b, 50 if b == 1 else 10)))

    print(f"\nextractor {cfg.backbone} at {size}px, {args.threads} threads")
    print(f"{'what':<32}{'batch':>6}{'img/s':>10}")
    for what, b, r in rows:
        print(f"{what:<32}{b:>6}{r:>10.1f}")


if __name__ == "__main__":
    main()
