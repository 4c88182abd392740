"""Getting CUB_200_2011 into ``data/raw``: from the generator, the official archive,
a local archive or a local folder.

Whatever the source, the result is ``raw_dir/CUB_200_2011`` in the canonical layout,
built beside ``raw_dir`` and swapped in only after ``check_layout`` passes, so a bad
source or an interrupted run never replaces the last good data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tarfile
from pathlib import Path

import requests
from tqdm import tqdm

from visrec.config import DataConfig
from visrec.data.cub import CUB_DIRNAME, METADATA_FILES, CubMeta, check_layout, read_cub, resolve_root
from visrec.utils.fs import atomic_dir

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")
ARCHIVE_NAME = "CUB_200_2011.tgz"
_LOCAL_HINT = (
    "set data.source to a local CUB_200_2011.tgz or CUB_200_2011 folder "
    "(e.g. dvc repro -S data.source=/path/CUB_200_2011.tgz "
    "or python stages/download.py -o data.source=...)"
)


class DownloadError(OSError):
    """A data source that could not be fetched, verified or unpacked: an I/O failure the user
    fixes (network, a local copy), so stages report it as one ``error:`` line, not a traceback."""


# ----------------------------------------------------------------------------- download


def file_md5(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _stream_to_part(url: str, part: Path, timeout_s: float, chunk_size: int, progress: bool) -> None:
    """Fetch ``url`` into ``part``, resuming from its current size when the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: requests would otherwise ungzip a .tgz served with Content-Encoding: gzip,
    # and byte ranges refer to the encoded bytes anyway.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as resp:
        if resp.status_code == 416 and offset:
            logger.info("%s: server says the %d bytes in %s are already complete", url, offset, part)
            return
        resp.raise_for_status()
        mode = "wb"
        if offset and resp.status_code == 206:
            match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != offset:
                # A range we did not ask for cannot be appended: start over once, without Range.
                logger.warning("%s: unexpected Content-Range %r; restarting from zero",
                               url, resp.headers.get("Content-Range"))
                resp.close()
                part.unlink()
                _stream_to_part(url, part, timeout_s, chunk_size, progress)
                return
            mode = "ab"
            logger.info("%s: resuming after %d bytes", url, offset)
        elif offset:
            logger.info("%s: server ignored the Range request; downloading from zero", url)
            offset = 0
        length = resp.headers.get("Content-Length")
        total = int(length) + offset if length and length.isdigit() else None
        with part.open(mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                        unit_divisor=1024, desc=part.name, disable=not progress) as bar:
            for chunk in resp.iter_content(chunk_size):
                f.write(chunk)
                bar.update(len(chunk))


