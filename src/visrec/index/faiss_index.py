"""Thin wrappers around the three Faiss index types a gallery can use.

Each backend speaks *gallery ids* (int64, assigned by :class:`visrec.index.gallery.Gallery`)
and hides how the index type stores them:

* ``FLAT``   -- ``IndexIDMap2(IndexFlatIP)``: exact search, ids and removal built in.
* ``IVF``    -- ``IndexIVFFlat`` (IP) with its *own* ``add_with_ids``/``remove_ids``. We do
  not wrap it in ``IndexIDMap2``: with faiss 1.15 that combination returns wrong ids after
  a removal (measured), while IVF's inverted lists store ids natively.
* ``HNSW32`` -- ``IndexHNSWFlat`` (IP). HNSW has no ids and no ``remove_ids``, so we keep
  ``pos2id`` (internal sequential position -> gallery id) and tombstoned positions, filter
  tombstones at search time with an ``IDSelector`` and rebuild ("compact") once they
  exceed ``compact_fraction`` of the index.

Vectors reaching a backend are already validated and L2-normalised by the Gallery, and ids
handed to ``remove`` are known to exist; backends do no input checking of their own.
Faiss index objects refuse new Python attributes, so all extra state lives on the backend.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
HNSW_ID_MAP_FILE = "id_map.npy"
HNSW_TOMBSTONES_FILE = "tombstones.npy"

#: Faiss's k-means wants >= 39 points per centroid; fewer gives poor lists (and a warning).
IVF_POINTS_PER_LIST = 39
#: Below this many vectors an IVF index cannot be trained meaningfully.
IVF_MIN_TRAIN = 2
_RECONSTRUCT_CHUNK = 65_536
#: Galleries with fewer live entries than this are searched exhaustively whatever their index type
#: (HNSW: brute force over its vectors; IVF: every list). Exact answers do not depend on how an
#: engine happened to build its graph: the same gallery answers the same on Faiss and Milvus. The
#: cost (bench/bench_index.py, 1280-d, one query a call): faster than the graph at 1k entries,
#: 0.8 vs 0.46 ms a query at 5k, 1.6 vs 0.52 ms at 10k.
EXACT_BELOW = 5_000


def set_num_threads(num_threads: int) -> None:
    """Set Faiss's OpenMP thread count explicitly.

    Paddle sets ``OMP_NUM_THREADS=1`` when it is imported, which would silently make every
    Faiss build and search single-threaded in a process that also runs the extractor.
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    faiss.omp_set_num_threads(int(num_threads))


