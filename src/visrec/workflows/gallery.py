"""Building and changing a gallery: the one implementation behind ``visrec gallery``, the
gallery-update DAG and the service.

* :func:`change_gallery`   lock, load, change, save: every gallery change goes through it, so two
                           writers (service workers, the DAG, the CLI) never lose each other's update
* :func:`build_from_list`  a new gallery from a list file, embedded by the served extractor
* :func:`add_from_list`    add a list file's images to the served gallery
* :func:`update_served_gallery`  the gallery-update DAG: validate a label file's images, add them to the served gallery
* :func:`check_gallery_update` / :func:`validate_gallery_images`  refuse bad images before any embedding
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from visrec.config import Config, RecognitionConfig, load_config
from visrec.data.manifest import probe_image
from visrec.index.factory import copy_to_milvus, create_gallery, open_gallery, update_lock
from visrec.index.milvus_store import MilvusSettings
from visrec.index.gallery_api import GalleryBase
from visrec.inference.gallery_ops import GalleryItem, add_items, fill_gallery, items_from_list
from visrec.inference.pipeline import load_detector, load_extractor
from visrec.workflows.champion import served_recognition

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_LISTED_PROBLEMS = 5


def change_gallery(path: str | Path, change: Callable[[GalleryBase], T], *, expected_fingerprint: str | None = None,
                   num_threads: int = 2,
                   after_save: Callable[[GalleryBase], None] | None = None) -> tuple[T, GalleryBase]:
    """Apply ``change(gallery)`` to the gallery at ``path`` and publish the result as a new version.

    Load-change-save runs under the gallery's update lock; so does ``after_save(gallery)``, for
    work that must see exactly this version (e.g. deleting files no entry refers to any more).
    ``change`` raising leaves the saved gallery as it was (a backend that writes through, Milvus,
    undoes what the change did). Returns what ``change`` returned and the changed gallery.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no gallery at {path}: build one first "
                                "(the build_index stage or `visrec gallery build LIST`)")
    with update_lock(path):
        gallery = open_gallery(path, expected_fingerprint=expected_fingerprint, num_threads=num_threads)
        try:
            result = change(gallery)
            gallery.save(path)
        except BaseException:
            gallery.discard_changes()
            raise
        if after_save is not None:
            after_save(gallery)
    return result, gallery


def migrate_gallery(cfg: Config, path: str | Path) -> dict[str, Any]:
    """``visrec gallery migrate --to milvus``: the Faiss gallery at ``path`` copied into Milvus
    (params ``index.milvus``) and served from there (:func:`visrec.index.factory.copy_to_milvus`)."""
    source, target = copy_to_milvus(path, MilvusSettings.from_config(cfg.index.milvus), cfg.recognition.num_threads)
    info = target.info()
    logger.info("migrated gallery %s to Milvus: %d entries, alias %s -> %s", path, len(target), info["alias"],
                info["collection"])
    return {"gallery": str(path), "entries": len(target), "next_id": target.next_id,
            "fingerprint": target.fingerprint,
            "from": {"index_type": source.index_type, "version": source.version, "count": len(source)},
            "to": {k: info[k] for k in ("uri", "alias", "collection", "version", "index_type")}}


def object_view_detector(rec: RecognitionConfig):
    """The detector that finds the ``object`` view of gallery images (None when not needed)."""
    return load_detector(rec) if "object" in rec.gallery_views else None


def build_from_list(cfg: Config, list_file: str | Path, root: str | Path | None = None) -> GalleryBase:
    """A new gallery of the list file's images, as ``recognition.gallery_views``, saved to
    ``recognition.gallery`` (the old one is replaced only once the new one is complete)."""
    rec = cfg.recognition
    items = read_items(list_file, root, cfg.index.delimiter)
    extractor = load_extractor(rec)
    # The same list, views, extractor and target resume an interrupted (Milvus) build.
    key = hashlib.sha1(json.dumps([Path(list_file).read_text(encoding="utf-8"), str(root), rec.gallery_views,
                                   extractor.fingerprint, str(Path(rec.gallery).resolve())]).encode()).hexdigest()[:16]
    gallery = create_gallery(cfg.index, extractor.dim, fingerprint=extractor.fingerprint, num_threads=rec.num_threads,
                             meta_extra={"source": str(list_file)}, resume_key=key)
    fill_gallery(gallery, extractor, items, cfg.index.batch_size, views=rec.gallery_views,
                 detector=object_view_detector(rec))  # interrupted: a Milvus build stays to be resumed
    gallery.save(rec.gallery)
    return gallery


