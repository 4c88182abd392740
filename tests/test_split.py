import json

import cv2
import numpy as np
import pytest

from visrec.data.cub import read_cub
from visrec.data.split import SplitError, clip_box, split_classes, write_split


def make_cub(root, num_classes=4, per_class=3, size=(40, 30), boxes=None):
    """A tiny CUB layout: ``per_class`` images per class, ids in class order."""
    cub = root / "CUB_200_2011"
    (cub / "images").mkdir(parents=True)
    lines = {k: [] for k in ("images", "labels", "classes", "boxes", "split")}
    image_id = 0
    for c in range(1, num_classes + 1):
        folder = f"{c:03d}.Class {c}"  # a space inside, as real names could have
        (cub / "images" / folder).mkdir()
        lines["classes"].append(f"{c} {folder}")
        for k in range(per_class):
            image_id += 1
            name = f"{folder}/img_{k}.jpg"
            cv2.imwrite(str(cub / "images" / name), np.full((size[1], size[0], 3), c * 20, np.uint8))
            box = (boxes or {}).get(image_id, (2.0, 3.0, 20.0, 15.0))
            lines["images"].append(f"{image_id} {name}")
            lines["labels"].append(f"{image_id} {c}")
            lines["boxes"].append(f"{image_id} " + " ".join(str(v) for v in box))
            lines["split"].append(f"{image_id} {k % 2}")
    for key, fname in (("images", "images.txt"), ("labels", "image_class_labels.txt"),
                       ("classes", "classes.txt"), ("boxes", "bounding_boxes.txt"),
                       ("split", "train_test_split.txt")):
        (cub / fname).write_text("\n".join(lines[key]) + "\n")
    return cub


def test_first_classes_train_rest_test(tmp_path):
    meta = read_cub(make_cub(tmp_path))
    split = split_classes(meta, 3)
    assert split.train_classes == [1, 2, 3] and split.test_classes == [4]


@pytest.mark.parametrize("n", [0, 4, 7])
def test_train_classes_out_of_range_is_a_clear_error(tmp_path, n):
    meta = read_cub(make_cub(tmp_path))
    with pytest.raises(SplitError, match=rf"split.train_classes={n} .* 4 classes.*between 1 and 3"):
        split_classes(meta, n)


def test_lists_and_coco(tmp_path):
    cub = make_cub(tmp_path, boxes={2: (30.0, 20.0, 15.0, 12.0), 3: (45.0, 1.0, 5.0, 5.0)})
    stats = write_split(read_cub(cub), 2, tmp_path / "split")
    train = (tmp_path / "split" / "train_list.txt").read_text().splitlines()
    test = (tmp_path / "split" / "test_list.txt").read_text().splitlines()
    assert train[0] == "images/001.Class 1/img_0.jpg 1 1"
    assert len(train) == 6 and len(test) == 6
    # label and unique id are the last two fields even when the path has a space
    assert {int(line.rsplit(" ", 2)[1]) for line in train} == {1, 2}
    assert {int(line.rsplit(" ", 2)[1]) for line in test} == {3, 4}
    assert [int(line.rsplit(" ", 2)[2]) for line in test] == list(range(7, 13))
    assert stats == {"train_images": 6, "train_classes": 2, "train_boxes_dropped": 1,
                     "test_images": 6, "test_classes": 2, "test_boxes_dropped": 0}

    coco = json.loads((tmp_path / "split" / "train_coco.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "foreground"}]
    assert coco["images"][0] == {"id": 1, "file_name": "images/001.Class 1/img_0.jpg",
                                 "width": 40, "height": 30}
    by_id = {a["image_id"]: a for a in coco["annotations"]}
    assert by_id[1]["bbox"] == [2.0, 3.0, 20.0, 15.0] and by_id[1]["category_id"] == 1
    assert by_id[2]["bbox"] == [30.0, 20.0, 10.0, 10.0]  # clipped to the 40x30 image
    assert 3 not in by_id  # entirely outside the image: dropped and counted


def test_clip_box_keeps_inside_boxes():
    assert clip_box((1.5, 2.5, 10.0, 10.0), 100, 100) == [1.5, 2.5, 10.0, 10.0]
    assert clip_box((-2.0, -1.0, 10.0, 10.0), 100, 100) == [0.0, 0.0, 8.0, 9.0]


def test_real_subset_protocol(cub_subset, tmp_path):
    stats = write_split(read_cub(cub_subset), 25, tmp_path)
    assert stats["train_classes"] == 25 and stats["test_classes"] == 25
    assert stats["train_images"] + stats["test_images"] == 2889
    coco = json.loads((tmp_path / "test_coco.json").read_text())
    assert len(coco["images"]) == stats["test_images"]
    for ann, img in zip(coco["annotations"], coco["images"]):
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
