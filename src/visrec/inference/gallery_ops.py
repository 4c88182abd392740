"""Filling a gallery from images: list files in, embeddings through the exported extractor.

Shared by the ``build_index`` stage, the ``visrec gallery`` commands, the service and the
gallery-update DAG, so every path embeds gallery images the same way: the whole image, or
the crop around a known box (``x1 y1 x2 y2``), grown by the extractor's ``bbox_pad``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from visrec.data.datasets import load_image
from visrec.index.gallery import Gallery
from visrec.index.listfile import read_list_file
from visrec.inference.extractor import Extractor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GalleryItem:
    """One image to put in a gallery: where it is, its label, and optionally its object box."""

    path: Path
    label: str
    box: tuple[float, float, float, float] | None = None  # x1 y1 x2 y2; None: the whole image
    metadata: dict[str, Any] | None = None


def items_from_list(list_file: str | Path, root: str | Path | None = None,
                    delimiter: str = "\t") -> list[GalleryItem]:
    """A gallery list file (``relative/path<delimiter>label``) as whole-image items."""
    return [GalleryItem(e.path, e.label) for e in read_list_file(list_file, root, delimiter=delimiter)]


def embed_items(extractor: Extractor, items: Sequence[GalleryItem], batch_size: int = 64,
                progress: bool = True, desc: str = "embedding gallery") -> np.ndarray:
    """``[N, D]`` embeddings of the items, in batches (images are decoded batch by batch)."""
    if not items:
        raise ValueError("no gallery images given: the list is empty")
    missing = [str(item.path) for item in items if not Path(item.path).is_file()]
    if missing:  # checked up front: a half-embedded list must not reach the gallery
        raise FileNotFoundError(f"{len(missing)} gallery image(s) not found, e.g. {', '.join(missing[:3])}: "
                                "fix the paths (relative to the list file's folder, or --root)")
    chunks = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, leave=False):
        crops = []
        for item in items[start:start + batch_size]:
            image = load_image(item.path)
            crops.append(extractor.crop(image, item.box) if item.box is not None else image)
        chunks.append(extractor.embed(crops))
    vectors = np.concatenate(chunks)
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.nonzero(~np.isfinite(norms) | (norms < 1e-6))[0]
    if bad.size:  # refuse here, naming the images: the gallery would refuse them less helpfully
        raise ValueError(f"the extractor gives no usable embedding (all zero or not finite) for {bad.size} of "
                         f"{len(items)} image(s), e.g. {items[int(bad[0])].path}: the model is degenerate "
                         "(too little training for its BatchNorm statistics?); retrain or re-export it")
    return vectors


def item_metadata(item: GalleryItem) -> dict[str, Any]:
    meta = {"path": str(item.path)}
    if item.box is not None:
        meta["box"] = [round(float(v), 2) for v in item.box]
    return {**meta, **(item.metadata or {})}


def build_gallery(extractor: Extractor, items: Sequence[GalleryItem], index_type: str = "HNSW32",
                  num_threads: int = 2, batch_size: int = 64, progress: bool = True,
                  meta_extra: dict[str, Any] | None = None, **index_params: Any) -> Gallery:
    """A new gallery of ``items``, stamped with the extractor's fingerprint."""
    vectors = embed_items(extractor, items, batch_size, progress)
    gallery = Gallery.build(vectors, [i.label for i in items], [item_metadata(i) for i in items],
                            index_type=index_type, fingerprint=extractor.fingerprint, num_threads=num_threads,
                            meta_extra=meta_extra, **index_params)
    logger.info("built a %s gallery of %d images, %d labels", index_type, len(gallery), len(gallery.labels()))
    return gallery


def add_items(gallery: Gallery, extractor: Extractor, items: Sequence[GalleryItem], batch_size: int = 64,
              progress: bool = True) -> list[int]:
    """Embed ``items`` and add them; nothing is added unless every image embeds."""
    if gallery.fingerprint and gallery.fingerprint != extractor.fingerprint:
        from visrec.index.gallery import GalleryMismatchError

        raise GalleryMismatchError(
            f"the gallery was built by extractor {gallery.fingerprint} but the loaded extractor is "
            f"{extractor.fingerprint}: rebuild the gallery (`visrec gallery build LIST`)")
    vectors = embed_items(extractor, items, batch_size, progress, desc="embedding new images")
    return gallery.add(vectors, [i.label for i in items], [item_metadata(i) for i in items])
