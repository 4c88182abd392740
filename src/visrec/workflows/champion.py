"""The champion: the promoted models and their gallery, published together, served together.

The pipeline's outputs (``data/export``, ``data/gallery``) are the *candidate*: every
``dvc repro`` rewrites them. What users query is the *champion*, a copy made by the promotion
gate only when the candidate is no worse than the champion it replaces::

    data/champion/
      current -> c000002-1a2b3c4d      # the live champion: one symlink swap publishes it
      c000002-1a2b3c4d/
        export/extractor, export/detector
        gallery/                         # a Gallery root (its own versions; the service adds here)
        champion.json                    # metrics, reason, git commit, time, carried-over changes
        base_entries.json                # the candidate gallery's (path, label) keys at publication

Models and gallery switch in one step (the ``current`` link), so a reader never pairs the new
extractor with the old gallery. A server polls ``current`` (one readlink) and reloads both.

Gallery changes made on the live champion (``/gallery/add``, the gallery-update DAG,
``/gallery/remove``) survive a promotion: additions are re-embedded by the new extractor from
their stored image paths, and entries removed from the old champion's base stay removed.
An addition whose image file is gone cannot be re-embedded: it is dropped, counted and named
in ``champion.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from visrec.config import Config, RecognitionConfig
from visrec.utils.fs import resolve_under

logger = logging.getLogger(__name__)

CURRENT_LINK = "current"
RECORD_FILE = "champion.json"
BASE_ENTRIES_FILE = "base_entries.json"
_PREFIX = "c"


def current_champion(root: str | Path) -> str | None:
    """Name of the live champion under ``root`` (one readlink), or None when there is none."""
    try:
        return os.readlink(Path(root) / CURRENT_LINK)
    except OSError:
        return None


def champion_record(root: str | Path) -> dict[str, Any] | None:
    name = current_champion(root)
    if name is None:
        return None
    path = Path(root) / name / RECORD_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def served_recognition(cfg: Config, base: str | Path = ".") -> tuple[RecognitionConfig, str | None]:
    """The ``recognition`` settings with the paths of what to serve, and the champion's name.

    With ``serve.champion`` on and a champion published under ``paths.champion``: its models
    and gallery. Otherwise the pipeline's latest outputs (``recognition.*``), champion None.
    Relative paths are resolved against ``base`` (the folder of the params file).
    """
    base = Path(base)
    rec = cfg.recognition
    root = resolve_under(cfg.paths.champion, base)
    name = current_champion(root) if cfg.serve.champion else None
    if name is None:
        if cfg.serve.champion:
            logger.info("no champion under %s yet (the promotion gate publishes one); serving the pipeline's "
                        "latest export", root)
        resolved = dataclasses.replace(
            rec, extractor=str(resolve_under(rec.extractor, base)), gallery=str(resolve_under(rec.gallery, base)),
            detector=str(resolve_under(rec.detector, base)) if rec.detector else None)
        return resolved, None
    live = root / CURRENT_LINK  # through the link: a server holding these paths follows promotions
    detector = str(live / "export" / "detector") if rec.detector else None
    return dataclasses.replace(rec, extractor=str(live / "export" / "extractor"), detector=detector,
                               gallery=str(live / "gallery")), name


# ----------------------------------------------------------------------------- publishing


def _image_label_key(label: str, metadata: dict[str, Any]) -> str:
    """An entry's image path and label, as ``base_entries.json`` keeps them (``path<TAB>label``;
    the views of one image share a key). Files already published are read with it: keep the format."""
    return f"{metadata.get('path', '')}\t{label}"


def _entries(gallery) -> list[tuple[int, str, dict[str, Any]]]:
    return list(gallery.entries())  # streamed by the backend, one call per page (not per entry)


def _carry_over(candidate, old_root: Path, extractor, batch_size: int) -> dict[str, Any]:
    """Apply the live changes of the old champion (``old_root``) to ``candidate``, in place."""
    from visrec.index.factory import open_gallery
    from visrec.inference.gallery_ops import GalleryItem, embed_items

    base_file = old_root / BASE_ENTRIES_FILE
    old_base = set(json.loads(base_file.read_text(encoding="utf-8"))) if base_file.is_file() else set()
    old_live = open_gallery(old_root / "gallery")
    live_keys = {_image_label_key(label, meta) for _, label, meta in _entries(old_live)}
    removed = old_base - live_keys
    drop = [i for i, label, meta in _entries(candidate) if _image_label_key(label, meta) in removed]
    if drop:
        candidate.remove(drop)
    additions = [(label, meta) for _, label, meta in _entries(old_live)
                 if _image_label_key(label, meta) not in old_base]
    usable = [(label, meta) for label, meta in additions if meta.get("path") and Path(meta["path"]).is_file()]
    lost = [f"{meta.get('path') or '<no stored image>'} ({label})" for label, meta in additions
            if (label, meta) not in usable]
    if usable:
        items = [GalleryItem(Path(meta["path"]), label, tuple(meta["box"]) if meta.get("box") else None)
                 for label, meta in usable]
        vectors = embed_items(extractor, items, batch_size, progress=False, desc="re-embedding additions")
        candidate.add(vectors, [label for label, _ in usable], [meta for _, meta in usable])
    if lost:
        logger.warning("%d gallery addition(s) could not be carried over (image file gone), e.g. %s",
                       len(lost), lost[0])
    return {"removed_again": len(drop), "additions_reembedded": len(usable), "additions_lost": lost[:20],
            "additions_lost_count": len(lost)}


def publish_champion(export_dir: str | Path, gallery_dir: str | Path, champion_root: str | Path,
                     record: dict[str, Any], *, num_threads: int = 2, batch_size: int = 64,
                     keep: int = 2) -> str:
    """Publish ``export_dir`` (extractor + detector) with a copy of the gallery at ``gallery_dir``
    as the new champion; returns its name. Atomic: a failure leaves the old champion live.

    The old champion's live gallery changes are carried over (see the module doc). The old
    champion's gallery update lock is held throughout, so no service write slips in between.

    A Milvus gallery is published under the champions' served name (an alias) by moving the
    alias just before the ``current`` link: a server that sees the new gallery before the new
    models keeps the old pair until the link moves (``visrec.serving.live``); if the link
    cannot be moved, the alias is moved back.
    """
    from visrec.index.factory import adopt_served_name, open_gallery, update_lock
    from visrec.inference.export import read_model_json
    from visrec.inference.extractor_runtime import Extractor

    export_dir, gallery_dir, root = Path(export_dir), Path(gallery_dir), Path(champion_root)
    for kind in ("extractor", "detector"):
        read_model_json(export_dir / kind)  # refuses a missing or incomplete export, naming it
    root.mkdir(parents=True, exist_ok=True)
    old_name = current_champion(root)
    old_root = root / old_name if old_name else None
    lock = update_lock(old_root / "gallery") if old_root is not None else _NoLock()
    with lock:
        number = 1 + max((int(p.name[1:7]) for p in root.glob(f"{_PREFIX}[0-9]*") if p.name[1:7].isdigit()),
                         default=0)
        name = f"{_PREFIX}{number:06d}-{uuid.uuid4().hex[:8]}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        gallery = None
        try:
            shutil.copytree(export_dir, tmp / "export", symlinks=False)
            extractor = Extractor(tmp / "export" / "extractor", num_threads=num_threads)
            # A working copy: carrying changes over must not touch the candidate (a Milvus write goes through).
            gallery = open_gallery(gallery_dir, expected_fingerprint=extractor.fingerprint,
                                   num_threads=num_threads).working_copy()
            base_keys = sorted({_image_label_key(label, meta) for _, label, meta in _entries(gallery)})
            carried = _carry_over(gallery, old_root, extractor, batch_size) if old_root is not None else {}
            (tmp / BASE_ENTRIES_FILE).write_text(json.dumps(base_keys, ensure_ascii=False) + "\n", encoding="utf-8")
            full_record = {**record, "name": name, "previous": old_name,
                           "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
                           "extractor_fingerprint": extractor.fingerprint,
                           "gallery_entries": len(gallery), **carried}
            (tmp / RECORD_FILE).write_text(json.dumps(full_record, indent=2) + "\n", encoding="utf-8")
            adopt_served_name(gallery, tmp / "gallery", old_root / "gallery" if old_root is not None else root)
            gallery.save(tmp / "gallery")  # Milvus: the alias moves here, right before the link
            os.rename(tmp, root / name)
            link = root / f".{CURRENT_LINK}.tmp-{uuid.uuid4().hex[:8]}"
            os.symlink(name, link)
            os.replace(link, root / CURRENT_LINK)  # the commit point
        except BaseException:
            if gallery is not None:
                gallery.revert_publish()
                gallery.release()
            shutil.rmtree(tmp, ignore_errors=True)
            if (root / name).is_dir() and current_champion(root) != name:
                shutil.rmtree(root / name, ignore_errors=True)
            raise
    _prune(root, keep, name)
    logger.info("published champion %s (previous %s): %d gallery entries", name, old_name, len(gallery))
    return name


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _prune(root: Path, keep: int, current: str) -> None:
    """Keep the newest ``keep`` champions (a reader holding the previous one gets a grace period)."""
    names = sorted((p.name for p in root.glob(f"{_PREFIX}[0-9]*") if p.is_dir()), reverse=True)
    for name in names[keep:]:
        if name != current:
            shutil.rmtree(root / name, ignore_errors=True)
    for stale in root.glob(f".{_PREFIX}*.tmp-*"):  # crashed publications
        shutil.rmtree(stale, ignore_errors=True)
