"""The backbone registry (timm style): builders registered by name, built by name.

    build_backbone("efficientnet_lite0", pretrained="imagenet", pool="gem")
    create_backbone("mobilenet_v1", scale=0.5)      # the builder's own keyword arguments
    list_backbones()                                 # every registered name

Each family registers its builders in its own module (``mobilenet_v1``, ``pplcnet_v2``,
``resnet``, ``efficientnet_lite``) with ``@register_backbone(name, default_cfg)``; the package
``visrec.models`` imports every family, so the registry is complete whatever is imported.
Every backbone maps images ``[N, 3, H, W]`` to pooled features ``[N, out_channels]`` and exposes
``forward_features`` / ``forward_stages`` (:class:`visrec.models.layers.StagedBackbone`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from paddle import nn

from visrec.models.weights import load_pretrained

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
