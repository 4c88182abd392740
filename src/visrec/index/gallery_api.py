"""What every gallery backend shares: the result type, the errors, input validation, and the
contract a caller may rely on whichever backend holds the vectors.

A gallery holds L2-normalised vectors with one label and a JSON metadata dict each, under
integer ids that are never reused, stamped with the fingerprint of the extractor that made the
vectors. Backends: :class:`visrec.index.gallery.Gallery` (Faiss, files on disk) and
:class:`visrec.index.milvus_gallery.MilvusGallery` (a Milvus collection behind an alias).
Callers open and create galleries through :mod:`visrec.index.factory`, never by backend.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visrec.index.centroids import LabelCentroids

RESERVED_KEYS = frozenset({"id", "label"})
BUILD_HINT = "`visrec gallery build LIST`"


class GalleryMismatchError(ValueError):
    """The gallery was built by a different feature extractor than the one in use."""


class UnknownIdError(KeyError):
    """``remove`` was asked for ids the gallery does not hold (nothing was removed)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Hit:
    """One search result. ``score`` is the cosine similarity in [-1, 1]."""

    id: int
    label: str
    score: float
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str | None:
        """The source image of the gallery entry, if it was recorded at add time."""
        return self.metadata.get("path")


def unknown_ids_error(unknown: Sequence[int]) -> UnknownIdError:
    return UnknownIdError(f"gallery has no id(s) {list(unknown[:10])}{' ...' if len(unknown) > 10 else ''}; "
                          "nothing was removed (pass missing_ok=True to skip unknown ids)")


def requested_ids(ids: Sequence[int] | int) -> set[int]:
    requested = np.atleast_1d(np.asarray(ids))
    if requested.size and requested.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers, got dtype {requested.dtype}")
    return {int(i) for i in requested.ravel()}


def vectors_dim(vectors: Any) -> int:
    """The width of a batch of vectors (0 for a scalar, which ``create`` then refuses by name)."""
    return int(np.shape(vectors)[-1]) if np.ndim(vectors) >= 1 else 0


def check_top_k(top_k: Any) -> int:
    if not isinstance(top_k, int | np.integer) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    return int(top_k)


