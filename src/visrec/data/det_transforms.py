"""Box-safe augmentations for the detector: each takes and returns ``(image HWC uint8 RGB,
boxes [K, 4] x1 y1 x2 y2 float32)`` plus a ``numpy.random.Generator``, and keeps every box
whole and correct (a box the image no longer shows is dropped).

:class:`ResizeToInput` without zoom is exactly the inference resize, so evaluation feeds the
network what the exported detector sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from visrec.data.transform_ops import ColorJitter
from visrec.imaging import ResizeInfo, ResizePolicy, check_policy, resize_geometry, resize_to_input

MIN_BOX_SIDE = 1.0  # pixels; a box side at or below this after a transform is dropped


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip to the image and drop boxes with a side of ``MIN_BOX_SIDE`` pixel or less."""
    boxes = boxes.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] - boxes[:, 0] > MIN_BOX_SIDE) & (boxes[:, 3] - boxes[:, 1] > MIN_BOX_SIDE)
    return boxes[keep]


@dataclass
class HorizontalFlip:
    prob: float = 0.5

    def __call__(self, img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator):
        if rng.random() >= self.prob:
            return img, boxes
        width = img.shape[1]
        flipped = boxes.copy()
        flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
        return np.ascontiguousarray(img[:, ::-1]), flipped


@dataclass
class CropKeepingBoxes:
    """With probability ``prob`` crop a window that contains every box.

    The window's sides are drawn in ``[min_side, 1]`` of the image's, grown to the boxes'
    union where needed, and placed at random among the positions that keep the union inside.
    """

    prob: float = 0.5
    min_side: float = 0.5

    def __call__(self, img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator):
        draw = rng.random(5)  # always the same number of draws: one sample's randomness stays fixed
        if draw[0] >= self.prob or len(boxes) == 0:
            return img, boxes
        height, width = img.shape[:2]
        ux1, uy1 = np.floor(boxes[:, :2].min(axis=0)).astype(int)
        ux2, uy2 = np.ceil(boxes[:, 2:].max(axis=0)).astype(int)
        ux1, uy1, ux2, uy2 = max(ux1, 0), max(uy1, 0), min(ux2, width), min(uy2, height)
        cw = max(ux2 - ux1, round(width * (self.min_side + (1 - self.min_side) * draw[1])))
        ch = max(uy2 - uy1, round(height * (self.min_side + (1 - self.min_side) * draw[2])))
        cw, ch = min(cw, width), min(ch, height)
        # x0 in [max(0, ux2 - cw), min(ux1, width - cw)] keeps the union inside the window.
        x_lo, x_hi = max(0, ux2 - cw), min(ux1, width - cw)
        y_lo, y_hi = max(0, uy2 - ch), min(uy1, height - ch)
        x0 = x_lo + int(draw[3] * (x_hi - x_lo + 1)) if x_hi >= x_lo else 0
        y0 = y_lo + int(draw[4] * (y_hi - y_lo + 1)) if y_hi >= y_lo else 0
        x0, y0 = min(x0, x_hi), min(y0, y_hi)
        cropped = img[y0:y0 + ch, x0:x0 + cw]
        shifted = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
        return np.ascontiguousarray(cropped), clip_boxes(shifted, cw, ch)


@dataclass
class ResizeToInput:
    """To the ``size`` square network input, the same way inference does.

    ``zoom_out=(lo, hi)`` (training): the fitted image is scaled again by a factor drawn in
    ``[lo, hi]`` and placed at a random position on the canvas, so objects appear at more
    sizes and places. ``(1, 1)`` is exactly the inference resize (``resize_to_input``).
    """

    size: int
    policy: ResizePolicy = "keep_ratio"
    zoom_out: tuple[float, float] = (1.0, 1.0)
    fill: tuple[int, int, int] = (124, 116, 104)

    def __post_init__(self) -> None:
        check_policy(self.policy)
        lo, hi = self.zoom_out
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"zoom_out must satisfy 0 < lo <= hi <= 1, got {self.zoom_out}")

    def __call__(self, img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator | None = None):
        lo, hi = self.zoom_out
        if rng is None or (lo == 1.0 and hi == 1.0):
            out, info = resize_to_input(img, self.size, self.policy, self.fill)
            return out, clip_boxes(info.to_input(boxes), self.size, self.size)
        draw = rng.random(3)
        zoom = lo + (hi - lo) * draw[0]
        height, width = img.shape[:2]
        fit_w, fit_h, _ = resize_geometry(width, height, self.size, self.policy)
        new_w, new_h = max(1, round(fit_w * zoom)), max(1, round(fit_h * zoom))
        x0 = int(draw[1] * (self.size - new_w + 1))
        y0 = int(draw[2] * (self.size - new_h + 1))
        resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        canvas = np.empty((self.size, self.size, 3), dtype=np.uint8)
        canvas[:] = np.asarray(self.fill, dtype=np.uint8)
        canvas[y0:y0 + new_h, x0:x0 + new_w] = resized
        info = ResizeInfo(new_w / width, new_h / height, float(x0), float(y0), width, height)
        return canvas, clip_boxes(info.to_input(boxes), self.size, self.size)


@dataclass
class PhotometricJitter:
    """Brightness / contrast / saturation jitter (boxes untouched)."""

    strength: float = 0.3

    def __post_init__(self) -> None:
        self._jitter = ColorJitter(self.strength, self.strength, self.strength)

    def __call__(self, img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator):
        if self.strength <= 0:
            return img, boxes
        return self._jitter(img, rng), boxes

