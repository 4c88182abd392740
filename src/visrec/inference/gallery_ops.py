"""Filling a gallery from images: list files in, embeddings through the exported extractor.

Shared by the ``build_index`` stage, the ``visrec gallery`` commands, the service and the
gallery-update DAG, so every path embeds gallery images the same way: the whole image, or
the crop around a known box (``x1 y1 x2 y2``), grown by the extractor's ``bbox_pad``.

``expand_views`` turns each gallery image into the views ``recognition.gallery_views`` names,
one gallery entry (same label, same path) each: ``whole`` (the photo) and ``object`` (its
known box, else the detector's best box). Queries are recognised from detector crops and the
whole photo, so a gallery holding both views meets them on their own terms (real CUB photos,
5 per species: top-1 0.606 with whole photos only vs 0.674 with both views and label scores).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from visrec.imaging import load_image
from visrec.index.gallery import Gallery
from visrec.index.gallery_api import GalleryBase
from visrec.index.listfile import read_list_file
from visrec.inference.detector_runtime import Detector
from visrec.inference.extractor_runtime import Extractor

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


VIEWS = ("whole", "object")


def check_views(views: Sequence[str]) -> None:
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ValueError(f"recognition.gallery_views must be a non-empty list of {', '.join(VIEWS)}; got {list(views)}")


Box = tuple[float, float, float, float]


def view_boxes(views: Sequence[str], known_box: Box | None, detected_box: Box | None
               ) -> list[tuple[str, Box | None]]:
    """The ``(view, box)`` pairs to embed for one gallery image (box None: the whole image).

    ``object`` is the known box, else the detected one; an image with neither keeps only its
    other views, and at least ``whole``.
    """
    box = known_box if known_box is not None else detected_box
    pairs: list[tuple[str, Box | None]] = []
    if "whole" in views or box is None or "object" not in views:
        pairs.append(("whole", None))
    if "object" in views and box is not None:
        pairs.append(("object", tuple(float(v) for v in box)))
    return pairs


def best_boxes(detector: Detector, images: Sequence[np.ndarray]) -> list[Box | None]:
    """The detector's best box per image (None where it finds nothing)."""
    return [tuple(float(v) for v in dets[0, :4]) if len(dets) else None
            for dets in detector.detect_arrays(list(images))]


def expand_views(items: Sequence[GalleryItem], views: Sequence[str], detector: Detector | None = None,
                 batch_size: int = 32) -> list[GalleryItem]:
    """Each item as one item per view (``VIEWS``), its ``metadata`` saying which (see ``view_boxes``)."""
    check_views(views)
    detected: dict[int, Box | None] = {}
    need = [i for i, item in enumerate(items) if item.box is None] if "object" in views and detector else []
    for start in range(0, len(need), batch_size):
        chunk = need[start:start + batch_size]
        detected.update(zip(chunk, best_boxes(detector, [load_image(items[i].path) for i in chunk]), strict=True))
    return [GalleryItem(item.path, item.label, box, {**(item.metadata or {}), "view": view})
            for i, item in enumerate(items) for view, box in view_boxes(views, item.box, detected.get(i))]


def check_files(items: Sequence[GalleryItem]) -> None:
    """Refuse an empty list or missing images up front: a half-embedded list must not reach the gallery."""
    if not items:
        raise ValueError("no gallery images given: the list is empty")
    missing = [str(item.path) for item in items if not Path(item.path).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} gallery image(s) not found, e.g. {', '.join(missing[:3])}: "
                                "fix the paths (relative to the list file's folder, or --root)")


def preprocess_items(extractor: Extractor, items: Sequence[GalleryItem]) -> np.ndarray:
    """The extractor's NCHW input for ``items``: each file decoded once, however many views use it."""
    decoded: dict[Path, np.ndarray] = {}
    rows = []
    for item in items:
        image = decoded.get(item.path)
        if image is None:
            image = decoded[item.path] = load_image(item.path)
        rows.append(extractor.preprocess(extractor.crop(image, item.box) if item.box is not None else image))
    return np.stack(rows)


