"""Detector geometry and post-processing, in numpy, shared by every detection path.

The same functions serve training-time evaluation (dygraph network), the exported
detector (Paddle Inference / ONNX Runtime) and the data pipeline, so all of them put an
image onto the network input the same way and turn dense outputs into the same boxes:

- ``resize_to_input``: original image -> square network input (``keep_ratio`` letterbox,
  centred, padded with the mean colour; or ``stretch``), plus the ``ResizeInfo`` mapping;
- ``postprocess``: dense boxes (input pixels) + scores -> score threshold, top-k,
  class-agnostic NMS, ``max_det``, mapped back to original image coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

ResizePolicy = Literal["keep_ratio", "stretch"]
RESIZE_POLICIES = ("keep_ratio", "stretch")


@dataclass(frozen=True)
class ResizeInfo:
    """How an original image sits on the network input: ``input = original * scale + pad``."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    orig_w: int
    orig_h: int

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Original ``x1 y1 x2 y2`` -> network-input coordinates."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y], dtype=np.float32)
        pad = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], dtype=np.float32)
        return boxes * scale + pad

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Network-input ``x1 y1 x2 y2`` -> original coordinates, clipped to the image."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y], dtype=np.float32)
        pad = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], dtype=np.float32)
        out = (boxes - pad) / scale
        out[:, 0::2] = np.clip(out[:, 0::2], 0.0, float(self.orig_w))
        out[:, 1::2] = np.clip(out[:, 1::2], 0.0, float(self.orig_h))
        return out


def check_policy(policy: str) -> str:
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}: use 'keep_ratio' (letterbox) or 'stretch'")
    return policy


def resize_geometry(width: int, height: int, size: int, policy: ResizePolicy) -> tuple[int, int, ResizeInfo]:
    """Resized (w, h) of a ``width x height`` image on a ``size`` square, and its mapping."""
    check_policy(policy)
    if width < 1 or height < 1:
        raise ValueError(f"cannot resize an empty image ({width}x{height})")
    if policy == "stretch":
        new_w, new_h = size, size
        pad_x = pad_y = 0
    else:
        fit = min(size / width, size / height)
        new_w, new_h = max(1, min(size, round(width * fit))), max(1, min(size, round(height * fit)))
        pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    # Scales from the integer sizes actually drawn, so the mapping is exact.
    info = ResizeInfo(new_w / width, new_h / height, float(pad_x), float(pad_y), int(width), int(height))
    return new_w, new_h, info


def pad_colour(mean: Sequence[float], scale: float) -> tuple[int, int, int]:
    """The uint8 colour that normalises to zero: padding then carries no signal."""
    return tuple(int(np.clip(round(m / scale), 0, 255)) for m in mean)  # type: ignore[return-value]


def resize_to_input(img: np.ndarray, size: int, policy: ResizePolicy,
                    fill: Sequence[int] = (124, 116, 104)) -> tuple[np.ndarray, ResizeInfo]:
    """HWC uint8 RGB image -> ``size x size`` uint8 network input and its ``ResizeInfo``."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HWC RGB image, got shape {img.shape}")
    height, width = img.shape[:2]
    new_w, new_h, info = resize_geometry(width, height, size, policy)
    # INTER_AREA when shrinking (real photos are several times the input): no aliasing.
    interp = cv2.INTER_AREA if new_w < width and new_h < height else cv2.INTER_LINEAR
    resized = img if (new_w, new_h) == (width, height) else cv2.resize(img, (new_w, new_h), interpolation=interp)
    if (new_w, new_h) == (size, size):
        return np.ascontiguousarray(resized), info
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = np.asarray(fill, dtype=np.uint8)
    x0, y0 = int(info.pad_x), int(info.pad_y)
    canvas[y0:y0 + new_h, x0:x0 + new_w] = resized
    return canvas, info


def normalize_chw(img: np.ndarray, mean: Sequence[float], std: Sequence[float], scale: float) -> np.ndarray:
    """uint8 HWC -> float32 CHW ``(x * scale - mean) / std``."""
    out = (img.astype(np.float32) * np.float32(scale) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


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


def postprocess(boxes: np.ndarray, scores: np.ndarray, infos: Sequence[ResizeInfo],
                score_threshold: float, nms_iou: float, max_det: int,
                pre_nms_top_k: int = 100) -> list[np.ndarray]:
    """Dense outputs of a batch -> per image ``[K, 5]`` arrays ``x1 y1 x2 y2 score``.

    ``boxes`` [N, P, 4] in network-input pixels, ``scores`` [N, P]; ``infos`` map each
    image back to its original coordinates. K <= ``max_det``, best score first.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2]:
        raise ValueError(f"expected boxes [N, P, 4] and scores [N, P], got {boxes.shape} and {scores.shape}")
    if len(infos) != boxes.shape[0]:
        raise ValueError(f"{len(infos)} resize infos for a batch of {boxes.shape[0]} images")
    results = []
    for img_boxes, img_scores, info in zip(boxes, scores, infos, strict=True):
        idx = np.nonzero(img_scores >= score_threshold)[0]
        if idx.size > pre_nms_top_k:
            idx = idx[np.argsort(-img_scores[idx], kind="stable")[:pre_nms_top_k]]
        # NMS in original coordinates: clipping there is what the user sees.
        cand = info.to_original(img_boxes[idx])
        valid = (cand[:, 2] > cand[:, 0]) & (cand[:, 3] > cand[:, 1])
        cand, cand_scores = cand[valid], img_scores[idx][valid]
        keep = nms(cand, cand_scores, nms_iou, max_keep=max_det)
        out = np.zeros((keep.size, 5), dtype=np.float32)
        if keep.size:
            out[:, :4] = cand[keep]
            out[:, 4] = cand_scores[keep]
        results.append(out)
    return results
