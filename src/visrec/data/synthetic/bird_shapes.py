"""The drawing list of one bird: a recipe and its instance colours -> filled polygons and thick
segments, back to front, in object coordinates.

Object coordinates: the body is an ellipse centred at the origin with half-length 1, the bird
faces +x, and y points down (image convention). Pattern shapes are clipped to the part they
mark (``Shape.clip`` names an earlier shape's ``layer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from visrec.data.synthetic.geometry import ellipse
from visrec.data.synthetic.recipes import FAMILIES, BirdRecipe


@dataclass
class Shape:
    colour: np.ndarray  # RGB float
    polys: list[np.ndarray]  # filled polygons, (N, 2) object coordinates
    lines: list[tuple[np.ndarray, np.ndarray, float]]  # segments (p0, p1, width)
    clip: str | None = None  # draw only inside this earlier layer
    layer: str | None = None  # remember this shape's mask under this name


def _rot(points: np.ndarray, angle: float, origin: np.ndarray) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    d = points - origin
    return origin + np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], axis=1)


def _tail(r: BirdRecipe, b: float) -> np.ndarray:
    """Tail polygon built pointing -x from the rump, then swung up by tail_angle."""
    root = np.array([-0.85, 0.1 * b])
    length = r.tail_len
    w0, w1 = 0.45 * b, {"square": 0.55, "notched": 0.6, "forked": 0.9,
                        "pointed": 0.12, "rounded": 0.75}[r.tail_shape] * b
    x1 = root[0] - length
    pts = [(root[0] + 0.1, root[1] - w0), (x1, root[1] - w1)]
    if r.tail_shape == "notched":
        pts.append((x1 + 0.18 * length, root[1]))
    elif r.tail_shape == "forked":
        pts.append((x1 + 0.6 * length, root[1]))
    elif r.tail_shape == "rounded":
        pts.append((x1 - 0.2 * length, root[1]))
    pts += [(x1, root[1] + w1), (root[0] + 0.1, root[1] + w0)]
    return _rot(np.array(pts, float), -math.radians(r.tail_angle), root)


def bird_shapes(r: BirdRecipe, colours: dict[str, np.ndarray], rng: np.random.Generator) -> list[Shape]:
    """The drawing list of one instance, back to front."""
    b = 1.0 / r.aspect  # body half-height
    hr = r.head_size * b  # head radius
    head_c = np.array([0.78 + 0.15 * hr, -0.55 * b - 0.2 * hr])
    shapes: list[Shape] = []

    shapes.append(Shape(colours["wing"] if r.wing != r.body else colours["body"] * 0.85,
                         [_tail(r, b)], [], layer="tail"))
    # Legs: two segments from the belly, with a short toe forward.
    legs = []
    leg_w = 0.07 * b
    for dx in (-0.12, 0.08):
        top = np.array([dx, 0.75 * b])
        foot = top + np.array([-0.05, r.leg_len * b + 0.25 * b])
        legs.append((top, foot, leg_w))
        legs.append((foot, foot + np.array([0.22 * b + 0.05, 0.0]), leg_w * 0.8))
    shapes.append(Shape(colours["leg"], [], legs))

    shapes.append(Shape(colours["body"], [ellipse(0, 0, 1.0, b)], [], layer="body"))
    body_pattern = _body_pattern(r, b, rng)
    if body_pattern is not None:
        polys, lines = body_pattern
        shapes.append(Shape(colours["body_pattern"], polys, lines, clip="body"))

    # Wing: a teardrop lying on the body, its point towards the tail.
    wing_len = 0.75 + r.wing_len
    wing_c = np.array([0.45 - wing_len, -0.1 * b])
    wing = ellipse(wing_c[0], wing_c[1], wing_len, r.wing_width * b * 1.3,
                    angle=math.radians(-4), taper=r.wing_point)
    shapes.append(Shape(colours["wing"] if r.wing != r.body else colours["body"] * 0.8,
                         [wing], [], layer="wing"))
    wing_pattern = _wing_pattern(r, b, wing_c, wing_len)
    if wing_pattern is not None:
        polys, lines = wing_pattern
        shapes.append(Shape(colours["wing_pattern"], polys, lines, clip="wing"))

    # Beak before the head so its base hides under the head outline.
    shapes.append(Shape(colours["beak"], [_beak(r, head_c, hr)], []))
    if r.head_pattern == "crest":
        crest = np.array([head_c + (-0.1 * hr, -0.6 * hr), head_c + (-1.3 * hr, -1.5 * hr),
                          head_c + (-0.9 * hr, -0.2 * hr)])
        shapes.append(Shape(colours["head_pattern"], [crest], []))
    shapes.append(Shape(colours["head"], [ellipse(head_c[0], head_c[1], hr, hr)], [], layer="head"))
    head_pattern = _head_pattern(r, head_c, hr)
    if head_pattern is not None:
        shapes.append(Shape(colours["head_pattern"], head_pattern, [], clip="head"))
    eye = head_c + np.array([0.35 * hr, -0.15 * hr])
    if r.eye_ring:
        shapes.append(Shape(colours["eye_ring"], [ellipse(eye[0], eye[1], 0.3 * hr, 0.3 * hr, n=16)], []))
    shapes.append(Shape(colours["eye"], [ellipse(eye[0], eye[1], 0.16 * hr, 0.16 * hr, n=12)], []))
    return shapes


def _beak(r: BirdRecipe, head_c: np.ndarray, hr: float) -> np.ndarray:
    droop = math.radians(r.beak_droop)
    d = np.array([math.cos(droop), math.sin(droop)])
    n = np.array([-d[1], d[0]])
    base = head_c + d * 0.8 * hr
    tip = head_c + d * (0.9 * hr + r.beak_len * hr)
    half = 0.5 * r.beak_width * hr
    shape = FAMILIES[r.family].beak
    if shape == "hook":
        return np.array([base - n * half, tip - n * 0.1 * hr, tip + n * 0.35 * hr - d * 0.15 * hr,
                         base + n * half])
    if shape == "dagger":
        return np.array([base - n * half, tip, base + n * half * 0.8])
    return np.array([base - n * half, tip + n * 0.05 * hr, base + n * half])


def _body_pattern(r: BirdRecipe, b: float, rng: np.random.Generator):
    k = r.pattern_count
    p = r.body_pattern
    if p == "bars":
        xs = np.linspace(-0.7, 0.6, k + 1)
        width = 0.5 * (xs[1] - xs[0])
        return [], [(np.array([x, -b]), np.array([x - 0.15, b]), width) for x in xs]
    if p == "spots":
        # Fixed positions per class, each nudged a little per instance.
        polys = [ellipse(x + rng.normal(0, 0.02), y * b + rng.normal(0, 0.02), rad, rad, n=12)
                 for x, y, rad in r.spots]
        return polys, []
    if p == "streaks":
        lines = []
        for i, x in enumerate(np.linspace(-0.2, 0.7, k + 2)):
            y0 = (0.05 + 0.25 * (i % 2)) * b
            lines.append((np.array([x, y0]), np.array([x - 0.18, y0 + 0.45 * b]), 0.09 * b + 0.03))
        return [], lines
    if p == "breast":
        return [ellipse(0.55, 0.35 * b, 0.5, 0.75 * b)], []
    if p == "belly":
        return [np.array([[-1.2, 0.2 * b], [1.2, -0.05 * b], [1.2, 1.2 * b], [-1.2, 1.2 * b]])], []
    if p == "collar":
        return [], [(np.array([0.72, -b]), np.array([0.62, b]), 0.22)]
    return None


def _wing_pattern(r: BirdRecipe, b: float, wing_c: np.ndarray, wing_len: float):
    p = r.wing_pattern
    if p == "bars":
        xs = wing_c[0] + np.linspace(0.1, 0.6, min(r.pattern_count, 3)) * wing_len
        return [], [(np.array([x, -2 * b]), np.array([x - 0.1, 2 * b]), 0.07) for x in xs]
    if p == "tips":
        x = wing_c[0] - 0.35 * wing_len
        return [np.array([[x, -2 * b], [x - 3, -2 * b], [x - 3, 2 * b], [x - 0.2, 2 * b]])], []
    if p == "shoulder":
        return [ellipse(wing_c[0] + 0.7 * wing_len, wing_c[1] - 0.15 * b, 0.35 * wing_len, 0.4 * b)], []
    return None


def _head_pattern(r: BirdRecipe, head_c: np.ndarray, hr: float) -> list[np.ndarray] | None:
    x, y = head_c
    p = r.head_pattern
    if p == "cap":
        return [np.array([[x - 2 * hr, y - 2 * hr], [x + 2 * hr, y - 2 * hr],
                          [x + 2 * hr, y - 0.35 * hr], [x - 2 * hr, y - 0.05 * hr]])]
    if p == "eye_stripe":
        return [np.array([[x - 2 * hr, y - 0.05 * hr], [x + 2 * hr, y - 0.4 * hr],
                          [x + 2 * hr, y + 0.05 * hr], [x - 2 * hr, y + 0.35 * hr]])]
    if p == "throat":
        return [ellipse(x + 0.6 * hr, y + 0.75 * hr, 0.7 * hr, 0.55 * hr)]
    return None


def silhouette_points(shapes: list[Shape]) -> np.ndarray:
    """Silhouette points (unclipped shapes only) for sizing the instance."""
    pts = []
    for s in shapes:
        if s.clip is not None:
            continue
        pts.extend(s.polys)
        for p0, p1, w in s.lines:
            pts.append(np.stack([p0, p1]) + np.array([[-w, -w], [w, w]]) * 0.5)
            pts.append(np.stack([p0, p1]) + np.array([[w, -w], [-w, w]]) * 0.5)
    return np.concatenate(pts, axis=0)
