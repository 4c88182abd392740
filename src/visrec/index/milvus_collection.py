"""The search and edit half of the Milvus gallery: one collection's entries read, searched,
added and removed, with the journal that lets a failed update be undone.

:class:`~visrec.index.milvus_gallery.MilvusGallery` builds on it with where collections come
from and where they go: creating, resuming and loading them, and publishing them as versions
behind an alias. Its module doc says what differs from the Faiss gallery, and why.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from visrec.index import milvus_store as store
from visrec.index.faiss_index import EXACT_BELOW, backend_class
from visrec.index.gallery_api import GalleryBase, Hit, check_top_k, requested_ids, unknown_ids_error
from visrec.index.gallery_store import now

FORMAT_VERSION = 1
MAX_LABEL_BYTES = 4096
_PAGE = 1000  # rows per query page / ids per filter
_LABELS_PER_QUERY = 64  # labels per centroid query's filter
_QUERY_LIMIT = 16_384  # Milvus's largest query result (offset + limit)


def _id_filter(ids: Sequence[int]) -> str:
    return f"id in [{', '.join(str(int(i)) for i in ids)}]"


def _label_filter(label: str) -> str:
    # A JSON string literal is a valid Milvus string literal (quotes, backslashes, any Unicode);
    # Milvus Lite 3.2 has no filter templates (``filter_params``) to bind it instead.
    return f"label == {json.dumps(label, ensure_ascii=False)}"


def _labels_filter(labels: Sequence[str]) -> str:
    return f"label in [{', '.join(json.dumps(label, ensure_ascii=False) for label in labels)}]"


class MilvusCollectionGallery(GalleryBase):
    """A gallery's entries in one Milvus collection: the contract's reads, searches and changes
    (changes write through, journalled until the next save)."""

    def __init__(self, client, settings: store.MilvusSettings, collection: str, meta: dict[str, Any], *,
                 alias: str | None = None, path: Path | None = None, num_threads: int = 2) -> None:
        """Low-level constructor; use :meth:`MilvusGallery.create`, ``build`` or ``load``."""
        self._client, self.settings, self.collection, self.alias, self.path = client, settings, collection, alias, path
        self._dim, self._index_type = int(meta["dim"]), str(meta["index_type"])
        self._params = dict(meta["index_params"])
        self.fingerprint = meta.get("fingerprint")
        self.next_id = int(meta["next_id"])
        self.meta_extra: dict[str, Any] = dict(meta.get("extra") or {})
        self.created, self.updated = meta.get("created") or now(), meta.get("updated")
        self.revision = int(meta.get("revision", 0))
        self.num_threads = num_threads  # searches run in Milvus; kept for the common interface
        self._count: int | None = None
        self._label_counts: Counter[str] | None = None
        self._added: list[int] = []  # the journal since the last load / save
        self._removed: list[dict[str, Any]] = []
        self._replaced: str | None = None  # what the alias served before this object's last publication


    # ----------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def index_type(self) -> str:
        return self._index_type

    @property
    def index_params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def version(self) -> str | None:
        return f"{self.collection}@r{self.revision}" if self.alias else None

    def __len__(self) -> int:
        if self._count is None:
            rows = self._client.query(self.collection, filter="", output_fields=["count(*)"],
                                      consistency_level="Strong")
            self._count = int(rows[0]["count(*)"])
        return self._count

    def _rows(self, ids: Sequence[int], fields: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        ids = sorted(ids)
        for start in range(0, len(ids), _PAGE):
            rows += self._client.query(self.collection, filter=_id_filter(ids[start:start + _PAGE]),
                                       output_fields=fields, consistency_level="Strong")
        return rows

    def __contains__(self, gallery_id: object) -> bool:
        return isinstance(gallery_id, int | np.integer) and bool(self._rows([int(gallery_id)], ["id"]))

    def _row(self, gallery_id: int) -> dict[str, Any]:
        rows = self._rows([int(gallery_id)], ["id", "label", "meta"])
        if not rows:
            raise KeyError(int(gallery_id))
        return rows[0]

    def label_of(self, gallery_id: int) -> str:
        return self._row(gallery_id)["label"]

    def metadata_of(self, gallery_id: int) -> Mapping[str, Any]:
        return MappingProxyType(dict(self._row(gallery_id)["meta"] or {}))

    def entries(self, with_vectors: bool = False) -> Iterator[tuple]:
        """``(id, label, metadata)`` of every entry in id order, a page at a time; with
        ``with_vectors``, ``(id, label, metadata, vector)``."""
        fields = ["id", "label", "meta", *(["vector"] if with_vectors else [])]
        for page in self._pages("id >= 0", fields):
            for row in sorted(page, key=lambda r: r["id"]):
                entry = (int(row["id"]), row["label"], dict(row["meta"] or {}))
                yield (*entry, np.asarray(row["vector"], dtype=np.float32)) if with_vectors else entry

    def label_vectors(self, labels: Sequence[str]) -> Iterator[tuple[list[str], np.ndarray]]:
        # Only the labels asked: a big collection is never read whole for its centroids.
        for start in range(0, len(labels), _LABELS_PER_QUERY):
            wanted = _labels_filter(labels[start:start + _LABELS_PER_QUERY])
            # One query (Milvus caps its result at _QUERY_LIMIT rows); an iterator past that.
            rows = self._client.query(self.collection, filter=wanted, output_fields=["label", "vector"],
                                      limit=_QUERY_LIMIT, consistency_level=self.settings.consistency_level)
            pages = [rows] if len(rows) < _QUERY_LIMIT else self._pages(wanted, ["label", "vector"])
            for page in pages:
                if page:
                    yield [row["label"] for row in page], np.asarray([row["vector"] for row in page], np.float32)

    def _pages(self, filter_expr: str, fields: list[str]) -> Iterator[list[dict[str, Any]]]:
        """The rows ``filter_expr`` selects, a page at a time (a query iterator, closed at the end)."""
        iterator = self._client.query_iterator(self.collection, batch_size=_PAGE, filter=filter_expr,
                                               output_fields=fields, consistency_level="Strong")
        try:
            while page := iterator.next():
                yield page
        finally:
            iterator.close()

    def ids(self) -> list[int]:
        return [i for i, _, _ in self.entries()]

    def label_counts(self) -> Mapping[str, int]:
        """Entries per label: one scan of the labels, then kept up to date by this object's changes."""
        if self._label_counts is None:
            self._label_counts = Counter(label for _, label, _ in self.entries())
        return MappingProxyType(self._label_counts)

    def labels(self) -> set[str]:
        return {label for label, count in self.label_counts().items() if count > 0}

    def info(self) -> dict[str, Any]:
        return {"backend": "milvus", "index_type": self.index_type, "metric": "IP", "dim": self.dim,
                "count": len(self), "next_id": self.next_id, "labels": len(self.labels()), "tombstones": 0,
                "fingerprint": self.fingerprint, "index_params": self.index_params, "version": self.version,
                "created": self.created, "updated": self.updated, "path": str(self.path) if self.path else None,
                "num_threads": self.num_threads, "extra": dict(self.meta_extra), "uri": self.settings.uri,
                "alias": self.alias, "collection": self.collection,
                "consistency_level": self.settings.consistency_level}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.index_type}, {self.collection}, dim={self.dim}, next_id={self.next_id})"

    # ----------------------------------------------------------------- mutation
    def _meta(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "dim": self.dim, "index_type": self.index_type,
                "index_params": self.index_params, "fingerprint": self.fingerprint, "next_id": self.next_id,
                "extra": self.meta_extra, "created": self.created, "updated": self.updated,
                "revision": self.revision}

    def _counted(self, labels: Sequence[str], sign: int) -> None:
        self._forget_centroids(set(labels))
        if self._count is not None:
            self._count += sign * len(labels)
        if self._label_counts is not None:
            self._label_counts.update({label: sign * n for label, n in Counter(labels).items()})

    def _delete(self, ids: Sequence[int]) -> None:
        """Delete rows by id, a filter's worth at a time."""
        for start in range(0, len(ids), _PAGE):
            self._client.delete(self.collection, ids=list(ids[start:start + _PAGE]))

    def _insert(self, ids: Sequence[int], x: np.ndarray, labels: Sequence[str], metas: Sequence[dict]) -> None:
        """Insert in batches; a failed batch deletes the ones before it (all or nothing)."""
        done: list[int] = []
        try:
            for start in range(0, len(ids), self.settings.insert_batch):
                stop = start + self.settings.insert_batch
                self._client.insert(self.collection, [
                    {"id": int(i), "vector": v, "label": label, "meta": meta}
                    for i, v, label, meta in zip(ids[start:stop], x[start:stop], labels[start:stop],
                                                 metas[start:stop], strict=True)])
                done += list(ids[start:stop])
        except BaseException:
            self._delete(done)
            raise

    def add(self, vectors: Any, labels: Sequence[str] | str,
            metadata: Sequence[Mapping[str, Any] | None] | None = None) -> list[int]:
        """As :meth:`Gallery.add`; the rows are in the collection when this returns."""
        x = self._vectors(vectors, "vectors")
        labels = self._labels(labels, len(x))
        metas = self._metadata(metadata, len(x))
        for i, label in enumerate(labels):
            if len(label.encode("utf-8")) > MAX_LABEL_BYTES:
                raise ValueError(f"label {i} is {len(label.encode('utf-8'))} bytes in UTF-8; the Milvus "
                                 f"gallery keeps labels up to {MAX_LABEL_BYTES} bytes")
        ids = list(range(self.next_id, self.next_id + len(x)))
        self.next_id += len(x)
        store.write_meta(self._client, self.collection, self._meta())  # reserved before use: never reused
        self._insert(ids, x, labels, metas)
        self._added += ids
        self._counted(labels, +1)
        return ids

    def remove(self, ids: Sequence[int] | int, *, missing_ok: bool = False) -> int:
        wanted = requested_ids(ids)
        rows = self._rows(sorted(wanted), ["id", "vector", "label", "meta"]) if wanted else []
        unknown = sorted(wanted - {int(r["id"]) for r in rows})
        if unknown and not missing_ok:
            raise unknown_ids_error(unknown)
        if rows:
            self._delete(sorted(int(r["id"]) for r in rows))
            self._removed += rows
            self._counted([r["label"] for r in rows], -1)
        return len(rows)

    def remove_label(self, label: str) -> int:
        ids = [int(r["id"]) for r in self._client.query(self.collection, filter=_label_filter(label),
                                                         output_fields=["id"], consistency_level="Strong")]
        return self.remove(ids)

    def discard_changes(self) -> None:
        """Undo the adds and removals since the last load / save (the ids stay used)."""
        self._delete(self._added)
        if self._removed:
            for start in range(0, len(self._removed), self.settings.insert_batch):
                self._client.upsert(self.collection, [{**row, "vector": list(row["vector"])} for row in
                                                      self._removed[start:start + self.settings.insert_batch]])
        self._added, self._removed, self._count, self._label_counts = [], [], None, None
        self._forget_centroids()

    def tune(self, **params: Any) -> None:
        """Search-time parameters (HNSW ``ef_search``, IVF ``nprobe``), saved with the next save."""
        backend = backend_class(self.index_type)
        fixed = sorted(set(params) - backend.tunable)
        if fixed:
            raise ValueError(f"{self.index_type} parameter(s) {fixed} cannot be changed after build (tunable: "
                             f"{sorted(backend.tunable)}); rebuild the gallery to change them")
        self._params.update(params)

    def compact(self) -> None:
        """Nothing to do: Milvus compacts deleted rows out of its segments itself."""

    def flush(self) -> None:
        """Seal what was inserted into segments and index them now (Milvus otherwise does it in
        the background); for timing a build, or before a bulk read."""
        self._client.flush(self.collection)
        self._client.load_collection(self.collection)

    # ----------------------------------------------------------------- search
    def _search_params(self, k: int, count: int) -> dict[str, Any]:
        # A gallery of fewer than ``exact_below`` entries is searched exhaustively, as on Faiss
        # (faiss_index.EXACT_BELOW): Milvus has no brute-force switch for an indexed collection, but
        # an HNSW beam as wide as the gallery visits all of it, and so does probing every IVF list.
        exact = count < int(self._params.get("exact_below", EXACT_BELOW))
        if self.index_type == "HNSW32":
            ef = max(int(self._params["ef_search"]), k, count if exact else 0)
            return {"metric_type": "IP", "params": {"ef": ef}}
        if self.index_type == "IVF":
            nprobe = int(self._params["nlist"]) if exact else int(self._params["nprobe"])
            return {"metric_type": "IP", "params": {"nprobe": nprobe}}
        return {"metric_type": "IP", "params": {}}

    def _search_rows(self, queries: Any, top_k: int) -> list[list[dict[str, Any]]]:
        q = self._vectors(queries, "queries")
        count = len(self)
        k = min(check_top_k(top_k), count)
        if k == 0:
            return [[] for _ in range(len(q))]
        return self._client.search(self.collection, data=list(q), limit=k, output_fields=["label", "meta"],
                                   search_params=self._search_params(k, count),
                                   consistency_level=self.settings.consistency_level)

    def search_arrays(self, queries: Any, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        rows = self._search_rows(queries, top_k)
        scores = np.full((len(rows), top_k), -np.inf, dtype=np.float32)
        ids = np.full((len(rows), top_k), -1, dtype=np.int64)
        for r, row in enumerate(rows):
            for c, hit in enumerate(row):
                scores[r, c], ids[r, c] = hit["distance"], hit["id"]
        return scores, ids

    def search(self, queries: Any, top_k: int = 5) -> list[list[Hit]]:
        return [[Hit(int(h["id"]), h["entity"]["label"], float(h["distance"]),
                     MappingProxyType(dict(h["entity"].get("meta") or {}))) for h in row]
                for row in self._search_rows(queries, top_k)]
