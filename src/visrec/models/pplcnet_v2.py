"""PP-LCNetV2 style backbone (registered as ``pplcnetv2_base``), trained from scratch."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import paddle
from paddle import nn

from visrec.models.layers import ConvBNAct, StagedBackbone, check_scale, make_divisible
from visrec.models.registry import register_backbone

logger = logging.getLogger(__name__)


class SqueezeExcite(nn.Layer):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = make_divisible(channels / reduction)
        self.reduce = nn.Conv2D(channels, hidden, 1)
        self.expand = nn.Conv2D(hidden, channels, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        gate = nn.functional.adaptive_avg_pool2d(x, 1)
        gate = nn.functional.hardsigmoid(self.expand(nn.functional.relu(self.reduce(gate))))
        return x * gate


class RepDepthwise(nn.Layer):
    """Re-parameterisable depthwise conv.

    Training: parallel depthwise conv+BN branches of kernel sizes k, k-2, ..., 1, plus an
    identity BN branch when the stride is 1, summed. ``rep()`` folds every branch into ONE
    depthwise k x k conv with bias: each BN is folded into its conv, smaller kernels are
    zero-padded to k x k (centres line up because padding is k // 2), and the identity is a
    k x k kernel with a single centre tap. Convolution is linear, so the sum of kernels
    gives the same output.
    """

    def __init__(self, channels: int, kernel: int, stride: int):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"RepDepthwise needs an odd kernel size, got {kernel}")
        self.channels, self.kernel, self.stride = channels, kernel, stride
        self.branches = nn.LayerList(
            [ConvBNAct(channels, channels, k, stride=stride, groups=channels, act=False) for k in range(kernel, 0, -2)]
        )
        self.identity = nn.BatchNorm2D(channels) if stride == 1 else None
        self.fused: nn.Conv2D | None = None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.fused is not None:
            return self.fused(x)
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return out

    def _fold_bn(self, bn: nn.BatchNorm2D, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fold BN (running statistics) into ``kernel``; returns (kernel, bias) as float64."""
        std = np.sqrt(bn._variance.numpy().astype(np.float64) + bn._epsilon)
        gamma = bn.weight.numpy().astype(np.float64)
        scale = gamma / std
        bias = bn.bias.numpy().astype(np.float64) - bn._mean.numpy().astype(np.float64) * scale
        return kernel * scale[:, None, None, None], bias

    def rep(self) -> None:
        """Merge all branches into one conv for inference (idempotent)."""
        if self.fused is not None:
            return
        k = self.kernel
        weight = np.zeros((self.channels, 1, k, k), dtype=np.float64)
        bias = np.zeros(self.channels, dtype=np.float64)
        for branch in self.branches:
            branch_kernel = branch.conv.weight.numpy().astype(np.float64)
            pad = (k - branch_kernel.shape[-1]) // 2
            branch_kernel = np.pad(branch_kernel, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            folded, folded_bias = self._fold_bn(branch.bn, branch_kernel)
            weight += folded
            bias += folded_bias
        if self.identity is not None:
            centre = np.zeros((self.channels, 1, k, k), dtype=np.float64)
            centre[:, :, k // 2, k // 2] = 1.0
            folded, folded_bias = self._fold_bn(self.identity, centre)
            weight += folded
            bias += folded_bias
        fused = nn.Conv2D(self.channels, self.channels, k, stride=self.stride, padding=k // 2, groups=self.channels)
        fused.weight.set_value(weight.astype(np.float32))
        fused.bias.set_value(bias.astype(np.float32))
        self.fused = fused
        # Drop the training branches so the state dict and export hold only the fused conv.
        del self.branches
        self.identity = None

    reparameterize = rep


class LCNetV2Block(nn.Layer):
    """Depthwise (re-parameterisable or plain) -> ReLU -> [SE] -> pointwise -> [+ shortcut] -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, use_rep: bool, use_se: bool, shortcut: bool):
        super().__init__()
        if use_rep:
            self.dw = RepDepthwise(in_ch, kernel, stride)
        else:
            self.dw = ConvBNAct(in_ch, in_ch, kernel, stride=stride, groups=in_ch, act=False)
        self.se = SqueezeExcite(in_ch) if use_se else None
        self.pw = ConvBNAct(in_ch, out_ch, 1, act=False)
        self.shortcut = shortcut and stride == 1 and in_ch == out_ch

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = nn.functional.relu(self.dw(x))
        if self.se is not None:
            out = self.se(out)
        out = self.pw(out)
        if self.shortcut:
            out = out + x
        return nn.functional.relu(out)


# Stages of the PP-LCNetV2-style backbone at scale 1.0:
# (channels, depthwise kernel, stride, depth, re-parameterisable, SE, shortcut).
# The last stage's stride is replaced by ``last_stride``.
PPLCNETV2_STAGES: tuple[tuple[int, int, int, int, bool, bool, bool], ...] = (
    (64, 3, 2, 1, False, False, False),   # stride 4
    (128, 3, 2, 2, False, False, False),  # stride 8
    (256, 5, 2, 4, True, True, False),    # stride 16
    (512, 5, 2, 2, True, False, True),    # stride 32, or 16 with last_stride=1
)  # fmt: skip


class PPLCNetV2(StagedBackbone):
    """PP-LCNetV2-style backbone with the PP-ShiTuV2 changes for recognition.

    - re-parameterisable depthwise blocks in the two deep stages (``rep()`` merges them);
    - SE in the third stage, shortcuts in the last;
    - ``last_stride=1`` keeps the last stage at stride 16 (more spatial detail);
    - after pooling, a 1x1 conv projects to ``out_channels`` with NO ReLU and no FC after
      it, so features keep their sign (the seed's "remove the ReLU and FC at the end").
    """

    def __init__(
        self,
        scale: float = 1.0,
        out_channels: int = 512,
        last_stride: int = 1,
        use_se: bool = True,
        depths: Sequence[int] | None = None,
    ):
        super().__init__()
        check_scale(scale)
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        depths = list(depths) if depths is not None else [stage[3] for stage in PPLCNETV2_STAGES]
        if len(depths) != len(PPLCNETV2_STAGES) or min(depths) < 1:
            raise ValueError(f"depths must be {len(PPLCNETV2_STAGES)} positive integers, got {depths}")
        in_ch = make_divisible(32 * scale)
        self.stem = ConvBNAct(3, in_ch, 3, stride=2)
        stages, stride, self.feature_channels, self.feature_strides = [], 2, [], []
        for index, (channels, kernel, stage_stride, _, use_rep, se, shortcut) in enumerate(PPLCNETV2_STAGES):
            if index == len(PPLCNETV2_STAGES) - 1:
                stage_stride = last_stride
            out_ch = make_divisible(channels * scale)
            blocks = []
            for block_index in range(depths[index]):
                block_stride = stage_stride if block_index == 0 else 1
                blocks.append(LCNetV2Block(in_ch, out_ch, kernel, block_stride, use_rep, se and use_se, shortcut))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
            stride *= stage_stride
            if index >= 1:  # stages 2-4 are the multi-scale outputs
                self.feature_channels.append(out_ch)
                self.feature_strides.append(stride)
        self.stages = nn.LayerList(stages)
        self.last_conv = nn.Conv2D(in_ch, out_channels, 1)
        self.out_channels = out_channels

    def forward_stages(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        x = self.stem(x)
        maps = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index >= 1:
                maps.append(x)
        return maps

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        pooled = self.pool(self.forward_features(x))  # [N, C]: back to [N, C, 1, 1] for the 1x1 conv
        return paddle.flatten(self.last_conv(pooled.unsqueeze([2, 3])), 1)

    def rep(self) -> None:
        """Fold every re-parameterisable depthwise block into one conv (for eval/export)."""
        if self.training:
            logger.warning("rep() on a model in training mode: BN running statistics are folded, call eval() after")
        for layer in self.sublayers():
            if isinstance(layer, RepDepthwise):
                layer.rep()

    reparameterize = rep


@register_backbone("pplcnetv2_base")
def pplcnetv2_base(
    scale: float = 1.0,
    out_channels: int = 512,
    last_stride: int = 1,
    use_se: bool = True,
    depths: Sequence[int] | None = None,
) -> PPLCNetV2:
    return PPLCNetV2(scale=scale, out_channels=out_channels, last_stride=last_stride, use_se=use_se, depths=depths)
