"""The synthetic data set on disk: every image of every class drawn (in parallel when asked),
written as JPEG in the CUB layout, with CUB's five metadata files.

    <dest_parent>/CUB_200_2011/images/NNN.Name/Name_NNNN.jpg
    images.txt  image_class_labels.txt  classes.txt  bounding_boxes.txt  train_test_split.txt

The boxes are the exact extent of each drawn object (its mask before occlusion).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from visrec.config import ConfigError, SyntheticConfig
from visrec.data.cub import CUB_DIRNAME
from visrec.data.synthetic.recipes import BirdRecipe, make_recipes
from visrec.data.synthetic.render import DEFAULT_OBJECT_SCALE, instance_rng, mask_box, render_instance

logger = logging.getLogger(__name__)

JPEG_QUALITY = 90


def _encode_jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG image")
    return buf.tobytes()


@dataclass(frozen=True)
class _Job:
    recipe: BirdRecipe
    index: int  # 0-based image index within the class
    path: Path
    seed: int
    image_size: int
    clutter_shapes: int
    occlusion_prob: float
    object_scale: tuple[float, float] = DEFAULT_OBJECT_SCALE
    texture: float = 0.0


def _render_job(job: _Job) -> tuple[int, int, int, int]:
    rng = instance_rng(job.seed, job.recipe.class_id, job.index)
    image, mask = render_instance(job.recipe, rng, job.image_size, job.clutter_shapes, job.occlusion_prob,
                                  job.object_scale, job.texture)
    job.path.write_bytes(_encode_jpeg(image))
    return mask_box(mask)


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already


def image_filename(recipe: BirdRecipe, index: int) -> str:
    return f"{recipe.name}_{index + 1:04d}.jpg"


def _check_config(cfg: SyntheticConfig) -> None:
    problems = []
    if cfg.num_classes < 1:
        problems.append(f"num_classes={cfg.num_classes} (need >= 1)")
    if cfg.images_per_class < 1:
        problems.append(f"images_per_class={cfg.images_per_class} (need >= 1)")
    if cfg.image_size < 32:
        problems.append(f"image_size={cfg.image_size} (need >= 32 pixels)")
    if not 0.0 <= cfg.occlusion_prob <= 1.0:
        problems.append(f"occlusion_prob={cfg.occlusion_prob} (need 0..1)")
    if cfg.clutter_shapes < 0:
        problems.append(f"clutter_shapes={cfg.clutter_shapes} (need >= 0)")
    if len(cfg.object_scale) != 2 or not 0.05 <= cfg.object_scale[0] <= cfg.object_scale[1] <= 2.0:
        problems.append(f"object_scale={cfg.object_scale} (need [low, high], 0.05 <= low <= high <= 2)")
    if not 0.0 <= cfg.texture <= 1.0:
        problems.append(f"texture={cfg.texture} (need 0..1)")
    if cfg.workers < 0:
        problems.append(f"workers={cfg.workers} (need >= 0; 0 or 1 runs in-process)")
    if problems:
        raise ConfigError("data.synthetic: invalid " + "; ".join(problems) + " — fix it in params.yaml")


def generate(dest_parent: Path, cfg: SyntheticConfig, progress: bool = True) -> Path:
    """Write the synthetic data set as ``dest_parent/CUB_200_2011``; return that folder.

    With ``cfg.workers > 1`` the images are drawn in spawned processes, so a script that
    calls this must guard its entry point with ``if __name__ == "__main__":``.
    """
    _check_config(cfg)
    start = time.perf_counter()
    root = Path(dest_parent) / CUB_DIRNAME
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} already exists and is not empty: generate into an empty folder")
    images_dir = root / "images"
    recipes = make_recipes(cfg.num_classes, cfg.seed)

    jobs: list[_Job] = []
    for recipe in recipes:
        (images_dir / recipe.folder).mkdir(parents=True, exist_ok=True)
        for index in range(cfg.images_per_class):
            jobs.append(_Job(recipe, index, images_dir / recipe.folder / image_filename(recipe, index),
                             cfg.seed, cfg.image_size, cfg.clutter_shapes, cfg.occlusion_prob,
                             (float(cfg.object_scale[0]), float(cfg.object_scale[1])), cfg.texture))

    bar = dict(total=len(jobs), desc="synthetic images", unit="img", disable=not progress)
    if cfg.workers <= 1:
        boxes = [_render_job(job) for job in tqdm(jobs, **bar)]
    else:
        # spawn, not fork: the caller may hold threads (Paddle, OpenMP) that fork would copy
        # mid-lock. An executor, not a Pool: a worker that dies at start-up raises
        # BrokenProcessPool instead of being respawned forever.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init) as pool:
            boxes = list(tqdm(pool.map(_render_job, jobs, chunksize=16), **bar))

    _write_metadata(root, recipes, jobs, boxes, cfg.seed)
    seconds = time.perf_counter() - start
    logger.info("synthetic data: %d classes, %d images, %d px, %.1f s -> %s",
                len(recipes), len(jobs), cfg.image_size, seconds, root)
    return root


def _write_metadata(root: Path, recipes: list[BirdRecipe], jobs: list[_Job],
                    boxes: list[tuple[int, int, int, int]], seed: int) -> None:
    # CUB marks roughly half of each class for training; pick which half per class, seeded.
    train_flags: list[int] = []
    per_class: dict[int, list[_Job]] = {}
    for job in jobs:
        per_class.setdefault(job.recipe.class_id, []).append(job)
    for class_id, class_jobs in per_class.items():
        n = len(class_jobs)
        order = np.random.default_rng([seed, 3, class_id]).permutation(n)
        flags = np.zeros(n, int)
        flags[order[: (n + 1) // 2]] = 1
        train_flags.extend(int(f) for f in flags)

    images, labels, bboxes, split = [], [], [], []
    for image_id, (job, box, flag) in enumerate(zip(jobs, boxes, train_flags, strict=True), start=1):
        images.append(f"{image_id} {job.recipe.folder}/{job.path.name}")
        labels.append(f"{image_id} {job.recipe.class_id}")
        x, y, w, h = box
        bboxes.append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
        split.append(f"{image_id} {flag}")
    files = {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "classes.txt": [f"{r.class_id} {r.folder}" for r in recipes],
        "bounding_boxes.txt": bboxes,
        "train_test_split.txt": split,
    }
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
