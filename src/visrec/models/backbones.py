"""Backbones built by name from a registry (timm style), trained from scratch.

Every backbone maps images ``[N, 3, H, W]`` to pooled features ``[N, out_channels]`` and
also exposes, for the detector and for inspection:

- ``forward_features(x)``: the last feature map ``[N, feature_channels[-1], h, w]``;
- ``forward_stages(x)``: feature maps at ``feature_strides`` (8, 16, 32 unless the last
  stage keeps its stride), with ``feature_channels`` channels.

Use ``create_backbone("mobilenet_v1", scale=0.5)``; ``list_backbones()`` names them all.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import paddle
from paddle import nn
from paddle.vision.models.resnet import BasicBlock, BottleneckBlock, ResNet

logger = logging.getLogger(__name__)

BackboneBuilder = Callable[..., nn.Layer]
_BACKBONES: dict[str, BackboneBuilder] = {}


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_DEFAULT_CFGS: dict[str, dict] = {}


def register_backbone(name: str, default_cfg: dict | None = None) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator adding a backbone builder to the registry under ``name``.

    ``default_cfg`` (timm style) holds what the network expects of its input, e.g. its
    ``mean`` / ``std`` after scaling to 0..1; backbones without one use ImageNet's.
    """

    def decorator(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = builder
        _DEFAULT_CFGS[name] = dict(default_cfg or {})
        return builder

    return decorator


def backbone_normalization(name: str, mean=None, std=None) -> tuple[list[float], list[float]]:
    """``(mean, std)``: the given values, or the backbone's own where they are None."""
    cfg = _DEFAULT_CFGS.get(name, {})
    return (list(mean) if mean is not None else list(cfg.get("mean", IMAGENET_MEAN)),
            list(std) if std is not None else list(cfg.get("std", IMAGENET_STD)))


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def create_backbone(name: str, **kwargs) -> nn.Layer:
    """Build the backbone registered as ``name`` with the builder's keyword arguments."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered backbones: {', '.join(list_backbones())}")
    builder = _BACKBONES[name]
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"backbone {name!r} does not take {', '.join(unknown)}; it accepts: {', '.join(accepted) or 'no arguments'}"
        )
    return builder(**kwargs)


def _check_scale(scale: float) -> None:
    if not scale > 0:
        raise ValueError(f"backbone scale must be > 0, got {scale}")


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


# ---------------------------------------------------------------- MobileNetV1

# (output channels, stride) of the 13 depthwise-separable blocks of MobileNetV1.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


class DepthwiseSeparable(nn.Layer):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.dw = ConvBNAct(in_ch, in_ch, 3, stride=stride, groups=in_ch)
        self.pw = ConvBNAct(in_ch, out_ch, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.pw(self.dw(x))


class MobileNetV1(StagedBackbone):
    """Standard MobileNetV1: conv-bn-relu stem (stride 2) + 13 depthwise-separable blocks."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        _check_scale(scale)
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


# ---------------------------------------------------------------- PP-LCNetV2 style


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` (CPU kernels like it), never below 90%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


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


class SqueezeExcite(nn.Layer):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = _make_divisible(channels / reduction)
        self.reduce = nn.Conv2D(channels, hidden, 1)
        self.expand = nn.Conv2D(hidden, channels, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        gate = nn.functional.adaptive_avg_pool2d(x, 1)
        gate = nn.functional.hardsigmoid(self.expand(nn.functional.relu(self.reduce(gate))))
        return x * gate


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
        _check_scale(scale)
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        depths = list(depths) if depths is not None else [stage[3] for stage in PPLCNETV2_STAGES]
        if len(depths) != len(PPLCNETV2_STAGES) or min(depths) < 1:
            raise ValueError(f"depths must be {len(PPLCNETV2_STAGES)} positive integers, got {depths}")
        in_ch = _make_divisible(32 * scale)
        self.stem = ConvBNAct(3, in_ch, 3, stride=2)
        stages, stride, self.feature_channels, self.feature_strides = [], 2, [], []
        for index, (channels, kernel, stage_stride, _, use_rep, se, shortcut) in enumerate(PPLCNETV2_STAGES):
            if index == len(PPLCNETV2_STAGES) - 1:
                stage_stride = last_stride
            out_ch = _make_divisible(channels * scale)
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


# ---------------------------------------------------------------- ResNet


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


# ---------------------------------------------------------------- weights


def load_pretrained(model: nn.Layer, path: str | Path, strip_prefix: str = "") -> tuple[list[str], list[str]]:
    """Load a ``.pdparams`` state dict into ``model``, skipping what does not fit.

    Returns ``(missing_keys, unexpected_keys)``: model keys absent from the file, and file
    keys not loaded (unknown to the model, or shape-mismatched: the reason is logged).
    ``strip_prefix`` removes a leading prefix from the file's keys first (e.g.
    ``"backbone."`` to load a backbone from a whole-model checkpoint).
    Raises ``ValueError`` when no key at all fits: that is a wrong file, not a partial one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} do not exist; train a model first or fix the path")
    loaded = paddle.load(str(path))
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict saved with paddle.save")
    if strip_prefix:
        loaded = {(k[len(strip_prefix) :] if k.startswith(strip_prefix) else k): v for k, v in loaded.items()}
    own = model.state_dict()
    usable, unexpected = {}, []
    for key, value in loaded.items():
        if key not in own:
            unexpected.append(key)
            continue
        file_shape, model_shape = list(np.shape(value)), list(own[key].shape)
        if file_shape != model_shape:
            logger.warning("skipping %s: shape %s in %s but %s in the model", key, file_shape, path, model_shape)
            unexpected.append(key)
            continue
        usable[key] = value
    if not usable:
        raise ValueError(
            f"none of the {len(loaded)} keys in {path} fit the model "
            f"(e.g. {sorted(loaded)[:3]} vs {sorted(own)[:3]}); wrong architecture, or pass strip_prefix"
        )
    with warnings.catch_warnings():
        # Paddle warns once per key absent from the dict; the summary below says it once.
        warnings.filterwarnings("ignore", message="Skip loading for")
        model.set_state_dict(usable)
    missing = [key for key in own if key not in loaded]
    if missing:
        logger.warning("%d model keys not in %s (kept their initial values): %s", len(missing), path, missing)
    if unexpected:
        logger.warning("%d keys of %s not loaded: %s", len(unexpected), path, unexpected)
    logger.info("loaded %d/%d tensors from %s", len(usable), len(own), path)
    return missing, unexpected


def build_backbone(name: str, pretrained: str | Path | None = None, **options) -> nn.Layer:
    """``create_backbone`` plus weights: a named set the builder knows (``"imagenet"``) or a file.

    A backbone whose builder takes ``pretrained`` (e.g. ``efficientnet_lite0``) receives a
    name like ``"imagenet"`` itself; anything else is a ``.pdparams`` path for ``load_pretrained``.
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered backbones: {', '.join(list_backbones())}")
    pool_options = {k: options.pop(k) for k in ("pool", "gem_p", "gem_learnable") if k in options}
    takes_named = "pretrained" in inspect.signature(_BACKBONES[name]).parameters
    if pretrained and not takes_named and not Path(str(pretrained)).suffix:
        raise ValueError(f"backbone {name!r} has no named weights like {pretrained!r}: give a .pdparams path "
                         "(efficientnet_lite0 offers pretrained: imagenet)")
    if pretrained and takes_named and not Path(str(pretrained)).suffix:
        layer = create_backbone(name, pretrained=str(pretrained), **options)
    else:
        layer = create_backbone(name, **options)
        if pretrained:
            load_pretrained(layer, pretrained)
    if pool_options:  # after the weights: the pooling layer is not part of pretrained sets
        if not hasattr(layer, "set_pool"):
            raise ValueError(f"backbone {name!r} has no pooling option; remove {sorted(pool_options)}")
        layer.set_pool(**pool_options)
    return layer


def count_parameters(model: nn.Layer, trainable_only: bool = False) -> int:
    """Number of parameter values (BN running statistics count unless ``trainable_only``)."""
    return sum(
        math.prod(p.shape) for p in model.parameters() if not (trainable_only and p.stop_gradient)
    )


from visrec.models import efficientnet_lite as _efficientnet_lite  # noqa: E402,F401  (registers efficientnet_lite0)
