"""The embedded default data set: procedurally drawn bird-like objects in the CUB layout.

The project cannot download CUB at run time, so by default it generates a look-alike:
``<dest_parent>/CUB_200_2011`` with ``images/NNN.Name/*.jpg`` and the five CUB metadata
files. Each class is a fixed *recipe* (family shape, part colours, patterns, proportions);
each image draws one instance of it at a random pose over a cluttered background.

Retrieval of unseen classes has to be a real task: colours come from one shared palette
(classes differ by which part wears which colour and by shape and pattern), backgrounds
and clutter reuse the bird colours, and lighting and colour jitter move the global colour
statistics, so neither a colour histogram nor a random network solves it, while a trained
network can learn the part structure.

Every image is a pure function of ``(seed, class id, image index)``: the output is
byte-identical whatever the number of worker processes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from visrec.config import ConfigError, SyntheticConfig
from visrec.data.cub import CUB_DIRNAME

logger = logging.getLogger(__name__)

JPEG_QUALITY = 90
# The object is drawn at this multiple of the image resolution and averaged down: that
# gives anti-aliased edges and a coverage (alpha) map whose non-zero pixels are the mask.
_SUPERSAMPLE = 2
_SUBPIXEL_BITS = 4  # cv2 drawing "shift": polygon vertices in 1/16 pixel

# One palette shared by every class: classes differ by the combination and placement of
# these colours, not by owning a colour no other class has.
PALETTE: dict[str, tuple[int, int, int]] = {
    "Black": (32, 31, 34),
    "White": (232, 230, 222),
    "Grey": (140, 140, 144),
    "Slate": (78, 84, 98),
    "Brown": (116, 80, 48),
    "Buff": (208, 180, 136),
    "Rufous": (188, 96, 44),
    "Red": (184, 34, 38),
    "Yellow": (232, 198, 52),
    "Olive": (118, 122, 58),
    "Blue": (52, 92, 172),
    "Green": (50, 128, 78),
}
_PALETTE_NAMES = tuple(PALETTE)
_BEAK_COLOURS = ("Black", "Grey", "Yellow", "Rufous", "Buff", "Red")
_LEG_COLOURS = ("Black", "Grey", "Rufous", "Yellow", "Buff")
# Each class prefers a habitat (as CUB's water birds mostly sit on water); a habitat is a
# few natural backdrop colours. Many classes share a habitat, so it narrows, not decides.
HABITATS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "sky": ((160, 194, 224), (206, 220, 234)),
    "foliage": ((72, 106, 52), (44, 68, 38), (120, 140, 90)),
    "forest_floor": ((98, 78, 58), (170, 150, 110)),
    "beach": ((200, 186, 152), (214, 204, 180)),
    "water": ((90, 110, 130), (60, 100, 140)),
    "stone": ((150, 150, 150), (112, 112, 118)),
    "reeds": ((190, 170, 100), (150, 140, 80)),
    "snow": ((228, 230, 236), (200, 206, 216)),
}
_HABITAT_NAMES = tuple(HABITATS)
_BACKDROP = tuple(c for colours in HABITATS.values() for c in colours)
_BARK = (98, 78, 58)  # occluding branches
_LEAF = (72, 106, 52)  # occluding leaves

# Nuisance strengths (tuned so that neither a colour histogram nor a random network
# solves retrieval of unseen classes, see the module docstring).
_COLOUR_SIGMA = 6.0  # per-part colour jitter, per channel
_COLOUR_SHIFT = 5.0  # whole-plumage colour shift, per channel
_LIGHT_GAMMA = (0.9, 1.1)
_LIGHT_CAST = (0.92, 1.08)  # per-channel gain
_LIGHT_CONTRAST = (0.85, 1.15)
_LIGHT_BRIGHTNESS = 12.0
_CLUTTER_MIX = (0.3, 0.8)  # P(bird palette), P(palette or backdrop); the rest is any colour
_CLUTTER_EXTENT = (0.03, 0.15)  # shape size as a fraction of the image side
_BACKDROP_RANDOM_P = 0.05  # chance the backdrop itself takes a clutter colour
_NOISE = (1.0, 5.0)  # sensor noise sigma range
_BLUR = 0.8  # max Gaussian blur sigma (blur applied above 0.3)
_ROTATION = 20.0  # degrees either way, on top of the class posture
_SCALE = (0.35, 0.8)  # longest object side / image side
_SHADING = (0.2, 0.5)  # back-to-belly brightness difference
_HABITAT_P = 0.85  # chance an image shows its class habitat (else any habitat)
_TEXTURE = (3.0, 8.0)  # amplitude of the low-frequency backdrop texture
_BACKDROP_SPREAD = 12.0  # colour difference across the gradient

# Every class differs from every other in at least this many traits (see trait_distance).
MIN_TRAIT_DISTANCE = 3.0
_RECIPE_TRIES = 300

BODY_PATTERNS = ("none", "bars", "spots", "streaks", "breast", "belly", "collar")
HEAD_PATTERNS = ("none", "cap", "eye_stripe", "throat", "crest")
WING_PATTERNS = ("none", "bars", "tips", "shoulder")
TAIL_SHAPES = ("square", "notched", "forked", "pointed", "rounded")


@dataclass(frozen=True)
class _Family:
    """Ranges of proportions for one body plan; a class samples its values once."""

    aspect: tuple[float, float]  # body length / body height
    head: tuple[float, float]  # head radius / body half-height
    beak_len: tuple[float, float]  # beak length / head radius
    beak_width: tuple[float, float]  # beak base width / head radius
    beak: str  # cone | thin | dagger | hook
    tail_len: tuple[float, float]  # tail length / body half-length
    tails: tuple[str, ...]
    tail_angle: tuple[float, float]  # degrees, positive = cocked up
    wing_len: tuple[float, float]  # how far the wing reaches past the body's rear
    wing_point: tuple[float, float]  # 0 = rounded (ellipse), >1 = long pointed
    leg_len: tuple[float, float]  # leg length / body half-height
    posture: tuple[float, float]  # degrees, head raised above horizontal


FAMILIES: dict[str, _Family] = {
    "Finch": _Family((1.45, 1.75), (0.62, 0.75), (0.45, 0.7), (0.6, 0.8), "cone", (0.45, 0.7),
                     ("notched", "square"), (-5, 10), (0.1, 0.3), (0.3, 0.6), (0.35, 0.6), (15, 35)),
    "Warbler": _Family((1.8, 2.2), (0.6, 0.7), (0.55, 0.85), (0.25, 0.35), "thin", (0.5, 0.8),
                       ("square", "notched"), (-5, 5), (0.2, 0.4), (0.4, 0.8), (0.35, 0.55), (10, 30)),
    "Wren": _Family((1.25, 1.45), (0.55, 0.65), (0.8, 1.1), (0.22, 0.3), "thin", (0.45, 0.7),
                    ("square", "rounded"), (45, 70), (0.0, 0.15), (0.0, 0.3), (0.4, 0.6), (0, 15)),
    "Swallow": _Family((2.2, 2.6), (0.65, 0.8), (0.25, 0.4), (0.45, 0.6), "cone", (1.0, 1.5),
                       ("forked",), (-10, 5), (0.6, 1.0), (0.9, 1.3), (0.15, 0.3), (0, 15)),
    "Heron": _Family((1.9, 2.3), (0.5, 0.6), (2.2, 3.2), (0.3, 0.4), "dagger", (0.2, 0.35),
                     ("pointed", "square"), (-20, -5), (0.1, 0.3), (0.3, 0.6), (2.0, 2.8), (25, 45)),
    "Woodpecker": _Family((1.9, 2.3), (0.6, 0.7), (1.0, 1.4), (0.35, 0.45), "dagger", (0.6, 0.9),
                          ("pointed",), (-15, 0), (0.2, 0.4), (0.3, 0.6), (0.25, 0.4), (55, 75)),
    "Parrot": _Family((1.6, 1.9), (0.8, 0.95), (0.6, 0.8), (0.7, 0.9), "hook", (1.0, 1.6),
                      ("pointed",), (-10, 0), (0.3, 0.5), (0.3, 0.6), (0.3, 0.45), (45, 65)),
    "Gull": _Family((1.9, 2.3), (0.6, 0.7), (0.9, 1.2), (0.35, 0.45), "hook", (0.3, 0.5),
                    ("square",), (0, 10), (0.7, 1.0), (0.9, 1.3), (0.5, 0.8), (0, 15)),
    "Kingfisher": _Family((1.5, 1.8), (0.85, 1.0), (1.4, 1.9), (0.45, 0.55), "dagger", (0.25, 0.4),
                          ("square",), (-10, 0), (0.2, 0.4), (0.3, 0.6), (0.1, 0.25), (20, 40)),
    "Thrush": _Family((1.6, 1.9), (0.6, 0.7), (0.7, 0.9), (0.35, 0.45), "thin", (0.6, 0.8),
                      ("square", "rounded"), (-5, 10), (0.2, 0.4), (0.4, 0.7), (0.5, 0.8), (20, 40)),
}


@dataclass(frozen=True)
class BirdRecipe:
    """Everything fixed for one class; colours are palette names."""

    class_id: int
    name: str  # folder name without the "NNN." prefix, e.g. "Synth_Red_Spotted_Finch"
    family: str
    body: str
    wing: str
    head: str
    beak_colour: str
    leg_colour: str
    body_pattern: str
    body_pattern_colour: str
    head_pattern: str
    head_pattern_colour: str
    wing_pattern: str
    wing_pattern_colour: str
    eye_ring: bool
    aspect: float
    head_size: float
    beak_len: float
    beak_width: float
    beak_droop: float  # degrees below the body axis
    tail_len: float
    tail_shape: str
    tail_angle: float
    wing_len: float
    wing_point: float
    wing_width: float
    leg_len: float
    posture: float
    pattern_count: int  # stripes / streaks / wing bars
    spots: tuple[tuple[float, float, float], ...]  # (x, y, radius) in body units
    habitat: str  # preferred backdrop, a key of HABITATS

    @property
    def folder(self) -> str:
        return f"{self.class_id:03d}.{self.name}"


# ----------------------------------------------------------------------------- recipes


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi))


def _pick(rng: np.random.Generator, options: tuple[str, ...], avoid: tuple[str, ...] = ()) -> str:
    allowed = [o for o in options if o not in avoid]
    return allowed[int(rng.integers(len(allowed)))]


def _make_recipe(class_id: int, rng: np.random.Generator) -> BirdRecipe:
    family_name = _pick(rng, tuple(FAMILIES))
    fam = FAMILIES[family_name]
    body = _pick(rng, _PALETTE_NAMES)
    # Many real birds wear one colour over body and wings or body and head.
    wing = body if rng.random() < 0.25 else _pick(rng, _PALETTE_NAMES, (body,))
    head = body if rng.random() < 0.3 else _pick(rng, _PALETTE_NAMES, (body,))
    body_pattern = _pick(rng, BODY_PATTERNS)
    head_pattern = _pick(rng, HEAD_PATTERNS)
    wing_pattern = _pick(rng, WING_PATTERNS)
    spots = tuple(
        (float(rng.uniform(-0.7, 0.8)), float(rng.uniform(-0.5, 0.8)), float(rng.uniform(0.09, 0.15)))
        for _ in range(int(rng.integers(6, 12)))
    )
    return BirdRecipe(
        class_id=class_id,
        name="",
        family=family_name,
        body=body,
        wing=wing,
        head=head,
        beak_colour=_pick(rng, _BEAK_COLOURS),
        leg_colour=_pick(rng, _LEG_COLOURS),
        body_pattern=body_pattern,
        body_pattern_colour=_pick(rng, _PALETTE_NAMES, (body,)),
        head_pattern=head_pattern,
        head_pattern_colour=_pick(rng, _PALETTE_NAMES, (head,)),
        wing_pattern=wing_pattern,
        wing_pattern_colour=_pick(rng, _PALETTE_NAMES, (wing,)),
        eye_ring=bool(rng.random() < 0.3),
        aspect=_uniform(rng, fam.aspect),
        head_size=_uniform(rng, fam.head),
        beak_len=_uniform(rng, fam.beak_len),
        beak_width=_uniform(rng, fam.beak_width),
        beak_droop=float(rng.uniform(0, 15)),
        tail_len=_uniform(rng, fam.tail_len),
        tail_shape=_pick(rng, fam.tails),
        tail_angle=_uniform(rng, fam.tail_angle),
        wing_len=_uniform(rng, fam.wing_len),
        wing_point=_uniform(rng, fam.wing_point),
        wing_width=float(rng.uniform(0.4, 0.6)),
        leg_len=_uniform(rng, fam.leg_len),
        posture=_uniform(rng, fam.posture),
        pattern_count=int(rng.integers(2, 6)),
        spots=spots,
        habitat=_pick(rng, _HABITAT_NAMES),
    )


def _signature(r: BirdRecipe) -> tuple:
    """The discrete traits; no two classes share all of them."""
    return (r.family, r.body, r.wing, r.head, r.body_pattern, r.body_pattern_colour,
            r.head_pattern, r.wing_pattern)


def _colour_distance(a: str, b: str) -> float:
    """0 for the same palette colour, up to 1 for clearly different ones (Brown vs Rufous ~0.6)."""
    return min(1.0, float(np.linalg.norm(np.subtract(PALETTE[a], PALETTE[b]))) / 120.0)


def _pattern_distance(kind_a: str, colour_a: str, kind_b: str, colour_b: str) -> float:
    if kind_a != kind_b:
        return 1.0
    return 0.0 if kind_a == "none" else 0.7 * _colour_distance(colour_a, colour_b)


def trait_distance(a: BirdRecipe, b: BirdRecipe) -> float:
    """How many visible traits two classes differ in (colours count by how far apart they are)."""
    return (
        float(a.family != b.family)
        + _colour_distance(a.body, b.body)
        + _colour_distance(a.wing, b.wing)
        + _colour_distance(a.head, b.head)
        + _pattern_distance(a.body_pattern, a.body_pattern_colour, b.body_pattern, b.body_pattern_colour)
        + _pattern_distance(a.head_pattern, a.head_pattern_colour, b.head_pattern, b.head_pattern_colour)
        + _pattern_distance(a.wing_pattern, a.wing_pattern_colour, b.wing_pattern, b.wing_pattern_colour)
        + 0.3 * _colour_distance(a.beak_colour, b.beak_colour)
    )


def _class_name(r: BirdRecipe, taken: set[str]) -> str:
    pattern = {"none": "Plain", "bars": "Barred", "spots": "Spotted", "streaks": "Streaked",
               "breast": f"{r.body_pattern_colour}breasted", "belly": f"{r.body_pattern_colour}bellied",
               "collar": "Collared"}[r.body_pattern]
    base = f"Synth_{r.body}_{pattern}_{r.family}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


def make_recipes(num_classes: int, seed: int) -> list[BirdRecipe]:
    """The class recipes, in class order; class k's recipe does not depend on num_classes."""
    recipes: list[BirdRecipe] = []
    names: set[str] = set()
    for class_id in range(1, num_classes + 1):
        rng = np.random.default_rng([seed, 1, class_id])
        # Redraw (same stream, so still deterministic) until the class differs from every
        # earlier one in several traits: near-duplicate classes would make recall a lottery.
        best, best_distance = None, -1.0
        for _ in range(_RECIPE_TRIES):
            recipe = _make_recipe(class_id, rng)
            distance = min((trait_distance(recipe, r) for r in recipes), default=math.inf)
            if distance > best_distance:
                best, best_distance = recipe, distance
            if distance >= MIN_TRAIT_DISTANCE:
                break
        name = _class_name(best, names)
        names.add(name)
        recipes.append(replace(best, name=name))
    return recipes


