"""A frozen backbone run by an exported copy of itself while the rest of the detector trains.

With ``detector.freeze_backbone`` only the FPN and head learn, yet eager Paddle spends most
of each step in the backbone's forward pass: EfficientNet-Lite0, batch 32 at 160 px, 2 cores,
measured 1.65 s of a 1.85 s step (FPN + head forward and backward: 0.20 s). The backbone's
weights and BatchNorm statistics never change, so an exported copy computes the same stage
outputs (to float tolerance) on ONNX Runtime or Paddle Inference, several times faster.

:func:`exported_stages` exports the backbone's ``forward_stages`` once into a temporary
folder, points :attr:`MainbodyDetector.stage_features` at it for the duration of a ``with``
block (training and evaluation), and restores the eager path afterwards, so the detector that
is checkpointed and exported is the ordinary one.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import paddle
from paddle import nn

from visrec.inference.export import export_layer
from visrec.inference.predictors import Predictor
from visrec.models.detector import MainbodyDetector

logger = logging.getLogger(__name__)

FrozenBackend = Literal["onnx", "paddle", "eager"]


class BackboneStages(nn.Layer):
    """The backbone truncated at its pyramid stages: what the FPN reads."""

    def __init__(self, backbone: nn.Layer):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return tuple(self.backbone.forward_stages(x))


def stages_predictor(backbone: nn.Layer, input_size: int, folder: Path, backend: Literal["onnx", "paddle"],
                     num_threads: int) -> Predictor:
    """Export ``backbone.forward_stages`` (any batch size, ``input_size`` square) and load it."""
    start = time.perf_counter()
    export_layer(BackboneStages(backbone), folder, [None, 3, input_size, input_size],
                 {"kind": "backbone-stages", "input_size": [input_size, input_size]}, onnx=backend == "onnx")
    predictor = Predictor(folder, backend=backend, num_threads=num_threads)
    logger.info("frozen backbone: stage outputs from an exported copy on %s (%d threads), exported in %.1f s",
                backend, num_threads, time.perf_counter() - start)
    return predictor


@contextmanager
def exported_stages(model: MainbodyDetector, input_size: int, backend: FrozenBackend = "onnx",
                    num_threads: int = 2) -> Iterator[None]:
    """Inside the block, ``model``'s frozen backbone runs as an exported copy (no-op when the
    backbone trains or ``backend`` is ``eager``)."""
    if backend == "eager" or not model.backbone_frozen:
        yield
        return
    if backend not in ("onnx", "paddle"):
        raise ValueError(f"detector.frozen_backend must be onnx, paddle or eager, got {backend!r}")
    with tempfile.TemporaryDirectory(prefix="visrec-frozen-backbone-") as tmp:
        predictor = stages_predictor(model.backbone, input_size, Path(tmp) / "stages", backend, num_threads)
        model.backbone.eval()  # the export switched it; a frozen backbone stays in eval mode anyway

        def stage_features(x: paddle.Tensor) -> list[paddle.Tensor]:
            if tuple(x.shape[2:]) != (input_size, input_size):  # the export is for one input size
                return model.backbone.forward_stages(x)
            return [paddle.to_tensor(out) for out in predictor(np.asarray(x.numpy(), dtype=np.float32))]

        model.stage_features = stage_features
        try:
            yield
        finally:
            model.stage_features = None
