"""Layers the backbone families and the detector share: conv-BN-act, depthwise-separable,
GeM pooling, and :class:`StagedBackbone`, the interface every backbone implements."""

from __future__ import annotations

import paddle
from paddle import nn


def check_scale(scale: float) -> None:
    if not scale > 0:
        raise ValueError(f"backbone scale must be > 0, got {scale}")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` (CPU kernels like it), never below 90%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Layer):
    """Conv (no bias: BN follows) + BatchNorm + optional ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2D(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias_attr=False)
        self.bn = nn.BatchNorm2D(out_ch)
        self.act = nn.ReLU() if act else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.bn(self.conv(x))
        return self.act(x) if self.act is not None else x


class GeM(nn.Layer):
    """Generalised-mean pooling (Radenović et al., 2018): ``(mean x^p)^(1/p)`` per channel.

    p = 1 is average pooling, p -> inf max pooling; in between it weighs the strongest
    activations more, which suits retrieval: on the real CUB subset, ImageNet Lite0 features
    zero-shot reach recall@1 0.727 with average pooling and 0.755 with p = 2. ``p`` is
    learnable by default (it then trains with the backbone's learning rate).
    """

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6):
        super().__init__()
        if p < 1.0:
            raise ValueError(f"GeM p must be >= 1 (1 = average pooling), got {p}")
        self.p = self.create_parameter([1], attr=paddle.ParamAttr(trainable=learnable),
                                       default_initializer=nn.initializer.Constant(float(p)))
        self.eps = eps

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # adaptive_avg_pool2d, not mean(): Paddle Inference's oneDNN reduce_mean prints a line
        # ("ReduceMeanCheckIfOneDNNSupport") to stdout, which would corrupt `visrec recognize`'s JSON.
        pooled = paddle.flatten(nn.functional.adaptive_avg_pool2d(paddle.clip(x, min=self.eps).pow(self.p), 1), 1)
        return pooled.pow(1.0 / self.p)


POOLS = ("avg", "gem")


class StagedBackbone(nn.Layer):
    """Shared plumbing: ``forward`` = global pool (average, or GeM) of ``forward_features``.

    Subclasses set ``out_channels``, ``feature_channels``, ``feature_strides`` and
    implement ``forward_stages``; the last stage map is the last feature map.
    """

    out_channels: int
    feature_channels: list[int]
    feature_strides: list[int]

    def set_pool(self, pool: str = "avg", gem_p: float = 3.0, gem_learnable: bool = True) -> None:
        """``avg`` (default) or ``gem``; the GeM layer is a sublayer named ``pooling`` (last unit)."""
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}: use one of {', '.join(POOLS)}")
        if pool == "gem":
            self.pooling = GeM(gem_p, gem_learnable)
        else:
            self._sub_layers.pop("pooling", None)

    def pool(self, feature_map: paddle.Tensor) -> paddle.Tensor:
        pooling = self._sub_layers.get("pooling")  # a sublayer, not a class attribute: Paddle registers it
        if pooling is not None:
            return pooling(feature_map)
        return paddle.flatten(nn.functional.adaptive_avg_pool2d(feature_map, 1), 1)

    def forward_stages(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        raise NotImplementedError

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.forward_stages(x)[-1]

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.pool(self.forward_features(x))


class DepthwiseSeparable(nn.Layer):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.dw = ConvBNAct(in_ch, in_ch, 3, stride=stride, groups=in_ch)
        self.pw = ConvBNAct(in_ch, out_ch, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.pw(self.dw(x))
