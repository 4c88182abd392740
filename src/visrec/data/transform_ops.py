"""Image transform ops for the feature extractor: plain numpy/cv2 callables.

Every op is called as ``op(img, rng)``: ``img`` is an HWC uint8 RGB array (CHW float32
after ``ToCHW``) and ``rng`` a ``numpy.random.Generator``. Random ops draw only from that
generator, so the dataset can derive it from ``(seed, epoch, index)`` and the same sample
gets the same augmentation whatever the worker count, and again after a resume.
Deterministic ops accept and ignore ``rng``.

A backbone's input convention is fully described by ``Normalize(mean, std, scale)``:
``out = (x * scale - mean) / std``. ImageNet backbones: mean=(0.485, 0.456, 0.406),
std=(0.229, 0.224, 0.225), scale=1/255. TF-Lite lineage (EfficientNet-Lite):
mean=(127,)*3, std=(128,)*3, scale=1.0, i.e. ``(x - 127) / 128``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}


class Transform(Protocol):
    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


def _check_size(name: str, size: int) -> int:
    if int(size) != size or size < 1:
        raise ValueError(f"{name}: size must be a positive integer, got {size!r}")
    return int(size)


def _check_prob(name: str, prob: float) -> float:
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"{name}: prob must be in [0, 1], got {prob!r}")
    return float(prob)


def _interp(name: str, interpolation: str) -> int:
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"{name}: interpolation {interpolation!r} is not one of {sorted(_INTERPOLATION)}")
    return _INTERPOLATION[interpolation]


def _check_hwc(name: str, img: np.ndarray) -> None:
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected an HWC image with 3 channels, got shape {img.shape}")


@dataclass
class Resize:
    """Square resize to ``size x size``, or with ``keep_ratio`` the short side to ``size``."""

    size: int
    keep_ratio: bool = False
    interpolation: str = "linear"

    def __post_init__(self) -> None:
        self.size = _check_size("Resize", self.size)
        self._flag = _interp("Resize", self.interpolation)

    def target_hw(self, h: int, w: int) -> tuple[int, int]:
        if not self.keep_ratio:
            return self.size, self.size
        if h <= w:
            return self.size, max(1, round(w * self.size / h))
        return max(1, round(h * self.size / w)), self.size

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        th, tw = self.target_hw(*img.shape[:2])
        if img.shape[:2] == (th, tw):
            return img  # already that size (e.g. from a resized cache): no second interpolation
        return cv2.resize(img, (tw, th), interpolation=self._flag)


@dataclass
class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize to ``size``."""

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "linear"
    attempts: int = 10

    def __post_init__(self) -> None:
        self.size = _check_size("RandomResizedCrop", self.size)
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"RandomResizedCrop: scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"RandomResizedCrop: ratio must satisfy 0 < min <= max, got {self.ratio}")
        self._flag = _interp("RandomResizedCrop", self.interpolation)

    def crop_window(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Return ``(top, left, height, width)`` of the crop."""
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(self.attempts):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))  # log-uniform: w/h and h/w equally likely
            cw = round(math.sqrt(target * aspect))
            ch = round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(rng.integers(0, h - ch + 1))
                left = int(rng.integers(0, w - cw + 1))
                return top, left, ch, cw
        # Fallback: the largest centred crop whose aspect ratio lies within ``ratio``.
        aspect = w / h
        if aspect < self.ratio[0]:
            cw, ch = w, round(w / self.ratio[0])
        elif aspect > self.ratio[1]:
            ch, cw = h, round(h * self.ratio[1])
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        top, left, ch, cw = self.crop_window(img.shape[0], img.shape[1], rng)
        crop = img[top:top + ch, left:left + cw]
        return cv2.resize(crop, (self.size, self.size), interpolation=self._flag)


def _pad(img: np.ndarray, top: int, bottom: int, left: int, right: int, mode: str) -> np.ndarray:
    if top == bottom == left == right == 0:
        return img
    border = cv2.BORDER_REFLECT_101 if mode == "reflect" else cv2.BORDER_CONSTANT
    return cv2.copyMakeBorder(img, top, bottom, left, right, border, value=(0, 0, 0))


@dataclass
class RandomCrop:
    """Pad by ``pad`` pixels on every side (reflect or zeros), then crop ``size x size`` at random.

    Images smaller than ``size`` after padding are padded up to it first.
    """

    size: int
    pad: int = 0
    pad_mode: Literal["reflect", "constant"] = "reflect"

    def __post_init__(self) -> None:
        self.size = _check_size("RandomCrop", self.size)
        if self.pad < 0:
            raise ValueError(f"RandomCrop: pad must be >= 0, got {self.pad}")
        if self.pad_mode not in ("reflect", "constant"):
            raise ValueError(f"RandomCrop: pad_mode must be 'reflect' or 'constant', got {self.pad_mode!r}")

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = self.pad
        img = _pad(img, p, p, p, p, self.pad_mode)
        h, w = img.shape[:2]
        dh, dw = max(0, self.size - h), max(0, self.size - w)
        img = _pad(img, dh // 2, dh - dh // 2, dw // 2, dw - dw // 2, self.pad_mode)
        h, w = img.shape[:2]
        top = int(rng.integers(0, h - self.size + 1))
        left = int(rng.integers(0, w - self.size + 1))
        return img[top:top + self.size, left:left + self.size]


@dataclass
class CenterCrop:
    """Crop the central ``size x size`` window (pads with zeros if the image is smaller)."""

    size: int

    def __post_init__(self) -> None:
        self.size = _check_size("CenterCrop", self.size)

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        h, w = img.shape[:2]
        dh, dw = max(0, self.size - h), max(0, self.size - w)
        img = _pad(img, dh // 2, dh - dh // 2, dw // 2, dw - dw // 2, "constant")
        h, w = img.shape[:2]
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return img[top:top + self.size, left:left + self.size]


@dataclass
class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    prob: float = 0.5

    def __post_init__(self) -> None:
        self.prob = _check_prob("RandomFlip", self.prob)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.prob:
            return np.ascontiguousarray(img[:, ::-1])  # cv2 refuses negative strides
        return img


@dataclass
class RandomRotation:
    """Rotate about the centre by an angle uniform in ``[-degrees, degrees]``, with probability ``prob``.

    The output keeps the input size. ``fill`` says what enters at the corners:
    ``"reflect"`` (mirror the image), ``"mean"`` (the image's own mean colour, so the
    corners carry no edge the network could learn) or an RGB tuple.
    PP-ShiTuV2 rotates because real camera shots are not always upright.
    """

    degrees: float
    prob: float = 0.5
    fill: str | tuple[int, int, int] = "reflect"
    interpolation: str = "linear"

    def __post_init__(self) -> None:
        if self.degrees < 0:
            raise ValueError(f"RandomRotation: degrees must be >= 0, got {self.degrees}")
        self.prob = _check_prob("RandomRotation", self.prob)
        if isinstance(self.fill, str) and self.fill not in ("reflect", "mean"):
            raise ValueError(f"RandomRotation: fill must be 'reflect', 'mean' or an RGB tuple, "
                             f"got {self.fill!r}")
        self._flag = _interp("RandomRotation", self.interpolation)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Draw both numbers unconditionally so one op's decision does not shift the stream
        # of the ops after it.
        apply, angle = rng.random() < self.prob, rng.uniform(-self.degrees, self.degrees)
        if not apply or self.degrees == 0:
            return img
        h, w = img.shape[:2]
        matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
        if self.fill == "reflect":
            return cv2.warpAffine(img, matrix, (w, h), flags=self._flag, borderMode=cv2.BORDER_REFLECT_101)
        if self.fill == "mean":
            value = tuple(float(v) for v in img.reshape(-1, img.shape[2]).mean(axis=0))
        else:
            value = tuple(float(v) for v in self.fill)
        return cv2.warpAffine(img, matrix, (w, h), flags=self._flag,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=value)


@dataclass
class ColorJitter:
    """Random brightness / contrast / saturation factors in ``[1 - x, 1 + x]``, in random order.

    Applied as a whole with probability ``prob``; works on uint8 RGB and returns uint8.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    prob: float = 1.0

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"ColorJitter: {name} must be >= 0, got {getattr(self, name)}")
        self.prob = _check_prob("ColorJitter", self.prob)

    @staticmethod
    def _grey(img: np.ndarray) -> np.ndarray:
        return img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        apply = rng.random() < self.prob
        amounts = (self.brightness, self.contrast, self.saturation)
        factors = [rng.uniform(max(0.0, 1.0 - a), 1.0 + a) for a in amounts]
        order = rng.permutation(3)
        if not apply:
            return img
        out = img.astype(np.float32)
        for op in order:
            f = np.float32(factors[op])
            if amounts[op] == 0:
                continue
            if op == 0:
                out = out * f
            elif op == 1:
                mean = np.float32(self._grey(out).mean())
                out = mean + f * (out - mean)
            else:
                grey = self._grey(out)[..., None]
                out = grey + f * (out - grey)
            out = np.clip(out, 0.0, 255.0)
        return (out + 0.5).astype(np.uint8)


