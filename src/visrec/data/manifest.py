"""The validate stage's manifest: one row per image the split lists, from opening every file.

:func:`probe_image` (exists? full decode? size? content hash?) is also the check the
gallery-update workflow runs on new images.
"""

from __future__ import annotations

import hashlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from visrec.data.cub import read_cub
from visrec.data.split_list import read_split_list

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
LIST_FILES = {"train": "train_list.txt", "test": "test_list.txt"}

MANIFEST_COLUMNS = [
    "split", "path", "label", "unique_id", "exists", "decodes", "width", "height", "channels",
    "box_x", "box_y", "box_w", "box_h", "box_overshoot", "content_hash",
]


def _rows(list_file: Path) -> list[tuple[str, int, int]]:
    # Duplicate unique ids are the unique_id_unique rule's to report (across both lists), not a parse error.
    return [(e.path, e.label, e.unique_id) for e in read_split_list(list_file, require_unique_ids=False)]


def probe_image(path: Path) -> dict[str, Any]:
    """Existence, full decode, size, channels and sha1 of one file."""
    info = {"exists": path.is_file(), "decodes": False, "width": 0, "height": 0,
            "channels": 0, "content_hash": ""}
    if not info["exists"]:
        return info
    try:
        data = path.read_bytes()
    except OSError as exc:
        logger.warning("cannot read %s: %s", path, exc)
        return info
    info["content_hash"] = hashlib.sha1(data).hexdigest()
    # A full decode (not just the header): OpenCV 5 returns None for a truncated JPEG.
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        return info
    info.update(decodes=True, width=int(image.shape[1]), height=int(image.shape[0]),
                channels=1 if image.ndim == 2 else int(image.shape[2]))
    return info


def box_overshoot(box: tuple[float, float, float, float], width: int, height: int) -> float:
    """How far ``box`` (x, y, w, h) reaches past the image, as a fraction of that side."""
    x, y, w, h = box
    return max(0.0, -x / width, -y / height, (x + w - width) / width, (y + h - height) / height)


def build_manifest(raw_root: str | Path, split_dir: str | Path, num_workers: int = 2) -> pd.DataFrame:
    """One row per image of ``train_list.txt`` and ``test_list.txt``; see MANIFEST_COLUMNS."""
    meta = read_cub(raw_root)
    boxes = {img.image_id: img.box for img in meta.images}
    entries = [(split, rel, label, uid)
               for split in SPLITS
               for rel, label, uid in _rows(Path(split_dir) / LIST_FILES[split])]
    paths = [meta.root / rel for _, rel, _, _ in entries]
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        probes = list(tqdm(pool.map(probe_image, paths), total=len(paths),
                           desc="validate: reading images", unit="img"))

    rows = []
    for (split, rel, label, uid), probe in zip(entries, probes):
        box = boxes.get(uid)
        overshoot = (box_overshoot(box, probe["width"], probe["height"])
                     if box is not None and probe["decodes"] else math.nan)
        bx, by, bw, bh = box if box is not None else (math.nan,) * 4
        rows.append({"split": split, "path": rel, "label": label, "unique_id": uid,
                     **{k: probe[k] for k in ("exists", "decodes", "width", "height", "channels")},
                     "box_x": bx, "box_y": by, "box_w": bw, "box_h": bh,
                     "box_overshoot": overshoot, "content_hash": probe["content_hash"]})
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return manifest.astype({"exists": bool, "decodes": bool, "label": "int64", "unique_id": "int64",
                            "width": "int64", "height": "int64", "channels": "int64",
                            "content_hash": str})
