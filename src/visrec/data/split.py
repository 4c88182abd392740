"""PaddleClas's CUB protocol: the first N classes train, the remaining classes are unseen.

Writes the list files (:mod:`visrec.data.split_list`) and COCO detection
annotations with the single category ``foreground`` for both halves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from visrec.data.cub import CubImage, CubMeta
from visrec.data.split_list import list_line
from visrec.utils.fs import atomic_write_text, write_json

logger = logging.getLogger(__name__)

FOREGROUND = {"id": 1, "name": "foreground"}
SPLIT_NAMES = ("train", "test")


class SplitError(ValueError):
    """The split settings do not fit the data set."""


@dataclass(frozen=True)
class ClassSplit:
    train_classes: list[int]
    test_classes: list[int]


def split_classes(meta: CubMeta, train_classes: int) -> ClassSplit:
    ids = meta.class_ids
    if not 1 <= train_classes < len(ids):
        raise SplitError(
            f"split.train_classes={train_classes} does not fit a data set of {len(ids)} classes: "
            f"set it between 1 and {len(ids) - 1} (100 for CUB_200_2011, 25 for the 50-class subset), "
            "e.g. -o split.train_classes=25"
        )
    return ClassSplit(train_classes=ids[:train_classes], test_classes=ids[train_classes:])


def clip_box(box: tuple[float, float, float, float], width: int, height: int) -> list[float]:
    """CUB ``x y w h`` clipped to the image; real CUB has a few boxes past the edge."""
    x, y, w, h = box
    x1, y1 = max(0.0, x), max(0.0, y)
    x2, y2 = min(float(width), x + w), min(float(height), y + h)
    return [round(x1, 2), round(y1, 2), round(max(0.0, x2 - x1), 2), round(max(0.0, y2 - y1), 2)]


def coco_for(meta: CubMeta, images: list[CubImage]) -> tuple[dict, int]:
    """COCO dict for ``images``; returns it and the number of boxes dropped as empty."""
    coco_images, annotations, dropped = [], [], 0
    for image in images:
        with Image.open(meta.root / image.rel_path) as im:  # reads the header only
            width, height = im.size
        coco_images.append({"id": image.image_id, "file_name": image.rel_path,
                            "width": width, "height": height})
        bbox = clip_box(image.box, width, height)
        if bbox[2] <= 0 or bbox[3] <= 0:
            dropped += 1  # the validate stage names such rows; COCO cannot hold them
            continue
        annotations.append({"id": image.image_id, "image_id": image.image_id,
                            "category_id": FOREGROUND["id"], "bbox": bbox,
                            "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0})
    coco = {"info": {"description": "visrec mainbody detection (single class)"},
            "images": coco_images, "annotations": annotations, "categories": [FOREGROUND]}
    return coco, dropped


def write_split(meta: CubMeta, train_classes: int, out_dir: str | Path) -> dict[str, int]:
    """Write ``{train,test}_list.txt`` and ``{train,test}_coco.json``; return counts."""
    out_dir = Path(out_dir)
    split = split_classes(meta, train_classes)
    members = {"train": set(split.train_classes), "test": set(split.test_classes)}
    stats: dict[str, int] = {}
    for name in SPLIT_NAMES:
        images = [img for img in meta.images if img.class_id in members[name]]
        lines = [list_line(i.rel_path, i.class_id, i.image_id) + "\n" for i in images]
        atomic_write_text(out_dir / f"{name}_list.txt", "".join(lines))
        coco, dropped = coco_for(meta, images)
        write_json(out_dir / f"{name}_coco.json", coco)
        stats[f"{name}_images"] = len(images)
        stats[f"{name}_classes"] = len(members[name])
        stats[f"{name}_boxes_dropped"] = dropped
        logger.info("%s: %d images of %d classes (%d empty boxes left out of COCO)",
                    name, len(images), len(members[name]), dropped)
    return stats
