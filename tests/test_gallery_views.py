"""Gallery images as views: the whole photo and its object box (known, else detected)."""

from __future__ import annotations

import numpy as np
import pytest

from visrec.inference.gallery_ops import GalleryItem, check_views, expand_views, view_boxes


class FakeDetector:
    """Stands in for an exported detector: a fixed answer per image width, and a call log."""

    def __init__(self, boxes_by_width: dict[int, np.ndarray]):
        self.boxes_by_width = boxes_by_width
        self.calls = 0

    def detect_arrays(self, images):
        self.calls += 1
        return [self.boxes_by_width.get(img.shape[1], np.zeros((0, 5), np.float32)) for img in images]


def write_image(path, width: int):
    import cv2

    cv2.imwrite(str(path), np.full((20, width, 3), 127, np.uint8))
    return path


def test_view_boxes_rules():
    box = (1.0, 2.0, 3.0, 4.0)
    assert view_boxes(["whole", "object"], box, None) == [("whole", None), ("object", box)]
    assert view_boxes(["whole", "object"], None, box) == [("whole", None), ("object", box)]
    assert view_boxes(["whole", "object"], box, (9.0, 9.0, 9.0, 9.0)) == [("whole", None), ("object", box)]
    assert view_boxes(["object"], None, None) == [("whole", None)]  # nothing to crop: the photo itself
    assert view_boxes(["object"], None, box) == [("object", box)]
    assert view_boxes(["whole"], box, None) == [("whole", None)]


def test_expand_views_detects_only_images_without_a_box(tmp_path):
    detector = FakeDetector({30: np.array([[2, 3, 12, 15, 0.9], [0, 0, 5, 5, 0.5]], np.float32)})
    items = [GalleryItem(write_image(tmp_path / "a.png", 30), "a"),
             GalleryItem(write_image(tmp_path / "b.png", 40), "b"),  # the detector finds nothing
             GalleryItem(write_image(tmp_path / "c.png", 50), "c", box=(1, 1, 9, 9), metadata={"k": 1})]
    out = expand_views(items, ["whole", "object"], detector)
    assert [(i.label, i.metadata["view"], i.box) for i in out] == [
        ("a", "whole", None), ("a", "object", (2.0, 3.0, 12.0, 15.0)),  # the best box only
        ("b", "whole", None),
        ("c", "whole", None), ("c", "object", (1, 1, 9, 9))]
    assert out[-1].metadata == {"k": 1, "view": "object"}
    assert detector.calls == 1  # one batched call for the two images that needed it
    assert [i.metadata["view"] for i in expand_views(items, ["whole"], detector)] == ["whole"] * 3


@pytest.mark.parametrize("views", [[], ["whole", "crop"]])
def test_bad_views_are_refused_with_the_choices(views):
    with pytest.raises(ValueError, match="whole, object"):
        check_views(views)