# ----------------------------------------------------------------------------- geometry
# Object coordinates: the body is an ellipse centred at the origin with half-length 1,
# the bird faces +x, and y points down (image convention).


@dataclass
class _Shape:
    colour: np.ndarray  # RGB float
    polys: list[np.ndarray]  # filled polygons, (N, 2) object coordinates
    lines: list[tuple[np.ndarray, np.ndarray, float]]  # segments (p0, p1, width)
    clip: str | None = None  # draw only inside this earlier layer
    layer: str | None = None  # remember this shape's mask under this name


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 40,
             taper: float = 0.0) -> np.ndarray:
    """Ellipse polygon; ``taper`` > 0 narrows the -x end to a point (wings, leaves)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = rx * np.cos(t)
    y = ry * np.sin(t) * ((1 + np.cos(t)) / 2) ** taper if taper > 0 else ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


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


def _bird_shapes(r: BirdRecipe, colours: dict[str, np.ndarray], rng: np.random.Generator) -> list[_Shape]:
    """The drawing list of one instance, back to front."""
    b = 1.0 / r.aspect  # body half-height
    hr = r.head_size * b  # head radius
    head_c = np.array([0.78 + 0.15 * hr, -0.55 * b - 0.2 * hr])
    shapes: list[_Shape] = []

    shapes.append(_Shape(colours["wing"] if r.wing != r.body else colours["body"] * 0.85,
                         [_tail(r, b)], [], layer="tail"))
    # Legs: two segments from the belly, with a short toe forward.
    legs = []
    leg_w = 0.07 * b
    for dx in (-0.12, 0.08):
        top = np.array([dx, 0.75 * b])
        foot = top + np.array([-0.05, r.leg_len * b + 0.25 * b])
        legs.append((top, foot, leg_w))
        legs.append((foot, foot + np.array([0.22 * b + 0.05, 0.0]), leg_w * 0.8))
    shapes.append(_Shape(colours["leg"], [], legs))

    shapes.append(_Shape(colours["body"], [_ellipse(0, 0, 1.0, b)], [], layer="body"))
    body_pattern = _body_pattern(r, b, rng)
    if body_pattern is not None:
        polys, lines = body_pattern
        shapes.append(_Shape(colours["body_pattern"], polys, lines, clip="body"))

    # Wing: a teardrop lying on the body, its point towards the tail.
    wing_len = 0.75 + r.wing_len
    wing_c = np.array([0.45 - wing_len, -0.1 * b])
    wing = _ellipse(wing_c[0], wing_c[1], wing_len, r.wing_width * b * 1.3,
                    angle=math.radians(-4), taper=r.wing_point)
    shapes.append(_Shape(colours["wing"] if r.wing != r.body else colours["body"] * 0.8,
                         [wing], [], layer="wing"))
    wing_pattern = _wing_pattern(r, b, wing_c, wing_len)
    if wing_pattern is not None:
        polys, lines = wing_pattern
        shapes.append(_Shape(colours["wing_pattern"], polys, lines, clip="wing"))

    # Beak before the head so its base hides under the head outline.
    shapes.append(_Shape(colours["beak"], [_beak(r, head_c, hr)], []))
    if r.head_pattern == "crest":
        crest = np.array([head_c + (-0.1 * hr, -0.6 * hr), head_c + (-1.3 * hr, -1.5 * hr),
                          head_c + (-0.9 * hr, -0.2 * hr)])
        shapes.append(_Shape(colours["head_pattern"], [crest], []))
    shapes.append(_Shape(colours["head"], [_ellipse(head_c[0], head_c[1], hr, hr)], [], layer="head"))
    head_pattern = _head_pattern(r, head_c, hr)
    if head_pattern is not None:
        shapes.append(_Shape(colours["head_pattern"], head_pattern, [], clip="head"))
    eye = head_c + np.array([0.35 * hr, -0.15 * hr])
    if r.eye_ring:
        shapes.append(_Shape(colours["eye_ring"], [_ellipse(eye[0], eye[1], 0.3 * hr, 0.3 * hr, n=16)], []))
    shapes.append(_Shape(colours["eye"], [_ellipse(eye[0], eye[1], 0.16 * hr, 0.16 * hr, n=12)], []))
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
        polys = [_ellipse(x + rng.normal(0, 0.02), y * b + rng.normal(0, 0.02), rad, rad, n=12)
                 for x, y, rad in r.spots]
        return polys, []
    if p == "streaks":
        lines = []
        for i, x in enumerate(np.linspace(-0.2, 0.7, k + 2)):
            y0 = (0.05 + 0.25 * (i % 2)) * b
            lines.append((np.array([x, y0]), np.array([x - 0.18, y0 + 0.45 * b]), 0.09 * b + 0.03))
        return [], lines
    if p == "breast":
        return [_ellipse(0.55, 0.35 * b, 0.5, 0.75 * b)], []
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
        return [_ellipse(wing_c[0] + 0.7 * wing_len, wing_c[1] - 0.15 * b, 0.35 * wing_len, 0.4 * b)], []
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
        return [_ellipse(x + 0.6 * hr, y + 0.75 * hr, 0.7 * hr, 0.55 * hr)]
    return None


# ----------------------------------------------------------------------------- rendering


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


def _random_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """Clutter colours: bird palette (so colour alone does not find the bird), backdrop, or any."""
    u = rng.random()
    if u < _CLUTTER_MIX[0]:
        base = np.array(PALETTE[_PALETTE_NAMES[int(rng.integers(len(_PALETTE_NAMES)))]], float)
    elif u < _CLUTTER_MIX[1]:
        base = np.array(_BACKDROP[int(rng.integers(len(_BACKDROP)))], float)
    else:
        base = rng.uniform(0, 255, 3)
    return tuple(float(v) for v in np.clip(base + rng.normal(0, 12, 3), 0, 255))


def _background(rng: np.random.Generator, size: int, clutter_shapes: int, habitat: str) -> np.ndarray:
    """Gradient + low-frequency texture + random shapes, float32 RGB."""
    if rng.random() < _BACKDROP_RANDOM_P:
        c0 = np.array(_random_colour(rng), float)
    else:
        if rng.random() >= _HABITAT_P:
            habitat = _HABITAT_NAMES[int(rng.integers(len(_HABITAT_NAMES)))]
        colours = HABITATS[habitat]
        c0 = np.array(colours[int(rng.integers(len(colours)))], float)
    c1 = np.clip(c0 + rng.normal(0, _BACKDROP_SPREAD, 3), 0, 255)
    angle = rng.uniform(0, 2 * np.pi)
    coords = (np.arange(size, dtype=np.float32) - size / 2) / size
    ramp = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None] + 0.5
    c0, c1 = c0.astype(np.float32), c1.astype(np.float32)
    img = c0 + ramp[..., None] * (c1 - c0)
    grid = rng.normal(0, 1, (5, 5, 3)).astype(np.float32)
    texture = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    img += texture * np.float32(rng.uniform(*_TEXTURE))

    for _ in range(clutter_shapes):
        colour = _random_colour(rng)
        kind = rng.random()
        cx, cy = rng.uniform(-0.1, 1.1, 2) * size
        extent = rng.uniform(*_CLUTTER_EXTENT) * size
        if kind < 0.35:  # blob / leaf
            poly = _ellipse(cx, cy, extent, extent * rng.uniform(0.2, 1.0), rng.uniform(0, np.pi),
                            n=24, taper=float(rng.choice([0.0, 0.0, 0.8])))
            cv2.fillPoly(img, [_to_fixed(poly, 1.0)], colour, cv2.LINE_AA, _SUBPIXEL_BITS)
        elif kind < 0.65:  # branch / twig
            a = rng.uniform(0, np.pi)
            d = np.array([math.cos(a), math.sin(a)]) * extent * 2
            p0, p1 = np.array([cx, cy]) - d, np.array([cx, cy]) + d
            thickness = max(1, int(rng.uniform(0.006, 0.04) * size))
            cv2.line(img, _pt(p0), _pt(p1), colour, thickness, cv2.LINE_AA, _SUBPIXEL_BITS)
        else:  # irregular polygon
            n = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = extent * rng.uniform(0.4, 1.0, n)
            poly = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
            cv2.fillPoly(img, [_to_fixed(poly, 1.0)], colour, cv2.LINE_AA, _SUBPIXEL_BITS)
    return img


def _to_fixed(points: np.ndarray, scale: float) -> np.ndarray:
    return np.round(points * scale * (1 << _SUBPIXEL_BITS)).astype(np.int32)


def _pt(p: np.ndarray, scale: float = 1.0) -> tuple[int, int]:
    q = np.round(np.asarray(p) * scale * (1 << _SUBPIXEL_BITS)).astype(int)
    return int(q[0]), int(q[1])


def _shape_points(shapes: list[_Shape]) -> np.ndarray:
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


def _draw_object(shapes: list[_Shape], transform: np.ndarray, size: int, scale: float
                 ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Draw the shapes supersampled inside the object's region of the image.

    Returns (premultiplied RGB float32, coverage 0..1, (x0, y0) of the region): only the
    region around the object is drawn, which keeps the supersampled canvases small.
    """
    corners = _shape_points(shapes) @ transform[:, :2].T + transform[:, 2]
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
            cv2.fillPoly(m, [_to_fixed(to_px(p), 1.0) for p in s.polys], 255, cv2.LINE_8, _SUBPIXEL_BITS)
        for p0, p1, width in s.lines:
            seg = to_px(np.stack([p0, p1]))
            cv2.line(m, _pt(seg[0]), _pt(seg[1]), 255, max(1, int(round(width * px_per_unit))),
                     cv2.LINE_8, _SUBPIXEL_BITS)
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


