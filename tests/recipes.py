"""The tiny from-scratch training recipes the unit tests start from.

``Config()`` holds params.yaml's product settings (a pretrained EfficientNet-Lite0, fine-tuned
with Proxy-Anchor), which train in minutes; the unit tests train tiny networks from scratch in
seconds. They start from these recipes and override what each test is about::

    config_from_dict({"extractor": scratch("extractor", {"image": {"size": 48}})})
"""

from __future__ import annotations

import copy
from typing import Any

# Free-form option mappings (a backbone's, a neck's, a head's) are replaced whole, never merged.
REPLACED_WHOLE = {"backbone", "neck", "head"}

SCRATCH: dict[str, dict[str, Any]] = {
    "extractor": {
        "backbone": {"name": "mobilenet_v1", "scale": 0.5},
        "neck": {"name": "FCNeck", "embedding_size": 512},
        "head": {"name": "ArcMarginHead", "margin": 0.2, "scale": 30.0},
        "losses": [{"name": "CELoss", "weight": 1.0, "epsilon": 0.1},
                   {"name": "TripletAngularMarginLoss", "weight": 1.0, "margin": 0.5}],
        "image": {"size": 128, "bbox_pad": 0.05},
        "augment": {"rotate_degrees": 15.0, "erase_prob": 0.3},
        "optimizer": {"name": "momentum", "lr": 0.05, "weight_decay": 5e-4, "backbone_lr_mult": 1.0,
                      "warmup_epochs": 1.0},
        "frozen_units": 0, "freeze_bn": False, "head_warmup_steps": 0,
        "epochs": 10, "eval_every": 2, "eval_before_training": False,
    },
    "detector": {
        "backbone": {"name": "mobilenet_v1", "scale": 0.25},
        "freeze_backbone": False,
        "assign": {"size_ranges": [[0.0, 64.0], [32.0, 128.0], [64.0, 100000.0]]},
        "image": {"size": 128},
        "optimizer": {"lr": 0.004},
        "epochs": 6, "eval_every": 2,
    },
    "classify": {
        "frozen_units": 0, "freeze_bn": False, "optimizer": {"backbone_lr_mult": 0.5}, "epochs": 10, "eval_every": 1,
    },
}


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: sections merge key by key, other values replace."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in REPLACED_WHOLE:
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def scratch(section: str, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The raw params of ``section``: the tiny recipe with ``raw`` on top."""
    return merged(SCRATCH[section], raw or {})
