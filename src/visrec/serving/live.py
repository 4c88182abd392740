"""What a serving worker holds: the recognition system it serves, kept current without restarts.

Shared by the BentoML service and anything else that serves (plain Python, unit-tested
without a server):

* **Which models**: the champion when ``serve.champion`` is on and one is published, else the
  pipeline's latest export (:func:`visrec.serving.champion.served_recognition`).
* **Promotions**: before each request the worker compares the champion's ``current`` link
  with the one it loaded (one readlink); when it moved, models and gallery are reloaded
  together and swapped in at once.
* **Gallery changes** are copy-on-write: load the live gallery from disk, change the copy,
  publish it with the atomic ``Gallery.save``, then swap the reference. A request in flight
  keeps the gallery object it started with, so it never sees half a change. Changes made by
  another worker or tool (``Gallery.current_version`` moved) are picked up the same way. A
  file lock in the gallery directory serialises load-modify-save across workers.
* **Uploaded gallery images** are stored content-addressed under ``serve.upload_dir`` and their
  path recorded in the entry's metadata, so a future champion can re-embed them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from visrec.config import Config
from visrec.index.gallery import Gallery, UnknownIdError, update_lock
from visrec.inference.gallery_ops import best_boxes, check_views, view_boxes
from visrec.inference.pipeline import RecognitionSystem
from visrec.workflows.champion import current_champion, served_recognition
from visrec.utils.fs import resolve_under

logger = logging.getLogger(__name__)
T = TypeVar("T")


class LiveRecognition:
    """A RecognitionSystem that follows promotions and gallery changes on disk."""

    def __init__(self, config: Config, base: str | Path = ".") -> None:
        self.config = config
        self.base = Path(base)
        self.champion_root = resolve_under(config.paths.champion, self.base)
        self.upload_dir = resolve_under(config.serve.upload_dir, self.base)
        self.lock = threading.RLock()  # reload / swap / mutation within this worker
        self.model_lock = threading.Lock()  # Paddle predictors are not thread-safe
        self._load()

    def _load(self) -> None:
        with self.lock:
            settings, champion = served_recognition(self.config, self.base)
            gallery_path = Path(settings.gallery)
            version = Gallery.current_version(gallery_path)
            system = RecognitionSystem.from_config(settings)
            self.settings, self.champion, self.gallery_path = settings, champion, gallery_path
            self.system, self.version = system, version
        ext = system.extractor
        logger.info("serving %s: extractor %s (dim %d, %s), detector %s, gallery %s (%d entries, version %s)",
                    f"champion {champion}" if champion else "the pipeline's latest export", ext.model_dir,
                    ext.dim, ext.fingerprint, settings.detector, gallery_path, len(system.gallery), version)

    def _champion_moved(self) -> bool:
        return self.config.serve.champion and current_champion(self.champion_root) != self.champion

    def refresh(self) -> tuple[RecognitionSystem, Gallery]:
        """Reload what moved on disk (a promotion, another writer's gallery change); return the
        system and gallery a request should use from start to end (a consistent snapshot).
        Cheap when nothing moved: two readlinks."""
        with self.lock:
            if self._champion_moved():
                old = self.champion
                self._load()
                logger.info("champion changed: %s -> %s; models and gallery reloaded", old, self.champion)
                return self.system, self.system.gallery
            version = Gallery.current_version(self.gallery_path)
            if version != self.version:
                gallery = Gallery.load(self.gallery_path, expected_fingerprint=self.system.extractor.fingerprint,
                                       num_threads=self.settings.num_threads)
                self.system.set_gallery(gallery)
                logger.info("reloaded gallery %s: version %s -> %s (%d entries)", self.gallery_path,
                            self.version, version, len(gallery))
                self.version = version
            return self.system, self.system.gallery

    def mutate(self, change: Callable[[Gallery], T]) -> tuple[T, Gallery]:
        """Apply ``change(gallery)`` to a fresh copy of the live gallery, publish it, swap it in.

        ``change`` raising leaves the saved gallery as it was."""
        with self.lock:
            self.refresh()  # a promotion since the last request: change the new champion's gallery
            with update_lock(self.gallery_path):
                gallery = Gallery.load(self.gallery_path, expected_fingerprint=self.system.extractor.fingerprint,
                                       num_threads=self.settings.num_threads)
                result = change(gallery)
                gallery.save(self.gallery_path)
                self.system.set_gallery(gallery)
                self.version = Gallery.current_version(self.gallery_path)
                return result, gallery

    def embed(self, images: Sequence[np.ndarray], system: RecognitionSystem | None = None) -> np.ndarray:
        system = system or self.system
        with self.model_lock:
            return system.extractor.embed(list(images))

    def describe(self, image: np.ndarray, system: RecognitionSystem | None = None):
        """Boxes and their embeddings (``RecognitionSystem.describe``) under the model lock."""
        system = system or self.system
        with self.model_lock:
            return system.describe(image)

    def store_upload(self, data: bytes, suffix: str = ".jpg") -> Path:
        """Keep an uploaded gallery image (content-addressed, written atomically); returns its path."""
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(data).hexdigest()[:24]
        path = self.upload_dir / f"{digest}{suffix.lower() if suffix else '.img'}"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp-{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return path.resolve()

    def add_images(self, arrays: Sequence[np.ndarray], labels: Sequence[str],
                   stored: Sequence[Path | None]) -> tuple[list[int], Gallery]:
        """Embed images as their gallery views (``recognition.gallery_views``, as ``visrec gallery
        add`` does) and add them under ``labels`` (metadata: source, time, stored path, view).

        Raises ValueError (nothing added) if any image gives no usable embedding."""
        system, _ = self.refresh()
        views = self.settings.gallery_views
        check_views(views)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        crops, entry_labels, metadata = [], [], []
        with self.model_lock:
            detected = (best_boxes(system.detector, arrays) if system.detector is not None and "object" in views
                        else [None] * len(arrays))
        for array, label, path, box in zip(arrays, labels, stored, detected, strict=True):
            for view, view_box in view_boxes(views, None, box):
                crops.append(array if view_box is None else system.extractor.crop(array, view_box))
                entry_labels.append(label)
                metadata.append({"source": "api", "added": now, "view": view,
                                 **({"path": str(path)} if path is not None else {}),
                                 **({"box": [round(v, 2) for v in view_box]} if view_box is not None else {})})
        vectors = self.embed(crops, system)
        norms = np.linalg.norm(vectors, axis=1)
        if not np.all(np.isfinite(norms) & (norms > 1e-6)):
            raise ValueError("the extractor gives no usable embedding for some of these images; nothing was added")
        fingerprint = system.extractor.fingerprint

        def change(gallery: Gallery) -> list[int]:
            if gallery.fingerprint and gallery.fingerprint != fingerprint:  # promoted while we embedded
                raise RuntimeError("the champion changed while these images were embedded; send them again")
            return gallery.add(vectors, entry_labels, metadata)

        return self.mutate(change)

    def remove(self, ids: Sequence[int] | None = None, label: str | None = None) -> tuple[int, Gallery]:
        """Remove entries by ``ids`` or every entry of ``label``; returns (removed, gallery).

        Raises ValueError for a bad request and UnknownIdError when nothing matches (nothing
        is saved then)."""
        if (ids is None) == (label is None):
            raise ValueError("give exactly one of 'ids' (a list of gallery ids) or 'label'")
        if ids is not None and not ids:
            raise ValueError("'ids' is empty")

        def change(gallery: Gallery) -> int:
            if label is None:
                return gallery.remove(ids)
            removed = gallery.remove_label(label)
            if removed == 0:
                raise UnknownIdError(f"no gallery entries with label {label!r}")
            return removed

        return self.mutate(change)
