"""ResNet-18 / ResNet-50 (registered as ``resnet18`` / ``resnet50``): Paddle's own, as backbones."""

from __future__ import annotations

import paddle
from paddle.vision.models.resnet import BasicBlock, BottleneckBlock, ResNet

from visrec.models.registry import register_backbone


class ResNetBackbone(ResNet):
    """Paddle's own ResNet without its classifier.

    Subclassed rather than wrapped so the state-dict keys are Paddle's (``conv1.weight``,
    ``layer1.0...``): a Paddle ResNet ``.pdparams`` file loads directly (its ``fc.*`` keys
    are reported as unexpected).
    """

    def __init__(self, depth: int):
        block = BasicBlock if depth < 50 else BottleneckBlock
        super().__init__(block, depth=depth, num_classes=0, with_pool=True)
        width = 512 * block.expansion
        self.out_channels = width
        self.feature_channels = [width // 4, width // 2, width]
        self.feature_strides = [8, 16, 32]

    def forward_stages(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer2(self.layer1(x))
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.forward_stages(x)[-1]

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.flatten(super().forward(x), 1)


@register_backbone("resnet18")
def resnet18() -> ResNetBackbone:
    return ResNetBackbone(18)


@register_backbone("resnet50")
def resnet50() -> ResNetBackbone:
    return ResNetBackbone(50)
