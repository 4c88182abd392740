"""End-to-end evaluation of the recognition system on the unseen (test-split) classes.

The ``build_index`` stage splits every test class into gallery images (``gallery_per_class``,
cropped to their boxes) and query images (the rest, whole photos through the detector). A
share of the classes (``open_set_fraction``) is held out of a second, *open-set* gallery: their
queries have no right answer there and should be rejected. The queries are halved:

- calibration half: choose the score threshold that maximises open-set accuracy (a known
  query is right when its top-1 label is right and its score passes; an unknown query is
  right when its score does not pass); the threshold is stored in the gallery's metadata;
- report half (``evaluate`` stage): top-1 accuracy with the full gallery, the share of those
  queries the threshold rejects, and open-set figures with the held-out classes removed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from visrec.data.cub import CubImage, CubMeta
from visrec.imaging import load_image
from visrec.imaging import load_image
from visrec.index.factory import open_gallery
from visrec.index.gallery_api import GalleryBase
from visrec.inference.gallery_ops import GalleryItem
from visrec.utils.fs import atomic_write_text

logger = logging.getLogger(__name__)

CALIBRATION, REPORT = "calibration", "report"
QUERIES_FILE = "queries.jsonl"  # build_index writes the held-back queries here (paths.index), evaluate reads them


def class_label(folder_name: str) -> str:
    """``"001.Black_footed_Albatross"`` -> ``"Black footed Albatross"`` (what a user reads)."""
    name = folder_name.split(".", 1)[1] if "." in folder_name and folder_name.split(".", 1)[0].isdigit() \
        else folder_name
    return name.replace("_", " ").strip() or folder_name


def box_xyxy(image: CubImage) -> tuple[float, float, float, float]:
    x, y, w, h = image.box
    return (x, y, x + w, y + h)


@dataclass(frozen=True)
class Query:
    path: Path
    label: str
    image_id: int
    part: str  # calibration | report
    known: bool  # its class is in the open-set gallery


@dataclass(frozen=True)
class SystemSplit:
    gallery: list[GalleryItem]
    queries: list[Query]
    held_out: list[str]  # labels left out of the open-set gallery


def split_for_system(meta: CubMeta, test_image_ids: set[int], gallery_per_class: int, open_set_fraction: float,
                     calibration_fraction: float, seed: int = 0) -> SystemSplit:
    """Gallery items, calibration/report queries and held-out labels, deterministic from ``seed``."""
    if gallery_per_class < 1:
        raise ValueError(f"index.gallery_per_class must be >= 1, got {gallery_per_class}")
    if not 0.0 <= open_set_fraction < 1.0:
        raise ValueError(f"index.open_set_fraction must be in [0, 1), got {open_set_fraction}")
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"index.calibration_fraction must be in (0, 1), got {calibration_fraction}")
    by_class: dict[int, list[CubImage]] = {}
    for image in meta.images:
        if image.image_id in test_image_ids:
            by_class.setdefault(image.class_id, []).append(image)
    if not by_class:
        raise ValueError("the test split lists no image of this data set: rerun the split stage")
    small = [cid for cid, imgs in by_class.items() if len(imgs) <= gallery_per_class]
    if small:
        raise ValueError(f"{len(small)} test class(es) have <= {gallery_per_class} images (e.g. class {small[0]}), "
                         "leaving no query: lower index.gallery_per_class")
    rng = np.random.default_rng(seed)
    labels = {cid: class_label(meta.classes[cid]) for cid in by_class}
    class_ids = sorted(by_class)
    held_count = int(round(open_set_fraction * len(class_ids)))
    held = set(rng.choice(class_ids, size=held_count, replace=False).tolist()) if held_count else set()

    gallery: list[GalleryItem] = []
    queries: list[tuple[CubImage, bool]] = []
    for cid in class_ids:
        images = sorted(by_class[cid], key=lambda im: im.image_id)
        chosen = set(rng.choice(len(images), size=gallery_per_class, replace=False).tolist())
        for i, image in enumerate(images):
            if i in chosen:
                gallery.append(GalleryItem(meta.root / image.rel_path, labels[cid], box_xyxy(image),
                                           {"image_id": image.image_id}))
            else:
                queries.append((image, cid not in held))
    order = rng.permutation(len(queries))
    n_calib = int(round(calibration_fraction * len(queries)))
    query_list = [Query(meta.root / queries[i][0].rel_path, labels[queries[i][0].class_id],
                        queries[i][0].image_id, CALIBRATION if rank < n_calib else REPORT, queries[i][1])
                  for rank, i in enumerate(order)]
    return SystemSplit(gallery, query_list, sorted(labels[c] for c in held))


def write_queries(path: Path, queries: list[Query]) -> None:
    lines = [json.dumps({"path": str(q.path), "label": q.label, "image_id": q.image_id, "part": q.part,
                         "known": q.known}, ensure_ascii=False) for q in queries]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_queries(path: str | Path) -> list[Query]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the build_index stage first (dvc repro build_index)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Query(Path(r["path"]), r["label"], int(r["image_id"]), r["part"], bool(r["known"])) for r in rows]


def open_set_gallery(gallery: GalleryBase, held_out: Sequence[str]) -> GalleryBase:
    """The gallery without the held-out labels (removes from ``gallery`` itself: pass a copy)."""
    for label in held_out:
        gallery.remove_label(label)
    return gallery


def describe_queries(system, queries: Sequence[Query], gallery: GalleryBase,
                     desc: str = "queries") -> list[tuple[np.ndarray, np.ndarray]]:
    """Boxes and embeddings of every query image, through the system's detector and extractor
    (its cascade, ``recognition.detect_unless_whole_margin``, deciding by a search in ``gallery``)."""
    return [system.describe(load_image(q.path), gallery) for q in tqdm(queries, desc=desc, leave=False)]


def top1_predictions(system, described, gallery: GalleryBase) -> tuple[list[str | None], np.ndarray]:
    labels, scores = [], []
    for image in described:
        label, score = system.top1(image, gallery)
        labels.append(label)
        scores.append(score)
    return labels, np.asarray(scores, dtype=np.float64)


def choose_threshold(correct: np.ndarray, scores: np.ndarray, known: np.ndarray) -> tuple[float, float]:
    """The threshold maximising open-set accuracy, and that accuracy.

    Known queries count as right when ``correct`` and ``score >= t``; unknown queries when
    ``score < t``. Candidates are midpoints between sorted scores (and both ends); ties go
    to the lowest threshold.
    """
    correct, scores, known = (np.asarray(a) for a in (correct, scores, known))
    if scores.size == 0:
        raise ValueError("no calibration query: raise index.calibration_fraction or add test images")
    unique = np.unique(scores)
    candidates = np.concatenate([[unique[0] - 1e-6], (unique[:-1] + unique[1:]) / 2, [unique[-1] + 1e-6]])
    passes = scores[None, :] >= candidates[:, None]  # [C, Q]
    right = np.where(known[None, :], passes & correct[None, :].astype(bool), ~passes)
    accuracy = right.mean(axis=1)
    best = int(np.argmax(accuracy))
    return float(candidates[best]), float(accuracy[best])


def open_set_metrics(labels: Sequence[str | None], scores: np.ndarray, truth: Sequence[str], known: np.ndarray,
                     threshold: float) -> dict[str, float]:
    """Accuracy figures of open-set predictions at ``threshold``."""
    correct = np.array([p == t for p, t in zip(labels, truth, strict=True)])
    passes = scores >= threshold
    known = np.asarray(known, dtype=bool)
    out = {"open_set_accuracy": float(np.where(known, correct & passes, ~passes).mean())}
    if known.any():
        out["known_accepted_correct"] = float((correct & passes)[known].mean())
    if (~known).any():
        out["unknown_rejected"] = float((~passes)[~known].mean())
    return out


def calibrate(system, split: SystemSplit, gallery_open: GalleryBase) -> dict[str, Any]:
    """Choose the threshold on the calibration queries against the open-set gallery."""
    queries = [q for q in split.queries if q.part == CALIBRATION]
    described = describe_queries(system, queries, gallery_open, desc="calibration queries")
    labels, scores = top1_predictions(system, described, gallery_open)
    truth = [q.label for q in queries]
    known = np.array([q.known for q in queries])
    correct = np.array([p == t for p, t in zip(labels, truth, strict=True)])
    threshold, accuracy = choose_threshold(correct, scores, known)
    result = {"threshold": round(threshold, 6), "calibration_queries": len(queries),
              "calibration_unknown_queries": int((~known).sum()),
              **{f"calibration_{k}": round(v, 6)
                 for k, v in open_set_metrics(labels, scores, truth, known, threshold).items()}}
    logger.info("rejection threshold %.4f (open-set accuracy %.4f on %d calibration queries)",
                threshold, accuracy, len(queries))
    return result


def evaluate_system(system, queries: Sequence[Query], gallery_full: GalleryBase, gallery_open: GalleryBase,
                    threshold: float) -> dict[str, float]:
    """The report-half figures (see the module docstring), ready for ``metrics.json``."""
    if not queries:
        raise ValueError("no report query: lower index.calibration_fraction or add test images")
    start = time.perf_counter()
    # The open-set figures reuse these descriptions, whose cascade searched the full gallery.
    described = describe_queries(system, queries, gallery_full, desc="report queries")
    ms_per_image = 1000 * (time.perf_counter() - start) / len(queries)  # decode + detect + extract
    truth = [q.label for q in queries]
    known = np.array([q.known for q in queries])
    full_labels, full_scores = top1_predictions(system, described, gallery_full)
    full_correct = np.array([p == t for p, t in zip(full_labels, truth, strict=True)])
    open_labels, open_scores = top1_predictions(system, described, gallery_open)
    metrics = {
        "system_top1_accuracy": float(full_correct.mean()),
        "system_rejection_rate": float((full_scores < threshold).mean()),
        "system_accepted_accuracy": float((full_correct & (full_scores >= threshold)).mean()),
        "system_threshold": float(threshold),
        "system_queries": len(queries),
        "system_describe_ms_per_image": ms_per_image,
        **{f"system_{k}": v for k, v in open_set_metrics(open_labels, open_scores, truth, known, threshold).items()},
    }
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


def evaluate_recognition(rec_cfg, queries: Sequence[Query], out_dir: Path | None = None) -> dict[str, Any]:
    """Load the system named in ``rec_cfg`` and evaluate it on ``queries`` (the report half)."""
    from visrec.inference.pipeline import RecognitionSystem

    system = RecognitionSystem.from_config(rec_cfg)
    gallery_full = system.gallery
    held_out = gallery_full.meta_extra.get("held_out_labels", [])
    # A working copy: removing the held-out labels must not touch the saved (Milvus: live) gallery.
    gallery_open = open_set_gallery(open_gallery(rec_cfg.gallery, num_threads=rec_cfg.num_threads).working_copy(),
                                    held_out)
    try:
        metrics = evaluate_system(system, queries, gallery_full, gallery_open, system.threshold)
    finally:
        gallery_open.release()
    logger.info("recognition system on %d report queries: %s", len(queries),
                ", ".join(f"{k} {v}" for k, v in metrics.items()))
    if out_dir is not None:
        (Path(out_dir) / "system_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
