"""The recognition model: Backbone + Neck + Head, built from three config dicts.

``forward`` gives the raw embedding (for the losses) and the logits (for the
classification loss); ``embed`` gives the L2-normalised embedding the gallery stores and
the export uses.
"""

from __future__ import annotations

import logging
from typing import Any

import paddle
from paddle import nn
from paddle.nn import functional as F

from visrec.models.registry import build_backbone
from visrec.models.freezing import BackboneFreezing
from visrec.models.heads import create_head
from visrec.models.necks import create_neck

logger = logging.getLogger(__name__)


class RecModel(BackboneFreezing, nn.Layer):
    def __init__(self, backbone: nn.Layer, neck: nn.Layer, head: nn.Layer | None = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.embedding_size: int = neck.out_channels

    def forward(self, x: paddle.Tensor, labels: paddle.Tensor | None = None) -> dict[str, paddle.Tensor | None]:
        """``{"features": [N, D] embedding before L2 norm, "logits": [N, K] or None}``."""
        return self.forward_from_backbone(self.backbone(x), labels)

    def forward_from_backbone(self, pooled: paddle.Tensor,
                              labels: paddle.Tensor | None = None) -> dict[str, paddle.Tensor | None]:
        """``forward`` from the backbone's pooled features on (neck, then head)."""
        features = self.neck(pooled)
        logits = self.head(features, labels) if self.head is not None else None
        return {"features": features, "logits": logits}

    def embed(self, x: paddle.Tensor) -> paddle.Tensor:
        """L2-normalised embedding ``[N, D]``: what the gallery stores and export serves."""
        return F.normalize(self.neck(self.backbone(x)), axis=1)

    def rep(self) -> None:
        """Re-parameterise the backbone for inference, when it supports it."""
        if hasattr(self.backbone, "rep"):
            self.backbone.rep()


def _split_spec(spec: dict[str, Any] | None, part: str) -> tuple[str | None, dict[str, Any]]:
    """``{"name": x, **options}`` -> (x, options); refuses a spec without a name."""
    if spec is None:
        return None, {}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"the {part} config must be a dict with a 'name' key, e.g. {{'name': ...}}; got {spec!r}")
    options = dict(spec)
    return options.pop("name"), options


def build_rec_model(
    backbone: dict[str, Any],
    neck: dict[str, Any] | None,
    head: dict[str, Any] | None,
    class_num: int,
) -> RecModel:
    """Build a RecModel from ``{"name": ..., **options}`` dicts.

    The backbone dict may hold ``"pretrained"``: a ``.pdparams`` path, or a named weight set
    the backbone offers (``"imagenet"`` for ``efficientnet_lite0``); see ``build_backbone``.
    The neck's input is the backbone's ``out_channels`` and the head's input the neck's
    ``out_channels``; ``neck=None`` / ``{"name": "null"}`` is the identity, ``head=None`` /
    ``{"name": "null"}`` means no head (pure metric learning).
    """
    backbone_name, backbone_options = _split_spec(backbone, "backbone")
    if backbone_name is None:
        raise ValueError("a backbone config is required, e.g. {'name': 'mobilenet_v1', 'scale': 0.5}")
    backbone_layer = build_backbone(backbone_name, **backbone_options)

    neck_name, neck_options = _split_spec(neck, "neck")
    neck_layer = create_neck(neck_name, backbone_layer.out_channels, **neck_options)

    head_name, head_options = _split_spec(head, "head")
    embedding_size = neck_layer.out_channels
    declared = head_options.pop("embedding_size", embedding_size)
    if declared != embedding_size:
        raise ValueError(
            f"head embedding_size {declared} differs from the neck's output {embedding_size}; "
            "drop it from the head config (it is taken from the neck)"
        )
    declared_classes = head_options.pop("class_num", class_num)
    if declared_classes != class_num:
        raise ValueError(
            f"head class_num {declared_classes} differs from the data's {class_num}; drop it from the head config"
        )
    head_layer = create_head(head_name, embedding_size, class_num, **head_options)

    model = RecModel(backbone_layer, neck_layer, head_layer)
    logger.info(
        "RecModel: backbone %s (%d features) -> neck %s (%d) -> head %s (%d classes)",
        backbone_name, backbone_layer.out_channels, neck_name, embedding_size, head_name, class_num,
    )  # fmt: skip
    return model


def param_groups(model: RecModel, backbone_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """Optimiser parameter groups: backbone (LR x ``backbone_lr_mult``) and the rest.

    Frozen parameters (``stop_gradient``: BN running statistics, the BNNeck bias) are left
    out. In Paddle a group's ``learning_rate`` multiplies the optimiser's learning rate.
    """
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    backbone_params = [p for p in model.backbone.parameters() if not p.stop_gradient]
    other_params = [p for p in model.parameters() if id(p) not in backbone_ids and not p.stop_gradient]
    groups = []
    if backbone_params:  # none when the backbone is frozen
        groups.append({"params": backbone_params, "learning_rate": float(backbone_lr_mult)})
    if other_params:
        groups.append({"params": other_params, "learning_rate": 1.0})
    return groups
