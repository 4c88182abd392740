"""Image classification on a real CUB_200_2011 folder: fine-tune the pretrained backbone with
CUB's own train/test split over all its classes, then report top-1 / top-5.

Uses the `classify` params (efficientnet_lite0 with ImageNet weights by default) with the data
pointed at the folder and every output in a work folder; `-o` overrides anything:

    .venv/bin/python bench/bench_classify.py ../shared/data/cub_subset/CUB_200_2011 --work /tmp/cls
    .venv/bin/python bench/bench_classify.py DIR -o classify.epochs=4 -o classify.image.crop_to_bbox=true
    .venv/bin/python bench/bench_classify.py DIR --export     # + export, and top-1 through Paddle Inference

Prints top-1 / top-5 of the best checkpoint (by validation top-1), training minutes and
training images/s; writes bench_classify.json, the run and the evaluation report to the work folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from visrec.classification.evaluate import evaluate_classifier
from visrec.classification.predict import export_run
from visrec.classification.train import run_training
from visrec.config import load_config
from visrec.utils.logs import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cub_dir", help="a CUB_200_2011 folder (or its parent)")
    parser.add_argument("--work", type=Path, default=None, help="keep outputs here (default: a temp folder)")
    parser.add_argument("--export", action="store_true", help="also export and evaluate the exported model")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()
    setup_logging("INFO")
    work = args.work or Path(tempfile.mkdtemp(prefix="visrec-classify-"))
    overrides = ["classify.data.type=cub", f"classify.data.root={args.cub_dir}",
                 f"classify.out={work / 'classify'}", f"classify.export={work / 'export'}", *args.override]
    cfg = load_config(args.params, overrides).classify

    start = time.perf_counter()
    summary = run_training(cfg, metrics_file=work / "train_summary.json")
    minutes = (time.perf_counter() - start) / 60
    rows = [{"model": f"checkpoint ({cfg.checkpoint}, epoch {summary['best_epoch']})",
             **_eval(lambda: evaluate_classifier(cfg))}]
    if args.export:
        export_run(cfg.out, cfg.export, cfg.checkpoint, onnx=cfg.onnx)
        rows.append({"model": f"exported ({cfg.backend})", **_eval(lambda: evaluate_classifier(cfg, exported=True))})

    print(f"\n{args.cub_dir}: {cfg.backbone}, {cfg.image.size} px, box crops {cfg.image.crop_to_bbox}, "
          f"frozen units {cfg.frozen_units}, {summary['epochs']} epochs\n")
    print("| model | top-1 | top-5 | val images | classes | eval s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['top1']:.4f} | {r['top5']:.4f} | {r['images']} | {r['classes']} | {r['eval_s']} |")
    print(f"\ntraining: {minutes:.1f} min (with {summary['epochs'] // cfg.eval_every} evaluations), "
          f"{summary['images_per_s']} train img/s")
    (work / "bench_classify.json").write_text(json.dumps(
        {"rows": rows, "train_minutes": round(minutes, 2), "summary": summary}, indent=2) + "\n")
    print(f"outputs in {work}")


def _eval(run) -> dict:
    start = time.perf_counter()
    metrics = run()
    return {**metrics, "eval_s": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":
    main()
