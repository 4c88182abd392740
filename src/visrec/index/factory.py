"""Open, create and version galleries without knowing their backend.

A gallery is named by a directory everywhere (params ``recognition.gallery``, champions, the
CLI). The directory says which backend holds it: a Faiss gallery's versions, or a Milvus
gallery's pointer (``milvus.json``). So *opening* needs no settings; *creating* follows params
``index.backend``::

    gallery = open_gallery("data/gallery", expected_fingerprint=extractor.fingerprint)
    gallery = gallery_from_vectors(cfg.index, vectors, labels, metadata, fingerprint=extractor.fingerprint)
    gallery.save("data/gallery")            # Faiss: a new version dir; Milvus: an alias switch
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visrec.index import milvus_store
from visrec.index.faiss_index import index_params
from visrec.index.gallery import Gallery
from visrec.index.gallery_api import GalleryBase
from visrec.index.gallery_store import update_lock

__all__ = ["create_gallery", "gallery_from_vectors", "gallery_version", "is_milvus", "open_gallery", "update_lock"]


def is_milvus(path: str | Path) -> bool:
    """Whether the gallery at ``path`` lives in Milvus (its directory holds a pointer)."""
    return milvus_store.has_pointer(path)


def _gallery_class(path: str | Path):
    if is_milvus(path):
        from visrec.index.milvus_gallery import MilvusGallery

        return MilvusGallery
    return Gallery


def open_gallery(path: str | Path, *, expected_fingerprint: str | None = None, expected_dim: int | None = None,
                 num_threads: int = 2) -> GalleryBase:
    """The live gallery at ``path``, whichever backend holds it (refused if it was built by
    another extractor: :class:`~visrec.index.gallery_api.GalleryMismatchError`)."""
    return _gallery_class(path).load(path, expected_fingerprint=expected_fingerprint, expected_dim=expected_dim,
                                     num_threads=num_threads)


def gallery_version(path: str | Path) -> str | None:
    """A cheap token that changes whenever the gallery at ``path`` is saved (servers poll it)."""
    return _gallery_class(path).current_version(path)


def create_gallery(index_cfg, dim: int, *, fingerprint: str | None = None, num_threads: int = 2,
                   meta_extra: dict[str, Any] | None = None) -> GalleryBase:
    """An empty gallery on the backend params ``index`` choose, with its index type and knobs."""
    params = index_params(index_cfg)
    if index_cfg.backend == "milvus":
        from visrec.index.milvus_gallery import MilvusGallery

        return MilvusGallery.create(dim, index_cfg.index_type, settings=milvus_store.MilvusSettings.from_config(
            index_cfg.milvus), fingerprint=fingerprint, num_threads=num_threads, meta_extra=meta_extra, **params)
    return Gallery.create(dim, index_cfg.index_type, fingerprint=fingerprint, num_threads=num_threads,
                          meta_extra=meta_extra, **params)


def gallery_from_vectors(index_cfg, vectors: Any, labels: Sequence[str] | str,
                  metadata: Sequence[Mapping[str, Any] | None] | None = None, *, fingerprint: str | None = None,
                  num_threads: int = 2, meta_extra: dict[str, Any] | None = None) -> GalleryBase:
    """:func:`create_gallery` sized to ``vectors``, then one add (an IVF Faiss index trains on it)."""
    import numpy as np

    dim = int(np.shape(vectors)[-1]) if np.ndim(vectors) >= 1 else 0
    gallery = create_gallery(index_cfg, dim, fingerprint=fingerprint, num_threads=num_threads, meta_extra=meta_extra)
    gallery.add(vectors, labels, metadata)
    return gallery
