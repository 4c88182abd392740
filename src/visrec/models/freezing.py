"""Partial freezing of a pretrained backbone for fine-tuning on small data.

Two knobs, shared by the extractor and the classifier:

- ``frozen_units``: the first N *units* of the backbone keep their weights. A unit is a
  top-level child layer in forward order, with layer lists expanded, so for
  EfficientNet-Lite0 the units are the stem conv, stem BN, the 16 MBConv blocks, the head
  conv and the head BN (20 in all). Autograd stops at the last frozen unit, so the
  backward pass (about two thirds of a step) shrinks with every unit frozen.
- ``freeze_bn``: every BatchNorm of the backbone uses its running (ImageNet) statistics
  and keeps its scale and shift. With batches of 32 crops from a few classes, batch
  statistics are noisy and drift away from what the pretrained weights were trained with.

``keep_eval`` must be called after every ``model.train()``; the models that
support freezing do it in their ``train`` override.
"""

from __future__ import annotations

import logging

from paddle import nn

logger = logging.getLogger(__name__)

_BN_TYPES = (nn.BatchNorm, nn.BatchNorm1D, nn.BatchNorm2D, nn.BatchNorm3D, nn.SyncBatchNorm)


def backbone_units(backbone: nn.Layer) -> list[nn.Layer]:
    """The backbone's layers in forward order: top-level children, layer lists expanded."""
    units: list[nn.Layer] = []
    for child in backbone.children():
        if isinstance(child, (nn.LayerList, nn.Sequential)):
            units.extend(child.children())
        else:
            units.append(child)
    return units


def freeze_backbone_layers(backbone: nn.Layer, frozen_units: int | str = 0, freeze_bn: bool = False) -> list[nn.Layer]:
    """Freeze the first ``frozen_units`` units (``"all"``: every one) and, optionally, every BN.

    Returns the layers that must stay in eval mode during training: the frozen units whole
    (no batch statistics, no drop-connect noise in what is now a fixed feature extractor)
    and, with ``freeze_bn``, every BN layer.
    """
    units = backbone_units(backbone)
    count = len(units) if frozen_units == "all" else frozen_units
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= len(units):
        raise ValueError(f"frozen_units must be an integer in [0, {len(units)}] or 'all' for this backbone "
                         f"({len(units)} units), got {frozen_units!r}")
    eval_layers: list[nn.Layer] = list(units[:count])
    for unit in eval_layers:
        for param in unit.parameters():
            param.stop_gradient = True
    if freeze_bn:
        for layer in backbone.sublayers():
            if isinstance(layer, _BN_TYPES):
                for param in layer.parameters():
                    param.stop_gradient = True
                eval_layers.append(layer)
    trainable = sum(int(p.size) for p in backbone.parameters() if not p.stop_gradient)
    total = sum(int(p.size) for p in backbone.parameters())
    if count or freeze_bn:
        logger.info("backbone: first %d of %d units frozen, BN %s; %d of %d weights train",
                    count, len(units), "frozen" if freeze_bn else "trains", trainable, total)
    return eval_layers


def keep_eval(eval_layers: list[nn.Layer]) -> None:
    """Put frozen layers back in eval mode (``model.train()`` switches every layer)."""
    for layer in eval_layers:
        layer.eval()


class BackboneFreezing:
    """Mixin for a model with a ``backbone``: ``freeze`` it partly, and keep the frozen layers
    in eval mode across ``train()`` calls. Put it before ``nn.Layer`` in the bases."""

    def freeze(self, frozen_units: int | str = 0, freeze_bn: bool = False) -> None:
        """Fine-tuning on small data: keep the first backbone units and/or every BN fixed."""
        self._frozen_eval_layers = freeze_backbone_layers(self.backbone, frozen_units, freeze_bn)

    def train(self):
        super().train()
        keep_eval(getattr(self, "_frozen_eval_layers", []))
        return self


def freeze_pretrained(model, cfg, section: str) -> None:
    """Apply ``cfg.frozen_units`` / ``cfg.freeze_bn`` to ``model`` (which has ``freeze``);
    refuses them for a backbone without pretrained weights (``cfg.backbone.pretrained`` or
    ``cfg.pretrained``): frozen random layers learn nothing."""
    if not (cfg.frozen_units or cfg.freeze_bn):
        return
    if not cfg.backbone.get("pretrained") and not cfg.pretrained:
        raise ValueError(f"{section}.frozen_units / freeze_bn are set but the backbone has no pretrained weights: "
                         f"frozen random layers learn nothing (set {section}.backbone.pretrained, e.g. imagenet)")
    model.freeze(cfg.frozen_units, cfg.freeze_bn)
