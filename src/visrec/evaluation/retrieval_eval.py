"""Retrieval evaluation of an exported extractor on the unseen test classes.

Query = gallery = the test split, each query's own image removed from its ranking.
Beside the trained model, the same architecture with random weights is evaluated as the
baseline that shows what training added (its BatchNorm statistics are recalibrated on
training images first: with default statistics an untrained net outputs almost nothing).
"""

from __future__ import annotations

import csv
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paddle

from visrec.data.cub import read_cub
from visrec.data.datasets import RetrievalDataset
from visrec.imaging import load_image
from visrec.data.transforms import build_transforms
from visrec.training.embedding import embed_dataset
from visrec.inference.export import EmbeddingNet, export_layer, read_model_json
from visrec.inference.predictors import Predictor
from visrec.metrics.retrieval import per_class_recall, retrieval_metrics
from visrec.models.extractor import build_rec_model

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("recall@1", "recall@5", "mAP", "MAP@R")


@dataclass
class RetrievalEvaluation:
    metrics: dict[str, float]
    per_query: dict[str, np.ndarray]
    features: np.ndarray
    labels: np.ndarray
    ids: np.ndarray


def eval_dataset_for(meta: dict[str, Any], raw_root: Path, list_file: Path, boxes=None) -> RetrievalDataset:
    """The list's images prepared exactly as the exported model expects (from model.json)."""
    size = int(meta["input_size"][0])
    transform = build_transforms(size, False, mean=meta["mean"], std=meta["std"], scale=meta["scale"])
    return RetrievalDataset(raw_root, list_file, transform, boxes=boxes,
                            crop_to_bbox=bool(meta.get("crop_to_bbox")), bbox_pad=float(meta.get("bbox_pad", 0.0)))


def evaluate_embeddings(embed_fn, dataset: RetrievalDataset, batch_size: int, max_k: int,
                        desc: str) -> RetrievalEvaluation:
    feats, labels, ids = embed_dataset(embed_fn, dataset, batch_size, desc=desc)
    ks = sorted(set(range(1, max_k + 1)) | {1, 5})
    result = retrieval_metrics(feats, labels, feats, labels, query_ids=ids, gallery_ids=ids, ks=ks,
                               return_per_query=True, progress=False)
    per_query = result.pop("per_query")
    return RetrievalEvaluation({k: float(v) for k, v in result.items()}, per_query, feats, labels, ids)


def random_baseline_model(model_config: dict[str, Any], calib: RetrievalDataset, calib_images: int,
                          seed: int) -> paddle.nn.Layer:
    """Same architecture, random weights, BN statistics recalibrated on ``calib`` images.

    The running statistics are set from one train-mode pass over ``calib_images`` images
    with momentum 0: with the default momentum a residue of the initial variance of 1
    remains and swamps the tiny variances of random depthwise convolutions.
    """
    paddle.seed(seed)
    model = build_rec_model({k: v for k, v in model_config["backbone"].items() if k != "pretrained"},
                            model_config["neck"], model_config["head"], model_config["class_num"])
    for layer in model.sublayers():
        if isinstance(layer, (paddle.nn.BatchNorm1D, paddle.nn.BatchNorm2D)):
            layer._momentum = 0.0
    model.train()
    idx = np.random.default_rng(seed).permutation(len(calib))[:calib_images]
    with paddle.no_grad():
        model.embed(paddle.to_tensor(np.stack([calib[int(i)][0] for i in idx])))
    model.eval()
    return model


def write_curve(path: Path, curves: dict[str, dict[str, float]], max_k: int) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["k", *curves])
        for k in range(1, max_k + 1):
            writer.writerow([k, *(round(c[f"recall@{k}"], 6) for c in curves.values())])


def write_per_class(path: Path, evaluation: RetrievalEvaluation, class_names: dict[int, str],
                    dataset: RetrievalDataset) -> None:
    recall = per_class_recall(evaluation.per_query, evaluation.labels, k=1)
    counts = np.bincount(evaluation.labels)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class_id", "class_name", "images", "recall@1"])
        for dense, value in sorted(recall.items(), key=lambda kv: kv[1]):
            class_id = dataset.classes[int(dense)]
            writer.writerow([class_id, class_names.get(class_id, ""), int(counts[int(dense)]), round(value, 4)])


