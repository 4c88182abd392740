"""One image of a class: the bird posed, drawn anti-aliased over its scene, and its exact mask.

Every image is a pure function of ``(seed, class id, image index)`` (``instance_rng``), so a
data set is byte-identical whatever the number of processes drawing it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from visrec.data.synthetic.bird_shapes import Shape, bird_shapes, silhouette_points
from visrec.data.synthetic.geometry import SUBPIXEL_BITS, fixed_point, to_fixed
from visrec.data.synthetic.recipes import PALETTE, BirdRecipe
from visrec.data.synthetic.scene import (
    apply_lighting,
    draw_background,
    draw_occluder,
    plumage_texture,
    textured_backdrop,
)

# The object is drawn at this multiple of the image resolution and averaged down: that
# gives anti-aliased edges and a coverage (alpha) map whose non-zero pixels are the mask.
_SUPERSAMPLE = 2
DEFAULT_OBJECT_SCALE = (0.35, 0.8)  # longest object side / image side
# Nuisance strengths on the bird itself, tuned together with the scene's (visrec.data.synthetic.scene).
_COLOUR_SIGMA = 6.0  # per-part colour jitter, per channel
_COLOUR_SHIFT = 5.0  # whole-plumage colour shift, per channel
_BLUR = 0.8  # max Gaussian blur sigma (blur applied above 0.3)
_ROTATION = 20.0  # degrees either way, on top of the class posture
_SHADING = (0.2, 0.5)  # back-to-belly brightness difference


def instance_rng(seed: int, class_id: int, index: int) -> np.random.Generator:
    """The random stream of one image: depends only on (seed, class, index)."""
    return np.random.default_rng([seed, 2, class_id, index])


def _jitter_colour(rng: np.random.Generator, name: str, shift: np.ndarray) -> np.ndarray:
    return np.clip(np.array(PALETTE[name], float) + shift + rng.normal(0, _COLOUR_SIGMA, 3), 0, 255)


def _instance_colours(r: BirdRecipe, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shift = rng.normal(0, _COLOUR_SHIFT, 3)  # the whole plumage a little warmer / cooler / darker
    return {
        "body": _jitter_colour(rng, r.body, shift),
        "wing": _jitter_colour(rng, r.wing, shift),
        "head": _jitter_colour(rng, r.head, shift),
        "beak": _jitter_colour(rng, r.beak_colour, shift),
        "leg": _jitter_colour(rng, r.leg_colour, shift),
        "body_pattern": _jitter_colour(rng, r.body_pattern_colour, shift),
        "head_pattern": _jitter_colour(rng, r.head_pattern_colour, shift),
        "wing_pattern": _jitter_colour(rng, r.wing_pattern_colour, shift),
        "eye_ring": _jitter_colour(rng, "White", shift),
        "eye": np.array([12.0, 12.0, 14.0]),
    }


def _draw_object(shapes: list[Shape], transform: np.ndarray, size: int, scale: float
                 ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Draw the shapes supersampled inside the object's region of the image.

    Returns (premultiplied RGB float32, coverage 0..1, (x0, y0) of the region): only the
    region around the object is drawn, which keeps the supersampled canvases small.
    """
    corners = silhouette_points(shapes) @ transform[:, :2].T + transform[:, 2]
    x0, y0 = (max(0, int(v) - 2) for v in corners.min(axis=0))
    x1, y1 = (min(size, int(v) + 3) for v in corners.max(axis=0))
    w, h = x1 - x0, y1 - y0
    big_w, big_h = w * _SUPERSAMPLE, h * _SUPERSAMPLE
    colour = np.zeros((big_h, big_w, 3), np.float32)
    cover = np.zeros((big_h, big_w), np.uint8)
    layers: dict[str, np.ndarray] = {}
    px_per_unit = scale * _SUPERSAMPLE
    origin = np.array([x0, y0], float)

    def to_px(points: np.ndarray) -> np.ndarray:
        return (points @ transform[:, :2].T + transform[:, 2] - origin) * _SUPERSAMPLE

    for s in shapes:
        m = np.zeros((big_h, big_w), np.uint8)
        if s.polys:
            cv2.fillPoly(m, [to_fixed(to_px(p), 1.0) for p in s.polys], 255, cv2.LINE_8, SUBPIXEL_BITS)
        for p0, p1, width in s.lines:
            seg = to_px(np.stack([p0, p1]))
            cv2.line(m, fixed_point(seg[0]), fixed_point(seg[1]), 255, max(1, int(round(width * px_per_unit))),
                     cv2.LINE_8, SUBPIXEL_BITS)
        if s.clip is not None:
            m &= layers[s.clip]
        if s.layer is not None:
            layers[s.layer] = m
        np.copyto(colour, s.colour.astype(np.float32), where=(m > 0)[..., None])
        cover |= m
    colour = cv2.resize(colour, (w, h), interpolation=cv2.INTER_AREA)
    alpha = cv2.resize(cover, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    return colour, alpha, (x0, y0)


def _shading(size: int, origin: tuple[int, int], shape: tuple[int, int], transform: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    """Light from above in the bird's own frame: back lighter than belly."""
    up = transform[:, :2] @ np.array([0.0, -1.0])
    up = up / (np.linalg.norm(up) + 1e-9)
    xs = (np.arange(origin[0], origin[0] + shape[1], dtype=np.float32) - size / 2) / size
    ys = (np.arange(origin[1], origin[1] + shape[0], dtype=np.float32) - size / 2) / size
    strength = rng.uniform(*_SHADING)
    return (1.0 + strength * (up[0] * xs[None, :] + up[1] * ys[:, None]))[..., None].astype(np.float32)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (x, y, width, height) of the non-zero pixels of ``mask``."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        raise ValueError("mask is empty: the object was not drawn inside the image")
    return int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)


def render_instance(recipe: BirdRecipe, rng: np.random.Generator, image_size: int,
                    clutter_shapes: int = 12, occlusion_prob: float = 0.25,
                    object_scale: tuple[float, float] = DEFAULT_OBJECT_SCALE, texture: float = 0.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One image of ``recipe``: (RGB uint8 image, bool object mask before occlusion).

    ``object_scale``: range of the object's longest side over the image side (above 1 the
    object may leave the frame). ``texture`` (0..1): photo-like detail on backdrop and
    object (``scene.textured_backdrop``, ``scene.plumage_texture``).
    """
    size = image_size
    bg = draw_background(rng, size, clutter_shapes, recipe.habitat)
    if texture > 0:
        bg = textured_backdrop(bg, rng, texture)

    shapes = bird_shapes(recipe, _instance_colours(recipe, rng), rng)
    # Pose: class posture + random tilt, random facing, random size and place.
    angle = -math.radians(recipe.posture + rng.uniform(-_ROTATION, _ROTATION))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    c, s = math.cos(angle), math.sin(angle)
    linear = np.array([[c, -s], [s, c]]) @ np.diag([flip, 1.0])
    pts = silhouette_points(shapes) @ linear.T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    target = rng.uniform(*object_scale) * size  # longest side of the object, in pixels
    scale = target / float(max(hi - lo))
    margin = 1.0
    # room < 0 (an object larger than the frame): it is cut by the frame on a random side
    room = size - 2 * margin - (hi - lo) * scale
    offset = margin + rng.uniform(0, 1, 2) * room - lo * scale
    transform = np.concatenate([linear * scale, offset[:, None]], axis=1)

    colour, alpha, (x0, y0) = _draw_object(shapes, transform, size, scale)
    colour *= _shading(size, (x0, y0), alpha.shape, transform, rng)
    if texture > 0:
        colour *= plumage_texture(alpha.shape, rng, texture)
    img = bg
    region = img[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]]
    region[:] = region * (1 - alpha[..., None]) + colour
    mask = np.zeros((size, size), bool)
    mask[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = alpha > 0

    if rng.random() < occlusion_prob:
        draw_occluder(img, mask_box(mask), rng)
    sigma = rng.uniform(0, _BLUR)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = apply_lighting(img, rng)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask
