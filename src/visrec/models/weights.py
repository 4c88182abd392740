"""Weights of a network: loading a ``.pdparams`` state dict that may only partly fit, counting."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import paddle
from paddle import nn

logger = logging.getLogger(__name__)


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


def count_parameters(model: nn.Layer, trainable_only: bool = False) -> int:
    """Number of parameter values (BN running statistics count unless ``trainable_only``)."""
    return sum(
        math.prod(p.shape) for p in model.parameters() if not (trainable_only and p.stop_gradient)
    )
