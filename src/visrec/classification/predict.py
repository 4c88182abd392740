"""Top-k prediction from a trained run (dygraph) or an exported model, and the export itself.

Both sources give the same object, ``ClassifierPredictor``: the eval preprocessing
(square resize -> normalise -> CHW, exactly as validation during training), softmax
probabilities, and class names from the class map. The export is the shared
``export_layer`` with ``kind: classifier``; its ``model.json`` carries the class map, so an
export directory is self-contained.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from visrec.classification.data import class_names_from, load_class_map
from visrec.classification.model import Classifier, ProbabilityNet, load_trained
from visrec.classification.scoring import ProbsFn, dygraph_probs_fn
from visrec.data.transforms import build_transforms
from visrec.imaging import load_image
from visrec.inference.export import export_layer, input_meta

logger = logging.getLogger(__name__)


def top_k_entries(probs: np.ndarray, class_names: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` best classes of one probability row, highest score first."""
    k = max(1, min(k, len(class_names)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class_id": int(i), "name": class_names[i], "score": round(float(probs[i]), 6)} for i in order]


class ClassifierPredictor:
    def __init__(self, probs_fn: ProbsFn, class_names: list[str], image: dict[str, Any], source: str):
        self.probs_fn = probs_fn
        self.class_names = class_names
        self.image = image  # size, mean, std, scale, crop_to_bbox, bbox_pad
        self.source = source
        self.transform = build_transforms(int(image["size"]), False, mean=image["mean"], std=image["std"],
                                          scale=image["scale"])

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best_model") -> ClassifierPredictor:
        model, model_cfg, names = load_trained(run_dir, checkpoint)
        return cls(dygraph_probs_fn(model), names, model_cfg["image"], f"{run_dir} ({checkpoint})")

    @classmethod
    def from_export(cls, export_dir: str | Path, backend: str = "paddle", num_threads: int = 2) -> ClassifierPredictor:
        from visrec.inference.predictors import Predictor

        predictor = Predictor(export_dir, backend=backend, num_threads=num_threads)
        meta = predictor.meta
        if meta.get("kind") != "classifier":
            raise ValueError(f"{export_dir} holds an exported {meta.get('kind')!r}, not a classifier "
                             "(export one with `visrec classify export`)")
        names = class_names_from(meta, Path(export_dir) / "model.json")
        size = meta["input_size"][0]
        image = {"size": size, "mean": meta["mean"], "std": meta["std"], "scale": meta["scale"],
                 "crop_to_bbox": meta.get("crop_to_bbox", False), "bbox_pad": meta.get("bbox_pad", 0.0)}
        return cls(lambda batch: predictor(batch)[0], names, image, f"{export_dir} ({backend})")

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB (the whole image: no boxes in the wild) -> CHW float32."""
        return self.transform(image, np.random.default_rng(0))

    def preprocess_fn(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """``preprocess`` with the dataset transform signature (the eval pipeline draws nothing)."""
        return self.preprocess(image)

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        probs = self.probs_fn(np.stack([self.preprocess(im) for im in images]))
        if probs.shape[1] != len(self.class_names):
            raise ValueError(f"{self.source}: the model gives {probs.shape[1]} scores but the class map has "
                             f"{len(self.class_names)} classes; they come from different runs")
        return probs

    def predict(self, images: list[np.ndarray], top_k: int = 5) -> list[list[dict[str, Any]]]:
        return [top_k_entries(row, self.class_names, top_k) for row in self.probabilities(images)]

    def predict_files(self, paths: Iterable[Path], top_k: int = 5, batch_size: int = 16) -> Iterator[dict[str, Any]]:
        """``{"image", "top_k"}`` per file, in order; an unreadable file gives ``{"image", "error"}``."""
        batch: list[tuple[Path, np.ndarray]] = []

        def flush() -> Iterator[dict[str, Any]]:
            results = self.predict([im for _, im in batch], top_k)
            for (path, _), entries in zip(batch, results):
                yield {"image": str(path), "top_k": entries}
            batch.clear()

        for path in paths:
            try:
                batch.append((path, load_image(path)))
            except OSError as exc:
                yield from flush() if batch else ()
                yield {"image": str(path), "error": str(exc)}
                continue
            if len(batch) == batch_size:
                yield from flush()
        if batch:
            yield from flush()


def export_classifier(model: Classifier, model_cfg: dict[str, Any], mapping: dict[str, Any], out_dir: str | Path,
                      onnx: bool = True) -> dict[str, Any]:
    """Export softmax probabilities ``[N, C]``; model.json holds the input convention and the class map."""
    names = class_names_from(mapping, "the class map")
    if len(names) != model.num_classes:
        raise ValueError(f"the class map has {len(names)} classes but the model {model.num_classes}")
    model.eval()
    model.rep()
    size = int(model_cfg["image"]["size"])
    meta = {
        "kind": "classifier",
        **input_meta(model_cfg["image"]),
        "output": "softmax probabilities [N, num_classes]",
        "num_classes": len(names),
        "backbone": model_cfg["backbone"],
        "classes": mapping["classes"],
    }
    return export_layer(ProbabilityNet(model), out_dir, [None, 3, size, size], meta, onnx=onnx)


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best_model",
               onnx: bool = True) -> dict[str, Any]:
    """Export a finished run's checkpoint (``best_model`` or ``latest``) to ``out_dir``."""
    model, model_cfg, _ = load_trained(run_dir, checkpoint)
    return export_classifier(model, model_cfg, load_class_map(run_dir), out_dir, onnx=onnx)