@dataclass
class Normalize:
    """``(x * scale - mean) / std`` per channel, as float32 (HWC in, HWC out).

    ImageNet: defaults. TF-Lite ``(x - 127) / 128``: mean=(127,)*3, std=(128,)*3, scale=1.0.
    """

    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    scale: float = 1.0 / 255.0

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"Normalize: mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Normalize: std values must be > 0, got {self.std}")
        self._mean = np.asarray(self.mean, dtype=np.float32)
        self._std = np.asarray(self.std, dtype=np.float32)
        self._scale = np.float32(self.scale)

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        _check_hwc("Normalize", img)
        return (img.astype(np.float32) * self._scale - self._mean) / self._std


@dataclass
class ToCHW:
    """HWC -> contiguous CHW float32."""

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


@dataclass
class RandomErasing:
    """Erase one random rectangle of a normalised CHW float image with probability ``prob``.

    Area fraction uniform in ``[sl, sh]``, aspect ratio log-uniform in ``[r1, 1/r1]``
    (Zhong et al., 2017). ``value``: ``"mean"`` fills with the image's per-channel mean,
    ``"random"`` with standard-normal noise (the normalised pixel scale), a number with
    that constant (0 = the data set's mean colour after ImageNet normalisation).
    """

    prob: float = 0.5
    sl: float = 0.02
    sh: float = 0.4
    r1: float = 0.3
    value: str | float = "mean"
    attempts: int = 100

    def __post_init__(self) -> None:
        self.prob = _check_prob("RandomErasing", self.prob)
        if not 0.0 < self.sl <= self.sh < 1.0:
            raise ValueError(f"RandomErasing: need 0 < sl <= sh < 1, got sl={self.sl}, sh={self.sh}")
        if not 0.0 < self.r1 <= 1.0:
            raise ValueError(f"RandomErasing: r1 must be in (0, 1], got {self.r1}")
        if isinstance(self.value, str) and self.value not in ("mean", "random"):
            raise ValueError(f"RandomErasing: value must be 'mean', 'random' or a number, got {self.value!r}")

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if img.ndim != 3 or img.dtype != np.float32:
            raise ValueError(f"RandomErasing: expected a CHW float32 array (put it after ToCHW), "
                             f"got {img.dtype} {img.shape}")
        if rng.random() >= self.prob:
            return img
        c, h, w = img.shape
        for _ in range(self.attempts):
            target = rng.uniform(self.sl, self.sh) * h * w
            aspect = math.exp(rng.uniform(math.log(self.r1), -math.log(self.r1)))
            eh = round(math.sqrt(target * aspect))
            ew = round(math.sqrt(target / aspect))
            if 0 < eh < h and 0 < ew < w:
                top = int(rng.integers(0, h - eh + 1))
                left = int(rng.integers(0, w - ew + 1))
                out = img.copy()
                if self.value == "mean":
                    out[:, top:top + eh, left:left + ew] = img.reshape(c, -1).mean(axis=1)[:, None, None]
                elif self.value == "random":
                    out[:, top:top + eh, left:left + ew] = rng.standard_normal((c, eh, ew), dtype=np.float32)
                else:
                    out[:, top:top + eh, left:left + ew] = np.float32(self.value)
                return out
        return img
