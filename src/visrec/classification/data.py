"""Classification data: three sources, one train/val split, the class map, and the dataset.

Sources (``classify.data.type``):

- ``cub``: a CUB_200_2011 folder. The class is the label and CUB's own
  ``train_test_split.txt`` is the split (the standard CUB classification protocol, unlike
  the retrieval split, which holds out whole classes). Boxes allow ``crop_to_bbox``.
- ``folder``: ``root/<class name>/**/*.jpg``; classes sorted by folder name.
- ``list``: ``relative/path label`` lines (paths relative to ``root``; split at the *last*
  delimiter, so paths may hold spaces and a label is never read from the wrong field).

Class ids are dense, 0..C-1, in sorted order of the source's labels; the class map
(``class_map.json``, never pickle) records id -> name and the source label.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visrec.config import ClassifyDataConfig
from visrec.data.cub import read_cub
from visrec.data.datasets import CachedImageDataset
from visrec.imaging import crop_box, load_image

logger = logging.getLogger(__name__)

CLASS_MAP_FILE = "class_map.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class ClassDataError(ValueError):
    """A data source or class map that cannot be used for classification."""


@dataclass(frozen=True)
class Item:
    path: Path
    class_id: int  # dense, 0..C-1
    box: tuple[float, float, float, float] | None = None  # x, y, w, h (CUB only)


@dataclass
class ClassSplit:
    train: list[Item]
    val: list[Item]
    class_names: list[str]  # index = class id
    source_labels: list[str]  # the label each class has in the source (CUB id, folder, list label)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _sort_labels(labels: set[str]) -> list[str]:
    """Numeric order when every label is an integer (so "10" follows "9"), else text order."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def hold_out(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Per-class random hold-out of ``fraction`` (at least one image per class stays in train)."""
    if not 0.0 < fraction < 1.0:
        raise ClassDataError(f"classify.data.val_fraction must be in (0, 1) when no val_list is given, got {fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Item]] = {}
    for item in items:
        by_class.setdefault(item.class_id, []).append(item)
    train, val = [], []
    for class_id in sorted(by_class):
        members = by_class[class_id]
        order = rng.permutation(len(members))
        n_val = min(len(members) - 1, int(round(fraction * len(members))))
        val += [members[i] for i in sorted(order[:n_val])]
        train += [members[i] for i in sorted(order[n_val:])]
    return train, val


def read_cub_split(root: str | Path) -> ClassSplit:
    meta = read_cub(root)
    ids = meta.class_ids
    dense = {cub_id: i for i, cub_id in enumerate(ids)}
    train, val = [], []
    for img in meta.images:
        item = Item(meta.root / img.rel_path, dense[img.class_id], img.box)
        (train if img.is_train else val).append(item)
    return ClassSplit(train, val, [meta.classes[c] for c in ids], [str(c) for c in ids])


def read_folder_tree(root: str | Path) -> tuple[list[Item], list[str]]:
    root = Path(root)
    if not root.is_dir():
        raise ClassDataError(f"classify.data.root {root} is not a folder (type folder expects root/<class>/<images>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items: list[Item] = []
    used: list[str] = []
    for name in classes:
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            logger.warning("%s holds no image: not a class", root / name)
            continue
        items += [Item(p, len(used)) for p in files]
        used.append(name)
    return items, used


def read_label_list(path: str | Path, root: str | Path, delimiter: str | None,
                    labels: list[str] | None = None) -> tuple[list[Item], list[str]]:
    """Parse ``relative/path<delimiter>label`` lines; ``labels`` fixes the class order (val lists)."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise ClassDataError(f"list file {path} does not exist (classify.data.train_list / val_list)")
    rows: list[tuple[str, str]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.rsplit(delimiter, 1) if delimiter else line.rstrip().rsplit(None, 1)
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise ClassDataError(f"{path}:{lineno}: expected 'relative/path{delimiter or ' '}label', got {line!r}")
            rows.append((parts[0].strip(), parts[1].strip()))
    if not rows:
        raise ClassDataError(f"list file {path} holds no images")
    if labels is None:
        labels = _sort_labels({label for _, label in rows})
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({label for _, label in rows if label not in index})
    if unknown:
        raise ClassDataError(f"{path}: labels {unknown[:5]} do not occur in the training list: "
                             "a validation list may only use the training classes")
    return [Item(root / rel, index[label]) for rel, label in rows], labels


def load_split(cfg: ClassifyDataConfig) -> ClassSplit:
    """The configured source as train / val items with dense class ids."""
    if cfg.type == "cub":
        split = read_cub_split(cfg.root)
    elif cfg.type == "folder":
        items, names = read_folder_tree(cfg.root)
        train, val = hold_out(items, cfg.val_fraction, cfg.split_seed)
        split = ClassSplit(train, val, names, list(names))
    else:
        if not cfg.train_list:
            raise ClassDataError("classify.data.type is list but classify.data.train_list is not set")
        items, labels = read_label_list(cfg.train_list, cfg.root, cfg.delimiter)
        if cfg.val_list:
            train = items
            val, _ = read_label_list(cfg.val_list, cfg.root, cfg.delimiter, labels)
        else:
            train, val = hold_out(items, cfg.val_fraction, cfg.split_seed)
        split = ClassSplit(train, val, list(labels), list(labels))
    _check_split(split, cfg)
    return split


def _check_split(split: ClassSplit, cfg: ClassifyDataConfig) -> None:
    where = f"classify.data ({cfg.type} at {cfg.root})"
    if split.num_classes < 2:
        raise ClassDataError(f"{where}: found {split.num_classes} class(es); classification needs at least 2")
    if not split.val:
        raise ClassDataError(f"{where}: the validation split is empty (raise val_fraction or give a val_list)")
    lacking = sorted(set(range(split.num_classes)) - {item.class_id for item in split.train})
    if lacking:
        names = [split.class_names[i] for i in lacking[:5]]
        raise ClassDataError(f"{where}: {len(lacking)} class(es) have no training image, e.g. {names}")


# ----------------------------------------------------------------------------- class map


def class_map(split: ClassSplit) -> dict[str, Any]:
    return {"classes": [{"class_id": i, "name": name, "source_label": label}
                        for i, (name, label) in enumerate(zip(split.class_names, split.source_labels))]}


def write_class_map(split: ClassSplit, directory: Path) -> Path:
    path = Path(directory) / CLASS_MAP_FILE
    path.write_text(json.dumps(class_map(split), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def class_names_from(mapping: dict[str, Any], source: str | Path) -> list[str]:
    """Names by class id from a class map; refuses gaps, duplicates or a malformed file."""
    try:
        entries = mapping["classes"]
        names = {int(e["class_id"]): str(e["name"]) for e in entries}
    except (KeyError, TypeError, ValueError):
        raise ClassDataError(f"{source}: not a visrec class map (expected "
                             '{"classes": [{"class_id": 0, "name": ...}, ...]}); '
                             "re-run `visrec classify train`") from None
    if sorted(names) != list(range(len(entries))):
        raise ClassDataError(f"{source}: class ids must be 0..{len(entries) - 1}, each once")
    return [names[i] for i in range(len(names))]


def load_class_map(directory: str | Path) -> dict[str, Any]:
    """The class map file of a run directory, checked; ``read_class_map`` gives just the names."""
    path = Path(directory) / CLASS_MAP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: no class map beside the model "
                                "(train it with `visrec classify train`)")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ClassDataError(f"{path}: not valid JSON ({exc})") from None
    class_names_from(mapping, path)
    return mapping


def read_class_map(directory: str | Path) -> list[str]:
    return class_names_from(load_class_map(directory), Path(directory) / CLASS_MAP_FILE)


# ----------------------------------------------------------------------------- dataset


class ClassificationDataset(CachedImageDataset):
    """Items as ``(CHW float32, class id int64, index int64)``.

    As ``RetrievalDataset``: sample ``i`` of epoch ``e`` is augmented with
    ``default_rng([seed, e, i])`` (exact resume), and ``cache_images`` decodes every image
    once (box-cropped, square-resized to ``cache_size``) before loader workers fork.
    """

    def __init__(self, items: list[Item], transform: Callable[[np.ndarray, np.random.Generator], np.ndarray],
                 crop_to_bbox: bool = False, bbox_pad: float = 0.0, cache_images: bool = False,
                 cache_size: int | None = None, seed: int = 0) -> None:
        super().__init__(transform, cache_images, cache_size, seed)
        if not items:
            raise ClassDataError("a classification dataset needs at least one image")
        if crop_to_bbox and any(item.box is None for item in items):
            raise ClassDataError("image.crop_to_bbox needs boxes, which only the cub data type has: "
                                 "set classify.image.crop_to_bbox=false")
        self.items = items
        self.labels = np.array([item.class_id for item in items], dtype=np.int64)
        self.crop_to_bbox = crop_to_bbox
        self.bbox_pad = bbox_pad

    def __len__(self) -> int:
        return len(self.items)

    def _decode(self, index: int) -> np.ndarray:
        item = self.items[index]
        img = load_image(item.path)
        if self.crop_to_bbox and item.box is not None:
            img = crop_box(img, item.box, self.bbox_pad)
        return img

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int64, np.int64]:
        return self.transformed(index), self.labels[int(index)], np.int64(int(index))
