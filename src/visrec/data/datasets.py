"""Split list files -> decoded, optionally box-cropped images -> transformed samples for Paddle.

The list files are the split stage's (:mod:`visrec.data.split_list`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paddle
from tqdm import tqdm

from visrec.data.cub import read_cub, resolve_root
from visrec.data.split_list import ListFileError, read_split_list
from visrec.imaging import crop_box, load_image

logger = logging.getLogger(__name__)


class CachedImageDataset(paddle.io.Dataset):
    """Shared plumbing of the image datasets: optional decode-once cache, per-sample seeding.

    Sample ``i`` of epoch ``e`` is transformed with ``default_rng([seed, e, i])``, so an
    epoch's randomness depends only on its number (exact resume). Subclasses implement
    ``__len__`` and ``_decode(index)`` (the image before the transform: HWC uint8 RGB).
    """

    cache_name = "the dataset"  # in the caching progress bar and log line

    def __init__(self, transform: Callable[[np.ndarray, np.random.Generator], np.ndarray],
                 cache_images: bool = False, cache_size: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if cache_size is not None and cache_size < 1:
            raise ValueError(f"cache_size must be a positive pixel count or None, got {cache_size}")
        self.transform = transform
        self.cache_images = cache_images
        self.cache_size = cache_size
        self.seed = seed
        self.epoch = 0
        self._cache: list[np.ndarray] | None = None

    def _decode(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def source_image(self, index: int) -> np.ndarray:
        """The decoded (and box-cropped) image before the transform: HWC uint8 RGB."""
        if self.cache_images:
            self.preload()
            assert self._cache is not None
            return self._cache[index]
        return self._decode(index)

    def preload(self) -> None:
        """Fill the image cache (no-op when caching is off or already done)."""
        if not self.cache_images or self._cache is not None:
            return
        cache = []
        for i in tqdm(range(len(self)), desc=f"caching {self.cache_name}", unit="img", disable=len(self) < 500):
            img = self._decode(i)
            if self.cache_size is not None:
                img = cv2.resize(img, (self.cache_size, self.cache_size), interpolation=cv2.INTER_LINEAR)
            img.setflags(write=False)  # a transform writing in place would corrupt later epochs
            cache.append(img)
        self._cache = cache
        logger.info("cached %d images of %s: %.1f MB", len(cache), self.cache_name,
                    sum(im.nbytes for im in cache) / 2**20)

    def transformed(self, index: int) -> np.ndarray:
        """Sample ``index`` of the current epoch, transformed."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        return self.transform(self.source_image(index), np.random.default_rng([self.seed, self.epoch, index]))


