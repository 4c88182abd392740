"""Detector post-processing in numpy, shared by every detection path.

Training-time evaluation (dygraph network) and the exported detector (Paddle Inference /
ONNX Runtime) turn dense outputs into the same boxes with :func:`postprocess`: score
threshold, top-k, class-agnostic NMS, ``max_det``, mapped back to original image
coordinates through the :class:`visrec.imaging.ResizeInfo` of the input resize.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from visrec.imaging import ResizeInfo


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``x1 y1 x2 y2`` boxes: [N, 4] x [M, 4] -> [N, M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, best score first. Ties keep the earlier box."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    boxes = np.asarray(boxes, dtype=np.float64)
    keep: list[int] = []
    while order.size and (max_keep is None or len(keep) < max_keep):
        best = int(order[0])
        keep.append(best)
        if order.size == 1:
            break
        ious = box_iou(boxes[best:best + 1], boxes[order[1:]])[0]
        order = order[1:][ious <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def scale_boxes(boxes: np.ndarray, factor: float) -> np.ndarray:
    """``x1 y1 x2 y2`` boxes with width and height times ``factor``, same centres."""
    if factor == 1.0:
        return boxes
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    return np.concatenate([centre - half, centre + half], axis=1).astype(boxes.dtype)


def centre_weights(boxes: np.ndarray, width: float, height: float, sigma: float) -> np.ndarray:
    """``exp(-r^2 / (2 sigma^2))`` of each box, ``r`` the distance of its centre from the image's,
    in image widths and heights: 1 at the centre, 0.25 at the middle of an edge for ``sigma`` 0.3."""
    dx = ((boxes[:, 0] + boxes[:, 2]) / 2 - width / 2) / max(width, 1e-6)
    dy = ((boxes[:, 1] + boxes[:, 3]) / 2 - height / 2) / max(height, 1e-6)
    return np.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma)).astype(np.float32)


def postprocess(boxes: np.ndarray, scores: np.ndarray, infos: Sequence[ResizeInfo],
                score_threshold: float, nms_iou: float, max_det: int,
                pre_nms_top_k: int = 100, box_scale: float = 1.0, center_prior: float = 0.0) -> list[np.ndarray]:
    """Dense outputs of a batch -> per image ``[K, 5]`` arrays ``x1 y1 x2 y2 score``.

    ``boxes`` [N, P, 4] in network-input pixels, ``scores`` [N, P]; ``infos`` map each
    image back to its original coordinates. K <= ``max_det``, best score first. Each box is
    grown by ``box_scale`` about its centre (then clipped to the image). ``center_prior`` > 0
    weighs each score by :func:`centre_weights` with that sigma for NMS and the order and scores
    returned: a photo's main object is usually framed near its centre, which a detector trained
    on generated scenes (objects anywhere) has never seen. The threshold still applies to the
    network's own score: the prior decides which object comes first, not whether one is there
    (an object off the centre is still found, ranked after a central one).
    """
    if not box_scale > 0:
        raise ValueError(f"box_scale must be > 0, got {box_scale}")
    if not center_prior >= 0:
        raise ValueError(f"center_prior must be >= 0 (0: off), got {center_prior}")
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2]:
        raise ValueError(f"expected boxes [N, P, 4] and scores [N, P], got {boxes.shape} and {scores.shape}")
    if len(infos) != boxes.shape[0]:
        raise ValueError(f"{len(infos)} resize infos for a batch of {boxes.shape[0]} images")
    results = []
    for img_boxes, img_scores, info in zip(boxes, scores, infos, strict=True):
        idx = np.nonzero(img_scores >= score_threshold)[0]
        if center_prior > 0:
            centres = info.to_original(img_boxes[idx])  # where each box sits in the photo, before growing
            ranked = img_scores[idx] * centre_weights(centres, info.orig_w, info.orig_h, center_prior)
        else:
            ranked = img_scores[idx]
        if idx.size > pre_nms_top_k:
            top = np.argsort(-ranked, kind="stable")[:pre_nms_top_k]
            idx, ranked = idx[top], ranked[top]
        # NMS in original coordinates: clipping there is what the user sees.
        cand = info.to_original(scale_boxes(img_boxes[idx], box_scale))
        valid = (cand[:, 2] > cand[:, 0]) & (cand[:, 3] > cand[:, 1])
        cand, cand_scores = cand[valid], ranked[valid]
        keep = nms(cand, cand_scores, nms_iou, max_keep=max_det)
        out = np.zeros((keep.size, 5), dtype=np.float32)
        if keep.size:
            out[:, :4] = cand[keep]
            out[:, 4] = cand_scores[keep]
        results.append(out)
    return results
