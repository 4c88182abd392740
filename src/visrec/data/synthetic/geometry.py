"""Polygon helpers shared by the bird and its scene: ellipses, and the fixed-point vertices
OpenCV draws with sub-pixel precision."""

from __future__ import annotations

import math

import numpy as np

SUBPIXEL_BITS = 4  # cv2 drawing "shift": polygon vertices in 1/16 pixel


def ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 40,
            taper: float = 0.0) -> np.ndarray:
    """Ellipse polygon; ``taper`` > 0 narrows the -x end to a point (wings, leaves)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = rx * np.cos(t)
    y = ry * np.sin(t) * ((1 + np.cos(t)) / 2) ** taper if taper > 0 else ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def to_fixed(points: np.ndarray, scale: float) -> np.ndarray:
    """Polygon vertices as cv2 takes them with ``shift=SUBPIXEL_BITS``."""
    return np.round(points * scale * (1 << SUBPIXEL_BITS)).astype(np.int32)


def fixed_point(p: np.ndarray, scale: float = 1.0) -> tuple[int, int]:
    """One point as the int pair cv2 takes with ``shift=SUBPIXEL_BITS``."""
    q = np.round(np.asarray(p) * scale * (1 << SUBPIXEL_BITS)).astype(int)
    return int(q[0]), int(q[1])