def retrieval_grid(path: Path, evaluation: RetrievalEvaluation, dataset: RetrievalDataset,
                   n_queries: int = 6, top_k: int = 5, thumb: int = 96, seed: int = 0) -> None:
    """Query (blue frame) and its top-k retrievals (green: same class, red: other class)."""
    rng = np.random.default_rng(seed)
    queries = rng.choice(len(dataset), size=min(n_queries, len(dataset)), replace=False)
    rows = []
    for q in queries:
        sims = evaluation.features @ evaluation.features[q]
        sims[evaluation.ids == evaluation.ids[q]] = -np.inf  # the query itself is not a result
        top = np.argsort(-sims, kind="stable")[:top_k]
        tiles = [_tile(dataset, int(q), thumb, (60, 60, 220))]
        for t in top:
            same = evaluation.labels[t] == evaluation.labels[q]
            tiles.append(_tile(dataset, int(t), thumb, (40, 170, 40) if same else (210, 40, 40),
                               f"{sims[t]:.2f}"))
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


def _tile(dataset: RetrievalDataset, index: int, size: int, colour, text: str = "") -> np.ndarray:
    img = load_image(dataset.image_path(index))
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    img = cv2.copyMakeBorder(img[4:-4, 4:-4], 4, 4, 4, 4, cv2.BORDER_CONSTANT, value=colour)
    if text:
        cv2.putText(img, text, (6, size - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 2, cv2.LINE_AA)
        cv2.putText(img, text, (6, size - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def evaluate_extractor(model_dir: Path, model_config: dict[str, Any], raw_root: Path, split_dir: Path,
                       out_dir: Path, *, backend: str = "paddle", num_threads: int = 2, batch_size: int = 64,
                       max_k: int = 20, grid_queries: int = 6, baseline: bool = True,
                       baseline_calib_images: int = 256, seed: int = 0) -> dict[str, float]:
    """Evaluate the exported extractor (and the random baseline); write the report files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = read_model_json(model_dir)
    cub = read_cub(raw_root)
    boxes = {img.image_id: img.box for img in cub.images}
    test_ds = eval_dataset_for(meta, raw_root, split_dir / "test_list.txt", boxes)
    predictor = Predictor(model_dir, backend=backend, num_threads=num_threads)
    trained = evaluate_embeddings(lambda b: predictor(b)[0], test_ds, batch_size, max_k, "embedding test split")
    metrics = {k: round(trained.metrics[k], 6) for k in SUMMARY_KEYS}
    metrics["num_queries"] = int(trained.metrics["num_valid_queries"])
    curves = {"trained": trained.metrics}

    if baseline:
        calib = eval_dataset_for(meta, raw_root, split_dir / "train_list.txt", boxes)
        model = random_baseline_model(model_config, calib, baseline_calib_images, seed)
        with tempfile.TemporaryDirectory() as tmp:
            export_layer(EmbeddingNet(model), Path(tmp) / "baseline", [None, 3, *meta["input_size"]],
                         {"kind": "extractor-random-baseline"}, onnx=backend == "onnx")
            base_pred = Predictor(Path(tmp) / "baseline", backend=backend, num_threads=num_threads)
            base = evaluate_embeddings(lambda b: base_pred(b)[0], test_ds, batch_size, max_k,
                                       "embedding test split (random baseline)")
        metrics.update({f"baseline_{k}": round(base.metrics[k], 6) for k in SUMMARY_KEYS})
        curves["random_baseline"] = base.metrics

    write_curve(out_dir / "recall_curve.csv", curves, max_k)
    write_per_class(out_dir / "per_class_recall.csv", trained, cub.classes, test_ds)
    retrieval_grid(out_dir / "top5_retrievals.png", trained, test_ds, n_queries=grid_queries, seed=seed)
    logger.info("retrieval on %d unseen-class queries: %s", metrics["num_queries"],
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "num_queries"))
    return metrics
