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
from visrec.index.gallery_api import GalleryBase, vectors_dim
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
                   meta_extra: dict[str, Any] | None = None, resume_key: str | None = None) -> GalleryBase:
    """An empty gallery on the backend params ``index`` choose, with its index type and knobs.

    ``resume_key``: Milvus reopens the unpublished build of that key if one was interrupted
    (:meth:`MilvusGallery.create`); a Faiss build lives in memory and always starts empty."""
    params = index_params(index_cfg)
    if index_cfg.backend == "milvus":
        from visrec.index.milvus_gallery import MilvusGallery

        return MilvusGallery.create(dim, index_cfg.index_type, settings=milvus_store.MilvusSettings.from_config(
            index_cfg.milvus), fingerprint=fingerprint, num_threads=num_threads, meta_extra=meta_extra,
            resume_key=resume_key, **params)
    return Gallery.create(dim, index_cfg.index_type, fingerprint=fingerprint, num_threads=num_threads,
                          meta_extra=meta_extra, **params)


def gallery_from_vectors(index_cfg, vectors: Any, labels: Sequence[str] | str,
                  metadata: Sequence[Mapping[str, Any] | None] | None = None, *, fingerprint: str | None = None,
                  num_threads: int = 2, meta_extra: dict[str, Any] | None = None) -> GalleryBase:
    """:func:`create_gallery` sized to ``vectors``, then one add (an IVF Faiss index trains on it)."""
    gallery = create_gallery(index_cfg, vectors_dim(vectors), fingerprint=fingerprint, num_threads=num_threads, meta_extra=meta_extra)
    gallery.add(vectors, labels, metadata)
    return gallery


def adopt_served_name(gallery: GalleryBase, path: str | Path, served_path: str | Path) -> None:
    """Make ``gallery``, when next saved to ``path``, replace the gallery at ``served_path`` under
    the same served name (a new champion's gallery taking the old one's). A Milvus gallery is
    served by its alias, moved in one call by that save; a Faiss gallery is named by its
    directory alone, so there is nothing to do."""
    from visrec.index.milvus_gallery import MilvusGallery

    if not isinstance(gallery, MilvusGallery):
        return
    alias = (milvus_store.read_pointer(served_path)[1] if milvus_store.has_pointer(served_path)
             else milvus_store.alias_for(served_path, gallery.settings.alias_prefix))
    milvus_store.write_pointer(path, alias, gallery.settings)


def copy_to_milvus(path: str | Path, settings: milvus_store.MilvusSettings,
                   num_threads: int = 2) -> tuple[GalleryBase, GalleryBase]:
    """Move the gallery at ``path`` from Faiss to Milvus: copy it (ids, labels, metadata, vectors,
    fingerprint, next id) into a new collection, publish that under the directory's served name,
    then write the directory's pointer, so whoever opens ``path`` from then on searches Milvus.

    The Faiss versions stay in the directory untouched: deleting ``milvus.json`` serves them
    again (without the changes made on Milvus since). Writers are held off by the update lock.
    Returns the source (as it was copied) and the published Milvus gallery.
    """
    from visrec.index.milvus_gallery import MilvusGallery

    path = Path(path)
    if is_milvus(path):
        raise ValueError(f"{path} already serves a Milvus gallery ({milvus_store.POINTER_FILE}); nothing to migrate")
    with update_lock(path):
        source = open_gallery(path, num_threads=num_threads)
        target = MilvusGallery.copy_of(source, settings)
        if len(target) != len(source):
            target.release()
            raise RuntimeError(f"copied {len(target)} of {len(source)} entries into Milvus; nothing was switched")
        target.publish(path, milvus_store.alias_for(path, settings.alias_prefix))
    return source, target
