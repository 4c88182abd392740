"""COCO detection annotations -> box-safe augmented samples and batches for the detector.

The split stage writes ``{train,test}_coco.json`` with ``file_name`` relative to the
CUB_200_2011 root and the single category ``foreground``. ``read_coco`` turns them into
``DetRecord`` s and deals with bad entries up front: a missing image file, a box of zero
area, an image left without a box. With ``on_bad="skip"`` (default) each is left out and
counted (the counts are logged and kept in ``DetectionDataset.skipped``); with
``on_bad="error"`` the first one raises ``DetectionDataError`` naming it. Corrupt images
are found when the image cache fills (``cache_images``), before training starts, and are
handled the same way; without the cache a corrupt file raises ``ImageReadError`` with its
path when it is read.

Training samples are augmented by the box-safe transforms of ``visrec.data.det_transforms``.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import paddle
from tqdm import tqdm

from visrec.data.cub import resolve_root
from visrec.data.det_transforms import CropKeepingBoxes, HorizontalFlip, PhotometricJitter, ResizeToInput
from visrec.imaging import (
    ImageReadError,
    ResizeInfo,
    ResizePolicy,
    check_policy,
    load_image,
    normalize_chw,
    pad_colour,
    resize_geometry,
    resize_to_input,
)

logger = logging.getLogger(__name__)

OnBad = Literal["skip", "error"]


class DetectionDataError(ValueError):
    """A COCO file or data set entry the detector cannot use."""


@dataclass(frozen=True)
class DetRecord:
    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # [K, 4] x1 y1 x2 y2, original pixels


# ----------------------------------------------------------------------- reading


def read_coco(coco_path: str | Path, root: str | Path, on_bad: OnBad = "skip",
              check_files: bool = True) -> tuple[list[DetRecord], Counter]:
    """Records of a COCO detection file whose ``file_name`` s are relative to ``root``.

    Returns the usable records and a Counter of what was skipped (``missing_image``,
    ``zero_area_box``, ``no_box``). ``on_bad="error"`` raises on the first problem instead.
    """
    coco_path, root = Path(coco_path), resolve_root(root)
    if on_bad not in ("skip", "error"):
        raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
    if not coco_path.is_file():
        raise DetectionDataError(f"COCO file {coco_path} does not exist: run the split stage first")
    try:
        coco = json.loads(coco_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DetectionDataError(f"{coco_path} is not valid JSON ({exc}): re-run the split stage") from None
    if not isinstance(coco, dict) or not {"images", "annotations"} <= coco.keys():
        raise DetectionDataError(f"{coco_path}: expected a COCO dict with 'images' and 'annotations'")

    skipped: Counter = Counter()

    def bad(reason: str, message: str) -> None:
        if on_bad == "error":
            raise DetectionDataError(f"{coco_path}: {message} (fix the data, or let the detector skip such "
                                     "entries with on_bad='skip')")
        skipped[reason] += 1

    boxes_of: dict[int, list[list[float]]] = {}
    for ann in coco["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
            bad("zero_area_box", f"annotation {ann.get('id')} of image {ann['image_id']} has a box of zero "
                                 f"area {ann['bbox']}")
            continue
        boxes_of.setdefault(int(ann["image_id"]), []).append([x, y, x + w, y + h])

    records: list[DetRecord] = []
    for image in coco["images"]:
        image_id = int(image["id"])
        path = root / image["file_name"]
        if check_files and not path.is_file():
            bad("missing_image", f"image {image_id} file {path} does not exist")
            continue
        if image_id not in boxes_of:
            bad("no_box", f"image {image_id} ({image['file_name']}) has no box")
            continue
        boxes = np.asarray(boxes_of[image_id], dtype=np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, image["width"])
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, image["height"])
        records.append(DetRecord(image_id, path, int(image["width"]), int(image["height"]), boxes))
    if skipped:
        logger.warning("%s: skipped %d entries (%s)", coco_path, sum(skipped.values()),
                       ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    if not records:
        raise DetectionDataError(f"{coco_path}: no usable image (skipped: {dict(skipped) or 'none listed'})")
    return records, skipped


# ----------------------------------------------------------------------- dataset


def subsample_indices(total: int, limit: int) -> np.ndarray:
    """``limit`` indices spread evenly over ``range(total)`` (all when ``limit`` <= 0 or >= total)."""
    if limit <= 0 or limit >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, limit).round().astype(np.int64))


class DetectionDataset(paddle.io.Dataset):
    """Items ``(CHW float32 image, boxes [K, 4] in input pixels, image id)``.

    ``train=True`` applies colour jitter, a crop that keeps the boxes, a horizontal flip
    and a zoom-out placement; ``train=False`` only the inference resize. With
    ``cache_images`` every image is decoded once: training images with their longer side
    shrunk to ``size`` (augmentations start from there), evaluation images already resized
    to the input (so evaluation feeds the network exactly what ``Detector`` would).
    Sample ``i`` of epoch ``e`` is augmented with ``default_rng([seed, e, i])``.
    """

    def __init__(self, root: str | Path, coco_path: str | Path, size: int,
                 resize: ResizePolicy = "keep_ratio",
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 scale: float = 1 / 255, train: bool = False, crop_prob: float = 0.5, crop_min: float = 0.5,
                 flip_prob: float = 0.5, zoom_out: Sequence[float] = (0.6, 1.0), color_jitter: float = 0.3,
                 cache_images: bool = True, max_images: int = 0, on_bad: OnBad = "skip", seed: int = 0):
        super().__init__()
        if size < 1:
            raise ValueError(f"detector input size must be >= 1, got {size}")
        self.root, self.coco_path = resolve_root(root), Path(coco_path)
        records, self.skipped = read_coco(self.coco_path, self.root, on_bad=on_bad)
        self.records = [records[i] for i in subsample_indices(len(records), max_images)]
        self.size, self.policy, self.train = int(size), check_policy(resize), train
        self.mean, self.std, self.scale = list(mean), list(std), float(scale)
        self.on_bad, self.seed, self.epoch = on_bad, int(seed), 0
        self.cache_images = cache_images
        fill = pad_colour(mean, scale)
        self.resize = ResizeToInput(self.size, resize, tuple(zoom_out) if train else (1.0, 1.0), fill)
        self.augment = [PhotometricJitter(color_jitter), CropKeepingBoxes(crop_prob, crop_min),
                        HorizontalFlip(flip_prob)] if train else []
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._infos: list[ResizeInfo] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    def resize_info(self, index: int) -> ResizeInfo:
        """How image ``index`` maps onto the un-augmented network input (evaluation)."""
        if self._infos is not None:
            return self._infos[index]
        record = self.records[index]
        return resize_geometry(record.width, record.height, self.size, self.policy)[2]

    def _source(self, record: DetRecord) -> tuple[np.ndarray, np.ndarray]:
        """Decoded image and boxes, the starting point of this dataset's transforms."""
        img = load_image(record.path)
        height, width = img.shape[:2]
        boxes = record.boxes
        if (width, height) != (record.width, record.height):
            raise ImageReadError(record.path, f"it is {width}x{height} but the COCO file says "
                                              f"{record.width}x{record.height} (re-run the split stage)")
        if not self.train:
            out, info = resize_to_input(img, self.size, self.policy, self.resize.fill)
            return out, info.to_input(boxes)
        shrink = self.size / max(width, height)
        if self.cache_images and shrink < 1:
            new_w, new_h = max(1, round(width * shrink)), max(1, round(height * shrink))
            img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
            boxes = boxes * np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
        return img, boxes

    def preload(self) -> None:
        """Decode every image once; unreadable ones are skipped and counted (or raise with on_bad='error')."""
        if not self.cache_images or self._cache is not None:
            return
        cache, records, infos = [], [], []
        for record in tqdm(self.records, desc=f"caching {self.coco_path.name}", unit="img",
                           disable=len(self.records) < 500, leave=False):
            try:
                img, boxes = self._source(record)
            except ImageReadError as exc:
                if self.on_bad == "error":
                    raise DetectionDataError(f"{self.coco_path}: {exc}") from None
                self.skipped["unreadable_image"] += 1
                logger.warning("skipping image %d: %s", record.image_id, exc)
                continue
            img.setflags(write=False)  # a transform writing in place would corrupt later epochs
            cache.append((img, boxes))
            records.append(record)
            infos.append(resize_geometry(record.width, record.height, self.size, self.policy)[2])
        if not records:
            raise DetectionDataError(f"{self.coco_path}: no readable image (skipped: {dict(self.skipped)})")
        if self.skipped["unreadable_image"]:
            logger.warning("%s: skipped %d unreadable image(s)", self.coco_path, self.skipped["unreadable_image"])
        self._cache, self.records, self._infos = cache, records, infos
        logger.info("cached %d images of %s: %.1f MB", len(cache), self.coco_path,
                    sum(im.nbytes for im, _ in cache) / 2**20)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.int64]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        if self.cache_images:
            self.preload()
            img, boxes = self._cache[index]  # type: ignore[index]
        else:
            img, boxes = self._source(self.records[index])
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            for op in self.augment:
                img, boxes = op(img, boxes, rng)
            img, boxes = self.resize(img, boxes, rng)
        chw = normalize_chw(img, self.mean, self.std, self.scale)
        return chw, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.int64(self.records[index].image_id)


