"""The mainbody detector at inference: export, and a ``Detector`` over an exported model.

The exported network takes the preprocessed batch ``[N, 3, H, W]`` and returns dense
decoded boxes ``[N, P, 4]`` (network-input pixels), scores ``[N, P]`` and the backbone's
saliency ``[N, 1, h, w]`` (exports from before 2026-12-04 lack the last). Everything
after that (threshold, NMS, ``max_det``, back to original coordinates) is
``visrec.inference.detection_post.postprocess``, the same function the dygraph
evaluation uses: exported and dygraph paths give the same boxes.

    detector = Detector("data/export/detector", backend="paddle")
    detector(image_rgb_uint8)            # [(x1, y1, x2, y2, score), ...] in original pixels
    detector.detect_batch([img1, img2])  # one list per image
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import paddle
from paddle import nn

from visrec.imaging import ResizeInfo, normalize_chw, pad_colour, resize_to_input
from visrec.inference.detection_post import NEUTRAL_CALIBRATION, check_calibration, postprocess
from visrec.inference.export import export_layer, read_model_json
from visrec.inference.predictors import Backend, Predictor

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float, float]
# A dense predict function: NCHW float32 batch -> (boxes [N, P, 4], scores [N, P],
# saliency [N, 1, h, w] or None for an export without it).
DenseOutputs = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]
DensePredictFn = Callable[[np.ndarray], DenseOutputs]


class DetectorExportNet(nn.Layer):
    """The layer exported: ``forward(x) = detector.predict(x)`` (dense boxes, scores, saliency)."""

    def __init__(self, detector: nn.Layer):
        super().__init__()
        self.detector = detector

    def forward(self, x):
        return self.detector.predict(x)


def detector_meta(model_config: dict[str, Any]) -> dict[str, Any]:
    """``model.json`` content (without fingerprint / files) from a training run's model config."""
    image, post = model_config["image"], model_config["postprocess"]
    size = int(image["size"])
    return {
        "kind": "detector",
        "input_size": [size, size],
        "resize": image["resize"],
        "mean": image["mean"], "std": image["std"], "scale": image["scale"],
        "pad_value": list(pad_colour(image["mean"], image["scale"])),
        "strides": model_config["strides"],
        "score_threshold": post["score_threshold"], "nms_iou": post["nms_iou"],
        "max_det": post["max_det"], "pre_nms_top_k": post["pre_nms_top_k"],
        "categories": [{"id": 1, "name": "foreground"}],
        "outputs": ["boxes [N, P, 4] x1 y1 x2 y2 in input pixels (dense, pre-NMS)", "scores [N, P]",
                    "saliency [N, 1, h, w] (the backbone's, stride 32)"],
        "backbone": model_config["backbone"],
    }


def export_detector(model, model_config: dict[str, Any], out_dir: str | Path, onnx: bool = True,
                    box_scale: float = 1.0, center_prior: float = 0.0, extent_blend: float = 0.0,
                    consensus: bool = False) -> dict[str, Any]:
    """Paddle inference files (+ ONNX) + ``model.json`` for a trained ``MainbodyDetector``.

    ``box_scale`` (how much the runtime grows each box) and ``center_prior`` (the sigma of the
    centre weighting of scores, 0: none), ``extent_blend`` and ``consensus``
    (``detection_post.postprocess``) go in model.json: calibrations that belong to the model,
    since they depend on what it was trained on.
    """
    model.eval()
    if hasattr(model, "rep"):
        model.rep()
    meta = {**detector_meta(model_config), "box_scale": float(box_scale), "center_prior": float(center_prior),
            "extent_blend": float(extent_blend), "consensus": bool(consensus)}
    size = meta["input_size"][0]
    return export_layer(DetectorExportNet(model), out_dir, [None, 3, size, size], meta, onnx=onnx)


def split_outputs(outputs: Sequence[np.ndarray]) -> DenseOutputs:
    """(boxes, scores, saliency or None) from a predictor's outputs, told apart by rank (output
    order may vary; an export from before the saliency output has two)."""
    boxes = [o for o in outputs if o.ndim == 3]
    scores = [o for o in outputs if o.ndim == 2]
    saliency = [o for o in outputs if o.ndim == 4]
    if len(boxes) != 1 or len(scores) != 1 or len(saliency) > 1:
        raise ValueError(f"expected a [N, P, 4], a [N, P] and at most one [N, 1, h, w] output, got shapes "
                         f"{[o.shape for o in outputs]}: is this an exported visrec detector?")
    return boxes[0], scores[0], saliency[0] if saliency else None


