"""The split stage's list files: one format, its writer and its one reader.

One image per line: ``relative/path.jpg label unique_id``, single spaces, as PaddleClas's
``train_list.txt`` / ``test_list.txt``. The path is relative to the CUB_200_2011 root and may
contain spaces, so lines are split from the right. Labels are CUB class ids, unique ids CUB image ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def list_line(path: str, label: int, unique_id: int) -> str:
    """One list-file line (what :func:`read_split_list` reads back)."""
    return f"{path} {label} {unique_id}"


class ListFileError(ValueError):
    """A malformed list file."""


@dataclass(frozen=True)
class SplitEntry:
    path: str  # relative to the data set root
    label: int  # CUB class id
    unique_id: int  # CUB image id


def read_split_list(path: str | Path, require_unique_ids: bool = True) -> list[SplitEntry]:
    """Parse a list file; raise ListFileError naming file:line on a malformed line.

    ``require_unique_ids``: a unique id used twice is an error too (the validate stage reports
    duplicates as a failed rule instead, across both lists, so it turns this off)."""
    path = Path(path)
    if not path.is_file():
        raise ListFileError(f"list file {path} does not exist: run the split stage first")
    entries: list[SplitEntry] = []
    seen: dict[int, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip()
            if not line.strip():
                continue
            parts = line.rsplit(" ", 2)
            if len(parts) != 3 or not parts[0]:
                raise ListFileError(f"{path}:{lineno}: expected 'relative/path label unique_id' "
                                    f"separated by single spaces, got {line!r}")
            rel, label_s, uid_s = parts
            try:
                label, uid = int(label_s), int(uid_s)
            except ValueError:
                raise ListFileError(f"{path}:{lineno}: label {label_s!r} and unique id {uid_s!r} "
                                    f"must be integers, got {line!r}") from None
            if require_unique_ids and uid in seen:
                raise ListFileError(f"{path}:{lineno}: unique id {uid} already used on line {seen[uid]}")
            seen[uid] = lineno
            entries.append(SplitEntry(rel, label, uid))
    return entries