class GalleryBase(ABC):
    """The backend-neutral part of a gallery: validation and the contract's signatures."""

    fingerprint: str | None
    meta_extra: dict[str, Any]
    next_id: int
    version: str | None
    path: Path | None  # the gallery root it was loaded from or last saved to; None for one never saved
    _centroids: LabelCentroids | None = None  # label_centroids(), made on first use

    @classmethod
    def build(cls, vectors: Any, labels: Sequence[str] | str,
              metadata: Sequence[Mapping[str, Any] | None] | None = None, *, index_type: str = "HNSW32",
              **create_options: Any) -> GalleryBase:
        """The backend's ``create`` sized to ``vectors``, then one add (an IVF Faiss index trains on
        exactly these). ``create_options``: that ``create``'s keywords (``fingerprint``,
        ``num_threads``, ``meta_extra``, index knobs; Milvus: ``settings``)."""
        gallery = cls.create(vectors_dim(vectors), index_type, **create_options)
        gallery.add(vectors, labels, metadata)
        return gallery

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def entries(self) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Every entry as ``(id, label, metadata)``, in id order (streamed by large backends)."""

    @abstractmethod
    def add(self, vectors: Any, labels: Sequence[str] | str,
            metadata: Sequence[Mapping[str, Any] | None] | None = None) -> list[int]: ...

    @abstractmethod
    def remove(self, ids: Sequence[int] | int, *, missing_ok: bool = False) -> int: ...

    @abstractmethod
    def search_arrays(self, queries: Any, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def search(self, queries: Any, top_k: int = 5) -> list[list[Hit]]: ...

    @abstractmethod
    def label_vectors(self, labels: Sequence[str]) -> Iterator[tuple[list[str], np.ndarray]]:
        """Every stored (normalised) vector of ``labels`` (or of more labels, when that is cheaper
        for the backend), as ``(labels, vectors)`` chunks."""

    def label_centroids(self) -> LabelCentroids:
        """Each label's unit mean vector (:mod:`visrec.index.centroids`), computed when first
        needed and kept until this object changes the label (add, remove, discard)."""
        if self._centroids is None:
            self._centroids = LabelCentroids(self.label_vectors)
        return self._centroids

    def _forget_centroids(self, labels: Sequence[str] | None = None) -> None:
        if self._centroids is not None:
            self._centroids.forget(labels)

    def discard_changes(self) -> None:
        """Undo what was changed since the last load or save. Faiss galleries change only in
        memory until saved, so there is nothing to undo; a backend that writes through overrides it."""

    def working_copy(self) -> GalleryBase:
        """A gallery to change without touching the saved one until it is saved somewhere. A
        loaded Faiss gallery already is one (it lives in memory); write-through backends copy."""
        return self

    def release(self) -> None:
        """Free what an unsaved working copy holds (a Milvus staging collection); no-op otherwise."""

    def revert_publish(self) -> None:
        """Undo this object's last save to a new location, when what should follow it failed
        (a champion whose models could not be published). Faiss: the version dir goes with the
        caller's temporary directory, nothing to do; Milvus: the alias moves back."""

    def check_expected(self, where: object, expected_fingerprint: str | None, expected_dim: int | None) -> None:
        """Refuse a gallery of another extractor (fingerprint) or another embedding size; ``where``
        names the gallery in the message (None: one never saved). The one check for loading a
        gallery, pairing it with an extractor, and adding an extractor's vectors to it."""
        gallery = "the gallery" if where is None else f"gallery {where}"
        if expected_fingerprint is not None and self.fingerprint != expected_fingerprint:
            raise GalleryMismatchError(
                f"{gallery} was built by extractor {self.fingerprint or '<unknown>'} but the current "
                f"extractor is {expected_fingerprint}; features are not comparable, rebuild the gallery "
                f"with the current extractor ({BUILD_HINT})")
        if expected_dim is not None and self.dim != expected_dim:
            raise GalleryMismatchError(f"{gallery} has dim {self.dim} but the extractor produces "
                                       f"dim {expected_dim}; rebuild the gallery ({BUILD_HINT})")

    # ----------------------------------------------------------------- validation
    def _vectors(self, vectors: Any, what: str) -> np.ndarray:
        """Validate and L2-normalise; raise ValueError naming the problem (nothing mutated)."""
        try:
            x = np.asarray(vectors)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what} must be a numeric array of shape (n, {self.dim}): {exc}") from None
        if x.dtype.kind not in "fiu":
            raise ValueError(f"{what} must be a numeric array of shape (n, {self.dim}), got dtype {x.dtype}")
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise ValueError(f"{what} must have shape (n, {self.dim}), got {x.shape}")
        if x.shape[0] == 0:
            raise ValueError(f"{what} is empty: pass at least one vector of dim {self.dim}")
        if x.shape[1] != self.dim:
            raise ValueError(f"{what} have dim {x.shape[1]} but the gallery has dim {self.dim} "
                             f"(extractor {self.fingerprint or 'unknown'}); embed with the same extractor "
                             f"or rebuild the gallery ({BUILD_HINT})")
        x = np.array(x, dtype=np.float32, order="C", copy=True)  # never normalise the caller's array
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if bad.size:
            raise ValueError(f"{what} rows {bad[:10].tolist()} contain NaN or inf; check the extractor output")
        norms = np.linalg.norm(x, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms < 1e-12))
        if bad.size:
            raise ValueError(f"{what} rows {bad[:10].tolist()} are all-zero (or overflow float32); "
                             "they have no direction to compare")
        x /= norms[:, None]
        return x

    @staticmethod
    def _labels(labels: Sequence[str] | str, n: int) -> list[str]:
        if isinstance(labels, str):  # one label for the whole batch (e.g. many views of one product)
            labels = [labels] * n
        labels = list(labels)
        if len(labels) != n:
            raise ValueError(f"got {n} vectors but {len(labels)} labels; pass one label per vector")
        for i, label in enumerate(labels):
            if not isinstance(label, str) or not label.strip():
                raise ValueError(f"label {i} is {label!r}; labels must be non-empty strings")
        return labels

    @staticmethod
    def _metadata(metadata: Sequence[Mapping[str, Any] | None] | None, n: int) -> list[dict[str, Any]]:
        if metadata is None:
            return [{} for _ in range(n)]
        metadata = list(metadata)
        if len(metadata) != n:
            raise ValueError(f"got {n} vectors but {len(metadata)} metadata entries; pass one per vector")
        out = []
        for i, meta in enumerate(metadata):
            meta = dict(meta or {})
            if clash := RESERVED_KEYS & set(meta):
                raise ValueError(f"metadata {i} uses reserved key(s) {sorted(clash)}")
            if not all(isinstance(k, str) for k in meta):
                raise ValueError(f"metadata {i} has non-string keys; it must be a JSON object")
            try:
                json.dumps(meta, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metadata {i} is not JSON-serialisable: {exc}") from None
            out.append(meta)
        return out
