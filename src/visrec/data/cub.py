"""The CUB_200_2011 folder layout: reading its metadata and checking it is complete.

Every data source (official archive, local copy, embedded generator) ends as this
layout under ``data/raw/CUB_200_2011``; everything downstream reads it through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CUB_DIRNAME = "CUB_200_2011"
METADATA_FILES = (
    "images.txt",
    "image_class_labels.txt",
    "classes.txt",
    "bounding_boxes.txt",
    "train_test_split.txt",
)


class DataLayoutError(ValueError):
    """A folder that is not a complete CUB_200_2011 layout."""


@dataclass(frozen=True)
class CubImage:
    image_id: int
    rel_path: str  # relative to the CUB_200_2011 root, e.g. "images/001.X/x.jpg"
    class_id: int
    box: tuple[float, float, float, float]  # x, y, width, height as in bounding_boxes.txt
    is_train: bool  # CUB's own train_test_split flag (used by classification, not retrieval)


@dataclass(frozen=True)
class CubMeta:
    root: Path
    classes: dict[int, str]  # class id -> folder name, e.g. 1 -> "001.Black_footed_Albatross"
    images: list[CubImage]

    @property
    def class_ids(self) -> list[int]:
        return sorted(self.classes)


def _read_table(path: Path, ncols: int, rest_as_one: bool = False) -> dict[int, list[str]]:
    """Read ``id value...`` lines; ``rest_as_one`` keeps spaces inside the last field."""
    rows: dict[int, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=ncols - 1) if rest_as_one else line.split()
            if len(parts) != ncols:
                raise DataLayoutError(
                    f"{path}:{lineno}: expected {ncols} fields, got {len(parts)}: {line!r}"
                )
            try:
                key = int(parts[0])
            except ValueError:
                raise DataLayoutError(f"{path}:{lineno}: id {parts[0]!r} is not an integer") from None
            if key in rows:
                raise DataLayoutError(f"{path}:{lineno}: id {key} appears twice")
            rows[key] = parts[1:]
    return rows


def resolve_root(path: str | Path) -> Path:
    """Accept either the CUB_200_2011 folder itself or its parent."""
    path = Path(path)
    if (path / "images.txt").exists():
        return path
    if (path / CUB_DIRNAME / "images.txt").exists():
        return path / CUB_DIRNAME
    return path


def read_cub(root: str | Path) -> CubMeta:
    """Parse the five metadata files; raise DataLayoutError naming what is wrong."""
    root = resolve_root(root)
    missing = [name for name in METADATA_FILES if not (root / name).is_file()]
    if not (root / "images").is_dir():
        missing.append("images/")
    if missing:
        raise DataLayoutError(
            f"{root} is not a CUB_200_2011 folder: missing {', '.join(missing)} "
            "(expected images/, images.txt, image_class_labels.txt, classes.txt, "
            "bounding_boxes.txt, train_test_split.txt)"
        )
    paths = _read_table(root / "images.txt", 2, rest_as_one=True)
    labels = _read_table(root / "image_class_labels.txt", 2)
    classes = _read_table(root / "classes.txt", 2, rest_as_one=True)
    boxes = _read_table(root / "bounding_boxes.txt", 5)
    flags = _read_table(root / "train_test_split.txt", 2)

    for name, table in (("image_class_labels.txt", labels), ("bounding_boxes.txt", boxes),
                        ("train_test_split.txt", flags)):
        if table.keys() != paths.keys():
            extra = sorted(table.keys() - paths.keys())[:5]
            lacking = sorted(paths.keys() - table.keys())[:5]
            raise DataLayoutError(
                f"{root / name} does not list the same image ids as images.txt "
                f"(missing ids {lacking}, unknown ids {extra})"
            )
    class_names = {cid: v[0] for cid, v in classes.items()}
    images = []
    for image_id in sorted(paths):
        class_id = int(labels[image_id][0])
        if class_id not in class_names:
            raise DataLayoutError(
                f"{root / 'image_class_labels.txt'}: image {image_id} has class {class_id}, "
                "which classes.txt does not define"
            )
        x, y, w, h = (float(v) for v in boxes[image_id])
        images.append(CubImage(
            image_id=image_id,
            rel_path=f"images/{paths[image_id][0]}",
            class_id=class_id,
            box=(x, y, w, h),
            is_train=flags[image_id][0] == "1",
        ))
    return CubMeta(root=root, classes=class_names, images=images)


def check_layout(root: str | Path) -> CubMeta:
    """``read_cub`` plus: every listed image file exists. Returns the metadata."""
    meta = read_cub(root)
    absent = [img.rel_path for img in meta.images if not (meta.root / img.rel_path).is_file()]
    if absent:
        raise DataLayoutError(
            f"{meta.root}: {len(absent)} image(s) listed in images.txt are missing, e.g. "
            + ", ".join(absent[:5])
        )
    if not meta.images:
        raise DataLayoutError(f"{meta.root}: images.txt lists no images")
    return meta
