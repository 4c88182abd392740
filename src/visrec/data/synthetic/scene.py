"""Everything around and over the bird that is not the bird: a habitat backdrop with clutter
drawn from the bird colours, occluders over the object, photo-like texture, and the lighting
and sensor noise over the whole image.

These nuisances are what makes retrieval of unseen classes a real task (see the package
docstring): clutter and backdrops reuse the bird palette, and lighting moves the global colour
statistics, so neither a colour histogram nor a random network solves it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from visrec.data.synthetic.geometry import SUBPIXEL_BITS, ellipse, fixed_point, to_fixed
from visrec.data.synthetic.recipes import HABITAT_NAMES, HABITATS, PALETTE, PALETTE_NAMES

_BACKDROP = tuple(c for colours in HABITATS.values() for c in colours)
_BARK = (98, 78, 58)  # occluding branches
_LEAF = (72, 106, 52)  # occluding leaves

# Nuisance strengths (tuned so that neither a colour histogram nor a random network
# solves retrieval of unseen classes).
_LIGHT_GAMMA = (0.9, 1.1)
_LIGHT_CAST = (0.92, 1.08)  # per-channel gain
_LIGHT_CONTRAST = (0.85, 1.15)
_LIGHT_BRIGHTNESS = 12.0
_CLUTTER_MIX = (0.3, 0.8)  # P(bird palette), P(palette or backdrop); the rest is any colour
_CLUTTER_EXTENT = (0.03, 0.15)  # shape size as a fraction of the image side
_BACKDROP_RANDOM_P = 0.05  # chance the backdrop itself takes a clutter colour
_NOISE = (1.0, 5.0)  # sensor noise sigma range
_HABITAT_P = 0.85  # chance an image shows its class habitat (else any habitat)
_TEXTURE = (3.0, 8.0)  # amplitude of the low-frequency backdrop texture
_BACKDROP_SPREAD = 12.0  # colour difference across the gradient


def _random_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """Clutter colours: bird palette (so colour alone does not find the bird), backdrop, or any."""
    u = rng.random()
    if u < _CLUTTER_MIX[0]:
        base = np.array(PALETTE[PALETTE_NAMES[int(rng.integers(len(PALETTE_NAMES)))]], float)
    elif u < _CLUTTER_MIX[1]:
        base = np.array(_BACKDROP[int(rng.integers(len(_BACKDROP)))], float)
    else:
        base = rng.uniform(0, 255, 3)
    return tuple(float(v) for v in np.clip(base + rng.normal(0, 12, 3), 0, 255))


def draw_background(rng: np.random.Generator, size: int, clutter_shapes: int, habitat: str) -> np.ndarray:
    """Gradient + low-frequency texture + random shapes, float32 RGB."""
    if rng.random() < _BACKDROP_RANDOM_P:
        c0 = np.array(_random_colour(rng), float)
    else:
        if rng.random() >= _HABITAT_P:
            habitat = HABITAT_NAMES[int(rng.integers(len(HABITAT_NAMES)))]
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
            poly = ellipse(cx, cy, extent, extent * rng.uniform(0.2, 1.0), rng.uniform(0, np.pi),
                           n=24, taper=float(rng.choice([0.0, 0.0, 0.8])))
            cv2.fillPoly(img, [to_fixed(poly, 1.0)], colour, cv2.LINE_AA, SUBPIXEL_BITS)
        elif kind < 0.65:  # branch / twig
            a = rng.uniform(0, np.pi)
            d = np.array([math.cos(a), math.sin(a)]) * extent * 2
            p0, p1 = np.array([cx, cy]) - d, np.array([cx, cy]) + d
            thickness = max(1, int(rng.uniform(0.006, 0.04) * size))
            cv2.line(img, fixed_point(p0), fixed_point(p1), colour, thickness, cv2.LINE_AA, SUBPIXEL_BITS)
        else:  # irregular polygon
            n = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = extent * rng.uniform(0.4, 1.0, n)
            poly = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
            cv2.fillPoly(img, [to_fixed(poly, 1.0)], colour, cv2.LINE_AA, SUBPIXEL_BITS)
    return img


def draw_occluder(img: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
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
        cv2.line(img, fixed_point(centre - d), fixed_point(centre + d), tuple(colour), thickness, cv2.LINE_AA,
                 SUBPIXEL_BITS)
    else:
        extent = rng.uniform(0.2, 0.4) * max(w, h)
        if kind < 0.75:
            colour = np.clip(np.array(_LEAF, float) + rng.normal(0, 20, 3), 0, 255)
            poly = ellipse(anchor[0], anchor[1], extent, extent * 0.45, rng.uniform(0, np.pi), taper=0.8)
        else:
            colour = np.array(_random_colour(rng))
            n = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = extent * rng.uniform(0.5, 1.0, n)
            poly = np.stack([anchor[0] + radii * np.cos(angles), anchor[1] + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(img, [to_fixed(poly, 1.0)], tuple(colour), cv2.LINE_AA, SUBPIXEL_BITS)


def apply_lighting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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


def textured_backdrop(bg: np.ndarray, rng: np.random.Generator, texture: float) -> np.ndarray:
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


def plumage_texture(shape: tuple[int, int], rng: np.random.Generator, texture: float) -> np.ndarray:
    """Multiplicative fine detail over the object (feathers), [h, w, 1] float32 around 1."""
    strength = np.float32(texture * rng.uniform(0.05, 0.25))
    detail = _octave_noise(rng, shape[0], shape[1], (4, 8, 16))
    return (1.0 + strength * detail)[..., None]