def exported_predict_fn(model, model_config: dict[str, Any], work_dir: str | Path,
                        num_threads: int = 2) -> DensePredictFn:
    """Dense predictions of ``model`` through Paddle Inference: exported into ``work_dir`` first.

    5-6x faster than eager Paddle on this CPU (the known trap), for evaluations over many
    photos; the export is the one the export stage makes, so the boxes are the served ones.
    """
    export_detector(model, model_config, work_dir, onnx=False)
    predictor = Predictor(work_dir, backend="paddle", num_threads=num_threads)
    return lambda batch: split_outputs(predictor(batch))


def dygraph_predict_fn(model) -> DensePredictFn:
    """Dense predictions of a dygraph ``MainbodyDetector`` (eval mode, no grad)."""
    def predict(batch: np.ndarray) -> DenseOutputs:
        model.eval()
        with paddle.no_grad():
            boxes, scores, saliency = model.predict(paddle.to_tensor(batch))
        return boxes.numpy(), scores.numpy(), saliency.numpy()

    return predict


class Detector:
    """An exported detector + its preprocessing (from ``model.json``) + the shared post-processing."""

    def __init__(self, model_dir: str | Path, backend: Backend = "paddle", num_threads: int = 2,
                 batch_size: int = 16, score_threshold: float | None = None, max_det: int | None = None,
                 box_scale: float | None = None, center_prior: float | None = None,
                 extent_blend: float | None = None):
        self.meta = read_model_json(model_dir)
        if self.meta.get("kind") != "detector":
            raise ValueError(f"{model_dir} holds a {self.meta.get('kind')!r} model, not a detector: "
                             "point to the detector export (e.g. data/export/detector)")
        self.predictor = Predictor(model_dir, backend=backend, num_threads=num_threads)
        self.size = int(self.meta["input_size"][0])
        self.batch_size = max(1, int(batch_size))
        self.score_threshold = float(self.meta["score_threshold"] if score_threshold is None else score_threshold)
        self.max_det = int(self.meta["max_det"] if max_det is None else max_det)
        # the caller's (recognition.det_*) value, else model.json's; exports from before a
        # calibration have none of it in model.json and keep their behaviour
        given = {"box_scale": box_scale, "center_prior": center_prior, "extent_blend": extent_blend}
        calibration = {k: float(self.meta.get(k, NEUTRAL_CALIBRATION[k]) if v is None else v)
                       for k, v in given.items()}
        check_calibration(calibration, knob=lambda name: f"{name} (recognition.det_{name})")
        self.box_scale, self.center_prior = calibration["box_scale"], calibration["center_prior"]
        self.extent_blend = calibration["extent_blend"]
        self.consensus = bool(self.meta.get("consensus", False))

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, ResizeInfo]:
        """HWC uint8 RGB -> CHW float32 network input and its mapping to the original."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HWC uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
        m = self.meta
        resized, info = resize_to_input(image, self.size, m["resize"], tuple(m["pad_value"]))
        return normalize_chw(resized, m["mean"], m["std"], m["scale"]), info

    def predict_dense(self, batch: np.ndarray) -> DenseOutputs:
        return split_outputs(self.predictor(batch))

    def postprocess(self, boxes: np.ndarray, scores: np.ndarray, infos: Sequence[ResizeInfo],
                    score_threshold: float | None = None, saliency: np.ndarray | None = None) -> list[np.ndarray]:
        m = self.meta
        threshold = self.score_threshold if score_threshold is None else float(score_threshold)
        # an export without the saliency output cannot refine: it keeps its boxes
        blend = self.extent_blend if saliency is not None else 0.0
        return postprocess(boxes, scores, infos, threshold, float(m["nms_iou"]), self.max_det,
                           int(m.get("pre_nms_top_k", 100)), self.box_scale, self.center_prior,
                           saliency=saliency, extent_blend=blend, consensus=self.consensus,
                           input_size=(self.size, self.size))

    def detect_arrays(self, images: Sequence[np.ndarray], score_threshold: float | None = None) -> list[np.ndarray]:
        """Per image a ``[K, 5]`` array ``x1 y1 x2 y2 score`` in original pixels.

        ``score_threshold`` (default: the detector's own) applies to the network's score; the
        score returned carries the export's calibrations (centre prior, consensus), so filter with
        this argument, not on it."""
        results: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            prepared = [self.preprocess(img) for img in images[start:start + self.batch_size]]
            batch = np.stack([p[0] for p in prepared])
            boxes, scores, saliency = self.predict_dense(batch)
            results.extend(self.postprocess(boxes, scores, [p[1] for p in prepared], score_threshold, saliency))
        return results

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Box]]:
        return [[tuple(float(v) for v in row) for row in dets] for dets in self.detect_arrays(images)]

    def __call__(self, image: np.ndarray) -> list[Box]:
        return self.detect_batch([image])[0]
