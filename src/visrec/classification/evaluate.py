"""The classifier's evaluation report: top-1 / top-5, per-class accuracy CSV, confusion matrix
(CSV + PNG) and a flat metrics JSON, for a checkpoint or the exported model (the figures
themselves are :mod:`visrec.classification.scoring`'s).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from visrec.classification.data import ClassificationDataset, load_split
from visrec.classification.predict import ClassifierPredictor
from visrec.classification.scoring import classification_metrics, confusion_matrix, predict_probs
from visrec.utils.fs import write_json

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class_accuracy.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in workers and CI
    import matplotlib.pyplot as plt

    count = len(class_names)
    totals = matrix.sum(axis=1, keepdims=True)
    # Row-normalised, so rare classes are as visible as frequent ones.
    rates = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)
    side = min(4 + 0.18 * count, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    if count <= 60:  # beyond that, names are unreadable: ids on the axes are enough
        ax.set_xticks(range(count), class_names, rotation=90, fontsize=6)
        ax.set_yticks(range(count), class_names, fontsize=6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix (row-normalised), top-1 {np.trace(matrix) / max(1, matrix.sum()):.3f}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(probs: np.ndarray, labels: np.ndarray, class_names: list[str], out_dir: str | Path,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write metrics.json, per_class_accuracy.csv, confusion_matrix.csv/.png; return the metrics."""
    if probs.shape[1] != len(class_names):
        raise ValueError(f"the model has {probs.shape[1]} outputs but the class map {len(class_names)} classes: "
                         "the model and its class map come from different runs")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(predicted, labels, len(class_names))
    with (out_dir / PER_CLASS_FILE).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["class_id", "name", "images", "correct", "accuracy"])
        for class_id, name in enumerate(class_names):
            total, correct = int(matrix[class_id].sum()), int(matrix[class_id, class_id])
            writer.writerow([class_id, name, total, correct, round(correct / total, 6) if total else ""])
    np.savetxt(out_dir / CONFUSION_CSV, matrix, fmt="%d", delimiter=",")
    plot_confusion(matrix, class_names, out_dir / CONFUSION_PNG)
    metrics = {**{k: round(v, 6) for k, v in classification_metrics(probs, labels).items()},
               "images": int(len(labels)), "classes": len(class_names), **(extra or {})}
    write_json(out_dir / METRICS_FILE, metrics)
    logger.info("classification: top-1 %.4f, top-5 %.4f on %d images -> %s", metrics["top1"], metrics["top5"],
                metrics["images"], out_dir)
    return metrics


def evaluate_classifier(cfg, exported: bool = False, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the trained run (``cfg.out``, ``cfg.checkpoint``) or its export (``cfg.export``,
    ``cfg.backend``) on the validation split of ``cfg.data``; the report goes to ``<out>/eval``
    (or ``<out>/eval_exported``) unless ``out_dir`` is given.

    Preprocessing is the predictor's own, so evaluation measures exactly what ``predict`` serves.
    """
    if exported:
        predictor = ClassifierPredictor.from_export(cfg.export, cfg.backend, cfg.num_threads)
    else:
        predictor = ClassifierPredictor.from_run(cfg.out, cfg.checkpoint)
    split = load_split(cfg.data)
    if split.class_names != predictor.class_names:
        raise ValueError(f"the classes of classify.data ({cfg.data.type} at {cfg.data.root}, {split.num_classes}) "
                         f"differ from the model's ({len(predictor.class_names)}): "
                         "evaluate on the data it was trained on")
    image = predictor.image
    dataset = ClassificationDataset(split.val, predictor.preprocess_fn, crop_to_bbox=bool(image.get("crop_to_bbox")),
                                    bbox_pad=float(image.get("bbox_pad", 0.0)))
    probs, labels = predict_probs(predictor.probs_fn, dataset, cfg.eval_batch_size)
    target = Path(out_dir) if out_dir else Path(cfg.out) / ("eval_exported" if exported else "eval")
    return write_report(probs, labels, predictor.class_names, target, extra={"source": predictor.source})
