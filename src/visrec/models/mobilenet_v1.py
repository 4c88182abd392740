"""MobileNetV1 (registered as ``mobilenet_v1``, with ``scale``), trained from scratch."""

from __future__ import annotations

import paddle
from paddle import nn

from visrec.models.layers import ConvBNAct, DepthwiseSeparable, StagedBackbone, check_scale
from visrec.models.registry import register_backbone


# (output channels, stride) of the 13 depthwise-separable blocks of MobileNetV1.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


class MobileNetV1(StagedBackbone):
    """Standard MobileNetV1: conv-bn-relu stem (stride 2) + 13 depthwise-separable blocks."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        check_scale(scale)
        stem_ch = int(32 * scale)
        self.stem = ConvBNAct(3, stem_ch, 3, stride=2)
        blocks, in_ch, stride = [], stem_ch, 2
        last_block_at_stride: dict[int, int] = {}
        for index, (channels, block_stride) in enumerate(MOBILENET_V1_BLOCKS):
            out_ch = int(channels * scale)
            blocks.append(DepthwiseSeparable(in_ch, out_ch, block_stride))
            in_ch, stride = out_ch, stride * block_stride
            last_block_at_stride[stride] = index
        self.blocks = nn.LayerList(blocks)
        self.feature_strides = [8, 16, 32]
        self._stage_ends = [last_block_at_stride[s] for s in self.feature_strides]
        self.feature_channels = [int(MOBILENET_V1_BLOCKS[i][0] * scale) for i in self._stage_ends]
        self.out_channels = in_ch

    def forward_stages(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        x = self.stem(x)
        maps = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self._stage_ends:
                maps.append(x)
        return maps


@register_backbone("mobilenet_v1")
def mobilenet_v1(scale: float = 1.0) -> MobileNetV1:
    return MobileNetV1(scale=scale)