def auto_nlist(n: int) -> int:
    """IVF list count for ``n`` training vectors: ~4*sqrt(n), but >= 39 points per list."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // IVF_POINTS_PER_LIST)))


class IndexBackend(ABC):
    """One Faiss index type behind a uniform, gallery-id based interface."""

    kind: ClassVar[str]
    #: Tunable parameters and their defaults; unknown parameter names are rejected.
    defaults: ClassVar[dict[str, Any]]

    #: Parameters that only affect search (or later removals) and may change on a built index.
    tunable: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, dim: int, params: dict[str, Any]) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for index type {self.kind}; "
                             f"valid ones are {sorted(self.defaults)}")
        self.dim = dim
        self.params: dict[str, Any] = {**self.defaults, **params}

    @property
    @abstractmethod
    def count(self) -> int:
        """Number of live (searchable) vectors."""

    @abstractmethod
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add normalised float32 ``vectors`` under gallery ``ids`` (int64)."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> None:
        """Remove gallery ``ids`` (all known to be present)."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(scores, ids)`` of shape ``(nq, k)``; missing results have id -1."""

    @abstractmethod
    def write(self, directory: Path) -> list[Path]:
        """Write the index files into ``directory``; return their paths (for fsync)."""

    @classmethod
    @abstractmethod
    def read(cls, directory: Path, dim: int, params: dict[str, Any]) -> IndexBackend:
        """Inverse of :meth:`write`."""

    @abstractmethod
    def vector_chunks(self, chunk: int = _RECONSTRUCT_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every live vector as ``(ids, vectors)`` chunks, in no particular order (for copying a
        gallery elsewhere, e.g. into Milvus)."""

    def stats(self) -> dict[str, Any]:
        """Extra, type-specific numbers for ``Gallery.info()``."""
        return {}

    def tune(self, **params: Any) -> None:
        """Change search-time parameters (e.g. ``ef_search``, ``nprobe``) without rebuilding."""
        fixed = sorted(set(params) - self.tunable)
        if fixed:
            raise ValueError(f"{self.kind} parameter(s) {fixed} cannot be changed after build (tunable: "
                             f"{sorted(self.tunable)}); rebuild the gallery to change them")
        for name, value in params.items():
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        self.params.update(params)


class FlatBackend(IndexBackend):
    """Exact inner-product search; the reference the others are measured against."""

    kind = "FLAT"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, dim: int, params: dict[str, Any], index: faiss.Index | None = None) -> None:
        super().__init__(dim, params)
        self.index = index if index is not None else faiss.index_factory(
            dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        self.index.remove_ids(ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def vector_chunks(self, chunk: int = _RECONSTRUCT_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        flat = faiss.downcast_index(self.index.index)
        for start in range(0, len(ids), chunk):
            stop = min(start + chunk, len(ids))
            yield ids[start:stop], flat.reconstruct_n(start, stop - start)

    def write(self, directory: Path) -> list[Path]:
        path = directory / INDEX_FILE
        faiss.write_index(self.index, str(path))
        return [path]

    @classmethod
    def read(cls, directory: Path, dim: int, params: dict[str, Any]) -> FlatBackend:
        return cls(dim, params, faiss.read_index(str(directory / INDEX_FILE)))


class IVFBackend(IndexBackend):
    """Inverted lists: trained on the first batch added (the gallery build)."""

    kind = "IVF"
    #: ``nlist=None`` means "choose from the size of the first batch" (see :func:`auto_nlist`).
    defaults: ClassVar[dict[str, Any]] = {"nlist": None, "nprobe": 16, "exact_below": EXACT_BELOW}
    tunable = frozenset({"nprobe", "exact_below"})

    def __init__(self, dim: int, params: dict[str, Any], index: faiss.Index | None = None) -> None:
        super().__init__(dim, params)
        self.index = index  # None until trained: nlist depends on the build size

    @property
    def count(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _train(self, vectors: np.ndarray) -> None:
        n = len(vectors)
        if n < IVF_MIN_TRAIN:
            raise ValueError(f"an IVF gallery needs at least {IVF_MIN_TRAIN} vectors in its first "
                             f"add to train on, got {n}; use index_type='FLAT' for tiny galleries")
        wanted = self.params["nlist"]
        nlist = auto_nlist(n) if wanted is None else int(wanted)
        if nlist < 1:
            raise ValueError(f"IVF nlist must be >= 1, got {nlist}")
        if nlist > n:
            logger.warning("IVF nlist=%d > %d training vectors; using nlist=%d", nlist, n, auto_nlist(n))
            nlist = auto_nlist(n)
        index = faiss.index_factory(self.dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # tiny galleries: fine, silence faiss's warning
        index.train(vectors)
        self.index = index
        self.params["nlist"] = nlist
        logger.info("trained IVF index: nlist=%d on %d vectors", nlist, n)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if self.index is None:
            self._train(vectors)
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        self.index.remove_ids(ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        nlist = int(self.index.nlist)
        # Every list probed is an exhaustive search (see EXACT_BELOW).
        nprobe = nlist if self.count < int(self.params["exact_below"]) else int(self.params["nprobe"])
        nprobe = max(1, min(nprobe, nlist))
        return self.index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))

    def vector_chunks(self, chunk: int = _RECONSTRUCT_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # One inverted list at a time: IVF cannot reconstruct by id without a direct map, but an
        # IVFFlat list's codes are the raw float32 vectors.
        if self.index is None:
            return
        lists = self.index.invlists
        for number in range(lists.nlist):
            size = lists.list_size(number)
            if size:
                ids = faiss.rev_swig_ptr(lists.get_ids(number), size).copy().astype(np.int64)
                codes = faiss.rev_swig_ptr(lists.get_codes(number), size * lists.code_size).copy()
                yield ids, codes.view(np.float32).reshape(size, self.dim)

    def write(self, directory: Path) -> list[Path]:
        if self.index is None:  # an empty, untrained gallery: meta.json alone describes it
            return []
        path = directory / INDEX_FILE
        faiss.write_index(self.index, str(path))
        return [path]

    @classmethod
    def read(cls, directory: Path, dim: int, params: dict[str, Any]) -> IVFBackend:
        path = directory / INDEX_FILE
        return cls(dim, params, faiss.read_index(str(path)) if path.exists() else None)

    def stats(self) -> dict[str, Any]:
        return {"trained": self.index is not None}


class HNSWBackend(IndexBackend):
    """HNSW graph with an id map and tombstones (HNSW has neither ids nor removal)."""

    kind = "HNSW32"
    # Tuned with bench/bench_index.py (100k x 512, 2 threads): on clustered data efSearch 64 gives
    # recall@1 ~1.0 of FLAT at ~15x its QPS. I.i.d. random 512-d vectors have no neighbourhood
    # structure and no setting gets close there (efSearch 512: recall@1 0.58 at 1.6x FLAT's QPS).
    defaults: ClassVar[dict[str, Any]] = {"hnsw_m": 32, "ef_construction": 64, "ef_search": 64,
                                          "compact_fraction": 0.2, "exact_below": EXACT_BELOW}
    tunable = frozenset({"ef_search", "compact_fraction", "exact_below"})

    def __init__(self, dim: int, params: dict[str, Any], index: faiss.Index | None = None,
                 pos2id: np.ndarray | None = None, tombstones: np.ndarray | None = None) -> None:
        super().__init__(dim, params)
        if not 0.0 <= float(self.params["compact_fraction"]) < 1.0:
            raise ValueError(f"compact_fraction must be in [0, 1), got {self.params['compact_fraction']}")
        self.index = index if index is not None else self._new_index()
        self.pos2id = pos2id if pos2id is not None else np.empty(0, dtype=np.int64)
        self.tombstones: set[int] = set() if tombstones is None else {int(t) for t in tombstones}
        self._id2pos = {int(g): p for p, g in enumerate(self.pos2id)}
        for p in self.tombstones:
            self._id2pos.pop(int(self.pos2id[p]), None)
        self._selector: tuple[Any, Any] | None = None  # cached (IDSelectorBatch, IDSelectorNot)
        if len(self.pos2id) != self.index.ntotal:
            raise ValueError(f"HNSW id map has {len(self.pos2id)} entries but the index holds "
                             f"{self.index.ntotal} vectors; the gallery files are inconsistent")

    def tune(self, **params: Any) -> None:
        if not 0.0 <= float(params.get("compact_fraction", 0.0)) < 1.0:
            raise ValueError(f"compact_fraction must be in [0, 1), got {params['compact_fraction']}")
        super().tune(**params)

    def _new_index(self) -> faiss.Index:
        index = faiss.IndexHNSWFlat(self.dim, int(self.params["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(self.params["ef_construction"])
        index.hnsw.efSearch = int(self.params["ef_search"])
        return index

    @property
    def count(self) -> int:
        return int(self.index.ntotal) - len(self.tombstones)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        start = int(self.index.ntotal)
        self.index.add(vectors)
        self.pos2id = np.concatenate([self.pos2id, ids.astype(np.int64)])
        self._id2pos.update((int(g), start + i) for i, g in enumerate(ids))

    def remove(self, ids: np.ndarray) -> None:
        for g in ids:
            self.tombstones.add(self._id2pos.pop(int(g)))
        self._selector = None
        if len(self.tombstones) > float(self.params["compact_fraction"]) * self.index.ntotal:
            self.compact()

    def compact(self) -> None:
        """Rebuild the graph from the surviving vectors; gallery ids are preserved.

        Reconstructs in chunks so a large gallery is never copied whole into memory twice.
        """
        old, dead = self.index, self.tombstones
        alive = np.ones(old.ntotal, dtype=bool)
        alive[list(dead)] = False
        new = self._new_index()
        for start in range(0, old.ntotal, _RECONSTRUCT_CHUNK):
            stop = min(start + _RECONSTRUCT_CHUNK, old.ntotal)
            keep = alive[start:stop]
            if keep.any():
                new.add(np.ascontiguousarray(old.reconstruct_n(start, stop - start)[keep]))
        logger.info("compacted HNSW index: %d -> %d vectors (%d tombstones dropped)",
                    old.ntotal, new.ntotal, len(dead))
        self.index, self.pos2id, self.tombstones = new, self.pos2id[alive], set()
        self._id2pos = {int(g): p for p, g in enumerate(self.pos2id)}
        self._selector = None

    def _alive_selector(self) -> Any:
        """An IDSelector of the positions not tombstoned (None: all are alive)."""
        if not self.tombstones:
            return None
        if self._selector is None:
            batch = faiss.IDSelectorBatch(np.fromiter(self.tombstones, dtype=np.int64))
            self._selector = (batch, faiss.IDSelectorNot(batch))  # keep both alive
        return self._selector[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sel = self._alive_selector()
        if self.count < int(self.params["exact_below"]):
            # Brute force over the graph's own vector store (see EXACT_BELOW).
            flat = faiss.downcast_index(self.index.storage)
            scores, pos = flat.search(queries, k, params=faiss.SearchParameters(sel=sel))
        else:
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(int(self.params["ef_search"]), k))
            scores, pos = self.index.search(queries, k, params=params)
        ids = np.where(pos >= 0, self.pos2id[np.clip(pos, 0, None)] if len(self.pos2id) else -1, -1)
        return scores, ids.astype(np.int64)

    def vector_chunks(self, chunk: int = _RECONSTRUCT_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        dead = np.zeros(self.index.ntotal, dtype=bool)
        dead[list(self.tombstones)] = True
        for start in range(0, self.index.ntotal, chunk):
            stop = min(start + chunk, self.index.ntotal)
            keep = ~dead[start:stop]
            if keep.any():
                yield self.pos2id[start:stop][keep], self.index.reconstruct_n(start, stop - start)[keep]

    def write(self, directory: Path) -> list[Path]:
        paths = [directory / INDEX_FILE, directory / HNSW_ID_MAP_FILE, directory / HNSW_TOMBSTONES_FILE]
        faiss.write_index(self.index, str(paths[0]))
        np.save(paths[1], self.pos2id, allow_pickle=False)
        np.save(paths[2], np.array(sorted(self.tombstones), dtype=np.int64), allow_pickle=False)
        return paths

    @classmethod
    def read(cls, directory: Path, dim: int, params: dict[str, Any]) -> HNSWBackend:
        index = faiss.read_index(str(directory / INDEX_FILE))
        index.hnsw.efConstruction = int({**cls.defaults, **params}["ef_construction"])
        pos2id = np.load(directory / HNSW_ID_MAP_FILE, allow_pickle=False).astype(np.int64)
        tombstones = np.load(directory / HNSW_TOMBSTONES_FILE, allow_pickle=False)
        return cls(dim, params, index, pos2id, tombstones)

    def stats(self) -> dict[str, Any]:
        return {"tombstones": len(self.tombstones), "internal_size": int(self.index.ntotal)}


BACKENDS: dict[str, type[IndexBackend]] = {b.kind: b for b in (HNSWBackend, IVFBackend, FlatBackend)}


def backend_class(index_type: str) -> type[IndexBackend]:
    """Look up a backend by its PaddleClas-style name (case-insensitive)."""
    try:
        return BACKENDS[str(index_type).upper()]
    except KeyError:
        raise ValueError(f"unknown index_type {index_type!r}; choose one of {sorted(BACKENDS)}") from None


def index_params(index_cfg) -> dict[str, Any]:
    """The knobs of ``IndexConfig`` (params ``index``) that the chosen index type takes."""
    if index_cfg.index_type == "HNSW32":
        return {"hnsw_m": index_cfg.hnsw_m, "ef_construction": index_cfg.ef_construction,
                "ef_search": index_cfg.ef_search, "compact_fraction": index_cfg.compact_fraction,
                "exact_below": index_cfg.exact_below}
    if index_cfg.index_type == "IVF":
        return {"nprobe": index_cfg.nprobe, "exact_below": index_cfg.exact_below}
    return {}
