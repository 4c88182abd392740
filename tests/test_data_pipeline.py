"""The extractor's data pipeline: list files, decoding, box crops, transforms, PK batches, loader."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from visrec.data import datasets as ds
from visrec.data.datasets import RetrievalDataset, make_loader
from visrec.data.split_list import ListFileError, read_split_list
from visrec.data.samplers import PKSampler
from visrec.imaging import ImageReadError, crop_box, load_image
from visrec.data.transform_ops import (
    CenterCrop,
    ColorJitter,
    Normalize,
    RandomCrop,
    RandomErasing,
    RandomFlip,
    RandomResizedCrop,
    RandomRotation,
    Resize,
    ToCHW,
)
from visrec.data.transforms import Compose, build_transforms, train_resize_size

RNG = np.random.default_rng


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return RNG(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    buf.tofile(str(path))


def _identity() -> Compose:
    """uint8 HWC -> the same values as CHW float32: lets tests see the source pixels."""
    return Compose([Normalize(mean=(0, 0, 0), std=(1, 1, 1), scale=1.0), ToCHW()])


@pytest.fixture()
def tiny_set(tmp_path: Path) -> tuple[Path, Path, dict[int, tuple[float, float, float, float]]]:
    """6 classes x 1..5 PNG images (lossless, so pixels are checkable), list file, boxes."""
    root = tmp_path / "CUB_200_2011"
    counts = {101: 5, 102: 4, 103: 4, 104: 3, 105: 2, 106: 1}
    lines, boxes, uid = [], {}, 0
    for label, n in counts.items():
        for j in range(n):
            uid += 1
            h, w = 30 + 3 * j, 40 + 2 * uid
            rel = f"images/{label}.class name/img {uid}.png"  # spaces in the path
            _write_rgb(root / rel, _noise(h, w, seed=uid))
            lines.append(f"{rel} {label} {uid}")
            boxes[uid] = (5.0, 4.0, 20.0 + j, 15.0)
    list_file = tmp_path / "train_list.txt"
    list_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, list_file, boxes


# ---------------------------------------------------------------- read_split_list

def test_read_list_parses_paths_with_spaces_and_skips_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "list.txt"
    f.write_text("images/001.A b/x y.jpg 1 10\r\n\nimages/002.B/z.jpg 2 11  \n", encoding="utf-8")
    entries = read_split_list(f)
    assert [(e.path, e.label, e.unique_id) for e in entries] == [
        ("images/001.A b/x y.jpg", 1, 10), ("images/002.B/z.jpg", 2, 11)]


@pytest.mark.parametrize("bad_line, needle", [
    ("images/a.jpg 3", "expected"),
    ("images/a.jpg x 4", "must be integers"),
    ("images/a.jpg 3 4.5", "must be integers"),
    ("images/b.jpg 3 1", "already used on line 1"),
])
def test_read_list_names_file_and_line_of_a_bad_line(tmp_path: Path, bad_line: str, needle: str) -> None:
    f = tmp_path / "list.txt"
    f.write_text(f"images/ok.jpg 1 1\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ListFileError, match=needle) as info:
        read_split_list(f)
    assert f"{f}:2:" in str(info.value)


def test_duplicate_unique_ids_may_be_left_to_the_validation_rule(tmp_path: Path) -> None:
    f = tmp_path / "list.txt"
    f.write_text("images/a.jpg 1 1\nimages/b.jpg 1 1\n", encoding="utf-8")
    assert [e.path for e in read_split_list(f, require_unique_ids=False)] == ["images/a.jpg", "images/b.jpg"]
    with pytest.raises(ListFileError, match="already used"):
        read_split_list(f)


def test_read_list_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ListFileError, match="split stage"):
        read_split_list(tmp_path / "nope.txt")


# ---------------------------------------------------------------- load_image / crop_box

def test_load_image_converts_bgr_to_rgb_and_reads_unicode_paths(tmp_path: Path) -> None:
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 200  # pure red in RGB
    path = tmp_path / "鸟 图.png"
    _write_rgb(path, rgb)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (8, 10, 3)
    np.testing.assert_array_equal(out, rgb)


def test_load_image_greyscale_becomes_three_channels(tmp_path: Path) -> None:
    grey = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (20, 1))
    path = tmp_path / "grey.jpg"
    assert cv2.imwrite(str(path), grey)
    out = load_image(path)
    assert out.shape == (20, 30, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_load_image_drops_alpha(tmp_path: Path) -> None:
    bgra = np.zeros((6, 7, 4), np.uint8)
    bgra[..., 0], bgra[..., 3] = 255, 10  # blue, nearly transparent
    path = tmp_path / "alpha.png"
    assert cv2.imwrite(str(path), bgra)
    out = load_image(path)
    assert out.shape == (6, 7, 3)
    assert (out == [0, 0, 255]).all()


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg" * 10)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path, needle in ((tmp_path / "missing.jpg", "not found"), (corrupt, "decodable"), (empty, "empty")):
        with pytest.raises(ImageReadError, match=needle) as info:
            load_image(path)
        assert info.value.path == str(path)


def test_crop_box_clips_pads_and_never_returns_empty() -> None:
    img = _noise(50, 80)
    np.testing.assert_array_equal(crop_box(img, (10, 5, 20, 30)), img[5:35, 10:30])
    # overshooting box (as in a few real CUB rows) is clipped to the image
    np.testing.assert_array_equal(crop_box(img, (60, 40, 30, 20)), img[40:50, 60:80])
    # pad grows each side by pad * (w, h): 0.1 * 20 = 2 px left/right, 0.1 * 30 = 3 px top/bottom
    np.testing.assert_array_equal(crop_box(img, (10, 5, 20, 30), pad=0.1), img[2:38, 8:32])
    for degenerate in ((100, 100, 10, 10), (10, 10, 0, 5), (10, 10, -3, 5), (float("nan"), 0, 5, 5)):
        np.testing.assert_array_equal(crop_box(img, degenerate), img)


# ---------------------------------------------------------------- transforms

@pytest.mark.parametrize("op, expected_shape", [
    (Resize(32), (32, 32, 3)),
    (Resize(30, keep_ratio=True), (30, 40, 3)),  # 45x60 -> short side 30
    (RandomResizedCrop(24), (24, 24, 3)),
    (RandomCrop(40), (40, 40, 3)),
    (RandomCrop(40, pad=4, pad_mode="constant"), (40, 40, 3)),
    (RandomCrop(64), (64, 64, 3)),  # larger than the image: padded up
    (CenterCrop(20), (20, 20, 3)),
    (RandomFlip(0.5), (45, 60, 3)),
    (RandomRotation(30, prob=1.0), (45, 60, 3)),
    (RandomRotation(30, prob=1.0, fill="mean"), (45, 60, 3)),
    (ColorJitter(0.4, 0.4, 0.4, prob=1.0), (45, 60, 3)),
])
def test_uint8_ops_keep_uint8_hwc(op, expected_shape) -> None:
    out = op(_noise(45, 60), RNG(3))
    assert out.shape == expected_shape and out.dtype == np.uint8


def test_normalize_and_to_chw_give_float32_chw() -> None:
    img = _noise(10, 12)
    out = ToCHW()(Normalize()(img, None), None)
    assert out.shape == (3, 10, 12) and out.dtype == np.float32 and out.flags.c_contiguous
    expected = (img / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out, expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)


def test_normalize_tflite_convention_is_exact() -> None:
    values = np.arange(256, dtype=np.uint8)
    img = np.stack([values, values[::-1], values], axis=-1)[None]  # 1 x 256 x 3
    out = Normalize(mean=(127, 127, 127), std=(128, 128, 128), scale=1.0)(img, None)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, (img.astype(np.float32) - 127) / 128)
    assert out.min() == -127 / 128 and out.max() == 1.0


def test_flip_rotation_and_jitter_respect_their_probability() -> None:
    img = _noise(20, 30)
    np.testing.assert_array_equal(RandomFlip(1.0)(img, RNG(0)), img[:, ::-1])
    for op in (RandomFlip(0.0), RandomRotation(40, prob=0.0), ColorJitter(0.5, 0.5, 0.5, prob=0.0)):
        np.testing.assert_array_equal(op(img, RNG(0)), img)
    assert not np.array_equal(ColorJitter(0.5, 0.5, 0.5, prob=1.0)(img, RNG(0)), img)


def test_rotation_fills_corners_with_the_constant() -> None:
    img = np.full((64, 64, 3), 100, np.uint8)
    filled = sum(
        (RandomRotation(45, prob=1.0, fill=(255, 0, 0))(img, RNG(seed))[0, 0] == [255, 0, 0]).all()
        for seed in range(10)
    )
    assert filled >= 8  # every angle beyond ~1 degree moves the corner outside the source


def test_random_erasing_erases_one_rectangle_within_the_area_bounds() -> None:
    img = RNG(0).standard_normal((3, 40, 50)).astype(np.float32) + 5.0  # no zeros in the input
    before = img.copy()
    for seed in range(20):
        out = RandomErasing(prob=1.0, sl=0.02, sh=0.4, r1=0.3, value=0)(img, RNG(seed))
        np.testing.assert_array_equal(img, before)  # input untouched
        erased = (out == 0).all(axis=0)
        rows, cols = np.nonzero(erased)
        assert rows.size > 0
        box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()  # a solid rectangle
        assert 0.015 <= erased.mean() <= 0.42
    np.testing.assert_array_equal(RandomErasing(prob=0.0)(img, RNG(0)), img)
    mean_filled = RandomErasing(prob=1.0, value="mean")(img, RNG(1))
    assert (mean_filled != img).any()
    with pytest.raises(ValueError, match="CHW float32"):
        RandomErasing(prob=1.0)(_noise(10, 10), RNG(0))


def test_build_transforms_shapes_and_seeded_determinism() -> None:
    img = _noise(70, 90)
    kwargs = dict(rotate_degrees=20, color_jitter=0.3, erase_prob=0.5)
    for train, rrc in ((False, False), (True, False), (True, True)):
        t = build_transforms(48, train, random_resized_crop=rrc, **kwargs)
        out = t(img, RNG([0, 0, 7]))
        assert out.shape == (3, 48, 48) and out.dtype == np.float32
        np.testing.assert_array_equal(out, t(img, RNG([0, 0, 7])))
    train = build_transforms(48, True, **kwargs)
    assert not np.array_equal(train(img, RNG([0, 0, 7])), train(img, RNG([0, 1, 7])))


# ---------------------------------------------------------------- PKSampler

def _labels(counts: list[int]) -> np.ndarray:
    labels = np.repeat(np.arange(len(counts)), counts)
    return RNG(9).permutation(labels)  # classes interleaved, as in a real list


def test_pk_batches_hold_p_distinct_classes_times_k() -> None:
    labels = _labels([12] * 10)
    sampler = PKSampler(labels, p=4, k=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10 * 4 // 4  # 40 groups of 3 / 4 per batch
    for batch in batches:
        assert len(batch) == 12
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 4 and (counts == 3).all()
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(labels)  # every image once per epoch


def test_pk_uneven_class_sizes_including_a_single_image_class() -> None:
    labels = _labels([1, 2, 5, 9, 30, 4, 3])
    dropped = PKSampler(labels, p=3, k=4, seed=0, drop_last=True)
    kept = PKSampler(labels, p=3, k=4, seed=0, drop_last=False)
    full, everything = list(dropped), list(kept)
    assert len(full) == len(dropped) > 0 and len(everything) == len(kept) > len(full)
    for batch in full:
        _, counts = np.unique(labels[batch], return_counts=True)
        assert len(counts) == 3 and (counts == 4).all()
    assert everything[:len(full)] == full  # drop_last=False only appends the leftovers
    assert set(np.concatenate(everything).tolist()) == set(range(len(labels)))
    single = int(np.flatnonzero(labels == 0)[0])
    hits = 0
    for epoch in range(5):  # the 1-image class repeats its image to fill its k slots
        kept.set_epoch(epoch)
        for batch in kept:
            if single in batch:
                hits += 1
                assert batch.count(single) == 4
    assert hits == 5


@pytest.mark.parametrize("counts, p, k", [
    ([1, 2, 5, 9, 30, 4, 3], 3, 4),
    ([12] * 10, 4, 3),
    ([3, 40, 2, 2, 17, 1, 8, 8], 2, 2),
    ([30] * 25, 16, 4),
])
def test_pk_len_equals_yielded_batches_in_every_epoch(counts, p, k) -> None:
    labels = _labels(counts)
    for drop_last in (True, False):
        for world_size in (1, 2):
            sampler = PKSampler(labels, p, k, seed=4, drop_last=drop_last, world_size=world_size)
            lengths = set()
            for epoch in range(4):
                sampler.set_epoch(epoch)
                lengths.add(len(sampler))
                assert len(list(sampler)) == len(sampler)
            assert len(lengths) == 1  # depends on class sizes only: LR schedules can rely on it


def test_pk_packs_the_most_batches_the_class_sizes_allow() -> None:
    # k=4 groups per class: 1, 1, 2, 3, 8, 1, 1 (17). With 3 distinct classes per batch,
    # 5 batches would need 15 groups but only 1+1+2+3+5+1+1 = 14 can be placed; 4 fit.
    assert len(PKSampler(_labels([1, 2, 5, 9, 30, 4, 3]), p=3, k=4)) == 4
    # one huge class cannot fill batches alone: 2 classes per batch, the small one limits
    assert len(PKSampler(_labels([100, 4]), p=2, k=2)) == 2


@pytest.mark.parametrize("counts, p, k", [([5] * 25, 32, 2), ([5] * 3, 4, 1)])
def test_pk_refuses_more_classes_per_batch_than_exist(counts, p, k) -> None:
    with pytest.raises(ValueError) as info:
        PKSampler(_labels(counts), p=p, k=k)
    msg = str(info.value)
    assert f"p={p}" in msg and f"k={k}" in msg and f"only {len(counts)} classes" in msg
    assert "lower the batch size" in msg


@pytest.mark.parametrize("p, k", [(1, 1), (2, 0), (0, 2)])
def test_pk_refuses_degenerate_batches(p, k) -> None:
    with pytest.raises(ValueError, match="PKSampler"):
        PKSampler(_labels([5, 5]), p=p, k=k)


def test_pk_order_is_a_function_of_seed_and_epoch() -> None:
    labels = _labels([7, 11, 6, 9, 14, 5])
    a, b = PKSampler(labels, 3, 2, seed=5), PKSampler(labels, 3, 2, seed=5)
    a.set_epoch(3)
    list(a)  # iterating must not consume randomness for the next pass
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(PKSampler(labels, 3, 2, seed=6)) != list(PKSampler(labels, 3, 2, seed=5))


def test_pk_distributed_ranks_are_disjoint_and_equal_length() -> None:
    labels = _labels([9, 8, 7, 13, 6, 10, 5])
    single = PKSampler(labels, 2, 3, seed=2)
    ranks = [PKSampler(labels, 2, 3, seed=2, rank=r, world_size=2) for r in range(2)]
    for s in [single, *ranks]:
        s.set_epoch(1)
    b0, b1 = list(ranks[0]), list(ranks[1])
    assert len(b0) == len(b1) == len(ranks[0]) == len(single) // 2
    assert not {tuple(b) for b in b0} & {tuple(b) for b in b1}
    global_batches = list(single)
    assert b0 == global_batches[0:2 * len(b0):2] and b1 == global_batches[1:2 * len(b1):2]
    with pytest.raises(ValueError, match="rank"):
        PKSampler(labels, 2, 3, rank=2, world_size=2)


# ---------------------------------------------------------------- dataset and loader

def test_dataset_dense_labels_and_reproducible_augmentation(tiny_set) -> None:
    root, list_file, _ = tiny_set
    data = RetrievalDataset(root, list_file, build_transforms(24, True, erase_prob=0.5), seed=3)
    assert data.classes == [101, 102, 103, 104, 105, 106] and data.num_classes == 6
    assert data.labels.tolist() == [0] * 5 + [1] * 4 + [2] * 4 + [3] * 3 + [4] * 2 + [5]
    assert data.unique_ids.tolist() == list(range(1, 20))
    image, label, uid = data[9]
    assert image.shape == (3, 24, 24) and image.dtype == np.float32
    assert label == 2 and uid == 10 and label.dtype == np.int64
    np.testing.assert_array_equal(data[9][0], image)
    data.set_epoch(1)
    assert not np.array_equal(data[9][0], image)
    data.set_epoch(0)
    np.testing.assert_array_equal(data[9][0], image)
    with pytest.raises(IndexError):
        data[len(data)]


def test_dataset_crop_to_bbox_returns_the_crop(tiny_set) -> None:
    root, list_file, boxes = tiny_set
    data = RetrievalDataset(root, list_file, _identity(), boxes=boxes, crop_to_bbox=True)
    full = load_image(data.image_path(4))
    x, y, w, h = (int(v) for v in boxes[5])
    np.testing.assert_array_equal(data[4][0], full[y:y + h, x:x + w].transpose(2, 0, 1).astype(np.float32))
    with pytest.raises(ValueError, match="no box"):
        RetrievalDataset(root, list_file, _identity(), boxes={1: (0, 0, 5, 5)}, crop_to_bbox=True)


def test_cached_samples_equal_uncached_and_decode_once(tiny_set, monkeypatch) -> None:
    root, list_file, boxes = tiny_set
    calls = []
    real_load = ds.load_image
    monkeypatch.setattr(ds, "load_image", lambda p: calls.append(p) or real_load(p))
    common = dict(boxes=boxes, crop_to_bbox=True, seed=1)
    eval_tf = build_transforms(16, False)
    plain = RetrievalDataset(root, list_file, eval_tf, **common)
    cached = RetrievalDataset(root, list_file, eval_tf, cache_images=True, cache_size=16, **common)
    train_tf = build_transforms(16, True, rotate_degrees=10, erase_prob=0.5)
    cached_full = RetrievalDataset(root, list_file, train_tf, cache_images=True, **common)
    cached_train = RetrievalDataset(root, list_file, train_tf, cache_images=True,
                                    cache_size=train_resize_size(16, 1.15), **common)
    plain_train = RetrievalDataset(root, list_file, train_tf, **common)
    for i in range(len(plain)):
        np.testing.assert_array_equal(cached[i][0], plain[i][0])
        np.testing.assert_array_equal(cached_full[i][0], plain_train[i][0])
        np.testing.assert_array_equal(cached_train[i][0], plain_train[i][0])
    calls.clear()
    for _ in range(2):
        for i in range(len(cached)):
            cached[i]
    assert calls == []  # the cache was filled on first use; no more decoding
    assert all(im.shape == (16, 16, 3) for im in cached._cache)


def test_loader_with_pk_sampler_yields_paddle_batches(tiny_set) -> None:
    import paddle

    root, list_file, _ = tiny_set
    data = RetrievalDataset(root, list_file, build_transforms(20, True), cache_images=True)
    sampler = PKSampler(data.labels, p=3, k=2, seed=0)
    loader = make_loader(data, batch_sampler=sampler)
    assert len(loader) == len(sampler)
    batches = list(loader)
    assert len(batches) == len(sampler) > 0
    images, labels, ids = batches[0]
    assert isinstance(images, paddle.Tensor)
    assert images.shape == [6, 3, 20, 20] and images.dtype == paddle.float32
    assert labels.shape == [6] and labels.dtype == paddle.int64 and ids.dtype == paddle.int64
    np.testing.assert_array_equal(ids.numpy(), data.unique_ids[list(sampler)[0]])
    with pytest.raises(ValueError, match="not both"):
        make_loader(data, batch_sampler=sampler, batch_size=4)


@pytest.mark.timeout(120)
def test_loader_workers_give_the_same_augmentation_as_one_process(tiny_set) -> None:
    root, list_file, _ = tiny_set
    data = RetrievalDataset(root, list_file, build_transforms(16, True, rotate_degrees=15))
    data.set_epoch(2)
    one = [b[0].numpy() for b in make_loader(data, batch_size=5)]
    two = [b[0].numpy() for b in make_loader(data, batch_size=5, num_workers=2, timeout=60)]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- real CUB subset (read-only)

def test_real_cub_greyscale_image_and_bbox_crops(cub_subset: Path, tmp_path: Path) -> None:
    from visrec.data.cub import read_cub

    meta = read_cub(cub_subset)
    grey = next(im for im in meta.images if im.image_id == 448)  # a greyscale JPEG in CUB
    sample = meta.images[:3] + [grey]
    list_file = tmp_path / "list.txt"
    list_file.write_text("".join(f"{im.rel_path} {im.class_id} {im.image_id}\n" for im in sample))
    data = RetrievalDataset(cub_subset, list_file, _identity(), crop_to_bbox=True)  # boxes from read_cub
    for i, im in enumerate(sample):
        crop = data[i][0]
        full_h, full_w = load_image(cub_subset / im.rel_path).shape[:2]
        x, y, w, h = im.box
        expected_h = min(full_h, y + h) - max(0, y)  # boxes may overshoot: clipped
        expected_w = min(full_w, x + w) - max(0, x)
        assert crop.shape[0] == 3
        # float edges are floored / ceiled outwards: up to 1 px more on each side
        assert abs(crop.shape[1] - expected_h) <= 2 and abs(crop.shape[2] - expected_w) <= 2
    raw = load_image(cub_subset / grey.rel_path)
    assert raw.shape[2] == 3 and (raw[..., 0] == raw[..., 2]).all()
