"""The classifier: a registry backbone (pooled features) + dropout + one FC layer.

``freeze`` / ``train`` follow ``RecModel``: frozen backbone units and BNs stay in eval mode
whenever the model trains. ``ProbabilityNet`` is what gets exported: softmax probabilities.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import paddle
from paddle import nn
from paddle.nn import functional as F

from visrec.classification.data import read_class_map
from visrec.models.registry import build_backbone
from visrec.models.freezing import BackboneFreezing
from visrec.training.checkpoint import load_finished_run

logger = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
STAGE = "classify"  # named in load_finished_run's messages


class Classifier(BackboneFreezing, nn.Layer):
    def __init__(self, backbone: nn.Layer, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"classify.dropout must be in [0, 1), got {dropout}")
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # Small initial weights: pooled pretrained features are large (Lite0's reach 6 per
        # channel over 1280 channels), and a default-initialised head would start far above
        # log(C) loss, spending the first epoch of a short fine-tuning unlearning noise.
        self.fc = nn.Linear(backbone.out_channels, num_classes,
                            weight_attr=paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, 0.01)),
                            bias_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)))
        self.num_classes = num_classes

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Logits ``[N, num_classes]``."""
        features = self.backbone(x)
        if self.dropout is not None:
            features = self.dropout(features)
        return self.fc(features)

    def rep(self) -> None:
        if hasattr(self.backbone, "rep"):
            self.backbone.rep()


class ProbabilityNet(nn.Layer):
    """The exported graph: softmax over the classifier's logits."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, x):
        return F.softmax(self.model(x), axis=1)


def build_classifier(backbone: dict[str, Any], num_classes: int, dropout: float = 0.0) -> Classifier:
    """``backbone``: ``{"name": ..., **options}``, e.g. ``{"name": "efficientnet_lite0", "pretrained": "imagenet"}``."""
    if not isinstance(backbone, dict) or "name" not in backbone:
        raise ValueError(f"classify.backbone must be a dict with a 'name' key, e.g. "
                         f"{{'name': 'efficientnet_lite0', 'pretrained': 'imagenet'}}; got {backbone!r}")
    options = dict(backbone)
    name = options.pop("name")
    model = Classifier(build_backbone(name, **options), num_classes, dropout)
    logger.info("Classifier: backbone %s (%d features) -> FC (%d classes)", name, model.backbone.out_channels,
                num_classes)
    return model


def load_trained(run_dir: str | Path, checkpoint: str = "best_model") -> tuple[Classifier, dict[str, Any], list[str]]:
    """The network of a finished run (eval mode), its model config and its class names."""
    if not (Path(run_dir) / MODEL_CONFIG_FILE).exists():
        raise FileNotFoundError(f"{Path(run_dir) / MODEL_CONFIG_FILE} not found: {run_dir} is not a finished "
                                "classifier run (train one with `visrec classify train`, or set classify.out)")
    model, model_cfg = load_finished_run(run_dir, checkpoint, STAGE, lambda c: build_classifier(
        c["backbone"], c["num_classes"], c.get("dropout", 0.0)))
    names = read_class_map(run_dir)
    if len(names) != model_cfg["num_classes"]:
        raise ValueError(f"{run_dir}: the class map has {len(names)} classes but the model "
                         f"{model_cfg['num_classes']}: the run directory is inconsistent, retrain it")
    return model, model_cfg, names
