"""The recognition system: mainbody detection -> crops -> one batched embedding -> gallery search.

    system = RecognitionSystem.from_config(cfg.recognition)
    system.predict(image_rgb)
    # [{"bbox": [x1, y1, x2, y2], "rec_docs": "Blue Jay", "rec_scores": 0.83}, ...]

Per image: the detector's top ``max_det`` boxes above ``det_threshold`` plus (by default, as
PP-ShiTu) the whole-image box; every crop goes through the extractor in ONE batched call
(with ``detect_unless_whole_margin``, a cascade: the whole image is embedded and searched
first, and the detector runs unless that view is recognised, passing the score threshold with
its best label ahead of the runner-up by the margin);
each embedding searches the gallery (``search_k`` neighbours), and each label gets a score
(the mean of its best ``class_top_m`` similarities, ``visrec.index.label_scores``, blended with
the cosine to the label's centroid by ``centroid_weight``); with
``whole_context`` > 0 each detected object's label scores are blended with the whole image's
(which then is no result of its own: the photo is the object's context); the top-k
labels are the candidates; results under the score threshold are dropped;
class-agnostic NMS over the recognised boxes, best score first, keeps one result per object.
Without a detector (``detector: null``) the whole image is the one object.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from visrec.config import RecognitionConfig
from visrec.inference.detection_post import nms
from visrec.inference.detector_runtime import Detector
from visrec.inference.export import ONNX_FILE
from visrec.inference.extractor_runtime import Extractor
from visrec.index.factory import open_gallery
from visrec.index.gallery_api import GalleryBase
from visrec.index.label_scores import label_hits, with_centroids, with_context

logger = logging.getLogger(__name__)


@dataclass
class Timings:
    """Seconds spent per step, summed over the calls since the last reset (for benchmarks)."""

    detect: float = 0.0
    extract: float = 0.0
    search: float = 0.0
    total: float = 0.0
    images: int = 0
    boxes: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"detect": self.detect, "extract": self.extract, "search": self.search,
                "rest": max(0.0, self.total - self.detect - self.extract - self.search), "total": self.total,
                "images": self.images, "boxes": self.boxes}


def load_extractor(rec_cfg: RecognitionConfig) -> Extractor:
    """The exported extractor ``recognition.extractor`` names."""
    return Extractor(rec_cfg.extractor, backend=rec_cfg.backend, num_threads=rec_cfg.num_threads)


def load_detector(rec_cfg: RecognitionConfig) -> Detector | None:
    """The exported mainbody detector ``recognition.detector`` names (None when it is null)."""
    if not rec_cfg.detector:
        return None
    backend = rec_cfg.detector_backend
    if backend == "auto":
        backend = "onnx" if (Path(rec_cfg.detector) / ONNX_FILE).is_file() else rec_cfg.backend
    return Detector(rec_cfg.detector, backend=backend, num_threads=rec_cfg.num_threads,
                    score_threshold=rec_cfg.det_threshold, max_det=rec_cfg.max_det, box_scale=rec_cfg.det_box_scale,
                    center_prior=rec_cfg.det_center_prior, extent_blend=rec_cfg.det_extent_blend)


def whole_box(width: int, height: int) -> np.ndarray:
    """The whole-image box ``[1, 4]``."""
    return np.array([[0, 0, width, height]], dtype=np.float32)


class Described(NamedTuple):
    """An image's candidate boxes ``[K, 4]``, their embeddings ``[K, D]``, and whether the last
    box is the whole image added beside the detections (``whole_image_box``), which
    ``whole_context`` then uses as every detection's context."""

    boxes: np.ndarray
    features: np.ndarray
    whole_last: bool


