"""Heads: embedding -> class logits, so a metric model can train with a classification loss.

``create_head("ArcMarginHead", embedding_size=512, class_num=100, margin=0.2)``;
``create_head(None, ...)`` (or ``"null"``) returns None: pure metric learning.
Every head is called as ``head(features, labels=None)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import paddle
from paddle import nn
from paddle.nn import functional as F

logger = logging.getLogger(__name__)

_HEADS: dict[str, Callable[..., nn.Layer]] = {}
NULL_NAMES = (None, "null", "none", "None")


def register_head(cls: type[nn.Layer]) -> type[nn.Layer]:
    """Class decorator: register a head under its class name."""
    _HEADS[cls.__name__] = cls
    return cls


def list_heads() -> list[str]:
    return sorted(_HEADS)


@register_head
class FCHead(nn.Layer):
    """Plain linear classifier."""

    def __init__(self, embedding_size: int, class_num: int, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(embedding_size, class_num, bias_attr=None if bias else False)

    def forward(self, features: paddle.Tensor, labels: paddle.Tensor | None = None) -> paddle.Tensor:
        return self.fc(features)


class _CosineHead(nn.Layer):
    """Shared part of margin heads: cosine between normalised features and class weights.

    The margin is applied only in training mode with labels; otherwise (eval, or no
    labels) the head returns ``scale * cos``, the plain cosine classifier.
    """

    def __init__(self, embedding_size: int, class_num: int, margin: float, scale: float):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"{type(self).__name__} scale must be > 0, got {scale}")
        self.margin, self.scale = float(margin), float(scale)
        self.weight = self.create_parameter(
            [embedding_size, class_num], default_initializer=nn.initializer.XavierNormal()
        )
        self._warned_no_labels = False

    def cosine(self, features: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(F.normalize(features, axis=1), F.normalize(self.weight, axis=0))

    def apply_margin(self, cos: paddle.Tensor, one_hot: paddle.Tensor) -> paddle.Tensor:
        raise NotImplementedError

    def forward(self, features: paddle.Tensor, labels: paddle.Tensor | None = None) -> paddle.Tensor:
        cos = self.cosine(features)
        if labels is None or not self.training:
            if labels is None and self.training and not self._warned_no_labels:
                logger.warning("%s in training mode without labels: no margin applied", type(self).__name__)
                self._warned_no_labels = True
            return self.scale * cos
        one_hot = F.one_hot(labels.reshape([-1]).astype("int64"), cos.shape[1]).astype(cos.dtype)
        return self.scale * self.apply_margin(cos, one_hot)


@register_head
class ArcMarginHead(_CosineHead):
    """ArcFace (Deng et al., 2019): logit of the target class is ``s * cos(theta + m)``.

    Where ``theta + m`` would pass pi, cos(theta + m) stops decreasing monotonically; the
    standard fix (not ``easy_margin``) uses ``cos(theta) - sin(pi - m) * m`` when
    ``cos(theta) <= cos(pi - m)``. With ``easy_margin`` the margin applies only where
    ``cos(theta) > 0``.
    """

    def __init__(
        self, embedding_size: int, class_num: int, margin: float = 0.5, scale: float = 30.0, easy_margin: bool = False
    ):
        super().__init__(embedding_size, class_num, margin, scale)
        self.easy_margin = easy_margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin

    def apply_margin(self, cos: paddle.Tensor, one_hot: paddle.Tensor) -> paddle.Tensor:
        sin = paddle.sqrt(paddle.clip(1.0 - cos * cos, 0.0, 1.0))
        phi = cos * self.cos_m - sin * self.sin_m  # cos(theta + m)
        if self.easy_margin:
            phi = paddle.where(cos > 0, phi, cos)
        else:
            phi = paddle.where(cos > self.th, phi, cos - self.mm)
        return one_hot * phi + (1.0 - one_hot) * cos


@register_head
class CosMarginHead(_CosineHead):
    """CosFace (Wang et al., 2018): logit of the target class is ``s * (cos(theta) - m)``."""

    def __init__(self, embedding_size: int, class_num: int, margin: float = 0.35, scale: float = 64.0):
        super().__init__(embedding_size, class_num, margin, scale)

    def apply_margin(self, cos: paddle.Tensor, one_hot: paddle.Tensor) -> paddle.Tensor:
        return cos - self.margin * one_hot


@register_head
class ProxyHead(_CosineHead):
    """One learnable proxy per class; gives the plain cosines ``[N, C]`` (no scale, no margin),
    which is what ``ProxyAnchorLoss`` reads."""

    def __init__(self, embedding_size: int, class_num: int):
        super().__init__(embedding_size, class_num, margin=0.0, scale=1.0)

    def apply_margin(self, cos: paddle.Tensor, one_hot: paddle.Tensor) -> paddle.Tensor:
        return cos


def create_head(name: str | None, embedding_size: int, class_num: int, **kwargs) -> nn.Layer | None:
    """Build head ``name`` (a class name above, case-insensitive); None/"null" -> no head."""
    if name in NULL_NAMES:
        return None
    by_lower = {key.lower(): key for key in _HEADS}
    key = by_lower.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown head {name!r}; registered heads: {', '.join(list_heads())}, or null for none")
    if class_num < 1:
        raise ValueError(f"head {key} needs class_num >= 1, got {class_num}")
    try:
        return _HEADS[key](embedding_size, class_num, **kwargs)
    except TypeError as error:
        raise ValueError(f"bad options for head {key}: {error}") from error
