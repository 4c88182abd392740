"""The gallery on disk: a directory of immutable versions and a ``current`` link to the live one.

    G/current -> v000002-1f3a9c2e     (swapped atomically with os.replace)
    G/v000001-.../  G/v000002-.../    (index.faiss, labels.jsonl, meta.json[, id_map.npy, tombstones.npy])

:func:`publish_version` writes ``G/.tmp-*``, fsyncs it, renames it to the next version and
swaps the link, so a reader sees the old or the new gallery, never half of one, and a crash
mid-save leaves the old one loadable. Labels and metadata are JSON (``ensure_ascii=False``),
never pickle. :func:`current_version` is a cheap poll for servers that hot-reload.
What a gallery *is* (search, add, remove) is :class:`visrec.index.gallery.Gallery`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from visrec.index.faiss_index import IndexBackend, backend_class, set_num_threads
from visrec.utils.fs import file_lock, fsync_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
LABELS_FILE = "labels.jsonl"
CURRENT_LINK = "current"
LOCK_FILE = ".lock"
MILVUS_POINTER = "milvus.json"  # visrec.index.milvus_store.POINTER_FILE: this directory serves a Milvus gallery
_VERSION_RE = re.compile(r"^v(\d{6,})-[0-9a-f]{8}$")
BUILD_HINT = "build one with `visrec gallery build LIST`"
Entries = dict[int, tuple[str, dict[str, Any]]]  # id -> (label, metadata)


class GalleryNotFoundError(FileNotFoundError):
    """The path holds no gallery."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


UPDATE_LOCK_FILE = ".update.lock"  # not save()'s own lock: this one spans a whole load-modify-save


def update_lock(root: str | Path):
    """Hold this around load -> change -> save of the gallery at ``root``, so concurrent updaters
    (service workers, the gallery-update DAG, ``visrec gallery add``) never overwrite each
    other's change. Readers need no lock."""
    return file_lock(Path(root) / UPDATE_LOCK_FILE)


def writer_lock(root: Path):
    """Serialise writers of one gallery; readers never lock (they follow the symlink)."""
    return file_lock(root / LOCK_FILE)


def versions(root: Path) -> dict[str, int]:
    return {p.name: int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.match(p.name)) and p.is_dir()}




def current_version(root: str | Path) -> str | None:
    """Name of the live version under ``root`` (cheap: one readlink), or None if none.

    It changes on every save, so a server can poll it and reload when it differs.
    If ``current`` is a real directory (a copy or DVC checkout materialised the link),
    that directory is the live version and ``"current"`` is returned.
    """
    link = Path(root) / CURRENT_LINK
    try:
        return os.readlink(link)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:  # EINVAL: not a symlink
        return CURRENT_LINK if link.is_dir() else None


def live_version_dir(path: Path) -> Path:
    """The version directory to read for ``path`` (a gallery root or a version dir)."""
    version = current_version(path)
    if version is not None:
        return path / version
    if (path / META_FILE).is_file():
        return path
    # DVC does not track symlinks: a gallery checked out from its cache has its versions but
    # no ``current`` link. Versions appear only once complete, so the newest one is live.
    numbered = versions(path) if path.is_dir() else {}
    if numbered:
        newest = max(numbered, key=numbered.get)
        logger.warning("%s has no '%s' link (a DVC checkout?); using the newest version %s",
                       path, CURRENT_LINK, newest)
        return path / newest
    if not path.exists():
        raise GalleryNotFoundError(f"no gallery at {path}; {BUILD_HINT}")
    raise GalleryNotFoundError(f"{path} is not a gallery (no '{CURRENT_LINK}' link or {META_FILE}); {BUILD_HINT}")


