"""Retrieval on a real CUB_200_2011 folder: the pretrained backbone zero-shot, then fine-tuned.

Runs the pipeline's own steps (download from a local source, split, train_extractor, export,
evaluate) in a work folder, with the params file + overrides, and prints recall@1, recall@5,
mAP, MAP@R, training time and images/s for each model:

    .venv/bin/python bench/bench_real_data.py ../shared/data/cub_subset/CUB_200_2011 --train-classes 25
    .venv/bin/python bench/bench_real_data.py /data/CUB_200_2011 --train-classes 100 --epochs 0   # zero-shot only
    .venv/bin/python bench/bench_real_data.py DIR -o extractor.image.size=160 -o extractor.epochs=4
    .venv/bin/python bench/bench_real_data.py DIR --train-classes 25 --seeds 0,1,2   # mean ± sd over seeds

The zero-shot model is the pretrained backbone's pooled features (no neck, no training) with the
recipe's pooling. The fine-tuned one uses the `extractor` params of ``params.yaml`` (the default
recipe; ``-o`` changes any of it) with `eval_before_training` on, so its best model is never
worse than its starting point, which (neck null) is that same zero-shot model.

Each fine-tuning run reports its best evaluated epoch and its last one. The best is picked on
the same unseen-class queries it is scored on (the CUB protocol has no validation split), so it
is optimistic; with ``--seeds`` the mean ± sd over seeds of both is the figure to quote.
``per_class_recall.csv`` / ``.png`` in the work folder compare recall@1 per test species.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from visrec.config import load_config
from visrec.data.cub import CUB_DIRNAME, read_cub
from visrec.data.download import materialize
from visrec.data.split import write_split
from visrec.evaluation.retrieval_eval import evaluate_extractor
from visrec.inference.export import export_extractor
from visrec.models.extractor import build_rec_model
from visrec.training.extractor_training import load_trained, model_config, run_training
from visrec.utils.logs import setup_logging

KEYS = ("recall@1", "recall@5", "mAP", "MAP@R")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cub_dir", help="a CUB_200_2011 folder (or its parent, or a .tgz)")
    parser.add_argument("--train-classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (0: zero-shot only)")
    parser.add_argument("--work", type=Path, default=None, help="keep outputs here (default: a temp folder)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, one fine-tuning run each "
                        "(default: extractor.seed)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()
    setup_logging("INFO")
    work = args.work or Path(tempfile.mkdtemp(prefix="visrec-real-"))
    paths = {k: str(work / k) for k in ("raw", "downloads", "split", "extractor", "export", "evaluate", "metrics")}
    overrides = [f"data.source={args.cub_dir}", f"split.train_classes={args.train_classes}",
                 *[f"paths.{k}={v}" for k, v in paths.items()], *args.override]
    if args.epochs is not None:
        overrides.append(f"extractor.epochs={max(args.epochs, 1)}")
    cfg = load_config(args.params, overrides)
    ext = cfg.extractor
    raw_root = Path(cfg.paths.raw) / CUB_DIRNAME
    if not (raw_root / "images.txt").exists():
        materialize(cfg.data, Path(cfg.paths.raw), Path(cfg.paths.downloads))
    write_split(read_cub(raw_root), cfg.split.train_classes, Path(cfg.paths.split))
    rows = []

    def evaluate(name: str, export_dir: Path, model_cfg: dict, seconds: float, img_per_s: float | None) -> None:
        start = time.perf_counter()
        metrics = evaluate_extractor(export_dir, model_cfg, raw_root, Path(cfg.paths.split), work / f"eval_{name}",
                                     num_threads=cfg.runtime.num_threads, baseline=False)
        rows.append({"model": name, **{k: metrics[k] for k in KEYS}, "train_min": round(seconds / 60, 1),
                     "train_img_s": img_per_s, "eval_s": round(time.perf_counter() - start, 1),
                     "queries": metrics["num_queries"]})

    zero_cfg = model_config(ext, class_num=cfg.split.train_classes)
    zero_cfg = {**zero_cfg, "neck": None, "head": None}
    variants = [("zero-shot", zero_cfg)]
    if ext.backbone.get("pool", "avg") != "avg":  # also the plain average-pooled features, for reference
        plain = {k: v for k, v in ext.backbone.items() if k not in ("pool", "gem_p", "gem_learnable")}
        variants.insert(0, ("zero-shot (average pooling)", {**zero_cfg, "backbone": plain}))
    for name, variant in variants:
        zero = build_rec_model(variant["backbone"], None, None, variant["class_num"])
        export_extractor(zero, variant, work / f"export_{name.split()[0]}_{len(name)}", onnx=False)
        evaluate(name, work / f"export_{name.split()[0]}_{len(name)}", variant, 0.0, None)

    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [ext.seed]
    tuned_names = []
    for seed in seeds if args.epochs != 0 else []:
        run_dir = Path(cfg.paths.extractor) if len(seeds) == 1 else Path(f"{cfg.paths.extractor}_seed{seed}")
        start = time.perf_counter()
        summary = run_training(dataclasses.replace(ext, seed=seed), raw_root, Path(cfg.paths.split), run_dir,
                               Path(cfg.paths.metrics) / f"train_extractor_seed{seed}.json")
        seconds = time.perf_counter() - start
        history = read_history(run_dir / "history.csv")
        speeds = [float(r["images_per_s"]) for r in history if r.get("images_per_s")]
        images_per_s = round(sum(speeds) / len(speeds), 1) if speeds else None
        model, tuned_cfg = load_trained(run_dir, "best_model")
        name = f"fine-tuned seed {seed}"
        export_extractor(model, tuned_cfg, work / f"export_fine_tuned_seed{seed}", onnx=False)
        evaluate(name, work / f"export_fine_tuned_seed{seed}", tuned_cfg, seconds, images_per_s)
        evaluated = [r for r in history if int(r["epoch"]) > 0 and r.get("val_recall@1")]
        rows[-1]["best_epoch"] = summary["best_epoch"]
        rows[-1]["per_epoch_recall@1"] = {int(r["epoch"]): float(r["val_recall@1"]) for r in evaluated}
        rows[-1]["last_recall@1"] = float(evaluated[-1]["val_recall@1"]) if evaluated else None
        tuned_names.append(name)

    print(f"\n{args.cub_dir}: train classes 1-{cfg.split.train_classes}, test the rest; "
          f"{ext.backbone}, {ext.image.size} px, box crops {ext.image.crop_to_bbox}\n")
    print("| model | recall@1 | recall@5 | mAP | MAP@R | recall@1 per evaluated epoch | training min | train img/s |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        best = f" (best epoch {r['best_epoch']})" if "best_epoch" in r else ""
        epochs = " / ".join(f"{e}: {v:.3f}" for e, v in r.get("per_epoch_recall@1", {}).items()) or "-"
        print(f"| {r['model']}{best} | {r['recall@1']:.4f} | {r['recall@5']:.4f} | {r['mAP']:.4f} | {r['MAP@R']:.4f} | "
              f"{epochs} | {r['train_min']} | {r['train_img_s'] or '-'} |")
    tuned = [r for r in rows if r["model"] in tuned_names]
    if len(tuned) > 1:
        print(f"\nover {len(tuned)} seeds (mean ± sd):")
        for label, values in (("best epoch recall@1", [r["recall@1"] for r in tuned]),
                              ("last epoch recall@1", [r["last_recall@1"] for r in tuned if r["last_recall@1"] is not None]),
                              ("best epoch mAP", [r["mAP"] for r in tuned])):
            if len(values) > 1:
                print(f"  {label}: {statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
    compare_per_class(work, ["zero-shot", *tuned_names])
    (work / "bench_real_data.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\noutputs in {work}")


def read_history(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def compare_per_class(work: Path, names: list[str]) -> None:
    """per_class_recall.csv/.png: recall@1 of each test species, zero-shot beside fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    tables = {}
    for name in names:
        with (work / f"eval_{name}" / "per_class_recall.csv").open(newline="") as f:
            tables[name] = {r["class_name"]: r for r in csv.DictReader(f)}
    classes = sorted(tables[names[0]], key=lambda c: float(tables[names[0]][c]["recall@1"]))
    with (work / "per_class_recall.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class_name", "images", *names])
        for c in classes:
            writer.writerow([c, tables[names[0]][c]["images"], *(tables[n][c]["recall@1"] for n in names)])
    height = max(3.0, 0.25 * len(classes))
    fig, ax = plt.subplots(figsize=(8, height))
    bar = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.barh([k + i * bar for k in range(len(classes))], [float(tables[name][c]["recall@1"]) for c in classes],
                height=bar, label=name)
    ax.set_yticks([k + 0.4 - bar / 2 for k in range(len(classes))], classes, fontsize=7)
    ax.set_xlabel("recall@1 (query = gallery, self excluded)")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(work / "per_class_recall.png", dpi=110)
    plt.close(fig)
    print(f"\nhardest test species, recall@1 ({' | '.join(names)}):")
    for c in classes[:8]:
        print(f"  {c}: " + " | ".join(f"{float(tables[n][c]['recall@1']):.2f}" for n in names))


if __name__ == "__main__":
    main()
