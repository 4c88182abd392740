"""Necks: the embedding layer between backbone and head, built by name.

``create_neck("BNNeck", in_channels=512)``; ``create_neck(None, 512)`` (or ``"null"``) is
the identity. Every neck exposes ``out_channels`` (the embedding size).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import paddle
from paddle import nn

logger = logging.getLogger(__name__)

_NECKS: dict[str, Callable[..., nn.Layer]] = {}
NULL_NAMES = (None, "null", "none", "None", "identity")


def register_neck(cls: type[nn.Layer]) -> type[nn.Layer]:
    """Class decorator: register a neck under its class name."""
    _NECKS[cls.__name__] = cls
    return cls


def list_necks() -> list[str]:
    return sorted(_NECKS)


class IdentityNeck(nn.Layer):
    """No neck: the backbone's pooled features are the embedding."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.out_channels = in_channels

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x


@register_neck
class FCNeck(nn.Layer):
    """A linear projection to ``embedding_size``."""

    def __init__(self, in_channels: int, embedding_size: int = 512):
        super().__init__()
        self.fc = nn.Linear(in_channels, embedding_size)
        self.out_channels = embedding_size

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(x)


@register_neck
class BNNeck(nn.Layer):
    """BatchNorm1D over the embedding with a bias frozen at exactly 0 (Luo et al., 2019).

    The bias is meant to stay 0 so the normalised features are centred on the origin, the
    right place for cosine retrieval. PaddleClas intends this but its bias still trains.
    Freezing the bias of ``nn.BatchNorm1D`` itself does not work in Paddle 3.3.1: the
    batch-norm kernel then returns no gradient for the scale either. So the BN here only
    normalises, and the affine part is explicit: a trainable ``weight`` and a ``bias``
    created with ``stop_gradient=True`` (it never gets a gradient, so neither the update
    nor weight decay, which Paddle applies through the gradient, can move it);
    ``extractor.param_groups`` also leaves it out of the optimiser.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm1D(in_channels, weight_attr=False, bias_attr=False)
        self.weight = self.create_parameter([in_channels], default_initializer=nn.initializer.Constant(1.0))
        self.bias = self.create_parameter(
            [in_channels],
            attr=paddle.ParamAttr(trainable=False),
            is_bias=True,
            default_initializer=nn.initializer.Constant(0.0),
        )
        self.out_channels = in_channels

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.norm(x) * self.weight + self.bias


@register_neck
class FCBNNeck(nn.Layer):
    """Linear projection (no bias: the BN re-centres anyway) followed by a BNNeck."""

    def __init__(self, in_channels: int, embedding_size: int = 512):
        super().__init__()
        self.fc = nn.Linear(in_channels, embedding_size, bias_attr=False)
        self.bnneck = BNNeck(embedding_size)
        self.out_channels = embedding_size

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.bnneck(self.fc(x))


def create_neck(name: str | None, in_channels: int, **kwargs) -> nn.Layer:
    """Build the neck ``name`` (a class name above, case-insensitive); None/"null" = identity."""
    if name in NULL_NAMES:
        if kwargs:
            raise ValueError(f"the null neck takes no options, got {sorted(kwargs)}; remove them or name a neck")
        return IdentityNeck(in_channels)
    by_lower = {key.lower(): key for key in _NECKS}
    key = by_lower.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown neck {name!r}; registered necks: {', '.join(list_necks())}, or null for none")
    try:
        return _NECKS[key](in_channels, **kwargs)
    except TypeError as error:
        raise ValueError(f"bad options for neck {key}: {error}") from error