def _occluder(img: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    """A branch, leaf or blob over part of the object (drawn in place)."""
    x, y, w, h = box
    size = img.shape[0]
    # Anchor on the object's box edge so the occluder hides part of it, not all of it.
    side = int(rng.integers(4))
    t = rng.uniform(0.2, 0.8)
    anchor = [np.array([x + t * w, y]), np.array([x + t * w, y + h]),
              np.array([x, y + t * h]), np.array([x + w, y + t * h])][side]
    kind = rng.random()
    if kind < 0.4:
        a = rng.uniform(0, np.pi)
        d = np.array([math.cos(a), math.sin(a)]) * size
        colour = np.clip(np.array(_BARK, float) + rng.normal(0, 18, 3), 0, 255)
        thickness = max(2, int(rng.uniform(0.05, 0.1) * max(w, h)))
        centre = anchor + (np.array([x + w / 2, y + h / 2]) - anchor) * rng.uniform(0.1, 0.4)
        cv2.line(img, _pt(centre - d), _pt(centre + d), tuple(colour), thickness, cv2.LINE_AA, _SUBPIXEL_BITS)
    else:
        extent = rng.uniform(0.2, 0.4) * max(w, h)
        if kind < 0.75:
            colour = np.clip(np.array(_LEAF, float) + rng.normal(0, 20, 3), 0, 255)
            poly = _ellipse(anchor[0], anchor[1], extent, extent * 0.45, rng.uniform(0, np.pi), taper=0.8)
        else:
            colour = np.array(_random_colour(rng))
            n = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = extent * rng.uniform(0.5, 1.0, n)
            poly = np.stack([anchor[0] + radii * np.cos(angles), anchor[1] + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(img, [_to_fixed(poly, 1.0)], tuple(colour), cv2.LINE_AA, _SUBPIXEL_BITS)


def _lighting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, colour cast, contrast, brightness and sensor noise over the whole image."""
    gamma = rng.uniform(*_LIGHT_GAMMA)
    cast = rng.uniform(*_LIGHT_CAST, 3)
    # Gamma and cast through a per-channel lookup table: far cheaper than a float power.
    lut = (255.0 * (np.arange(256) / 255.0) ** gamma)[:, None] * cast[None, :]
    pixels = np.clip(np.round(img), 0, 255).astype(np.uint8)
    out = cv2.LUT(pixels, lut.reshape(256, 1, 3).astype(np.float32))
    mean = float(out.mean())
    out = (out - mean) * np.float32(rng.uniform(*_LIGHT_CONTRAST)) + np.float32(
        mean + rng.uniform(-_LIGHT_BRIGHTNESS, _LIGHT_BRIGHTNESS))
    out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(rng.uniform(*_NOISE))
    return out


def _octave_noise(rng: np.random.Generator, height: int, width: int, cells: tuple[int, ...]) -> np.ndarray:
    """Sum of smooth random fields, one per grid of ``cells`` cells: float32, std about 1."""
    out = np.zeros((height, width), np.float32)
    for n in cells:
        grid = rng.normal(0, 1, (n, n)).astype(np.float32)
        out += cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return out / np.float32(math.sqrt(len(cells)))


def _textured_backdrop(bg: np.ndarray, rng: np.random.Generator, texture: float) -> np.ndarray:
    """Photo-like backdrop: fine multi-scale detail (pebbles, leaves, ripples), then a random
    defocus. Real photos rarely show the flat fields of the shape drawing, and a detector that
    learned "object = the only detail in the picture" draws loose boxes on them."""
    size = bg.shape[0]
    amplitude = np.float32(texture * rng.uniform(8.0, 40.0))
    luma = _octave_noise(rng, size, size, (8, 16, 32, 64))
    tint = rng.normal(0, 0.3, 3).astype(np.float32)  # detail is mostly luminance, a little colour
    bg = bg + amplitude * luma[..., None] * (1.0 + tint)
    sigma = texture * rng.uniform(0.0, 3.0)
    return cv2.GaussianBlur(bg, (0, 0), sigma) if sigma > 0.3 else bg


def _plumage_texture(shape: tuple[int, int], rng: np.random.Generator, texture: float) -> np.ndarray:
    """Multiplicative fine detail over the object (feathers), [h, w, 1] float32 around 1."""
    strength = np.float32(texture * rng.uniform(0.05, 0.25))
    detail = _octave_noise(rng, shape[0], shape[1], (4, 8, 16))
    return (1.0 + strength * detail)[..., None]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (x, y, width, height) of the non-zero pixels of ``mask``."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        raise ValueError("mask is empty: the object was not drawn inside the image")
    return int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)


def render_instance(recipe: BirdRecipe, rng: np.random.Generator, image_size: int,
                    clutter_shapes: int = 12, occlusion_prob: float = 0.25,
                    object_scale: tuple[float, float] = _SCALE, texture: float = 0.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One image of ``recipe``: (RGB uint8 image, bool object mask before occlusion).

    ``object_scale``: range of the object's longest side over the image side (above 1 the
    object may leave the frame). ``texture`` (0..1): photo-like detail, see ``_photo_texture``.
    """
    size = image_size
    bg = _background(rng, size, clutter_shapes, recipe.habitat)
    if texture > 0:
        bg = _textured_backdrop(bg, rng, texture)

    shapes = _bird_shapes(recipe, _instance_colours(recipe, rng), rng)
    # Pose: class posture + random tilt, random facing, random size and place.
    angle = -math.radians(recipe.posture + rng.uniform(-_ROTATION, _ROTATION))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    c, s = math.cos(angle), math.sin(angle)
    linear = np.array([[c, -s], [s, c]]) @ np.diag([flip, 1.0])
    pts = _shape_points(shapes) @ linear.T
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
        colour *= _plumage_texture(alpha.shape, rng, texture)
    img = bg
    region = img[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]]
    region[:] = region * (1 - alpha[..., None]) + colour
    mask = np.zeros((size, size), bool)
    mask[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = alpha > 0

    if rng.random() < occlusion_prob:
        _occluder(img, mask_box(mask), rng)
    sigma = rng.uniform(0, _BLUR)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = _lighting(img, rng)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


# ----------------------------------------------------------------------------- writing


def _encode_jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG image")
    return buf.tobytes()


@dataclass(frozen=True)
class _Job:
    recipe: BirdRecipe
    index: int  # 0-based image index within the class
    path: Path
    seed: int
    image_size: int
    clutter_shapes: int
    occlusion_prob: float
    object_scale: tuple[float, float] = _SCALE
    texture: float = 0.0


def _render_job(job: _Job) -> tuple[int, int, int, int]:
    rng = instance_rng(job.seed, job.recipe.class_id, job.index)
    image, mask = render_instance(job.recipe, rng, job.image_size, job.clutter_shapes, job.occlusion_prob,
                                  job.object_scale, job.texture)
    job.path.write_bytes(_encode_jpeg(image))
    return mask_box(mask)


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already


def image_filename(recipe: BirdRecipe, index: int) -> str:
    return f"{recipe.name}_{index + 1:04d}.jpg"


def _check_config(cfg: SyntheticConfig) -> None:
    problems = []
    if cfg.num_classes < 1:
        problems.append(f"num_classes={cfg.num_classes} (need >= 1)")
    if cfg.images_per_class < 1:
        problems.append(f"images_per_class={cfg.images_per_class} (need >= 1)")
    if cfg.image_size < 32:
        problems.append(f"image_size={cfg.image_size} (need >= 32 pixels)")
    if not 0.0 <= cfg.occlusion_prob <= 1.0:
        problems.append(f"occlusion_prob={cfg.occlusion_prob} (need 0..1)")
    if cfg.clutter_shapes < 0:
        problems.append(f"clutter_shapes={cfg.clutter_shapes} (need >= 0)")
    if len(cfg.object_scale) != 2 or not 0.05 <= cfg.object_scale[0] <= cfg.object_scale[1] <= 2.0:
        problems.append(f"object_scale={cfg.object_scale} (need [low, high], 0.05 <= low <= high <= 2)")
    if not 0.0 <= cfg.texture <= 1.0:
        problems.append(f"texture={cfg.texture} (need 0..1)")
    if cfg.workers < 0:
        problems.append(f"workers={cfg.workers} (need >= 0; 0 or 1 runs in-process)")
    if problems:
        raise ConfigError("data.synthetic: invalid " + "; ".join(problems) + " — fix it in params.yaml")


def generate(dest_parent: Path, cfg: SyntheticConfig, progress: bool = True) -> Path:
    """Write the synthetic data set as ``dest_parent/CUB_200_2011``; return that folder.

    With ``cfg.workers > 1`` the images are drawn in spawned processes, so a script that
    calls this must guard its entry point with ``if __name__ == "__main__":``.
    """
    _check_config(cfg)
    start = time.perf_counter()
    root = Path(dest_parent) / CUB_DIRNAME
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} already exists and is not empty: generate into an empty folder")
    images_dir = root / "images"
    recipes = make_recipes(cfg.num_classes, cfg.seed)

    jobs: list[_Job] = []
    for recipe in recipes:
        (images_dir / recipe.folder).mkdir(parents=True, exist_ok=True)
        for index in range(cfg.images_per_class):
            jobs.append(_Job(recipe, index, images_dir / recipe.folder / image_filename(recipe, index),
                             cfg.seed, cfg.image_size, cfg.clutter_shapes, cfg.occlusion_prob,
                             (float(cfg.object_scale[0]), float(cfg.object_scale[1])), cfg.texture))

    bar = dict(total=len(jobs), desc="synthetic images", unit="img", disable=not progress)
    if cfg.workers <= 1:
        boxes = [_render_job(job) for job in tqdm(jobs, **bar)]
    else:
        # spawn, not fork: the caller may hold threads (Paddle, OpenMP) that fork would copy
        # mid-lock. An executor, not a Pool: a worker that dies at start-up raises
        # BrokenProcessPool instead of being respawned forever.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init) as pool:
            boxes = list(tqdm(pool.map(_render_job, jobs, chunksize=16), **bar))

    _write_metadata(root, recipes, jobs, boxes, cfg.seed)
    seconds = time.perf_counter() - start
    logger.info("synthetic data: %d classes, %d images, %d px, %.1f s -> %s",
                len(recipes), len(jobs), cfg.image_size, seconds, root)
    return root


def _write_metadata(root: Path, recipes: list[BirdRecipe], jobs: list[_Job],
                    boxes: list[tuple[int, int, int, int]], seed: int) -> None:
    # CUB marks roughly half of each class for training; pick which half per class, seeded.
    train_flags: list[int] = []
    per_class: dict[int, list[_Job]] = {}
    for job in jobs:
        per_class.setdefault(job.recipe.class_id, []).append(job)
    for class_id, class_jobs in per_class.items():
        n = len(class_jobs)
        order = np.random.default_rng([seed, 3, class_id]).permutation(n)
        flags = np.zeros(n, int)
        flags[order[: (n + 1) // 2]] = 1
        train_flags.extend(int(f) for f in flags)

    images, labels, bboxes, split = [], [], [], []
    for image_id, (job, box, flag) in enumerate(zip(jobs, boxes, train_flags, strict=True), start=1):
        images.append(f"{image_id} {job.recipe.folder}/{job.path.name}")
        labels.append(f"{image_id} {job.recipe.class_id}")
        x, y, w, h = box
        bboxes.append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
        split.append(f"{image_id} {flag}")
    files = {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "classes.txt": [f"{r.class_id} {r.folder}" for r in recipes],
        "bounding_boxes.txt": bboxes,
        "train_test_split.txt": split,
    }
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
