"""The feature extractor at inference: an exported model + the preprocessing in its ``model.json``.

    extractor = Extractor("data/export/extractor")
    extractor.embed([crop1, crop2])       # [2, D] float32, L2-normalised
    extractor.embed_boxes(image, boxes)   # crops around x1 y1 x2 y2 boxes (padded as in training)

Crops are prepared exactly as the evaluation prepared the training-time box crops: the box
grown by ``bbox_pad`` on each side, a square resize to the input size, the backbone's
normalisation. All crops of a call go through the network in batches of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from visrec.imaging import crop_xyxy, normalize_chw
from visrec.inference.export import read_model_json
from visrec.inference.predictors import Backend, Predictor


class Extractor:
    """Images (HWC uint8 RGB) -> L2-normalised embeddings, through an exported extractor."""

    def __init__(self, model_dir: str | Path, backend: Backend = "paddle", num_threads: int = 2,
                 batch_size: int = 32):
        self.model_dir = Path(model_dir)
        self.meta = read_model_json(self.model_dir)
        if self.meta.get("kind") != "extractor":
            raise ValueError(f"{model_dir} holds a {self.meta.get('kind')!r} model, not an extractor: "
                             "point to the extractor export (e.g. data/export/extractor)")
        self.predictor = Predictor(self.model_dir, backend=backend, num_threads=num_threads)
        self.size = int(self.meta["input_size"][0])
        self.dim = int(self.meta["embedding_dim"])
        self.bbox_pad = float(self.meta.get("bbox_pad", 0.0))
        self.batch_size = max(1, int(batch_size))

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB -> CHW float32 input (square resize, the model's normalisation)."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HWC uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
        if image.shape[:2] != (self.size, self.size):
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        m = self.meta
        return normalize_chw(image, m["mean"], m["std"], m["scale"])

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        """A preprocessed NCHW batch -> [N, D] embeddings."""
        out = self.predictor(batch)[0]
        return np.asarray(out, dtype=np.float32).reshape(len(batch), -1)

    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed NCHW rows -> [N, D]; one network call per ``batch_size`` rows."""
        return np.concatenate([self.embed_batch(batch[first:first + self.batch_size])
                               for first in range(0, len(batch), self.batch_size)])

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Whole images (or crops) -> [N, D]; one network call per ``batch_size`` images."""
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([self.preprocess(img) for img in images[start:start + self.batch_size]])
            chunks.append(self.embed_batch(batch))
        return np.concatenate(chunks)

    def crop(self, image: np.ndarray, box_xyxy: Sequence[float]) -> np.ndarray:
        """The crop the extractor sees for an ``x1 y1 x2 y2`` box (grown by ``bbox_pad``)."""
        return crop_xyxy(image, box_xyxy, pad=self.bbox_pad)

    def embed_boxes(self, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        return self.embed([self.crop(image, box) for box in boxes])
