"""The classes of the synthetic data set: one shared palette, habitats, body plans, and the
*recipe* each class fixes once (family shape, part colours, patterns, proportions).

Recipes are drawn so that classes differ by which part wears which colour, by shape and by
pattern, never by owning a colour: every class differs from every earlier one in at least
``MIN_TRAIT_DISTANCE`` traits (``trait_distance``), and class k's recipe does not depend on
how many classes are made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

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
PALETTE_NAMES = tuple(PALETTE)
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
HABITAT_NAMES = tuple(HABITATS)

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
    body = _pick(rng, PALETTE_NAMES)
    # Many real birds wear one colour over body and wings or body and head.
    wing = body if rng.random() < 0.25 else _pick(rng, PALETTE_NAMES, (body,))
    head = body if rng.random() < 0.3 else _pick(rng, PALETTE_NAMES, (body,))
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
        body_pattern_colour=_pick(rng, PALETTE_NAMES, (body,)),
        head_pattern=head_pattern,
        head_pattern_colour=_pick(rng, PALETTE_NAMES, (head,)),
        wing_pattern=wing_pattern,
        wing_pattern_colour=_pick(rng, PALETTE_NAMES, (wing,)),
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
        habitat=_pick(rng, HABITAT_NAMES),
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
