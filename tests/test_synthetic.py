"""The embedded synthetic data set: CUB layout, determinism, and exact boxes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from visrec.config import ConfigError, SyntheticConfig
from visrec.data.cub import CUB_DIRNAME, check_layout
from visrec.data.synthetic import generate
from visrec.data.synthetic.recipes import make_recipes
from visrec.data.synthetic.render import instance_rng, mask_box, render_instance

TINY = SyntheticConfig(num_classes=4, images_per_class=3, image_size=64, seed=0,
                       occlusion_prob=0.5, clutter_shapes=6, workers=1)


def _tiny(**changes) -> SyntheticConfig:
    return SyntheticConfig(**{**TINY.__dict__, **changes})


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("tiny"), TINY, progress=False)


def test_layout_is_complete_cub(tiny_root: Path) -> None:
    assert tiny_root.name == CUB_DIRNAME
    meta = check_layout(tiny_root)
    assert meta.class_ids == [1, 2, 3, 4]
    assert len(meta.images) == 4 * 3
    assert [img.image_id for img in meta.images] == list(range(1, 13))
    # Ordered by class as in CUB, and every image sits in its class folder.
    assert [img.class_id for img in meta.images] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    for img in meta.images:
        folder = meta.classes[img.class_id]
        assert img.rel_path.startswith(f"images/{folder}/") and img.rel_path.endswith(".jpg")
        assert folder.startswith(f"{img.class_id:03d}.Synth_") and " " not in folder
    assert len(set(meta.classes.values())) == 4


def test_images_are_rgb_jpegs_of_the_configured_size(tiny_root: Path) -> None:
    meta = check_layout(tiny_root)
    for img in meta.images:
        path = meta.root / img.rel_path
        assert path.read_bytes()[:2] == b"\xff\xd8"  # JPEG magic
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert pixels.shape == (64, 64, 3)


def test_metadata_formats_match_cub(tiny_root: Path) -> None:
    box_line = (tiny_root / "bounding_boxes.txt").read_text().splitlines()[0].split()
    assert len(box_line) == 5 and all("." in v and len(v.split(".")[1]) == 1 for v in box_line[1:])
    first = (tiny_root / "images.txt").read_text().splitlines()[0].split()
    assert first[0] == "1" and not first[1].startswith("images/")
    flags = {line.split()[1] for line in (tiny_root / "train_test_split.txt").read_text().splitlines()}
    assert flags == {"0", "1"}


def test_split_marks_about_half_of_each_class_for_training(tmp_path: Path) -> None:
    meta = check_layout(generate(tmp_path, _tiny(num_classes=3, images_per_class=6, image_size=32), progress=False))
    for class_id in meta.class_ids:
        flags = [img.is_train for img in meta.images if img.class_id == class_id]
        assert sum(flags) == 3


def test_boxes_are_the_exact_extent_of_the_rendered_object(tiny_root: Path) -> None:
    meta = check_layout(tiny_root)
    recipes = make_recipes(TINY.num_classes, TINY.seed)
    for img in meta.images:
        index = int(Path(img.rel_path).stem.rsplit("_", 1)[1]) - 1
        image, mask = render_instance(recipes[img.class_id - 1], instance_rng(TINY.seed, img.class_id, index),
                                      TINY.image_size, TINY.clutter_shapes, TINY.occlusion_prob)
        # The re-rendered image is the one on disk (up to JPEG loss) ...
        on_disk = cv2.cvtColor(cv2.imread(str(meta.root / img.rel_path)), cv2.COLOR_BGR2RGB)
        assert np.abs(on_disk.astype(int) - image.astype(int)).mean() < 6
        # ... and the listed box is the tight box of its object mask.
        x, y, w, h = img.box
        assert (x, y, w, h) == tuple(float(v) for v in mask_box(mask))
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        assert mask[int(y), int(x):int(x + w)].any() and mask[int(y + h - 1), int(x):int(x + w)].any()
        assert mask[int(y):int(y + h), int(x)].any() and mask[int(y):int(y + h), int(x + w - 1)].any()
        outside = mask.copy()
        outside[int(y):int(y + h), int(x):int(x + w)] = False
        assert not outside.any()


def test_object_mask_covers_drawn_pixels_only() -> None:
    """Without clutter the object is the only thing that differs from the plain backdrop."""
    recipe = make_recipes(1, 3)[0]
    image, mask = render_instance(recipe, instance_rng(3, 1, 0), 96, clutter_shapes=0, occlusion_prob=0.0)
    assert 0.02 < mask.mean() < 0.6
    x, y, w, h = mask_box(mask)
    assert max(w, h) >= 0.25 * 96  # object about 30-80 % of the side
    # Pixels well inside the object differ from the backdrop far more than backdrop pixels do.
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    far = ~cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    background = image[far].astype(float)
    median = np.median(background, axis=0)
    assert np.abs(image[inner] - median).sum(axis=1).mean() > 2 * np.abs(background - median).sum(axis=1).mean()


def test_mask_box_on_a_known_mask() -> None:
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    mask[7, 4] = True
    assert mask_box(mask) == (3, 2, 6, 6)
    with pytest.raises(ValueError, match="empty"):
        mask_box(np.zeros((4, 4), bool))


def test_two_runs_are_byte_identical(tiny_root: Path, tmp_path: Path) -> None:
    again = generate(tmp_path, TINY, progress=False)
    assert _files(again) == _files(tiny_root)


def test_worker_count_does_not_change_the_output(tiny_root: Path, tmp_path: Path) -> None:
    parallel = generate(tmp_path, _tiny(workers=2), progress=False)
    assert _files(parallel) == _files(tiny_root)


def test_seed_changes_the_images(tiny_root: Path, tmp_path: Path) -> None:
    other = _files(generate(tmp_path, _tiny(seed=1), progress=False))
    mine = _files(tiny_root)
    jpgs = [k for k in mine if k.endswith(".jpg")]
    other_jpgs = sorted(k for k in other if k.endswith(".jpg"))
    assert len(other_jpgs) == len(jpgs)
    assert not set(mine[k] for k in jpgs) & set(other[k] for k in other_jpgs)


def test_recipes_are_stable_and_distinct() -> None:
    few, many = make_recipes(5, 0), make_recipes(200, 0)
    assert many[:5] == few  # adding classes does not change the earlier ones
    assert len({r.name for r in many}) == 200
    signatures = {(r.family, r.body, r.wing, r.head, r.body_pattern, r.body_pattern_colour,
                   r.head_pattern, r.wing_pattern) for r in many}
    assert len(signatures) == 200
    # Colours are shared between classes: no class owns a body colour.
    assert len({r.body for r in many}) < 20


def test_instances_of_a_class_vary() -> None:
    (recipe,) = make_recipes(1, 0)
    (img0, mask0), (img1, mask1) = (render_instance(recipe, instance_rng(0, 1, i), 64) for i in (0, 1))
    assert not np.array_equal(img0, img1)
    assert not np.array_equal(mask0, mask1)  # pose differs, not just the backdrop


@pytest.mark.parametrize("field,value", [
    ("num_classes", 0), ("images_per_class", 0), ("image_size", 16),
    ("occlusion_prob", 1.5), ("clutter_shapes", -1), ("workers", -2),
    ("object_scale", [0.9, 0.5]), ("object_scale", [0.5]), ("texture", 1.5),
])
def test_bad_config_is_refused_with_the_field_named(tmp_path: Path, field: str, value) -> None:
    with pytest.raises(ConfigError, match=field):
        generate(tmp_path, _tiny(**{field: value}), progress=False)
    assert not (tmp_path / CUB_DIRNAME).exists()


def test_objects_larger_than_the_frame_are_cut_by_it_and_boxed_as_seen() -> None:
    recipes = make_recipes(6, 0)
    for i, recipe in enumerate(recipes):
        image, mask = render_instance(recipe, instance_rng(0, recipe.class_id, i), 64, clutter_shapes=0,
                                      occlusion_prob=0.0, object_scale=(1.3, 1.5))
        x, y, w, h = mask_box(mask)
        assert x == 0 or y == 0 or x + w == 64 or y + h == 64  # the frame cuts the object
        assert mask.mean() > 0.1


def _background_detail(texture: float) -> float:
    """Mean |Laplacian| of backdrop pixels well away from the object, over a few images."""
    recipe = make_recipes(1, 0)[0]
    detail = []
    for i in range(4):
        image, mask = render_instance(recipe, instance_rng(0, 1, i), 96, clutter_shapes=0,
                                      occlusion_prob=0.0, texture=texture)
        far = ~cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        detail.append(np.abs(cv2.Laplacian(grey, cv2.CV_32F))[far].mean())
    return float(np.mean(detail))


def test_texture_adds_photo_like_detail_to_the_backdrop() -> None:
    assert _background_detail(1.0) > 1.3 * _background_detail(0.0)


def test_refuses_to_overwrite_a_filled_folder(tiny_root: Path) -> None:
    with pytest.raises(FileExistsError, match="not empty"):
        generate(tiny_root.parent, TINY, progress=False)
