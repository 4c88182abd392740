"""The retrieval gallery: a Faiss index plus labels, per-entry metadata and provenance.

A :class:`Gallery` receives embedding vectors (it never imports Paddle), L2-normalises
them, and answers top-k cosine-similarity queries with labelled :class:`Hit`s; entries are
added and removed by id or label. :meth:`Gallery.load` / :meth:`Gallery.save` read and
publish versions of the on-disk store (:mod:`visrec.index.gallery_store`: immutable versions,
an atomically swapped ``current`` link, JSON labels, never pickle).

A Gallery object is not thread-safe; a server should load a new one and swap references.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from visrec.index import gallery_store as store
from visrec.index.faiss_index import IndexBackend, backend_class, set_num_threads
from visrec.index.gallery_api import (GalleryBase, GalleryMismatchError, Hit, UnknownIdError, check_top_k,
                                     requested_ids, unknown_ids_error)
from visrec.index.gallery_store import GalleryNotFoundError, now, update_lock

__all__ = ["Gallery", "GalleryMismatchError", "GalleryNotFoundError", "Hit", "UnknownIdError", "update_lock"]

logger = logging.getLogger(__name__)

SMALL_QUERY_BATCH = 16


class Gallery(GalleryBase):
    """A Faiss index of normalised vectors with labels, metadata and an extractor fingerprint.

    Create with :meth:`create` (empty) or :meth:`build` (create + first add; IVF trains on
    that batch), reopen with :meth:`load`. Ids are assigned from ``next_id`` and never
    reused, not even after removal or HNSW compaction.
    """

    def __init__(self, backend: IndexBackend, *, fingerprint: str | None, num_threads: int = 2,
                 entries: dict[int, tuple[str, dict[str, Any]]] | None = None, next_id: int = 0,
                 meta_extra: dict[str, Any] | None = None, created: str | None = None,
                 updated: str | None = None, version: str | None = None, path: Path | None = None) -> None:
        """Low-level constructor; use :meth:`create`, :meth:`build` or :meth:`load`."""
        self._backend = backend
        self.fingerprint = fingerprint
        self.num_threads = num_threads
        self._entries = entries if entries is not None else {}
        self._label_counts: Counter[str] | None = None  # cached; add / remove reset it
        self.next_id = next_id
        self.meta_extra: dict[str, Any] = dict(meta_extra or {})  # saved as meta.json "extra"
        self.created = created or now()
        self.updated = updated
        self.version = version  # uuid of the saved version this object was loaded from / saved as
        self.path = path  # gallery root it was loaded from / last saved to
        set_num_threads(num_threads)

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(cls, dim: int, index_type: str = "HNSW32", *, fingerprint: str | None = None,
               num_threads: int = 2, meta_extra: dict[str, Any] | None = None,
               **index_params: Any) -> Gallery:
        """An empty gallery. ``index_params``: HNSW32 ``hnsw_m, ef_construction, ef_search,
        compact_fraction``; IVF ``nlist`` (default: from the first add's size), ``nprobe``."""
        if not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        backend = backend_class(index_type)(int(dim), dict(index_params))
        return cls(backend, fingerprint=fingerprint, num_threads=num_threads, meta_extra=meta_extra)

    # ----------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return self._backend.dim

    @property
    def index_type(self) -> str:
        return self._backend.kind

    @property
    def index_params(self) -> dict[str, Any]:
        return dict(self._backend.params)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, gallery_id: object) -> bool:
        return gallery_id in self._entries

    def label_of(self, gallery_id: int) -> str:
        return self._entries[int(gallery_id)][0]

    def metadata_of(self, gallery_id: int) -> Mapping[str, Any]:
        return MappingProxyType(self._entries[int(gallery_id)][1])

    def ids(self) -> list[int]:
        return sorted(self._entries)

    def entries(self) -> Iterator[tuple[int, str, dict[str, Any]]]:
        for i in sorted(self._entries):
            label, meta = self._entries[i]
            yield i, label, dict(meta)

    def vector_chunks(self, chunk: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored (normalised) vector as ``(ids, vectors)`` chunks, in no particular order."""
        yield from self._backend.vector_chunks(chunk)

    def label_vectors(self, labels: Sequence[str]) -> Iterator[tuple[list[str], np.ndarray]]:
        # All labels in one pass: the index is in memory, and IVF cannot fetch vectors by id.
        for ids, vectors in self._backend.vector_chunks():
            yield [self._entries[int(i)][0] for i in ids], vectors

    def labels(self) -> set[str]:
        return {label for label, _ in self._entries.values()}

    def label_counts(self) -> Mapping[str, int]:
        """How many entries each label has (what label-level scoring needs)."""
        if self._label_counts is None:
            self._label_counts = Counter(label for label, _ in self._entries.values())
        return MappingProxyType(self._label_counts)

    def info(self) -> dict[str, Any]:
        """A JSON-friendly summary (for logs, ``visrec gallery info`` and health endpoints)."""
        stats = self._backend.stats()
        return {"backend": "faiss", "index_type": self.index_type, "metric": "IP", "dim": self.dim,
                "count": len(self), "next_id": self.next_id, "labels": len(self.labels()),
                "tombstones": stats.pop("tombstones", 0), "fingerprint": self.fingerprint,
                "index_params": self.index_params, "version": self.version, "created": self.created,
                "updated": self.updated, "path": str(self.path) if self.path else None,
                "num_threads": self.num_threads, "extra": dict(self.meta_extra), **stats}

    def __repr__(self) -> str:
        return f"Gallery({self.index_type}, dim={self.dim}, count={len(self)}, next_id={self.next_id})"

    # ----------------------------------------------------------------- mutation
    def add(self, vectors: Any, labels: Sequence[str] | str,
            metadata: Sequence[Mapping[str, Any] | None] | None = None) -> list[int]:
        """Add vectors (shape ``(n, dim)``) with one label each (or one str for all) and
        optional per-entry metadata dicts (e.g. ``{"path": "img/1.jpg"}``). Returns new ids.

        All inputs are validated before anything changes, so a rejected call leaves the
        gallery exactly as it was. The first add to an IVF gallery trains it.
        """
        x = self._vectors(vectors, "vectors")
        labels = self._labels(labels, len(x))
        metas = self._metadata(metadata, len(x))
        ids = np.arange(self.next_id, self.next_id + len(x), dtype=np.int64)
        set_num_threads(self.num_threads)
        self._backend.add(x, ids)  # may raise (e.g. IVF too small) before touching our state
        self._entries.update(zip(ids.tolist(), zip(labels, metas, strict=True), strict=True))
        self._label_counts = None
        self._forget_centroids()
        self.next_id += len(x)
        return ids.tolist()

    def remove(self, ids: Sequence[int] | int, *, missing_ok: bool = False) -> int:
        """Remove entries by id; returns how many were removed.

        Unknown ids raise :class:`UnknownIdError` and nothing is removed, unless
        ``missing_ok=True``, in which case they are skipped.
        """
        wanted = requested_ids(ids)
        unknown = sorted(wanted - self._entries.keys())
        if unknown and not missing_ok:
            raise unknown_ids_error(unknown)
        present = np.array(sorted(wanted - set(unknown)), dtype=np.int64)
        if present.size:
            set_num_threads(self.num_threads)
            self._backend.remove(present)
            for i in present.tolist():
                del self._entries[i]
            self._label_counts = None
            self._forget_centroids()
        return int(present.size)

    def remove_label(self, label: str) -> int:
        """Remove every entry with this label; returns the count (0 if the label is absent)."""
        return self.remove([i for i, (lab, _) in self._entries.items() if lab == label])

    def tune(self, **params: Any) -> None:
        """Change search-time index parameters in place (HNSW ``ef_search``, IVF ``nprobe``,
        HNSW ``compact_fraction``); they are saved with the next :meth:`save`."""
        self._backend.tune(**params)

    def compact(self) -> None:
        """Drop HNSW tombstones now (it also happens automatically); no-op for FLAT/IVF."""
        if hasattr(self._backend, "compact"):
            set_num_threads(self.num_threads)
            self._backend.compact()

    # ----------------------------------------------------------------- search
    def search_arrays(self, queries: Any, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Raw results: ``(scores, ids)`` of shape ``(nq, top_k)``; padding is id -1, score -inf."""
        top_k = check_top_k(top_k)
        q = self._vectors(queries, "queries")
        scores = np.full((len(q), top_k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), top_k), -1, dtype=np.int64)
        k = min(int(top_k), len(self))
        if k:
            # A few queries (one photo's boxes) search on one thread: beside the extractor's own
            # threads, waking Faiss's OpenMP team cost more than it saved (0.44 vs 1.26 ms per
            # photo, and the detector slowed too); batches of queries use every thread.
            set_num_threads(self.num_threads if len(q) >= SMALL_QUERY_BATCH else 1)
            s, i = self._backend.search(q, k)
            valid = i >= 0  # selectors / IVF probing can come back short
            scores[:, :k] = np.where(valid, s, -np.inf)
            ids[:, :k] = np.where(valid, i, -1)
        return scores, ids

    def search(self, queries: Any, top_k: int = 5) -> list[list[Hit]]:
        """Top-k hits per query (one list per query row, best first, possibly shorter than k)."""
        scores, ids = self.search_arrays(queries, top_k)
        results = []
        for row_s, row_i in zip(scores.tolist(), ids.tolist(), strict=True):
            hits = []
            for s, i in zip(row_s, row_i, strict=True):
                if i < 0 or i not in self._entries:
                    continue
                label, meta = self._entries[i]
                hits.append(Hit(i, label, float(s), MappingProxyType(meta)))
            results.append(hits)
        return results

    # ----------------------------------------------------------------- storage (visrec.index.gallery_store)
    current_version = staticmethod(store.current_version)

    @classmethod
    def load(cls, path: str | Path, *, expected_fingerprint: str | None = None,
             expected_dim: int | None = None, num_threads: int = 2) -> Gallery:
        """Load the live version of the gallery at ``path``.

        ``expected_fingerprint`` (the current extractor's) guards against searching
        features of one model in a gallery embedded by another: a mismatch raises
        :class:`GalleryMismatchError`. A version pruned by a concurrent writer while we
        read it is retried from the new ``current``.
        """
        root = Path(path)
        for attempt in range(5):
            version_dir = store.live_version_dir(root)
            try:
                meta, backend, entries = store.read_version(version_dir, num_threads)
                break
            except Exception:  # a pruned version surfaces as ENOENT or as a faiss RuntimeError
                if attempt == 4 or store.current_version(root) in (None, version_dir.name):
                    raise
                logger.debug("version %s vanished while loading; retrying", version_dir.name)
        gallery = cls(backend, fingerprint=meta.get("fingerprint"), num_threads=num_threads, entries=entries,
                      next_id=int(meta["next_id"]), meta_extra=meta.get("extra"), created=meta.get("created"),
                      updated=meta.get("updated"), version=meta.get("version"),
                      path=root if version_dir != root else None)
        gallery.check_expected(root, expected_fingerprint, expected_dim)
        logger.info("loaded gallery %s (%s)", root, gallery)
        return gallery

    def save(self, path: str | Path | None = None, *, keep_versions: int = 2) -> str:
        """Atomically publish this gallery as a new version under ``path`` (default: where it was
        loaded from); returns the version's name. See :func:`visrec.index.gallery_store.publish_version`."""
        if path is None and self.path is None:
            raise ValueError("save() needs a path: this gallery was never saved or loaded from a gallery root")
        root = Path(path) if path is not None else self.path
        meta = {"index_type": self.index_type, "metric": "IP", "dim": self.dim, "count": len(self),
                "next_id": self.next_id, "labels": len(self.labels()), "fingerprint": self.fingerprint,
                "index_params": self.index_params, "created": self.created, "extra": self.meta_extra}
        name, written = store.publish_version(root, self._backend, self._entries, meta, keep_versions)
        self.path, self.version, self.updated = root, written["version"], written["updated"]
        logger.info("saved gallery %s as %s (%d entries)", root, name, len(self))
        return name