def collate_detection(samples: Sequence[tuple[np.ndarray, np.ndarray, np.int64]]):
    """Stack images; pad boxes to ``[B, M, 4]`` with their counts ``[B]``; image ids ``[B]``."""
    images = np.stack([s[0] for s in samples]).astype(np.float32)
    counts = np.array([len(s[1]) for s in samples], dtype=np.int64)
    boxes = np.zeros((len(samples), max(1, int(counts.max(initial=0))), 4), dtype=np.float32)
    for i, sample in enumerate(samples):
        boxes[i, : counts[i]] = sample[1]
    ids = np.array([s[2] for s in samples], dtype=np.int64)
    return images, boxes, counts, ids


class EpochShuffleBatchSampler:
    """Shuffled batches whose order depends only on ``(seed, epoch)``: exact resume."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and num_samples < batch_size:
            raise ValueError(f"{num_samples} training images cannot fill one batch of {batch_size}: "
                             "lower detector.batch_size")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.drop_last, self.epoch = drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start:start + self.batch_size].tolist()


def make_detection_loader(dataset: DetectionDataset, batch_size: int, seed: int = 0,
                          num_workers: int = 0) -> tuple[paddle.io.DataLoader, EpochShuffleBatchSampler]:
    dataset.preload()  # before workers fork, so they share one cache
    sampler = EpochShuffleBatchSampler(len(dataset), batch_size, seed)
    loader = paddle.io.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_detection,
                                  num_workers=num_workers, return_list=True)
    return loader, sampler
