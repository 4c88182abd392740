"""Gallery list files: one ``relative/path<DELIM>label`` per line.

Lines are split on the *first* delimiter only, so labels keep spaces, further delimiters
and any Unicode ("Black footed Albatross", "元气森林"). (Splitting on all whitespace and
taking field 1 truncates such labels to their first word, silently merging classes.)
Surrounding whitespace of path and label is stripped (a stray trailing
space must not create a new class). Blank lines and ``#`` comments are skipped; a malformed line is an error naming
``file:line`` and the expected format rather than being dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger(__name__)


class GalleryListEntry(NamedTuple):
    """One gallery image: its path (resolved against the root) and its label."""

    path: Path
    label: str


def _describe(delimiter: str) -> str:
    return {"\t": "<TAB>", " ": "<SPACE>"}.get(delimiter, repr(delimiter))


def parse_list_lines(lines: Iterable[str], *, root: str | Path = ".", delimiter: str = "\t",
                     source: str = "<list>") -> list[GalleryListEntry]:
    """Parse list-file lines (see module docstring); ``source`` names the file in errors."""
    if not delimiter or delimiter in "\r\n":
        raise ValueError(f"delimiter must be a non-empty string without newlines, got {delimiter!r}")
    root = Path(root)
    entries = []
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if delimiter not in line:
            raise ValueError(f"{source}:{number}: no {_describe(delimiter)} delimiter in {line!r}; "
                             f"expected 'relative/path{_describe(delimiter)}label'")
        path, label = (part.strip() for part in line.split(delimiter, 1))
        if not path or not label:
            raise ValueError(f"{source}:{number}: empty {'path' if not path else 'label'} in {line!r}; "
                             f"expected 'relative/path{_describe(delimiter)}label'")
        entries.append(GalleryListEntry(root / path, label))
    return entries


def read_list_file(path: str | Path, root: str | Path | None = None, *, delimiter: str = "\t",
                   encoding: str = "utf-8-sig") -> list[GalleryListEntry]:
    """Read a gallery list file; image paths are resolved against ``root``
    (default: the list file's directory). ``utf-8-sig`` also accepts a BOM."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gallery list file {path} not found; expected lines 'relative/path"
                                f"{_describe(delimiter)}label'")
    with open(path, encoding=encoding, newline="") as handle:
        entries = parse_list_lines(handle, root=path.parent if root is None else root,
                                   delimiter=delimiter, source=str(path))
    logger.info("read %d entries (%d labels) from %s", len(entries), len({e.label for e in entries}), path)
    return entries


def write_list_file(path: str | Path, entries: Iterable[tuple[str | Path, str]], *,
                    delimiter: str = "\t") -> Path:
    """Write ``(relative path, label)`` pairs so :func:`read_list_file` reads them back exactly.

    Rejects what cannot round-trip: a delimiter inside a path, newlines anywhere,
    surrounding whitespace or emptiness. Written to a temp file, then renamed into place.
    """
    path = Path(path)
    rows = []
    for i, (image, label) in enumerate(entries):
        image, label = str(image), str(label)
        if delimiter in image or any(c in image + label for c in "\r\n"):
            raise ValueError(f"entry {i} ({image!r}, {label!r}) cannot be written: the path contains the "
                             f"delimiter {_describe(delimiter)} or a newline is present")
        if not image.strip() or not label.strip() or label != label.strip() or image != image.strip():
            raise ValueError(f"entry {i} ({image!r}, {label!r}): empty or whitespace-padded path/label")
        if image.lstrip().startswith("#"):
            raise ValueError(f"entry {i}: path {image!r} starts with '#' and would be read as a comment")
        rows.append(f"{image}{delimiter}{label}\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(rows), encoding="utf-8")
    os.replace(tmp, path)
    return path