def read_version(directory: Path, num_threads: int) -> tuple[dict[str, Any], IndexBackend, Entries]:
    """``(meta, index backend, entries)`` of one version directory, checked for consistency."""
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory / META_FILE} has format {meta.get('format')!r}, this code reads "
                         f"format {FORMAT_VERSION}; rebuild the gallery (`visrec gallery build LIST`)")
    set_num_threads(num_threads)  # before reading: HNSW/IVF loading may use OpenMP
    backend = backend_class(meta["index_type"]).read(directory, int(meta["dim"]), meta["index_params"])
    entries: Entries = {}
    with open(directory / LABELS_FILE, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                entries[int(row.pop("id"))] = (row.pop("label"), row)
    if not len(entries) == backend.count == meta["count"]:
        raise ValueError(f"gallery {directory} is inconsistent: meta.json count {meta['count']}, "
                         f"{len(entries)} labels, {backend.count} indexed vectors; rebuild it")
    return meta, backend, entries


def _write_version(directory: Path, backend: IndexBackend, entries: Entries, meta: dict[str, Any]) -> None:
    files = backend.write(directory)
    with open(directory / LABELS_FILE, "w", encoding="utf-8") as handle:
        for i in sorted(entries):
            label, extra = entries[i]
            handle.write(json.dumps({"id": i, "label": label, **extra}, ensure_ascii=False) + "\n")
    meta_text = json.dumps(meta, ensure_ascii=False, indent=2) + "\n"
    (directory / META_FILE).write_text(meta_text, encoding="utf-8")
    for path in [*files, directory / LABELS_FILE, directory / META_FILE]:
        fsync_path(path)
    fsync_path(directory)


def _check_root(root: Path) -> None:
    if (root / MILVUS_POINTER).exists():
        raise ValueError(f"{root} serves a Milvus gallery ({MILVUS_POINTER}); save there with index.backend: "
                         f"milvus, or delete {MILVUS_POINTER} to serve its Faiss versions again")
    if (root / META_FILE).exists():
        raise ValueError(f"{root} is a single gallery version, not a gallery root; save to a new directory")
    root.mkdir(parents=True, exist_ok=True)
    if current_version(root) is None and any(p.name != LOCK_FILE and not p.name.startswith(".")
                                             for p in root.iterdir()):
        raise ValueError(f"refusing to save a gallery into {root}: it is a non-empty directory that is "
                         "not a gallery; choose an empty or new directory")


def publish_version(root: Path, backend: IndexBackend, entries: Entries, meta: dict[str, Any],
                    keep_versions: int = 2) -> tuple[str, dict[str, Any]]:
    """Write a new version of ``root`` and make it live; returns its name and its full meta.json
    (``meta`` plus ``format``, ``version``, ``sequence`` and ``updated``).

    Keeps the newest ``keep_versions`` versions (readers still holding an older one get one
    save's grace). Writers are serialised with a lock file; leftovers of crashed saves are
    cleaned up here.
    """
    if keep_versions < 1:
        raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
    _check_root(root)
    with writer_lock(root):
        for stale in root.glob(".tmp-*"):  # crashed saves (we hold the writer lock)
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.glob(".current.tmp-*"):
            stale.unlink(missing_ok=True)
        _drop_orphans(root)
        version_uuid = uuid.uuid4().hex
        number = max(versions(root).values(), default=0) + 1
        name = f"v{number:06d}-{version_uuid[:8]}"
        meta = {"format": FORMAT_VERSION, **meta, "version": version_uuid, "sequence": number, "updated": now()}
        try:
            json.dumps(meta, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"gallery.meta_extra must be JSON-serialisable: {exc}") from None
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            os.chmod(tmp, 0o755)
            _write_version(tmp, backend, entries, meta)
            os.rename(tmp, root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_path(root)
        link = root / f".current.tmp-{version_uuid}"
        os.symlink(name, link)
        current = root / CURRENT_LINK
        if current.is_dir() and not current.is_symlink():  # materialised copy: make it a version
            os.rename(current, root / f"v000000-{uuid.uuid4().hex[:8]}")  # (brief window, once)
        os.replace(link, root / CURRENT_LINK)  # the commit point
        fsync_path(root)
        _prune(root, keep_versions, name)
    return name, meta


def _drop_orphans(root: Path) -> None:
    """Remove versions newer than ``current``: saves that crashed before the link swap.

    Writers are serialised and every successful save makes its version current, so a
    version numbered above the current one never went live and nobody can be reading it.
    """
    current = current_version(root)
    numbered = versions(root)
    if current not in numbered:  # no (recognisable) live version: delete nothing
        return
    for name, number in numbered.items():
        if number > numbered[current]:
            logger.warning("removing %s: left by a save that crashed before publishing it", root / name)
            shutil.rmtree(root / name, ignore_errors=True)


def _prune(root: Path, keep_versions: int, current: str) -> None:
    numbered = sorted(versions(root).items(), key=lambda item: item[1], reverse=True)
    keep = {name for name, _ in numbered[:keep_versions]} | {current}
    for name, _ in numbered:
        if name not in keep:
            shutil.rmtree(root / name, ignore_errors=True)
