"""The extractor's and the classifier's transform pipelines, composed from
:mod:`visrec.data.transform_ops` (each op is called as ``op(img, rng)``; see there)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from visrec.data.transform_ops import (IMAGENET_MEAN, IMAGENET_STD, ColorJitter, Normalize, RandomCrop, RandomErasing,
                                       RandomFlip, RandomResizedCrop, RandomRotation, Resize, ToCHW)


@dataclass
class Compose:
    """Apply ``ops`` in order. Call as ``compose(img, rng)``.

    Without ``rng`` the composed transform uses its own generator (``reseed`` it for
    reproducible runs); the dataset always passes one derived from (seed, epoch, index).
    """

    ops: list[Callable[..., np.ndarray]]
    seed: int | None = None
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def reseed(self, seed: int | Sequence[int]) -> None:
        self._rng = np.random.default_rng(seed)

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = self._rng if rng is None else rng
        for op in self.ops:
            img = op(img, rng)
        return img


def train_resize_size(image_size: int, resize_scale: float) -> int:
    """Side of the square Resize before the train RandomCrop (and the matching cache size)."""
    return int(image_size * resize_scale)


def build_transforms(
    image_size: int,
    train: bool,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: float = 1.0 / 255.0,
    resize_scale: float = 1.15,
    random_resized_crop: bool = False,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    flip_prob: float = 0.5,
    rotate_degrees: float = 0.0,
    rotate_prob: float = 0.5,
    color_jitter: float = 0.0,
    erase_prob: float = 0.0,
    erase_sl: float = 0.02,
    erase_sh: float = 0.4,
    erase_r1: float = 0.3,
) -> Compose:
    """The extractor's pipeline: image (HWC uint8 RGB) -> CHW float32 of ``image_size``.

    eval:  Resize(image_size) -> Normalize -> ToCHW
    train: RandomResizedCrop(image_size) | Resize(image_size * resize_scale) -> RandomCrop(image_size)
           -> RandomFlip -> [RandomRotation] -> [ColorJitter] -> Normalize -> ToCHW -> [RandomErasing]
    """
    normalize = Normalize(mean=mean, std=std, scale=scale)
    if not train:
        return Compose([Resize(image_size), normalize, ToCHW()])
    if resize_scale < 1.0:
        raise ValueError(f"build_transforms: resize_scale must be >= 1 (resize then crop), "
                         f"got {resize_scale}")
    ops: list[Callable[..., np.ndarray]]
    if random_resized_crop:
        ops = [RandomResizedCrop(image_size, scale=crop_scale)]
    else:
        ops = [Resize(train_resize_size(image_size, resize_scale)), RandomCrop(image_size)]
    ops.append(RandomFlip(flip_prob))
    if rotate_degrees > 0:
        ops.append(RandomRotation(rotate_degrees, prob=rotate_prob))
    if color_jitter > 0:
        ops.append(ColorJitter(color_jitter, color_jitter, color_jitter, prob=0.8))
    ops += [normalize, ToCHW()]
    if erase_prob > 0:
        ops.append(RandomErasing(prob=erase_prob, sl=erase_sl, sh=erase_sh, r1=erase_r1))
    return Compose(ops)
