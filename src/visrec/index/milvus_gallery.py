"""The gallery in Milvus: the same contract as the Faiss :class:`~visrec.index.gallery.Gallery`,
with the vectors, labels and metadata in a Milvus collection instead of one process's memory.

Differences a caller may notice, and why:

* **Changes write through.** ``add`` / ``remove`` change the collection at once (a database
  does not copy itself per change); searches see them right away (read-your-writes in this
  process at consistency ``Session``). Until :meth:`save`, every change is journalled, and
  :meth:`discard_changes` undoes it (``change_gallery`` calls it when a change fails), so a
  failed update still leaves the saved gallery as it was. Ids are reserved before the insert:
  a crash can skip ids, never reuse them.
* **Versions are collections.** ``save`` to the gallery's own location commits the journal
  (the version string ``<collection>@r<revision>`` moves); ``save`` to another location, or of
  a new gallery, publishes a collection under that location's alias in one ``alter_alias``
  (:mod:`visrec.index.milvus_store`).
* A loaded gallery stays on the collection the alias named when it was opened (a consistent
  snapshot, like a loaded Faiss version); a server reloads when :meth:`current_version` moves.
* Writers are serialised by the gallery directory's update lock: run them on one host (the
  gallery-update DAG, one admin replica); readers can be anywhere (docs/deploy.md).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from visrec.index import milvus_store as store
from visrec.index.faiss_index import backend_class
from visrec.index.gallery_api import GalleryBase, Hit, check_top_k, requested_ids, unknown_ids_error
from visrec.index import gallery_api, gallery_store
from visrec.index.gallery_store import GalleryNotFoundError, now

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_LABEL_BYTES = 4096
MILVUS_INDEX = {"HNSW32": "HNSW", "IVF": "IVF_FLAT", "FLAT": "FLAT"}
DEFAULT_NLIST = 128  # IVF_FLAT: Milvus trains each segment's lists itself, it needs nlist up front
_PAGE = 1000  # rows per query page / ids per filter


def _id_filter(ids: Sequence[int]) -> str:
    return f"id in [{', '.join(str(int(i)) for i in ids)}]"


def _label_filter(label: str) -> str:
    # A JSON string literal is a valid Milvus string literal (quotes, backslashes, any Unicode);
    # Milvus Lite 3.2 has no filter templates (``filter_params``) to bind it instead.
    return f"label == {json.dumps(label, ensure_ascii=False)}"


class MilvusGallery(GalleryBase):
    """A gallery in one Milvus collection; see the module doc for what differs from Faiss."""

    def __init__(self, client, settings: store.MilvusSettings, collection: str, meta: dict[str, Any], *,
                 alias: str | None = None, path: Path | None = None, num_threads: int = 2) -> None:
        """Low-level constructor; use :meth:`create`, :meth:`build` or :meth:`load`."""
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

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(cls, dim: int, index_type: str = "HNSW32", *, settings: store.MilvusSettings,
               fingerprint: str | None = None, num_threads: int = 2, meta_extra: dict[str, Any] | None = None,
               resume_key: str | None = None, **index_params: Any) -> MilvusGallery:
        """An empty gallery in a new, not yet published collection (published by :meth:`save`).

        With ``resume_key`` (e.g. a hash of the list being built), the staging collection is named
        by it, and one left by an interrupted build with the same dim, index and fingerprint is
        reopened as it is, so the build can continue where it stopped."""
        from pymilvus import DataType, MilvusClient

        if not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        backend = backend_class(index_type)  # the same names and parameter checks as Faiss
        kind = backend.kind
        unknown = sorted(set(index_params) - set(backend.defaults))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for index type {kind}; valid ones are "
                             f"{sorted(backend.defaults)}")
        params = {**backend.defaults, **index_params}
        if kind == "IVF":
            params["nlist"] = int(params["nlist"] or DEFAULT_NLIST)
        client = store.connect(settings.uri)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL_BYTES)
        schema.add_field("meta", DataType.JSON)
        meta = {"format": FORMAT_VERSION, "dim": int(dim), "index_type": kind, "index_params": params,
                "fingerprint": fingerprint, "next_id": 0, "extra": dict(meta_extra or {}), "created": now(),
                "updated": None, "revision": 0}
        name = store.staging_name(settings.alias_prefix, resume_key)
        if resume_key and client.has_collection(name):
            found = store.read_meta(client, name)
            if all(found.get(k) == meta[k] for k in ("dim", "index_type", "index_params", "fingerprint")):
                client.load_collection(name)
                logger.info("reopened the interrupted build %s (%s entries so far)", name, found["next_id"])
                return cls(client, settings, name, found, num_threads=num_threads)
            client.drop_collection(name)  # an interrupted build of another extractor or index
        client.create_collection(name, schema=schema, index_params=cls._index_params(client, kind, params),
                                 consistency_level=settings.consistency_level,
                                 properties={store.META_PROPERTY: json.dumps(meta, ensure_ascii=False)})
        return cls(client, settings, name, meta, num_threads=num_threads)

    @staticmethod
    def _index_params(client, kind: str, params: dict[str, Any]):
        index = client.prepare_index_params()
        build = {"HNSW32": {"M": int(params.get("hnsw_m", 32)),
                            "efConstruction": int(params.get("ef_construction", 64))},
                 "IVF": {"nlist": int(params.get("nlist") or DEFAULT_NLIST)}, "FLAT": {}}[kind]
        index.add_index(field_name="vector", index_type=MILVUS_INDEX[kind], metric_type="IP", params=build)
        return index

    @classmethod
    def load(cls, path: str | Path, *, expected_fingerprint: str | None = None, expected_dim: int | None = None,
             num_threads: int = 2) -> MilvusGallery:
        """The gallery the alias in ``path/milvus.json`` names now (pinned to that collection)."""
        root = Path(path)
        if not store.has_pointer(root):
            raise GalleryNotFoundError(f"no Milvus gallery at {root} (no {store.POINTER_FILE}); {gallery_store.BUILD_HINT}")
        uri, alias, settings = store.read_pointer(root)
        client = store.connect(uri)
        collection = store.resolve_alias(client, alias)
        if collection is None:
            raise GalleryNotFoundError(f"{root} names the Milvus alias {alias} at {uri}, which does not exist "
                                       f"(dropped, or another server?); rebuild the gallery ({gallery_api.BUILD_HINT})")
        client.load_collection(collection)
        gallery = cls(client, settings, collection, store.read_meta(client, collection), alias=alias, path=root,
                      num_threads=num_threads)
        gallery.check_expected(root, expected_fingerprint, expected_dim)
        logger.info("loaded gallery %s (%s)", root, gallery)
        return gallery

    @staticmethod
    def current_version(path: str | Path) -> str | None:
        """``<collection>@r<revision>`` of what ``path``'s alias serves now (two small calls)."""
        if not store.has_pointer(path):
            return None
        uri, alias, _ = store.read_pointer(path)
        client = store.connect(uri)
        collection = store.resolve_alias(client, alias)
        return None if collection is None else f"{collection}@r{store.read_meta(client, collection)['revision']}"

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
        iterator = self._client.query_iterator(self.collection, batch_size=_PAGE, filter="id >= 0",
                                               output_fields=fields, consistency_level="Strong")
        try:
            while page := iterator.next():
                for row in sorted(page, key=lambda r: r["id"]):
                    entry = (int(row["id"]), row["label"], dict(row["meta"] or {}))
                    yield (*entry, np.asarray(row["vector"], dtype=np.float32)) if with_vectors else entry
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
        return f"MilvusGallery({self.index_type}, {self.collection}, dim={self.dim}, next_id={self.next_id})"

    # ----------------------------------------------------------------- mutation
    def _meta(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "dim": self.dim, "index_type": self.index_type,
                "index_params": self.index_params, "fingerprint": self.fingerprint, "next_id": self.next_id,
                "extra": self.meta_extra, "created": self.created, "updated": self.updated,
                "revision": self.revision}

    def _counted(self, labels: Sequence[str], sign: int) -> None:
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
    def _search_params(self, k: int) -> dict[str, Any]:
        if self.index_type == "HNSW32":
            return {"metric_type": "IP", "params": {"ef": max(int(self._params["ef_search"]), k)}}
        if self.index_type == "IVF":
            return {"metric_type": "IP", "params": {"nprobe": int(self._params["nprobe"])}}
        return {"metric_type": "IP", "params": {}}

    def _search_rows(self, queries: Any, top_k: int) -> list[list[dict[str, Any]]]:
        q = self._vectors(queries, "queries")
        k = min(check_top_k(top_k), len(self))
        if k == 0:
            return [[] for _ in range(len(q))]
        return self._client.search(self.collection, data=list(q), limit=k, output_fields=["label", "meta"],
                                   search_params=self._search_params(k),
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

    # ----------------------------------------------------------------- publishing
    @classmethod
    def copy_of(cls, source: GalleryBase, settings: store.MilvusSettings) -> MilvusGallery:
        """A new unpublished gallery holding ``source``'s entries as they are (ids, labels,
        metadata, vectors, fingerprint, next id), from either backend, inserted in batches."""
        copy = cls.create(source.dim, source.index_type, settings=settings, fingerprint=source.fingerprint,
                          num_threads=source.num_threads, meta_extra=source.meta_extra, **source.index_params)
        try:
            batch: list[tuple] = []
            for row in _rows_with_vectors(source):
                batch.append(row)
                if len(batch) >= settings.insert_batch:
                    copy._copy_rows(batch)
                    batch = []
            if batch:
                copy._copy_rows(batch)
            copy.next_id, copy.created = source.next_id, source.created
            store.write_meta(copy._client, copy.collection, copy._meta())
        except BaseException:
            copy.release()
            raise
        return copy

    def working_copy(self) -> MilvusGallery:
        """A copy in a new unpublished collection: changing it leaves this gallery untouched."""
        return MilvusGallery.copy_of(self, self.settings)

    def _copy_rows(self, rows: Sequence[tuple]) -> None:
        """Insert ``(id, label, metadata, vector)`` rows as they are (their ids kept)."""
        self._insert([r[0] for r in rows], np.stack([r[3] for r in rows]), [r[1] for r in rows], [r[2] for r in rows])
        self._count = None

    def save(self, path: str | Path | None = None, *, keep_versions: int | None = None) -> str:
        """Publish this gallery at ``path`` (default: where it was loaded from); returns its version.

        Saved where it was loaded from: the changes since then are committed (the revision
        moves). A new gallery (unpublished collection) becomes the alias's next collection; a
        gallery published elsewhere is copied into one. The alias switch is the commit point.
        """
        if path is None and self.path is None:
            raise ValueError("save() needs a path: this gallery was never saved or loaded from a gallery root")
        root = Path(path) if path is not None else self.path
        alias = store.read_pointer(root)[1] if store.has_pointer(root) else self._check_new_root(root)
        return self.publish(root, alias, keep_versions)

    def publish(self, root: Path, alias: str, keep_versions: int | None = None) -> str:
        """:meth:`save` under a given served name (``visrec gallery migrate`` publishes beside the
        Faiss versions it copied, which :meth:`save` would refuse to write next to)."""
        keep = keep_versions or self.settings.keep_versions
        client = self._client
        self.revision += 1
        self.updated = now()
        # A Strong read waits until the query nodes have applied every write so far; readers are
        # told of this version only after it, so even a reader at Eventually/Session (which
        # waits for nothing it did not write itself) finds the whole gallery, never half.
        self._count = None
        len(self)
        if alias == self.alias and store.resolve_alias(client, alias) == self.collection:
            store.write_meta(client, self.collection, self._meta())
        else:
            # A new gallery's staging collection becomes the next version; a gallery published
            # under another name (or superseded) publishes a copy.
            staged = self.collection if self.alias is None else self.working_copy().collection
            self.collection = store.next_version_name(client, alias)
            client.rename_collection(staged, self.collection)
            store.write_meta(client, self.collection, self._meta())
            client.load_collection(self.collection)
            store.write_pointer(root, alias, self.settings)
            self._replaced = store.switch_alias(client, alias, self.collection)  # the commit point
            store.prune(client, alias, keep)
        self.alias, self.path = alias, root
        self._added, self._removed = [], []
        logger.info("saved gallery %s as %s (%d entries)", root, self.version, len(self))
        return self.version

    def revert_publish(self) -> None:
        """Point the alias back at the collection this object's last save replaced (kept by pruning)."""
        if self.alias and self._replaced:
            store.switch_alias(self._client, self.alias, self._replaced)
            self._replaced = None

    def release(self) -> None:
        """Drop this gallery's collection if it was never published (a working copy, a failed build)."""
        if self.alias is None and self._client.has_collection(self.collection):
            self._client.drop_collection(self.collection)

    def _check_new_root(self, root: Path) -> str:
        if root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir()):
            raise ValueError(f"refusing to save a Milvus gallery into {root}: it is a non-empty directory without "
                             f"{store.POINTER_FILE} (a Faiss gallery? `visrec gallery migrate --to milvus` copies "
                             "one); choose an empty or new directory")
        return store.alias_for(root, self.settings.alias_prefix)


def _rows_with_vectors(gallery: GalleryBase) -> Iterator[tuple[int, str, dict[str, Any], np.ndarray]]:
    """``(id, label, metadata, vector)`` of every entry of a gallery of either backend."""
    if isinstance(gallery, MilvusGallery):
        yield from gallery.entries(with_vectors=True)
        return
    for ids, vectors in gallery.vector_chunks():
        for i, vector in zip(ids.tolist(), vectors, strict=True):
            yield i, gallery.label_of(i), dict(gallery.metadata_of(i)), vector