class RecognitionSystem:
    def __init__(self, extractor: Extractor, gallery: GalleryBase, detector: Detector | None = None,
                 settings: RecognitionConfig | None = None):
        self.extractor = extractor
        self.detector = detector
        # Only the post-processing knobs are read here; the model paths were used to load.
        self.settings = settings or RecognitionConfig()
        self.timings = Timings()
        self.set_gallery(gallery)

    @property
    def settings(self) -> RecognitionConfig:
        return self._settings

    @settings.setter
    def settings(self, settings: RecognitionConfig) -> None:
        for knob in ("whole_context", "centroid_weight"):
            if not 0.0 <= float(getattr(settings, knob)) <= 1.0:
                raise ValueError(f"recognition.{knob} is a weight in [0, 1], got {getattr(settings, knob)}")
        self._settings = settings

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, rec_cfg: RecognitionConfig, gallery: GalleryBase | None = None) -> RecognitionSystem:
        """Load the exported models and the gallery named in a ``RecognitionConfig``."""
        extractor = load_extractor(rec_cfg)
        detector = load_detector(rec_cfg)
        if gallery is None:
            gallery = open_gallery(rec_cfg.gallery, expected_fingerprint=extractor.fingerprint,
                                   num_threads=rec_cfg.num_threads)
        return cls(extractor, gallery, detector, rec_cfg)

    def set_gallery(self, gallery: GalleryBase) -> None:
        """Swap in another gallery (e.g. after an update); checked against the extractor first."""
        gallery.check_expected(gallery.path, self.extractor.fingerprint, self.extractor.dim)
        self.gallery = gallery

    @property
    def threshold(self) -> float:
        """The cosine similarity a recognition needs: params, else the gallery's calibrated one."""
        if self.settings.score_threshold is not None:
            return float(self.settings.score_threshold)
        calibrated = self.gallery.meta_extra.get("threshold")
        return float(calibrated) if calibrated is not None else float(self.settings.default_threshold)

    # ------------------------------------------------------------------ recognition

    def detections(self, image: np.ndarray) -> np.ndarray:
        """The detector's boxes ``[K, 4]`` above ``det_threshold`` (at most ``max_det``)."""
        if self.detector is None:
            return np.zeros((0, 4), dtype=np.float32)
        start = time.perf_counter()
        dets = self.detector.detect_arrays([image], score_threshold=self.settings.det_threshold)[0]
        self.timings.detect += time.perf_counter() - start
        return dets[: self.settings.max_det, :4]

    def boxes_for(self, image: np.ndarray) -> np.ndarray:
        """The candidate object boxes ``[K, 4]`` x1 y1 x2 y2: detections (+ the whole image)."""
        height, width = image.shape[:2]
        boxes = self.detections(image)
        if self.detector is None or self.settings.whole_image_box or len(boxes) == 0:
            boxes = np.concatenate([boxes, whole_box(width, height)])
        return boxes

    def describe(self, image: np.ndarray, gallery: GalleryBase | None = None) -> Described:
        """The candidate boxes ``[K, 4]`` of an image and their embeddings ``[K, D]``.

        Without the cascade, one batched extractor call for all boxes. With
        ``detect_unless_whole_margin`` (and a detector and the whole-image box), the whole image
        first, searched in ``gallery`` (default: the system's): when it is recognised
        (:meth:`whole_is_recognised`) that is all; otherwise the detector's crops join in a
        second call."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HWC uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
        if self.settings.detect_unless_whole_margin is None or self.detector is None or not self.settings.whole_image_box:
            boxes = self.boxes_for(image)  # the whole image is last when whole_image_box adds it
            return Described(boxes, self._embed(image, boxes), bool(self.settings.whole_image_box and len(boxes) > 1))
        whole = whole_box(image.shape[1], image.shape[0])
        whole_features = self._embed(image, whole)
        if self.whole_is_recognised(whole_features, gallery):
            return Described(whole, whole_features, False)
        boxes = self.detections(image)
        if len(boxes) == 0:
            return Described(whole, whole_features, False)
        return Described(np.concatenate([boxes, whole]), np.concatenate([self._embed(image, boxes), whole_features]),
                         True)

    def whole_is_recognised(self, whole_features: np.ndarray, gallery: GalleryBase | None = None) -> bool:
        """The cascade's test: the whole image's best label passes the score threshold and leads
        the runner-up label by at least ``detect_unless_whole_margin``. A margin, not a score:
        similarities run higher or lower with the extractor and the kind of photo (the generated
        shapes all look alike to an ImageNet model), their gaps much less (docs/experiments.md)."""
        gallery = self.gallery if gallery is None else gallery
        if len(gallery) == 0:
            return False
        hits = self._label_scores(whole_features, gallery, int(self.settings.search_k))[1][0]
        if not hits or hits[0].score < self.threshold:
            return False
        runner_up = hits[1].score if len(hits) > 1 else -1.0
        return hits[0].score - runner_up >= float(self.settings.detect_unless_whole_margin)

    def _label_scores(self, features: np.ndarray, gallery: GalleryBase, neighbours_k: int):
        """Each row's ``neighbours_k`` nearest gallery entries and its label scores (``label_hits``,
        blended with the centroids' cosines when ``centroid_weight`` > 0: ``with_centroids``)."""
        start = time.perf_counter()
        neighbours = gallery.search(features, neighbours_k)
        counts = gallery.label_counts()
        hits = [label_hits(row, counts, self.settings.class_top_m) for row in neighbours]
        weight = float(self.settings.centroid_weight)
        if weight > 0 and any(hits):
            floors = [row[-1].score if row else -1.0 for row in neighbours]
            hits = with_centroids(hits, floors, features, gallery.label_centroids(), weight)
        self.timings.search += time.perf_counter() - start
        return neighbours, hits

    def _embed(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        features = self.extractor.embed_boxes(image, boxes)
        self.timings.extract += time.perf_counter() - start
        return features

    def recognize(self, described: Described, gallery: GalleryBase | None = None,
                  top_k: int | None = None, threshold: float | None = None,
                  return_topk: bool = False) -> list[dict[str, Any]]:
        """Search a described image's embeddings in the gallery, threshold, NMS: the recognition results."""
        boxes, features, whole_last = described
        gallery = self.gallery if gallery is None else gallery
        if len(gallery) == 0:
            raise ValueError("the gallery is empty: add images first (`visrec gallery add LIST`)")
        k = int(top_k or self.settings.top_k)
        neighbours, hits = self._label_scores(features, gallery, max(k, int(self.settings.search_k)))
        weight = float(self.settings.whole_context)
        if weight > 0 and whole_last and all(len(r) for r in neighbours):
            # Each detected object is scored with its photo as context; the whole photo is then
            # no result of its own.
            floors = [row[-1].score for row in neighbours]
            hits = [with_context(own, floor, hits[-1], floors[-1], weight)
                    for own, floor in zip(hits[:-1], floors[:-1], strict=True)]
            boxes = boxes[:-1]
        hits = [row[:k] for row in hits]
        return self._select(boxes, hits, self.threshold if threshold is None else float(threshold), return_topk)

    def predict(self, image: np.ndarray, top_k: int | None = None, threshold: float | None = None,
                return_topk: bool = False) -> list[dict[str, Any]]:
        """Recognise the objects of one HWC uint8 RGB image (see the module docstring)."""
        start = time.perf_counter()
        if len(self.gallery) == 0:
            raise ValueError("the gallery is empty: add images first (`visrec gallery add LIST`)")
        described = self.describe(image)
        results = self.recognize(described, top_k=top_k, threshold=threshold, return_topk=return_topk)
        self.timings.total += time.perf_counter() - start
        self.timings.images += 1
        self.timings.boxes += len(described.boxes)
        return results

    def _select(self, boxes: np.ndarray, hits: Sequence[Sequence[Any]], threshold: float,
                return_topk: bool) -> list[dict[str, Any]]:
        """Keep boxes whose best hit passes ``threshold``; class-agnostic NMS by that score."""
        kept, scores = [], []
        for box, box_hits in zip(boxes, hits, strict=True):
            if not box_hits or box_hits[0].score < threshold:
                continue
            kept.append((box, box_hits))
            scores.append(box_hits[0].score)
        if not kept:
            return []
        order = nms(np.stack([k[0] for k in kept]), np.asarray(scores), self.settings.nms_iou)
        results = []
        for i in order:
            box, box_hits = kept[int(i)]
            result: dict[str, Any] = {"bbox": [int(round(float(v))) for v in box],
                                      "rec_docs": box_hits[0].label,
                                      "rec_scores": round(float(box_hits[0].score), 6)}
            if return_topk:
                result["topk"] = [{"id": int(h.id), "label": h.label, "score": round(float(h.score), 6)}
                                  for h in box_hits]
            results.append(result)
        return results

    def top1(self, described: Described, gallery: GalleryBase | None = None) -> tuple[str | None, float]:
        """The system's best (label, score) for a described image, before any threshold."""
        results = self.recognize(described, gallery=gallery, top_k=1, threshold=-2.0)
        if not results:
            return None, -2.0
        return results[0]["rec_docs"], float(results[0]["rec_scores"])
