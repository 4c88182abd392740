"""Mixup and CutMix on a training batch, with the soft targets they imply, and soft-target CE.

Both pair every image with another of the same batch (a random permutation):

- mixup (Zhang et al., 2018): ``x = lam * x + (1 - lam) * x[perm]``, ``lam ~ Beta(a, a)``;
- CutMix (Yun et al., 2019): a box of ``x[perm]`` pasted into ``x``; ``lam`` is the share of
  ``x`` left after clipping the box to the image.

The targets are mixed with the same ``lam``. Randomness comes from the generator passed in,
so the engine's per-epoch seeding makes a resumed run mix exactly as an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
from paddle.nn import functional as F


def one_hot(labels: paddle.Tensor, num_classes: int, smoothing: float = 0.0) -> paddle.Tensor:
    """``[N]`` class ids -> ``[N, C]`` float targets, smoothed toward uniform by ``smoothing``."""
    target = F.one_hot(labels.reshape([-1]).astype("int64"), num_classes).astype("float32")
    return smooth(target, smoothing)


def smooth(target: paddle.Tensor, smoothing: float) -> paddle.Tensor:
    if smoothing == 0.0:
        return target
    return (1.0 - smoothing) * target + smoothing / target.shape[1]


def soft_cross_entropy(logits: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
    """Mean over the batch of ``-sum(target * log_softmax(logits))`` (soft or one-hot targets)."""
    return -(target * F.log_softmax(logits, axis=1)).sum(axis=1).mean()


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box covering about ``1 - lam`` of the image, centred uniformly, clipped: (y1, y2, x1, x2)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    return (max(cy - ch // 2, 0), min(cy + ch // 2, height), max(cx - cw // 2, 0), min(cx + cw // 2, width))


def mix_batch(images: paddle.Tensor, labels: paddle.Tensor, num_classes: int, rng: np.random.Generator,
              mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mix_prob: float = 1.0,
              smoothing: float = 0.0) -> tuple[paddle.Tensor, paddle.Tensor, str | None]:
    """Mix a batch; returns ``(images, soft targets [N, C], "mixup" | "cutmix" | None)``.

    With both alphas set, each mixed batch uses one of the two at random (as timm / PaddleClas
    OpsFusion). Targets sum to 1 per row whatever happens.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0.0 <= mix_prob <= 1.0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 and mix_prob in [0, 1]; "
                         f"got {mixup_alpha}, {cutmix_alpha}, {mix_prob}")
    target = one_hot(labels, num_classes)
    # Draw every number up front so one decision does not shift the stream of the next batch.
    apply = rng.random() < mix_prob
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    if not apply or alpha == 0:
        return images, smooth(target, smoothing), None
    lam = float(rng.beta(alpha, alpha))
    perm = paddle.to_tensor(rng.permutation(images.shape[0]))
    shuffled = paddle.gather(images, perm)
    if use_cutmix:
        height, width = images.shape[2], images.shape[3]
        y1, y2, x1, x2 = cutmix_box(height, width, lam, rng)
        images = images.clone()
        images[:, :, y1:y2, x1:x2] = shuffled[:, :, y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)  # the box as clipped
        kind = "cutmix"
    else:
        images = lam * images + (1.0 - lam) * shuffled
        kind = "mixup"
    target = lam * target + (1.0 - lam) * paddle.gather(target, perm)
    return images, smooth(target, smoothing), kind