def embed_items(extractor: Extractor, items: Sequence[GalleryItem], batch_size: int = 64,
                progress: bool = True, desc: str = "embedding gallery") -> np.ndarray:
    """``[N, D]`` embeddings of the items, in batches.

    While the model embeds one batch, a second thread decodes and preprocesses the next
    (OpenCV releases the GIL), so decoding overlaps the model instead of following it.
    """
    check_files(items)
    starts = range(0, len(items), batch_size)
    chunks = []
    with ThreadPoolExecutor(1, thread_name_prefix="gallery-decode") as prefetch:
        pending = prefetch.submit(preprocess_items, extractor, items[0:batch_size])
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            batch = pending.result()
            following = start + batch_size
            pending = (prefetch.submit(preprocess_items, extractor, items[following:following + batch_size])
                       if following < len(items) else None)
            chunks.append(extractor.embed_preprocessed(batch))
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


#: Items embedded before they are added: bounds memory on a big catalogue (4096 x 1280-d float32
#: = 21 MB) while keeping inserts large. A Faiss IVF gallery trains on the first chunk.
STREAM_CHUNK = 4096


def labelled_view_key(label: str, metadata: dict[str, Any]) -> str:
    """What identifies a gallery entry across builds: its label, image, view and box."""
    return json.dumps([label, metadata.get("path"), metadata.get("view"), metadata.get("box")], ensure_ascii=False)


def fill_gallery(gallery: GalleryBase, extractor: Extractor, items: Sequence[GalleryItem], batch_size: int = 64,
                 progress: bool = True, views: Sequence[str] | None = None, detector: Detector | None = None,
                 chunk: int | None = STREAM_CHUNK) -> int:
    """Embed ``items`` (each as its ``views``, if given) and add them to ``gallery`` a chunk at a
    time (bounded memory, one progress bar; ``chunk=None``: one add of everything); returns how
    many entries were added.

    Resumable: entries the gallery already holds (same label, image, view and box; e.g. a
    Milvus build interrupted and reopened) are skipped, so a rerun adds only what is missing.
    """
    if views:
        items = expand_views(items, views, detector)
    check_files(items)
    done = {labelled_view_key(label, meta) for _, label, meta in gallery.entries()} if len(gallery) else set()
    todo = [item for item in items if labelled_view_key(item.label, item_metadata(item)) not in done]
    if done:
        logger.info("resuming a gallery build: %d of %d entries already present", len(items) - len(todo), len(items))
    with tqdm(total=len(todo), desc="embedding gallery", unit="img", disable=not progress, leave=False) as bar:
        step = chunk or max(len(todo), 1)
        for start in range(0, len(todo), step):
            part = todo[start:start + step]
            vectors = embed_items(extractor, part, batch_size, progress=False)
            gallery.add(vectors, [i.label for i in part], [item_metadata(i) for i in part])
            bar.update(len(part))
    logger.info("gallery of %d entries, %d labels (%d added)", len(gallery), len(gallery.labels()), len(todo))
    return len(todo)


def build_gallery(extractor: Extractor, items: Sequence[GalleryItem], index_type: str = "HNSW32",
                  num_threads: int = 2, batch_size: int = 64, progress: bool = True,
                  meta_extra: dict[str, Any] | None = None, views: Sequence[str] | None = None,
                  detector: Detector | None = None, **index_params: Any) -> Gallery:
    """A new in-memory Faiss gallery of ``items``, stamped with the extractor's fingerprint
    (params-driven builds on either backend: ``visrec.workflows.gallery.build_from_list``)."""
    gallery = Gallery.create(extractor.dim, index_type, fingerprint=extractor.fingerprint, num_threads=num_threads,
                             meta_extra=meta_extra, **index_params)
    fill_gallery(gallery, extractor, items, batch_size, progress, views, detector,
                 chunk=None)  # one add: IVF trains on all of it
    return gallery


def add_items(gallery: GalleryBase, extractor: Extractor, items: Sequence[GalleryItem], batch_size: int = 64,
              progress: bool = True, views: Sequence[str] | None = None,
              detector: Detector | None = None) -> list[int]:
    """Embed ``items`` (each as its ``views``, if given) and add them; nothing is added unless every image embeds."""
    if views:
        items = expand_views(items, views, detector)
    gallery.check_expected(gallery.path, extractor.fingerprint, None)  # dim: gallery.add checks the vectors
    vectors = embed_items(extractor, items, batch_size, progress, desc="embedding new images")
    return gallery.add(vectors, [i.label for i in items], [item_metadata(i) for i in items])
