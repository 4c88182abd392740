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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visrec.index import gallery_api, gallery_store
from visrec.index import milvus_store as store
from visrec.index.faiss_index import backend_class
from visrec.index.gallery_api import GalleryBase
from visrec.index.gallery_store import GalleryNotFoundError, now
from visrec.index.milvus_collection import FORMAT_VERSION, MAX_LABEL_BYTES, MilvusCollectionGallery

logger = logging.getLogger(__name__)

MILVUS_INDEX = {"HNSW32": "HNSW", "IVF": "IVF_FLAT", "FLAT": "FLAT"}
DEFAULT_NLIST = 128  # IVF_FLAT: Milvus trains each segment's lists itself, it needs nlist up front


class MilvusGallery(MilvusCollectionGallery):
    """A gallery in one Milvus collection; see the module doc for what differs from Faiss.

    Searching and editing come from :class:`~visrec.index.milvus_collection.MilvusCollectionGallery`;
    this class creates, loads and publishes the collections (versions behind an alias)."""

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
        # Label filters (remove_label, the label centroids' fetch) look labels up instead of scanning.
        index.add_index(field_name="label", index_type="INVERTED")
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
