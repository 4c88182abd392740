"""Detector post-processing in numpy, shared by every detection path.

Training-time evaluation (dygraph network) and the exported detector (Paddle Inference /
ONNX Runtime) turn dense outputs into the same boxes with :func:`postprocess`: score
threshold, top-k, class-agnostic NMS, ``max_det``, mapped back to original image
coordinates through the :class:`visrec.imaging.ResizeInfo` of the input resize; for a detector
trained on generated scenes also the calibrations its export names (centre prior, box scale,
extent refinement from the backbone's saliency, consensus scores).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import cv2
import numpy as np

from visrec.imaging import ResizeInfo

# Extent refinement: the saliency is searched inside each box grown this much about its centre.
SALIENCY_SEARCH = 1.5
# Consensus scores: a photo's confidence is 1 - exp(-MASS_SCALE x the summed scores of the
# candidates that agree with its first box (IoU >= CONSENSUS_IOU)); the k-th box gets
# RANK_DECAY^k of it, so first boxes of all photos rank before second ones.
MASS_SCALE, CONSENSUS_IOU, RANK_DECAY = 0.2, 0.5, 0.2
# The numeric calibrations a detector export can carry, and what each must satisfy.
CALIBRATION_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "box_scale": (lambda v: v > 0, "> 0"),
    "center_prior": (lambda v: v >= 0, ">= 0 (0: off)"),
    "extent_blend": (lambda v: 0 <= v <= 1, "in [0, 1] (0: off)"),
}

# Their values that change nothing: what an export without a calibration behaves as.
NEUTRAL_CALIBRATION: dict[str, float] = {"box_scale": 1.0, "center_prior": 0.0, "extent_blend": 0.0}


def check_calibration(values: Mapping[str, float], knob: Callable[[str], str] = str) -> None:
    """Raise naming ``knob(name)`` (the setting a user turns) for a calibration out of its range."""
    for name, value in values.items():
        valid, rule = CALIBRATION_RULES[name]
        if not valid(value):
            raise ValueError(f"{knob(name)} must be {rule}, got {value}")


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


def refine_extents(boxes: np.ndarray, saliency: np.ndarray, info: ResizeInfo, input_size: tuple[int, int],
                   blend: float) -> np.ndarray:
    """``x1 y1 x2 y2`` boxes (original pixels) moved ``blend`` of the way to the extent of the salient
    region around them: the largest connected region, inside the box grown ``SALIENCY_SEARCH``x,
    where ``saliency`` (the backbone's map over the network input) is above its mean over the photo.

    A detector trained on generated scenes finds the object but sizes it by what the shapes
    taught it, which varies from run to run (median predicted / true area 0.68-0.98 over three
    seeds on real photos); the pretrained backbone's own map of where the object is does not.
    """
    height, width = input_size
    boxes = np.asarray(boxes, dtype=np.float32)
    if not len(boxes) or blend <= 0:
        return boxes
    heat = cv2.resize(np.asarray(saliency, dtype=np.float32).reshape(saliency.shape[-2:]), (width, height),
                      interpolation=cv2.INTER_LINEAR)
    x0, y0 = int(info.pad_x), int(info.pad_y)  # the photo's area on the (letterboxed) input
    x1 = int(np.ceil(info.pad_x + info.orig_w * info.scale_x))
    y1 = int(np.ceil(info.pad_y + info.orig_h * info.scale_y))
    salient = np.zeros((height, width), dtype=bool)
    photo = heat[y0:y1, x0:x1]
    salient[y0:y1, x0:x1] = photo > photo.mean()
    out = boxes.copy()
    for i, box in enumerate(info.to_input(boxes).astype(np.float64)):
        centre, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) * SALIENCY_SEARCH / 2
        lo = np.clip(np.floor(centre - half), 0, [width - 1, height - 1]).astype(int)
        hi = np.clip(np.ceil(centre + half), 1, [width, height]).astype(int)
        region = salient[lo[1]:hi[1], lo[0]:hi[0]].astype(np.uint8)
        if region.sum() < 4:  # nothing salient around it: keep the detector's box
            continue
        _, _, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
        j = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        left, top, w, h = stats[j, :4]
        extent = np.array([left, top, left + w, top + h], dtype=np.float64) + np.concatenate([lo, lo])
        out[i, :4] = info.to_original(((1 - blend) * box + blend * extent)[None])[0]
    out[:, 0::2] = out[:, 0::2].clip(0, info.orig_w)
    out[:, 1::2] = out[:, 1::2].clip(0, info.orig_h)
    return out


def consensus_scores(kept: np.ndarray, kept_scores: np.ndarray, candidates: np.ndarray,
                     candidate_scores: np.ndarray) -> np.ndarray:
    """Scores for the kept boxes of one photo (best first) that rank photos by how many dense
    candidates agree with their first box, and every first box before any second one.

    The network's score of a box says how object-like its one location looks; the summed scores
    of the candidates overlapping it say how many locations agree on that box, which tells a right
    first box from a wrong one better on real photos (AUC 0.78 vs 0.73-0.75, docs/experiments.md).
    """
    if not len(kept):
        return np.asarray(kept_scores, dtype=np.float32)
    mass = float(candidate_scores[box_iou(kept[:1], candidates)[0] >= CONSENSUS_IOU].sum())
    confidence = 1.0 - np.exp(-MASS_SCALE * mass)
    relative = np.asarray(kept_scores, dtype=np.float64) / max(float(kept_scores[0]), 1e-12)
    return (confidence * relative * RANK_DECAY ** np.arange(len(kept))).astype(np.float32)


def postprocess(boxes: np.ndarray, scores: np.ndarray, infos: Sequence[ResizeInfo],
                score_threshold: float, nms_iou: float, max_det: int,
                pre_nms_top_k: int = 100, box_scale: float = 1.0, center_prior: float = 0.0,
                saliency: np.ndarray | None = None, extent_blend: float = 0.0,
                consensus: bool = False, input_size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Dense outputs of a batch -> per image ``[K, 5]`` arrays ``x1 y1 x2 y2 score``.

    ``boxes`` [N, P, 4] in network-input pixels, ``scores`` [N, P]; ``infos`` map each
    image back to its original coordinates. K <= ``max_det``, best score first. Each box is
    grown by ``box_scale`` about its centre (then clipped to the image). ``center_prior`` > 0
    weighs each score by :func:`centre_weights` with that sigma for NMS and the order and scores
    returned: a photo's main object is usually framed near its centre, which a detector trained
    on generated scenes (objects anywhere) has never seen. The threshold still applies to the
    network's own score: the prior decides which object comes first, not whether one is there
    (an object off the centre is still found, ranked after a central one).

    ``extent_blend`` > 0 moves each kept box towards the salient region around it
    (:func:`refine_extents`; needs ``saliency`` [N, 1, h, w] over the network input and that
    input's ``input_size`` (H, W)).
    ``consensus`` replaces the returned scores by :func:`consensus_scores` (order unchanged).
    """
    check_calibration({"box_scale": box_scale, "center_prior": center_prior, "extent_blend": extent_blend})
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2]:
        raise ValueError(f"expected boxes [N, P, 4] and scores [N, P], got {boxes.shape} and {scores.shape}")
    if len(infos) != boxes.shape[0]:
        raise ValueError(f"{len(infos)} resize infos for a batch of {boxes.shape[0]} images")
    if extent_blend > 0:
        if saliency is None:
            raise ValueError("extent_blend needs the detector's saliency output: re-export the detector "
                             "(exports from before 2026-12-04 have none), or set the blend to 0")
        if input_size is None:
            raise ValueError("extent_blend needs the network input size (H, W)")
    results = []
    for n, (img_boxes, img_scores, info) in enumerate(zip(boxes, scores, infos, strict=True)):
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
            if consensus:  # on the network's boxes: agreement is about them, not the refined ones
                out[:, 4] = consensus_scores(out[:, :4], out[:, 4], cand, cand_scores)
            if extent_blend > 0:
                out[:, :4] = refine_extents(out[:, :4], saliency[n], info, input_size, extent_blend)
        results.append(out)
    return results
