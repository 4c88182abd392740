"""What a serving worker holds: the recognition system it serves, kept current without restarts.

Shared by the BentoML service and anything else that serves (plain Python, unit-tested
without a server):

* **Which models**: the champion when ``serve.champion`` is on and one is published, else the
  pipeline's latest export (:func:`visrec.workflows.champion.served_recognition`).
* **Promotions**: before each request the worker compares the champion's ``current`` link
  with the one it loaded (one readlink); when it moved, models and gallery are reloaded
  together and swapped in at once.
* **Gallery changes** go through ``workflows.change_gallery``: open the live gallery, change it,
  publish it (Faiss: a new version directory, copy-on-write; Milvus: the rows are written
  through and the change committed), then swap the reference. A request in flight keeps the
  gallery object it started with. Changes made by another worker or tool
  (``visrec.index.factory.gallery_version`` moved) are picked up the same way, read before
  every request or at most every ``serve.gallery_poll_s`` seconds. A file lock in
  the gallery directory serialises load-modify-save across workers.
* **Either backend** (``visrec.index.factory``): a Milvus promotion moves the gallery's alias
  just before the champion link; a worker that sees a gallery of another extractor before the
  link moves keeps serving the old pair (its collection is kept) until it does.
* **Uploaded gallery images** are stored under ``serve.upload_dir``, named by content hash and
  decoded format, and their path recorded in the entry's metadata, so a future champion can
  re-embed them. A stored file no entry refers to any more (after a removal) is deleted, and
  so are writes a crash interrupted (at start-up).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from visrec.config import Config
from visrec.index.factory import gallery_version, open_gallery, update_lock
from visrec.index.gallery_api import GalleryBase, GalleryMismatchError
from visrec.inference.gallery_ops import best_boxes, check_views, view_boxes
from visrec.inference.pipeline import RecognitionSystem
from visrec.workflows.champion import current_champion, served_recognition
from visrec.workflows.gallery import change_gallery
from visrec.serving.errors import BadRequest, Conflict, NotFound, UnprocessableContent
from visrec.utils.fs import resolve_under

logger = logging.getLogger(__name__)
T = TypeVar("T")
TMP_PREFIX = ".tmp-"  # an upload being written (left behind only by an interrupted save)


class LiveRecognition:
    """A RecognitionSystem that follows promotions and gallery changes on disk."""

    def __init__(self, config: Config, base: str | Path = ".") -> None:
        self.config = config
        self.base = Path(base)
        self.champion_root = resolve_under(config.paths.champion, self.base)
        self.upload_dir = resolve_under(config.serve.upload_dir, self.base)
        self.lock = threading.RLock()  # reload / swap / mutation within this worker
        # Every model call runs on this one thread: Paddle predictors are not thread-safe, and
        # Paddle's oneDNN caches are kept per calling thread, so calls from a pool of request
        # threads multiplied them (a worker grew to 2.2 GB instead of 0.56 GB at 16 clients).
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="visrec-model")
        self._model_thread_id: int | None = None
        if config.serve.gallery_poll_s < 0:
            raise ValueError(f"serve.gallery_poll_s must be >= 0 seconds, got {config.serve.gallery_poll_s}")
        self._version_read_at = float("-inf")  # time.monotonic() of the last gallery_version read
        self._load()

    def _load(self) -> None:
        with self.lock:
            settings, champion = served_recognition(self.config, self.base)
            gallery_path = Path(settings.gallery)
            version = self._read_version(gallery_path)
            system = RecognitionSystem.from_config(settings)
            self.settings, self.champion, self.gallery_path = settings, champion, gallery_path
            self.system, self.version = system, version
        ext = system.extractor
        logger.info("serving %s: extractor %s (dim %d, %s), detector %s, gallery %s (%d entries, version %s)",
                    f"champion {champion}" if champion else "the pipeline's latest export", ext.model_dir,
                    ext.dim, ext.fingerprint, settings.detector, gallery_path, len(system.gallery), version)

    def _read_version(self, gallery_path: Path) -> str | None:
        self._version_read_at = time.monotonic()
        return gallery_version(gallery_path)

    def _champion_moved(self) -> bool:
        return self.config.serve.champion and current_champion(self.champion_root) != self.champion

    def refresh(self) -> tuple[RecognitionSystem, GalleryBase]:
        """Reload what moved on disk (a promotion, another writer's gallery change); return the
        system and gallery a request should use from start to end (a consistent snapshot).
        Cheap when nothing moved: two readlinks."""
        with self.lock:
            if self._champion_moved():
                old = self.champion
                self._load()
                logger.info("champion changed: %s -> %s; models and gallery reloaded", old, self.champion)
                return self.system, self.system.gallery
            if time.monotonic() - self._version_read_at < self.config.serve.gallery_poll_s:
                return self.system, self.system.gallery
            version = self._read_version(self.gallery_path)
            if version != self.version:
                try:
                    gallery = open_gallery(self.gallery_path, expected_fingerprint=self.system.extractor.fingerprint,
                                           num_threads=self.settings.num_threads)
                except GalleryMismatchError:
                    # A promotion on Milvus moves the gallery's alias just before the champion link:
                    # keep serving the old pair (its collection is kept) until the link moves.
                    logger.info("gallery %s moved to another extractor's; waiting for the champion link",
                                self.gallery_path)
                    return self.system, self.system.gallery
                self.system.set_gallery(gallery)
                logger.info("reloaded gallery %s: version %s -> %s (%d entries)", self.gallery_path,
                            self.version, version, len(gallery))
                self.version = version
            return self.system, self.system.gallery

    def mutate(self, change: Callable[[GalleryBase], T], prune: bool = False) -> tuple[T, GalleryBase]:
        """Apply ``change(gallery)`` to a fresh copy of the live gallery, publish it, swap it in;
        with ``prune``, then delete the stored uploads no entry refers to any more.

        ``change`` raising leaves the saved gallery as it was."""
        def published(gallery: GalleryBase) -> None:  # still under the gallery's update lock
            self.system.set_gallery(gallery)
            self.version = self._read_version(self.gallery_path)
            if prune:
                self._prune_uploads(gallery)

        with self.lock:
            self.refresh()  # a promotion since the last request: change the new champion's gallery
            return change_gallery(self.gallery_path, change, expected_fingerprint=self.system.extractor.fingerprint,
                                  num_threads=self.settings.num_threads, after_save=published)

    def run_model(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the model thread (one call at a time, always the same thread)."""
        if threading.get_ident() == self._model_thread_id:
            return fn(*args)

        def call() -> T:
            self._model_thread_id = threading.get_ident()
            return fn(*args)

        return self._model_thread.submit(call).result()

    def embed(self, images: Sequence[np.ndarray], system: RecognitionSystem | None = None) -> np.ndarray:
        system = system or self.system
        return self.run_model(system.extractor.embed, list(images))

    def describe(self, image: np.ndarray, system: RecognitionSystem | None = None,
                 gallery: GalleryBase | None = None):
        """Boxes and their embeddings (``RecognitionSystem.describe``, its cascade searching
        ``gallery``: the request's snapshot) on the model thread."""
        system = system or self.system
        return self.run_model(system.describe, image, gallery)

    # ------------------------------------------------------------------ stored uploads
    # Written, and pruned, only under the gallery's update lock (inside ``mutate``): no other
    # worker can then be between storing a file and saving the entry that refers to it.

    def _store_upload(self, data: bytes, extension: str) -> Path:
        """Keep an uploaded gallery image, named by its content hash and decoded format
        (never the client's file name), written atomically; returns its path."""
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(data).hexdigest()[:24]
        path = self.upload_dir / f"{digest}{extension}"
        if not path.exists():
            tmp = self.upload_dir / f"{TMP_PREFIX}{path.name}.{threading.get_ident()}"
            tmp.write_bytes(data)
            tmp.replace(path)
        return path.resolve()

    def _prune_uploads(self, gallery: GalleryBase) -> int:
        """Delete stored uploads no entry of ``gallery`` refers to, and interrupted writes."""
        if not self.upload_dir.is_dir():
            return 0
        root = self.upload_dir.resolve()
        referenced = set()
        for _, _, meta in gallery.entries():
            stored = meta.get("path")
            if stored and Path(stored).parent == root:
                referenced.add(Path(stored).name)
        removed = 0
        for path in root.iterdir():
            if path.is_file() and path.name not in referenced:
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.info("deleted %d stored upload(s) no gallery entry refers to", removed)
        return removed

    def clean_uploads(self) -> int:
        """At start-up: delete interrupted writes and uploads the live gallery no longer uses."""
        if not self.upload_dir.is_dir() or not self.gallery_path.is_dir():
            return 0
        with self.lock, update_lock(self.gallery_path):
            gallery = open_gallery(self.gallery_path, num_threads=self.settings.num_threads)
            return self._prune_uploads(gallery)

    def add_images(self, arrays: Sequence[np.ndarray], labels: Sequence[str],
                   uploads: Sequence[tuple[bytes, str] | None]) -> tuple[list[int], GalleryBase]:
        """Embed images as their gallery views (``recognition.gallery_views``, as ``visrec gallery
        add`` does) and add them under ``labels`` (metadata: source, time, stored path, view).
        ``uploads``: per image, (its bytes, extension) to keep under ``serve.upload_dir`` (so a
        future champion can re-embed it), or None.

        Raises UnprocessableContent (nothing added) if any image gives no usable embedding, and
        Conflict if a promotion raced the embedding."""
        system, _ = self.refresh()
        views = self.settings.gallery_views
        check_views(views)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        crops, entry_labels, metadata = [], [], []
        detected = (self.run_model(best_boxes, system.detector, arrays)
                    if system.detector is not None and "object" in views else [None] * len(arrays))
        owners = []  # the upload each entry comes from
        for index, (array, label, box) in enumerate(zip(arrays, labels, detected, strict=True)):
            for view, view_box in view_boxes(views, None, box):
                crops.append(array if view_box is None else system.extractor.crop(array, view_box))
                entry_labels.append(label)
                owners.append(index)
                metadata.append({"source": "api", "added": now, "view": view,
                                 **({"box": [round(v, 2) for v in view_box]} if view_box is not None else {})})
        vectors = self.embed(crops, system)
        norms = np.linalg.norm(vectors, axis=1)
        if not np.all(np.isfinite(norms) & (norms > 1e-6)):
            raise UnprocessableContent("the extractor gives no usable embedding for some of these images; nothing was added")
        fingerprint = system.extractor.fingerprint

        def change(gallery: GalleryBase) -> list[int]:
            if gallery.fingerprint and gallery.fingerprint != fingerprint:  # promoted while we embedded
                raise Conflict("the champion changed while these images were embedded; send them again")
            paths = [None if upload is None else self._store_upload(*upload) for upload in uploads]
            for meta, owner in zip(metadata, owners, strict=True):
                if paths[owner] is not None:
                    meta["path"] = str(paths[owner])
            return gallery.add(vectors, entry_labels, metadata)

        return self.mutate(change)

    def remove(self, ids: Sequence[int] | None = None, label: str | None = None) -> tuple[int, GalleryBase]:
        """Remove entries by ``ids`` or every entry of ``label``; returns (removed, gallery).

        Raises BadRequest for a bad request and NotFound when an id or the label is not in the
        gallery (nothing is removed then)."""
        if (ids is None) == (label is None):
            raise BadRequest("give exactly one of 'ids' (a list of gallery ids) or 'label'")
        if ids is not None and not ids:
            raise BadRequest("'ids' is empty")

        def change(gallery: GalleryBase) -> int:
            if label is None:
                unknown = sorted({int(i) for i in ids if int(i) not in gallery})
                if unknown:
                    shown = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
                    raise NotFound(f"no gallery entries with id(s) {shown}: nothing was removed")
                return gallery.remove(ids)
            removed = gallery.remove_label(label)
            if removed == 0:
                raise NotFound(f"no gallery entries with label {label!r}")
            return removed

        return self.mutate(change, prune=True)