def download_file(
    url: str,
    dest: Path,
    md5: str | None,
    timeout_s: float = 30.0,
    chunk_size: int = 1 << 20,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part`` (resumable); verify ``md5`` if given."""
    dest = Path(dest)
    if dest.exists():
        if md5 is None:
            logger.info("%s already exists (no checksum to verify)", dest)
            return dest
        got = file_md5(dest)
        if got == md5:
            logger.info("%s already exists with the expected md5", dest)
            return dest
        logger.warning("%s has md5 %s, expected %s: downloading it again", dest, got, md5)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        _stream_to_part(url, part, timeout_s, chunk_size, progress)
    except requests.HTTPError as exc:
        resp = exc.response
        status = f"HTTP {resp.status_code} {resp.reason or ''}" if resp is not None else "HTTP error"
        raise DownloadError(f"cannot download {url}: {_one_line(status)}; {_LOCAL_HINT}") from None
    except requests.RequestException as exc:
        kept = part.stat().st_size if part.exists() else 0
        resume = f" ({kept} bytes kept in {part}: rerunning resumes)" if kept else ""
        what = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
        raise DownloadError(
            f"cannot download {url}: {what} ({type(exc).__name__}){resume}; {_LOCAL_HINT}"
        ) from None
    if md5 is not None:
        got = file_md5(part)
        if got != md5:
            part.unlink()
            raise DownloadError(
                f"checksum mismatch for {url}: expected md5 {md5}, got {got}; the partial file "
                f"was deleted: retry, or {_LOCAL_HINT}"
            )
    os.replace(part, dest)
    logger.info("downloaded %s to %s (%d bytes)", url, dest, dest.stat().st_size)
    return dest


# ----------------------------------------------------------------------------- extract


def _find_cub_root(parent: Path) -> Path | None:
    """The CUB folder in an extracted archive: ``parent`` itself, ``CUB_200_2011/``,
    or the single top-level folder holding ``images.txt`` (a repacked copy)."""
    root = resolve_root(parent)
    if (root / "images.txt").is_file():
        return root
    candidates = [d for d in parent.iterdir() if d.is_dir() and (d / "images.txt").is_file()]
    return candidates[0] if len(candidates) == 1 else None


def extract_archive(archive: Path, dest_parent: Path, progress: bool = True) -> Path:
    """Unpack a tar archive into ``dest_parent`` safely; return the CUB_200_2011 folder in it."""
    archive, dest_parent = Path(archive), Path(dest_parent)
    if not hasattr(tarfile, "data_filter"):  # Python < 3.11.4: no safe extraction filter
        raise DownloadError("extracting archives safely needs Python >= 3.11.4 (tarfile filter='data')")
    dest_parent.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            # Iterating the TarFile reads headers lazily: a .tgz is decompressed once,
            # not once to list members and again to extract them.
            with tqdm(tar, desc=f"extract {archive.name}", unit=" files", disable=not progress) as members:
                # filter="data" refuses absolute paths, "..", links leaving dest_parent, devices.
                tar.extractall(dest_parent, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise DownloadError(
            f"{archive}: refusing to extract, a member would land outside {dest_parent} "
            f"({_one_line(exc)}); the archive is not a genuine CUB_200_2011.tgz"
        ) from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DownloadError(
            f"{archive}: cannot extract ({type(exc).__name__}: {_one_line(exc)}); "
            "the file is truncated or not a tar archive: use a complete CUB_200_2011.tgz"
        ) from None
    root = _find_cub_root(dest_parent)
    if root is None:
        raise DownloadError(
            f"{archive} holds no CUB_200_2011 folder (no images.txt at its top level, in "
            f"{CUB_DIRNAME}/ or in a single top-level folder)"
        )
    return root


# ----------------------------------------------------------------------------- materialize


def _link_or_copy(src: str, dst: str) -> str:
    """Hard link (no second copy of ~1 GB on the same file system), else copy.

    Linking the user's originals is safe: nothing downstream writes into data/raw.
    """
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _copy_cub_folder(src_root: Path, dest: Path) -> None:
    """Copy ``images/`` and the metadata files; extras (attributes/, parts/) are skipped."""
    dest.mkdir(parents=True)
    for name in METADATA_FILES:
        _link_or_copy(str(src_root / name), str(dest / name))
    shutil.copytree(src_root / "images", dest / "images", copy_function=_link_or_copy)


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _extract_into(archive: Path, tmp: Path, progress: bool) -> None:
    """Extract into a staging folder, keep only the CUB folder as ``tmp/CUB_200_2011``."""
    staging = tmp / ".extract"
    root = extract_archive(archive, staging, progress=progress)
    os.rename(root, tmp / CUB_DIRNAME)
    shutil.rmtree(staging, ignore_errors=True)  # top-level extras such as attributes.txt


def materialize(
    cfg: DataConfig,
    raw_dir: Path,
    downloads_dir: Path,
    progress: bool = True,
) -> CubMeta:
    """Build ``raw_dir/CUB_200_2011`` from ``cfg.source``; replace ``raw_dir`` only if it checks out."""
    raw_dir, downloads_dir = Path(raw_dir), Path(downloads_dir)
    source = cfg.source
    with atomic_dir(raw_dir) as tmp:
        if source == "synthetic":
            from visrec.data.synthetic import generate  # lazy: heavy, and only this branch needs it

            described = "the embedded synthetic generator"
            generate(tmp, cfg.synthetic, progress=progress)
        elif source == "cub":
            archive = download_file(cfg.url, downloads_dir / ARCHIVE_NAME, cfg.md5 or None,
                                    cfg.timeout_s, progress=progress)
            described = f"{cfg.url} (cached at {archive})"
            _extract_into(archive, tmp, progress)
        else:
            path = Path(source).expanduser()
            if _is_archive(path):
                # Repacked copies are welcome, so the md5 is reported, not required.
                got = file_md5(path)
                note = "the official archive" if got == cfg.md5 else "not the official archive's md5"
                logger.info("local archive %s: md5 %s (%s)", path, got, note)
                described = f"local archive {path}"
                _extract_into(path, tmp, progress)
            elif path.is_dir():
                src_root = resolve_root(path)
                read_cub(src_root)  # a clear error before copying anything from a wrong folder
                described = f"local folder {src_root}"
                _copy_cub_folder(src_root, tmp / CUB_DIRNAME)
            elif path.exists():
                raise DownloadError(
                    f"data.source {source!r} is a file but not a tar archive "
                    f"(expected a name ending in {', '.join(ARCHIVE_SUFFIXES)})"
                )
            else:
                raise DownloadError(
                    f"data.source must be 'synthetic', 'cub', or an existing path to a "
                    f"CUB_200_2011.tgz or CUB_200_2011 folder: {str(path)!r} does not exist"
                )
        # Inside the with-block: a source that fails the check never replaces good data.
        meta = check_layout(tmp / CUB_DIRNAME)
    meta = dataclasses.replace(meta, root=raw_dir / CUB_DIRNAME)
    logger.info("raw data ready: %d images in %d classes at %s, from %s",
                len(meta.images), len(meta.classes), meta.root, described)
    return meta