class RetrievalDataset(CachedImageDataset):
    """Images of a list file as ``(CHW float32, dense label int64, unique id int64)``.

    Labels are re-indexed densely: ``classes`` holds the sorted CUB class ids and
    ``label_to_index`` maps them to 0..C-1 (what a classification head needs).

    Augmentation is reproducible: sample ``i`` in epoch ``e`` is transformed with
    ``np.random.default_rng([seed, e, i])``, independent of worker count and order;
    call ``set_epoch`` each epoch (before the loader starts its workers).

    ``cache_images=True`` decodes every image once (box-cropped, then square-resized to
    ``cache_size`` if given) and keeps it in memory: on 2 CPU cores JPEG decoding otherwise
    competes with training. Memory: about N x cache_size^2 x 3 bytes, e.g. 147 px ->
    65 KB per image, 3,000 images -> 190 MB; with ``cache_size=None`` full crops are kept
    (CUB averages ~500x375 px, ~0.5 MB per image). When ``cache_size`` equals the
    transform's first square ``Resize``, cached samples are identical to uncached ones.
    The cache fills in the calling process at first use (or ``preload()``), so loader
    workers forked afterwards share it.
    """

    def __init__(
        self,
        root: str | Path,
        list_file: str | Path,
        transform: Callable[[np.ndarray, np.random.Generator], np.ndarray],
        boxes: dict[int, tuple[float, float, float, float]] | None = None,
        crop_to_bbox: bool = False,
        bbox_pad: float = 0.0,
        cache_images: bool = False,
        cache_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(transform, cache_images, cache_size, seed)
        if bbox_pad < 0:
            raise ValueError(f"bbox_pad must be >= 0 (a fraction of the box size), got {bbox_pad}")
        self.root = resolve_root(root)
        self.list_file = Path(list_file)
        self.cache_name = self.list_file.name
        self.entries = read_split_list(self.list_file)
        if not self.entries:
            raise ListFileError(f"list file {self.list_file} holds no images")
        self.crop_to_bbox = crop_to_bbox
        self.bbox_pad = bbox_pad

        self.classes: list[int] = sorted({e.label for e in self.entries})
        self.label_to_index: dict[int, int] = {c: i for i, c in enumerate(self.classes)}
        self.labels = np.array([self.label_to_index[e.label] for e in self.entries], dtype=np.int64)
        self.unique_ids = np.array([e.unique_id for e in self.entries], dtype=np.int64)

        self.boxes: dict[int, tuple[float, float, float, float]] | None = None
        if crop_to_bbox:
            if boxes is None:
                boxes = {img.image_id: img.box for img in read_cub(self.root).images}
            missing = [e.unique_id for e in self.entries if e.unique_id not in boxes]
            if missing:
                raise ValueError(f"crop_to_bbox: {len(missing)} image id(s) of {self.list_file} have no box, "
                                 f"e.g. {missing[:5]}: pass boxes for every unique id or crop_to_bbox=False")
            self.boxes = {e.unique_id: tuple(boxes[e.unique_id]) for e in self.entries}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, index: int) -> Path:
        return self.root / self.entries[index].path

    def _decode(self, index: int) -> np.ndarray:
        img = load_image(self.image_path(index))
        if self.boxes is not None:
            img = crop_box(img, self.boxes[self.entries[index].unique_id], self.bbox_pad)
        return img

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int64, np.int64]:
        image = self.transformed(index)
        return image, self.labels[int(index)], self.unique_ids[int(index)]


def make_loader(
    dataset: paddle.io.Dataset,
    batch_sampler: Any | None = None,
    batch_size: int | None = None,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    timeout: int = 0,
) -> paddle.io.DataLoader:
    """A ``paddle.io.DataLoader`` yielding lists of paddle tensors ``[images, labels, ids]``.

    Give either ``batch_sampler`` (e.g. a PKSampler; then batch_size/shuffle/drop_last
    must stay unset) or ``batch_size``. Workers are re-created every epoch (not persistent)
    so they see the dataset's current ``set_epoch``. ``timeout`` (seconds, 0 = wait
    forever) turns a stuck worker into an error instead of a hang.
    """
    if batch_sampler is not None:
        if batch_size is not None or shuffle or drop_last:
            raise ValueError("make_loader: batch_size/shuffle/drop_last belong to the batch sampler; "
                             "pass either batch_sampler or batch_size, not both")
        kwargs: dict[str, Any] = {"batch_sampler": batch_sampler}
    else:
        if batch_size is None or batch_size < 1:
            raise ValueError(f"make_loader: give a batch_sampler or a positive batch_size (got {batch_size})")
        kwargs = {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last}
    if num_workers < 0:
        raise ValueError(f"make_loader: num_workers must be >= 0, got {num_workers}")
    preload = getattr(dataset, "preload", None)
    if callable(preload):
        preload()  # before workers fork, so they share one cache instead of decoding again
    return paddle.io.DataLoader(
        dataset,
        return_list=True,
        # No worker_init_fn calling cv2.setNumThreads: in a worker forked after the parent
        # used cv2's thread pool it deadlocks (seen with Paddle 3.3.1 + OpenCV 5.0).
        num_workers=num_workers,
        timeout=timeout,
        **kwargs,
    )