def add_items_to_gallery(cfg: Config, items: Sequence[GalleryItem], progress: bool = True) -> dict[str, Any]:
    """Embed ``items`` with the extractor ``cfg.recognition`` names and add them to its gallery,
    as a new gallery version. Nothing is added unless every image embeds."""
    rec = cfg.recognition
    extractor = load_extractor(rec)
    detector = object_view_detector(rec)

    def add(gallery: GalleryBase) -> tuple[int, str | None, list[int]]:
        before, old_version = len(gallery), gallery.version
        ids = add_items(gallery, extractor, items, batch_size=cfg.index.batch_size, progress=progress,
                        views=rec.gallery_views, detector=detector)
        return before, old_version, ids

    (before, old_version, ids), gallery = change_gallery(
        rec.gallery, add, expected_fingerprint=extractor.fingerprint, num_threads=rec.num_threads)
    return {"added": len(ids), "ids": ids, "labels": sorted({i.label for i in items}), "count_before": before,
            "count": len(gallery), "old_version": old_version, "version": gallery.version,
            "gallery": str(rec.gallery)}


def add_from_list(cfg: Config, list_file: str | Path, root: str | Path | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """:func:`add_items_to_gallery` for the images of a list file (``relative/path<delimiter>label``)."""
    return add_items_to_gallery(cfg, read_items(list_file, root, cfg.index.delimiter), progress)


def read_items(list_file: str | Path, root: str | Path | None, delimiter: str) -> list[GalleryItem]:
    # Absolute paths: they are stored in the gallery so a future champion can re-embed the images.
    root = Path(root if root is not None else Path(list_file).parent).resolve()
    items = items_from_list(list_file, root=root, delimiter=delimiter)
    if not items:
        raise ValueError(f"{list_file} lists no images")
    return items


def validate_gallery_images(items: Sequence[GalleryItem], min_width: int, min_height: int) -> list[str]:
    """Problems with new gallery images (empty list: all good).

    The checks of the validate stage's ``file_decodes`` and ``min_size`` rules, on the same
    probe (:func:`visrec.data.manifest.probe_image`: exists, full decode, size), plus a
    non-empty label. Done directly, not through a Great Expectations suite (GX takes ~10 s to
    import for a handful of images).
    """
    problems = []
    for item in items:
        path, label = Path(item.path), item.label
        if not isinstance(label, str) or not label.strip():
            problems.append(f"{path}: empty label")
        probe = probe_image(path)
        if not probe["exists"]:
            problems.append(f"{path}: file not found (file_decodes)")
        elif not probe["decodes"]:
            problems.append(f"{path}: does not decode as an image (file_decodes)")
        elif probe["width"] < min_width or probe["height"] < min_height:
            problems.append(f"{path}: {probe['width']}x{probe['height']} is smaller than "
                            f"{min_width}x{min_height} (min_size)")
    return problems


def check_items(cfg: Config, items: Sequence[GalleryItem], source: str | Path) -> None:
    """Raise ValueError listing up to five problems of ``items`` (see :func:`validate_gallery_images`)."""
    problems = validate_gallery_images(items, cfg.validate.min_width, cfg.validate.min_height)
    if problems:
        more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise ValueError(f"{len(problems)} problem(s) in {source}; nothing was added:\n  "
                         + "\n  ".join(problems[:MAX_LISTED_PROBLEMS]) + more)


def check_gallery_update(cfg: Config, images_dir: str | Path, label_file: str | Path) -> dict[str, Any]:
    """Read and validate a label file of new images (paths relative to ``images_dir``)."""
    items = read_items(label_file, images_dir, cfg.index.delimiter)
    check_items(cfg, items, label_file)
    return {"images": len(items), "labels": sorted({i.label for i in items})}


def update_gallery(cfg: Config, images_dir: str | Path, label_file: str | Path) -> dict[str, Any]:
    """Validate the label file's images, then add them to the gallery ``cfg.recognition`` names.

    Invalid images raise ValueError before anything is embedded or saved."""
    items = read_items(label_file, images_dir, cfg.index.delimiter)
    check_items(cfg, items, label_file)
    result = add_items_to_gallery(cfg, items, progress=False)
    logger.info("gallery update: %s", result)
    return result


def update_served_gallery(params_path: str | Path, images_dir: str | Path, label_file: str | Path) -> dict[str, Any]:
    """:func:`update_gallery` on what is served: the champion's gallery and extractor when there is
    one and ``serve.champion`` is on, else ``recognition.gallery`` / ``recognition.extractor``.
    Relative paths in the params file are resolved against its folder (the repo root)."""
    params_path = Path(params_path).resolve()
    cfg = load_config(params_path)
    rec, champion = served_recognition(cfg, params_path.parent)
    return {**update_gallery(dataclasses.replace(cfg, recognition=rec), images_dir, label_file), "champion": champion}
