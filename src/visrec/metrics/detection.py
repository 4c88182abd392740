"""COCO detection metrics (pycocotools) as a flat dict for DVC and the training engine.

``det_mAP`` is COCO mAP@[.5:.95], ``det_AP50`` AP at IoU 0.5, ``det_recall50`` recall at
IoU 0.5 with up to ``max_det`` boxes per image; ``AP50`` repeats ``det_AP50`` under the
name the engine selects the best checkpoint by.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DETECTION_KEYS = ("det_mAP", "det_AP50", "det_recall50")


def detections_to_coco(detections: Mapping[int, np.ndarray], category_id: int = 1) -> list[dict[str, Any]]:
    """``{image_id: [K, 5] x1 y1 x2 y2 score}`` -> COCO result dicts (``bbox`` as x y w h)."""
    results = []
    for image_id, dets in detections.items():
        for x1, y1, x2, y2, score in np.asarray(dets, dtype=np.float64).reshape(-1, 5):
            results.append({"image_id": int(image_id), "category_id": category_id,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return results


def _load_gt(gt: str | Path | Mapping[str, Any], image_ids: Sequence[int] | None):
    from pycocotools.coco import COCO

    data = json.loads(Path(gt).read_text(encoding="utf-8")) if isinstance(gt, (str, Path)) else copy.deepcopy(dict(gt))
    if image_ids is not None:
        wanted = set(int(i) for i in image_ids)
        data["images"] = [im for im in data["images"] if int(im["id"]) in wanted]
        data["annotations"] = [a for a in data["annotations"] if int(a["image_id"]) in wanted]
    for ann in data["annotations"]:  # COCO needs area and iscrowd; the split stage writes both
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    data.setdefault("categories", [{"id": 1, "name": "foreground"}])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_detection_metrics(gt: str | Path | Mapping[str, Any], detections: Mapping[int, np.ndarray],
                           max_det: int = 100, image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCO box metrics of ``detections`` against the ground truth ``gt`` (a COCO file or dict).

    ``image_ids`` restricts the evaluation to those images (e.g. a validation subset);
    by default every image of ``detections`` is evaluated.
    """
    from pycocotools.cocoeval import COCOeval

    ids = list(detections) if image_ids is None else list(image_ids)
    if not ids:
        raise ValueError("no image to evaluate: detections is empty and no image_ids were given")
    coco_gt = _load_gt(gt, ids)
    missing = set(int(i) for i in ids) - set(coco_gt.getImgIds())
    if missing:
        raise ValueError(f"{len(missing)} evaluated image id(s) are not in the ground truth, e.g. "
                         f"{sorted(missing)[:5]}: detections and COCO file do not belong together")
    results = detections_to_coco({i: detections.get(i, np.zeros((0, 5))) for i in ids})
    if not results:  # loadRes refuses an empty list; nothing detected scores zero
        return {"det_mAP": 0.0, "det_AP50": 0.0, "det_recall50": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = [int(i) for i in ids]
        evaluator.params.maxDets = [1, 10, max(int(max_det), 1)] if max_det > 10 else [1, int(max_det), 100]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    recall = evaluator.eval["recall"]  # [T, K, A, M]
    m = evaluator.params.maxDets.index(int(max_det)) if int(max_det) in evaluator.params.maxDets else -1

    def mean_valid(values: np.ndarray) -> float:
        values = values[values > -1]
        return float(values.mean()) if values.size else 0.0

    # area index 0 = "all"
    metrics = {
        "det_mAP": mean_valid(precision[:, :, :, 0, m]),
        "det_AP50": mean_valid(precision[0, :, :, 0, m]),
        "det_recall50": mean_valid(recall[0, :, 0, m]),
    }
    metrics["AP50"] = metrics["det_AP50"]
    return metrics
