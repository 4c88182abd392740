"""The mainbody detector: assignment, loss, box-safe transforms, post-processing, COCO
metrics, bad input, training end to end, and export parity (dygraph / Paddle Inference / ONNX)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest

from recipes import scratch

from visrec.config import Config, DetectorConfig, config_from_dict
from visrec.imaging import ImageReadError, load_image
from visrec.data.det_dataset import (
    DetectionDataError,
    DetectionDataset,
    EpochShuffleBatchSampler,
    collate_detection,
    read_coco,
)
from visrec.data.det_transforms import CropKeepingBoxes, HorizontalFlip, ResizeToInput
from visrec.imaging import ResizeInfo, resize_geometry, resize_to_input
from visrec.inference.detection_post import (MASS_SCALE, RANK_DECAY, box_iou, consensus_scores, nms, postprocess,
                                            refine_extents)
from visrec.inference.detector_runtime import Detector, dygraph_predict_fn, export_detector, split_outputs
from visrec.inference.export import read_model_json
from visrec.metrics.detection import coco_detection_metrics
from visrec.models.registry import create_backbone
from visrec.models.detector import (
    DetectionLoss,
    MainbodyDetector,
    assign_targets,
    build_detector,
    build_targets,
    make_points,
)
from visrec.training.detector import (
    PREDICTIONS_PNG,
    export_calibration,
    load_trained,
    make_dataset,
    postprocess_params,
    predict_dataset,
    run_training,
    write_prediction_sheet,
)

STRIDES = [8, 16, 32]
RANGES = [[0.0, 24.0], [16.0, 48.0], [40.0, 1e5]]


@pytest.fixture(scope="module")
def tiny_det(tmp_path_factory):
    """Synthetic CUB (4 classes x 6 images, 64 px) and its split: classes 1-2 train, 3-4 validate."""
    from visrec.config import SyntheticConfig
    from visrec.data.cub import read_cub
    from visrec.data.split import write_split
    from visrec.data.synthetic import generate

    base = tmp_path_factory.mktemp("tiny_det")
    root = generate(base / "raw", SyntheticConfig(num_classes=4, images_per_class=6, image_size=64, workers=1),
                    progress=False)
    write_split(read_cub(root), 2, base / "split")
    return root, base / "split"


def tiny_config(**extra) -> DetectorConfig:
    raw = {
        "backbone": {"name": "mobilenet_v1", "scale": 0.25},
        "neck_channels": 16, "head_convs": 1,
        "image": {"size": 64},
        "assign": {"size_ranges": RANGES},
        "optimizer": {"lr": 0.01, "warmup_epochs": 0.0},
        "batch_size": 4, "epochs": 3, "min_steps": 0, "eval_every": 3, "eval_batch_size": 8, "vis_images": 2,
        "score_threshold": 0.0, "seed": 3,
    }
    raw.update(extra)
    return config_from_dict({"detector": scratch("detector", raw)}).detector


# ------------------------------------------------------------------ assignment


def reference_assign(points, strides, boxes, radius):
    """Brute force, one location and one box at a time (the rule, read literally)."""
    out = []
    for (px, py), s in zip(points, strides):
        best, best_area = -1, np.inf
        for g, (x1, y1, x2, y2) in enumerate(boxes):
            lo, hi = RANGES[STRIDES.index(int(s))]
            side = max(x2 - x1, y2 - y1)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            ok = (lo <= side <= hi and x1 < px < x2 and y1 < py < y2
                  and abs(px - cx) < radius * s and abs(py - cy) < radius * s)
            area = (x2 - x1) * (y2 - y1)
            if ok and area < best_area:
                best, best_area = g, area
        out.append(best)
    return np.array(out)


def test_assignment_on_hand_made_boxes():
    points, strides = make_points(64, 64, STRIDES)
    assert points.shape == (8 * 8 + 4 * 4 + 2 * 2, 2) and points[0].tolist() == [4.0, 4.0]
    # longer sides 60 (stride 32 only), 12 (stride 8 only) and 30 (stride 16 only), overlapping
    boxes = np.array([[2, 2, 62, 50], [10, 10, 22, 22], [30, 30, 60, 54]], dtype=np.float32)
    assigned = assign_targets(points, strides, boxes, STRIDES, RANGES, center_radius=1.5)
    np.testing.assert_array_equal(assigned, reference_assign(points, strides, boxes, 1.5))
    for g, level_stride in ((0, 32), (1, 8), (2, 16)):
        assert set(strides[assigned == g]) == {level_stride}
    # where box 1 lies inside box 0 on a shared level the smaller box would win: check directly
    both = np.array([[0, 0, 40, 40], [8, 8, 32, 32]], dtype=np.float32)  # sides 40 and 24: both on stride 16
    a = assign_targets(points, strides, both, STRIDES, RANGES, center_radius=10.0)
    centre16 = np.nonzero((strides == 16) & (points[:, 0] == 24) & (points[:, 1] == 24))[0][0]
    assert a[centre16] == 1
    assert (a == 0).any()  # the big box keeps the locations only it covers


def test_a_box_smaller_than_a_cell_still_gets_one_location():
    points, strides = make_points(64, 64, STRIDES)
    tiny = np.array([[17.0, 17.0, 19.0, 19.0]], dtype=np.float32)  # no location centre inside it
    assigned = assign_targets(points, strides, tiny, STRIDES, RANGES, center_radius=2.5)
    assert (assigned == 0).sum() == 1
    chosen = points[assigned == 0][0]
    assert strides[assigned == 0][0] == 8 and np.hypot(*(chosen - 18)) < 8
    assert (assign_targets(points, strides, np.zeros((0, 4)), STRIDES, RANGES, 2.5) == -1).all()


def test_build_targets_pads_and_counts():
    points, strides = make_points(64, 64, STRIDES)
    gt = np.zeros((2, 2, 4), dtype=np.float32)
    gt[0, 0] = [4, 4, 44, 44]
    gt[1, :] = [[2, 2, 22, 22], [30, 30, 62, 62]]
    positive, targets = build_targets(points, strides, gt, np.array([1, 2]), STRIDES, RANGES, 2.5)
    assert positive.shape == (2, len(points)) and positive.any(axis=1).all()
    np.testing.assert_array_equal(np.unique(targets[0][positive[0]], axis=0), gt[0, :1])
    assert len(np.unique(targets[1][positive[1]], axis=0)) == 2
    assert not targets[~positive].any()


# ------------------------------------------------------------------ model + loss


def test_model_shapes_and_strides_check():
    model = build_detector({"backbone": {"name": "mobilenet_v1", "scale": 0.25}, "neck_channels": 16,
                            "head_convs": 1})
    logits, distances = model(paddle.rand([2, 3, 64, 96]))
    assert logits.shape == [2, 8 * 12 + 4 * 6 + 2 * 3] and distances.shape == [2, logits.shape[1], 4]
    assert float(distances.min()) > 0
    with pytest.raises(ValueError, match="last_stride: 2"):
        MainbodyDetector(create_backbone("pplcnetv2_base", scale=0.25), STRIDES, 16, 1)
    with pytest.raises(ValueError, match="backbone"):
        build_detector({"backbone": {"scale": 0.5}})


def test_loss_is_finite_and_falls_when_overfitting_a_few_images(tiny_det):
    root, split = tiny_det
    paddle.seed(0)
    cfg = tiny_config()
    dataset = make_dataset(cfg, root, split / "train_coco.json", train=False)
    images, boxes, counts, _ = collate_detection([dataset[i] for i in range(4)])
    model = build_detector(cfg)
    loss_fn = DetectionLoss(STRIDES, RANGES, center_radius=2.5)
    optimizer = paddle.optimizer.AdamW(0.01, parameters=model.parameters())
    x = paddle.to_tensor(images)
    losses = []
    for _ in range(25):
        loss, parts = loss_fn(model, x, boxes, counts)
        assert np.isfinite(float(loss)) and parts["pos_per_image"] > 0
        losses.append(float(loss))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


def test_loss_on_a_batch_without_boxes_is_finite_and_backpropagates():
    model = build_detector({"backbone": {"name": "mobilenet_v1", "scale": 0.25}, "neck_channels": 8,
                            "head_convs": 1})
    loss, parts = DetectionLoss(STRIDES, RANGES)(model, paddle.rand([2, 3, 64, 64]),
                                                  np.zeros((2, 1, 4), np.float32), np.zeros(2, np.int64))
    loss.backward()
    assert np.isfinite(float(loss)) and parts["pos_per_image"] == 0
    assert model.head.cls.bias.grad is not None


# ------------------------------------------------------------------ transforms


def painted(height=60, width=90, box=(20, 10, 50, 40)):
    """A grey image with a red rectangle exactly at ``box`` (x1 y1 x2 y2, integer pixels)."""
    img = np.full((height, width, 3), 90, dtype=np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = (250, 0, 0)
    return img, np.array([box], dtype=np.float32)


def red_extent(img):
    """x1 y1 x2 y2 of the pixels that are mostly red."""
    mask = (img[..., 0] > 170) & (img[..., 1] < 90)
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def test_flip_moves_the_box_with_the_pixels():
    img, boxes = painted()
    out, out_boxes = HorizontalFlip(prob=1.0)(img, boxes, np.random.default_rng(0))
    np.testing.assert_array_equal(out_boxes[0], [40, 10, 70, 40])
    np.testing.assert_array_equal(red_extent(out), out_boxes[0])


def test_crop_keeps_the_whole_box_and_shifts_it():
    img, boxes = painted()
    crop = CropKeepingBoxes(prob=1.0, min_side=0.3)
    sizes = set()
    for seed in range(20):
        out, out_boxes = crop(img, boxes, np.random.default_rng(seed))
        sizes.add(out.shape[:2])
        assert out.shape[0] >= 30 and out.shape[1] >= 30  # never smaller than the box
        np.testing.assert_array_equal(red_extent(out), out_boxes[0])
    assert len(sizes) > 5  # it really crops


@pytest.mark.parametrize("policy", ["keep_ratio", "stretch"])
@pytest.mark.parametrize("zoom", [(1.0, 1.0), (0.5, 0.9)])
def test_resize_maps_the_box_onto_the_resized_pixels(policy, zoom):
    img, boxes = painted(height=80, width=120, box=(30, 20, 90, 60))
    resize = ResizeToInput(64, policy, zoom_out=zoom)
    for seed in range(5):
        out, out_boxes = resize(img, boxes, np.random.default_rng(seed))
        assert out.shape == (64, 64, 3)
        # interpolation blurs the edge by up to a pixel
        np.testing.assert_allclose(red_extent(out), out_boxes[0], atol=1.0)


def test_letterbox_geometry():
    new_w, new_h, info = resize_geometry(200, 100, 64, "keep_ratio")
    assert (new_w, new_h) == (64, 32) and (info.pad_x, info.pad_y) == (0, 16)
    _, _, info = resize_geometry(200, 100, 64, "stretch")
    assert (info.scale_x, info.scale_y, info.pad_x, info.pad_y) == (0.32, 0.64, 0, 0)
    img, _ = resize_to_input(np.zeros((100, 200, 3), np.uint8), 64, "keep_ratio", fill=(1, 2, 3))
    assert img[0, 0].tolist() == [1, 2, 3] and img[32, 32].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="keep_ratio"):
        resize_geometry(10, 10, 64, "crop")


# ------------------------------------------------------------------ post-processing


@pytest.mark.parametrize("policy", ["keep_ratio", "stretch"])
def test_postprocess_maps_boxes_back_to_original_coordinates(policy):
    original = np.array([[30.0, 40.0, 150.0, 90.0], [5.0, 5.0, 25.0, 20.0]], dtype=np.float32)
    _, _, info = resize_geometry(200, 100, 64, policy)
    dense = np.zeros((1, 10, 4), np.float32)
    dense[0, :, 2:] = 1.0  # background locations: tiny boxes at the corner, score 0
    dense[0, [3, 7]] = info.to_input(original)
    scores = np.zeros((1, 10), np.float32)
    scores[0, [3, 7]] = [0.9, 0.6]
    (dets,) = postprocess(dense, scores, [info], score_threshold=0.5, nms_iou=0.5, max_det=5)
    np.testing.assert_allclose(dets[:, :4], original, atol=1e-3)
    np.testing.assert_allclose(dets[:, 4], [0.9, 0.6])
    # boxes reaching into the letterbox padding are clipped to the original image
    far = info.to_original(np.array([[-10.0, -10.0, 80.0, 80.0]]))[0]
    np.testing.assert_allclose(far, [0, 0, 200, 100])


def test_only_a_detector_trained_on_generated_data_exports_a_calibration():
    cfg = Config()
    cfg.detector.synthetic_extent_blend = 0.3  # off by default; a user's value must reach the export
    assert cfg.data.source == "synthetic"
    assert export_calibration(cfg) == {"box_scale": cfg.detector.synthetic_box_scale,
                                       "center_prior": cfg.detector.synthetic_center_prior,
                                       "extent_blend": cfg.detector.synthetic_extent_blend,
                                       "consensus": cfg.detector.synthetic_consensus}
    assert cfg.detector.synthetic_center_prior > 0 and cfg.detector.synthetic_extent_blend > 0
    cfg.data.source = "/data/CUB_200_2011"  # real boxes: the detector's own extent, scores and framing are right
    assert export_calibration(cfg) == {"box_scale": 1.0, "center_prior": 0.0, "extent_blend": 0.0,
                                       "consensus": False}
    cfg.data.source = "synthetic"
    for knob, bad in (("synthetic_extent_blend", 1.5), ("synthetic_center_prior", -0.1), ("synthetic_box_scale", 0.0)):
        with pytest.raises(ValueError, match=f"detector.{knob}"):
            export_calibration(dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, **{knob: bad})))


def test_center_prior_ranks_a_central_box_above_a_better_scored_corner_box():
    info = ResizeInfo(1.0, 1.0, 0.0, 0.0, 200, 100)
    # a corner box scored 0.9, a centred one 0.8, and a centred one below the threshold
    boxes = np.array([[[0.0, 0.0, 40.0, 20.0], [80.0, 40.0, 120.0, 60.0], [70.0, 30.0, 130.0, 70.0]]], np.float32)
    scores = np.array([[0.9, 0.8, 0.3]], np.float32)
    (plain,) = postprocess(boxes, scores, [info], score_threshold=0.5, nms_iou=0.5, max_det=5)
    (prior,) = postprocess(boxes, scores, [info], score_threshold=0.1, nms_iou=0.5, max_det=5, center_prior=0.3)
    np.testing.assert_allclose(plain[:, 4], [0.9, 0.8])
    np.testing.assert_allclose(prior[0], [80, 40, 120, 60, 0.8])  # at the centre: weight 1
    np.testing.assert_allclose(prior[1], [70, 30, 130, 70, 0.3])
    # the corner box's centre is 0.4 widths and 0.4 heights off: weight exp(-0.32 / 0.18), last now
    np.testing.assert_allclose(prior[2], [0, 0, 40, 20, 0.9 * np.exp(-0.32 / 0.18)], rtol=1e-5)
    # the threshold applies to the network's own score: a corner object is still found, ranked last
    (strict,) = postprocess(boxes, scores, [info], score_threshold=0.5, nms_iou=0.5, max_det=5, center_prior=0.1)
    np.testing.assert_allclose(strict[:, :4], boxes[0, :2][::-1])
    np.testing.assert_allclose(strict[:, 4], [0.8, 0.9 * np.exp(-0.32 / 0.02)], rtol=1e-4)
    with pytest.raises(ValueError, match="center_prior"):
        postprocess(boxes, scores, [info], score_threshold=0.5, nms_iou=0.5, max_det=5, center_prior=-0.1)


def test_postprocess_box_scale_grows_boxes_about_their_centres_within_the_image():
    info = ResizeInfo(1.0, 1.0, 0.0, 0.0, 100, 100)
    boxes = np.array([[[40.0, 40.0, 60.0, 50.0], [0.0, 80.0, 20.0, 100.0]]], np.float32)
    scores = np.array([[0.9, 0.8]], np.float32)
    (plain,) = postprocess(boxes, scores, [info], score_threshold=0.5, nms_iou=0.5, max_det=5)
    (grown,) = postprocess(boxes, scores, [info], score_threshold=0.5, nms_iou=0.5, max_det=5, box_scale=1.5)
    np.testing.assert_allclose(plain[:, :4], boxes[0])
    np.testing.assert_allclose(grown[0, :4], [35.0, 37.5, 65.0, 52.5])  # 1.5x the width and height, same centre
    np.testing.assert_allclose(grown[1, :4], [0.0, 75.0, 25.0, 100.0])  # clipped at the image border
    np.testing.assert_allclose(grown[:, 4], plain[:, 4])
    with pytest.raises(ValueError, match="box_scale"):
        postprocess(boxes, scores, [info], score_threshold=0.5, nms_iou=0.5, max_det=5, box_scale=0.0)


def test_nms_keeps_the_best_of_overlapping_boxes_and_max_det():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10.5], [30, 0, 40, 10]],
                     dtype=np.float32)
    scores = np.array([0.5, 0.9, 0.4, 0.7, 0.3], dtype=np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [1, 2, 4])
    np.testing.assert_array_equal(nms(boxes, scores, 0.5, max_keep=2), [1, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.99), [1, 3, 0, 2, 4])
    info = ResizeInfo(1.0, 1.0, 0.0, 0.0, 100, 100)
    (dets,) = postprocess(boxes[None], scores[None], [info], score_threshold=0.35, nms_iou=0.5, max_det=5)
    np.testing.assert_allclose(dets[:, 4], [0.9, 0.4])  # 0.3 is under the threshold
    (dets,) = postprocess(boxes[None], scores[None], [info], score_threshold=0.0, nms_iou=0.99, max_det=3)
    assert len(dets) == 3 and (np.diff(dets[:, 4]) <= 0).all()
    assert box_iou(boxes[:1], boxes[2:3])[0, 0] == 0 and box_iou(boxes[:1], boxes[:1])[0, 0] == 1


# ------------------------------------------------------------------ metrics


def small_coco():
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2, 3)]
    boxes = {1: [10, 10, 40, 30], 2: [50, 20, 30, 60], 3: [0, 0, 100, 100]}
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, b in boxes.items()]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "foreground"}]}, boxes


def as_dets(boxes, dx=0.0, score=0.9):
    return {i: np.array([[x + dx, y, x + w + dx, y + h, score]]) for i, (x, y, w, h) in boxes.items()}


def test_metrics_perfect_and_shifted_boxes():
    coco, boxes = small_coco()
    perfect = coco_detection_metrics(coco, as_dets(boxes), max_det=5)
    assert perfect == pytest.approx({"det_mAP": 1.0, "det_AP50": 1.0, "det_recall50": 1.0, "AP50": 1.0})
    slightly = coco_detection_metrics(coco, as_dets(boxes, dx=5.0), max_det=5)
    assert slightly["det_AP50"] == pytest.approx(1.0) and slightly["det_mAP"] < 0.9
    far = coco_detection_metrics(coco, as_dets(boxes, dx=60.0), max_det=5)
    assert far["det_AP50"] < 0.4 and far["det_recall50"] < 0.4
    nothing = coco_detection_metrics(coco, {}, image_ids=[1, 2, 3])
    assert nothing["det_AP50"] == 0.0
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_detection_metrics(coco, {9: np.zeros((0, 5))})


# ------------------------------------------------------------------ data + bad input


def write_coco(path: Path, images, annotations):
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "foreground"}]}))
    return path


@pytest.fixture()
def small_set(tmp_path):
    """Four 48x40 images: ok, missing file, zero-area box, no box; plus a corrupt one."""
    root = tmp_path / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(1, 6):
        name = f"images/{i}.jpg"
        images.append({"id": i, "file_name": name, "width": 48, "height": 40})
        if i != 2:  # image 2 is missing
            cv2.imwrite(str(root / name), np.full((40, 48, 3), 40 * i, np.uint8))
    (root / "images" / "5.jpg").write_bytes(b"not a jpeg at all")
    for i, box in ((1, [4, 4, 20, 20]), (2, [4, 4, 20, 20]), (3, [10, 10, 0, 8]), (5, [1, 1, 10, 10])):
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": box})
    return root, write_coco(tmp_path / "coco.json", images, anns)


def test_bad_entries_are_counted_and_skipped(small_set, caplog):
    root, coco = small_set
    records, skipped = read_coco(coco, root)
    assert [r.image_id for r in records] == [1, 5]
    # image 3's only box has zero area, so it is also left without a box; image 4 never had one
    assert skipped == Counter({"missing_image": 1, "zero_area_box": 1, "no_box": 2})
    assert "skipped 4 entries" in caplog.text
    dataset = DetectionDataset(root, coco, size=32)
    dataset.preload()  # the corrupt image is found here, before any training step
    assert dataset.image_ids == [1] and dataset.skipped["unreadable_image"] == 1
    image, boxes, image_id = dataset[0]
    assert image.shape == (3, 32, 32) and image_id == 1
    # 48x40 letterboxed on 32: 32x27 drawn (y scale 27/40), 2 rows of padding above
    np.testing.assert_allclose(boxes, [[4 * 32 / 48, 4 * 27 / 40 + 2, 24 * 32 / 48, 24 * 27 / 40 + 2]], atol=1e-4)


def test_bad_entries_raise_clear_errors_when_asked(small_set, tmp_path):
    root, coco = small_set
    with pytest.raises(DetectionDataError, match=r"image 3 has a box of zero area \[10, 10, 0, 8\].*on_bad='skip'"):
        read_coco(coco, root, on_bad="error")
    data = json.loads(coco.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 3]
    write_coco(coco, data["images"], data["annotations"])
    with pytest.raises(DetectionDataError, match="image 2 file .*2.jpg does not exist"):
        read_coco(coco, root, on_bad="error")
    only_bad = write_coco(tmp_path / "bad.json", [{"id": 3, "file_name": "images/3.jpg", "width": 48, "height": 40}],
                          [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [1, 1, 0, 0]}])
    with pytest.raises(DetectionDataError, match="no usable image"):
        read_coco(only_bad, root)
    corrupt = write_coco(tmp_path / "corrupt.json", [{"id": 5, "file_name": "images/5.jpg", "width": 48, "height": 40}],
                         [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 1, 10, 10]}])
    with pytest.raises(ImageReadError, match="5.jpg.*not a decodable image"):
        DetectionDataset(root, corrupt, size=32, cache_images=False)[0]
    with pytest.raises(DetectionDataError, match="no readable image"):
        DetectionDataset(root, corrupt, size=32).preload()
    with pytest.raises(DetectionDataError, match="split stage"):
        read_coco(tmp_path / "absent.json", root)


def test_collate_and_sampler():
    samples = [(np.zeros((3, 8, 8), np.float32), np.ones((k, 4), np.float32), np.int64(k)) for k in (2, 0, 1)]
    images, boxes, counts, ids = collate_detection(samples)
    assert images.shape == (3, 3, 8, 8) and boxes.shape == (3, 2, 4)
    assert counts.tolist() == [2, 0, 1] and ids.tolist() == [2, 0, 1] and not boxes[1].any()
    sampler = EpochShuffleBatchSampler(10, 4, seed=1)
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first and len(first) == 2 == len(sampler)
    with pytest.raises(ValueError, match="batch_size"):
        EpochShuffleBatchSampler(3, 4)


def test_training_samples_keep_boxes_on_the_object(tiny_det):
    root, split = tiny_det
    cfg = tiny_config(augment={"crop_prob": 1.0, "flip_prob": 0.5, "zoom_out": [0.5, 1.0]})
    dataset = make_dataset(cfg, root, split / "train_coco.json", train=True)
    for index in range(4):
        for epoch in (0, 1):
            dataset.set_epoch(epoch)
            image, boxes, _ = dataset[index]
            assert image.shape == (3, 64, 64) and boxes.shape == (1, 4)
            x1, y1, x2, y2 = boxes[0]
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and (x2 - x1) * (y2 - y1) > 16


# ------------------------------------------------------------------ end to end + export


@pytest.fixture(scope="module")
def trained_run(tiny_det, tmp_path_factory):
    root, split = tiny_det
    out = tmp_path_factory.mktemp("det_run")
    cfg = tiny_config(epochs=12, eval_every=6, optimizer={"lr": 0.02, "warmup_epochs": 0.0})
    summary = run_training(cfg, root, split, out / "detector", out / "metrics.json")
    return out, summary


def test_training_writes_run_metrics_and_picture(trained_run):
    out, summary = trained_run
    run = out / "detector"
    assert not (out / "detector.run").exists()  # promoted on success
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"best_model", "latest", "epoch_12"}
    header = (run / "history.csv").read_text().splitlines()[0]
    assert "val_AP50" in header and "train_qfl" in header and "train_giou" in header
    assert json.loads((out / "metrics.json").read_text()) == summary
    assert {"det_mAP", "det_AP50", "det_recall50"} <= summary.keys() and summary["val_images"] == 12
    assert all(0.0 <= summary[k] <= 1.0 for k in ("det_mAP", "det_AP50", "det_recall50"))
    picture = cv2.imread(str(run / PREDICTIONS_PNG))
    assert picture is not None and picture.shape[0] >= 100


def by_position(dets) -> np.ndarray:
    """Rows sorted by their box: backends may order boxes whose scores tie to 1e-6 either way."""
    dets = np.asarray(dets, dtype=np.float64).reshape(-1, 5)
    keys = np.round(dets[:, :4], 1)
    return dets[np.lexsort(keys.T[::-1])]


def assert_same_clear_detections(det: np.ndarray, ref: np.ndarray, tag: str) -> None:
    """Same kept boxes, except where the top-5 cut falls between scores tied within float noise
    (with score_threshold 0 a tiny net has many near-equal candidates; which one survives NMS
    then depends on the last bits): every detection whose score stands clear of all other
    candidates' must be there, with the same box."""
    det = np.asarray(det, dtype=np.float64).reshape(-1, 5)
    assert ref.shape == det.shape, tag
    for i in range(len(ref)):
        others = np.delete(ref[:, 4], i)
        if np.all(np.abs(others - ref[i, 4]) > 1e-3) and ref[i, 4] - ref[:, 4].min() > 1e-3:
            match = np.abs(det[:, 4] - ref[i, 4]) < 1e-4
            assert match.any(), (tag, ref[i], det)
            np.testing.assert_allclose(det[match][0, :4], ref[i, :4], rtol=1e-4, atol=1e-3, err_msg=tag)


def test_export_parity_dygraph_paddle_inference_onnx(trained_run, tiny_det, tmp_path):
    out, _ = trained_run
    root, split = tiny_det
    model, model_cfg = load_trained(out / "detector")
    cfg = tiny_config()
    dataset = make_dataset(cfg, root, split / "test_coco.json", train=False)
    batch = np.stack([dataset[i][0] for i in range(len(dataset))])
    boxes, scores, saliency = dygraph_predict_fn(model)(batch)
    assert saliency.shape == (len(batch), 1, 2, 2)  # stride 32 of a 64-px input
    # a trained net: outputs differ across images and locations by far more than the tolerance
    assert scores.std() > 1e-3 and np.abs(boxes - boxes.mean(axis=0)).max() > 1.0

    meta = export_detector(model, model_cfg, tmp_path / "export")
    assert meta == read_model_json(tmp_path / "export")
    assert meta["kind"] == "detector" and meta["input_size"] == [64, 64] and meta["resize"] == "keep_ratio"
    assert meta["strides"] == STRIDES and meta["max_det"] == 5
    post = {**postprocess_params(cfg), "score_threshold": 0.0}
    infos = [dataset.resize_info(i) for i in range(len(dataset))]
    reference = postprocess(boxes, scores, infos, **post)
    assert all(len(d) == 5 for d in reference)
    for backend in ("paddle", "onnx"):
        detector = Detector(tmp_path / "export", backend=backend, num_threads=1, score_threshold=0.0)
        dense_boxes, dense_scores, dense_saliency = detector.predict_dense(batch)
        # The network's dense outputs match; post-processing is the same numpy code for all.
        np.testing.assert_allclose(dense_boxes, boxes, rtol=1e-4, atol=1e-3, err_msg=backend)
        np.testing.assert_allclose(dense_scores, scores, rtol=1e-5, atol=1e-4, err_msg=backend)
        np.testing.assert_allclose(dense_saliency, saliency, rtol=1e-4, atol=1e-4, err_msg=backend)
        got = detector.postprocess(dense_boxes, dense_scores, infos, saliency=dense_saliency)
        for ref, det in zip(reference, got, strict=True):
            assert_same_clear_detections(det, ref, backend)
        # from raw images: Detector's own preprocessing equals the evaluation dataset's
        images = [load_image(r.path) for r in dataset.records[:3]]
        from_images = detector.detect_batch(images)
        for ref, det in zip(reference[:3], from_images, strict=True):
            assert_same_clear_detections(np.asarray(det), ref, f"{backend} from images")
        assert detector(images[0]) == from_images[0]

    # the export's calibrations (model.json) apply unless the caller overrides them
    assert meta["box_scale"] == 1.0 and meta["center_prior"] == 0.0
    assert meta["extent_blend"] == 0.0 and meta["consensus"] is False
    maps = {"saliency": saliency, "input_size": (64, 64)}
    for key, value, neutral in (("box_scale", 1.2, 1.0), ("center_prior", 0.3, 0.0), ("extent_blend", 0.5, 0.0),
                                ("consensus", True, None)):
        assert export_detector(model, model_cfg, tmp_path / key, onnx=False, **{key: value})[key] == value
        calibrated = Detector(tmp_path / key, num_threads=1, score_threshold=0.0)
        expected = postprocess(boxes, scores, infos, **post, **maps, **{key: value})
        for ref, det in zip(expected, calibrated.postprocess(boxes, scores, infos, saliency=saliency), strict=True):
            assert_same_clear_detections(det, ref, f"{key} from model.json")
        # a caller's threshold (recognition.det_threshold) applies like the detector's own
        for ref, det in zip(postprocess(boxes, scores, infos, **{**post, "score_threshold": 0.5}, **maps,
                                        **{key: value}),
                            calibrated.postprocess(boxes, scores, infos, score_threshold=0.5, saliency=saliency),
                            strict=True):
            assert_same_clear_detections(det, ref, f"{key}, threshold 0.5")
        if neutral is None:  # consensus scores are not a recognition override
            continue
        assert getattr(Detector(tmp_path / key, num_threads=1, **{key: neutral}), key) == neutral
        with pytest.raises(ValueError, match=f"det_{key}"):
            Detector(tmp_path / key, num_threads=1, **{key: -1.0})
    # an export from before the saliency output (two outputs) keeps its boxes: no refinement
    blended = Detector(tmp_path / "extent_blend", num_threads=1, score_threshold=0.0)
    for ref, det in zip(reference, blended.postprocess(boxes, scores, infos, saliency=None), strict=True):
        assert_same_clear_detections(det, ref, "no saliency")

    dygraph = predict_dataset(dygraph_predict_fn(model), dataset, 5, post)
    np.testing.assert_allclose(by_position(dygraph[dataset.image_ids[0]]), by_position(reference[0]), atol=1e-5)
    assert split_outputs([scores, boxes])[0] is boxes and split_outputs([scores, boxes])[2] is None
    assert split_outputs([saliency, scores, boxes])[2] is saliency
    with pytest.raises(ValueError, match="not a detector"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "model.json").write_text(json.dumps({"kind": "extractor"}))
        Detector(tmp_path / "other")


def test_prediction_sheet_draws_images_with_no_detection(tiny_det, tmp_path):
    """An undertrained detector may find nothing above the threshold: the picture is still drawn."""
    root, split = tiny_det
    dataset = make_dataset(tiny_config(), root, split / "test_coco.json", train=False)
    path = write_prediction_sheet(dataset, {}, tmp_path / "sheet.png", count=2, tile=64)
    picture = cv2.imread(str(path))
    assert picture is not None and picture.shape[:2] == (64, 128)


def test_frozen_backbone_keeps_weights_and_statistics_while_the_head_learns(tiny_det, tmp_path):
    root, split = tiny_det
    backbone = create_backbone("mobilenet_v1", scale=0.25)
    paddle.save(backbone.state_dict(), str(tmp_path / "backbone.pdparams"))
    cfg = tiny_config(backbone={"name": "mobilenet_v1", "scale": 0.25,
                                "pretrained": str(tmp_path / "backbone.pdparams")}, freeze_backbone=True)
    from visrec.training.detector import build_loss, build_model
    from visrec.models.extractor import param_groups

    model = build_model(cfg)
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    groups = param_groups(model, 1.0)
    assert len(groups) == 1 and all(not p.stop_gradient for p in groups[0]["params"])
    optimizer = paddle.optimizer.AdamW(0.01, parameters=groups)
    dataset = make_dataset(cfg, root, split / "train_coco.json", train=True)
    images, boxes, counts, _ = collate_detection([dataset[i] for i in range(4)])
    model.train()
    assert not model.backbone.training  # BN statistics frozen too
    loss, _ = build_loss(cfg)(model, paddle.to_tensor(images), np.asarray(boxes), np.asarray(counts))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k].numpy()) for k in before if k.startswith("backbone."))
    assert any(not np.array_equal(before[k], after[k].numpy()) for k in before if k.startswith("head."))


def test_freezing_a_random_backbone_is_refused():
    from visrec.training.detector import build_model

    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model(tiny_config(freeze_backbone=True))


def test_small_data_sets_train_for_at_least_min_steps() -> None:
    from visrec.training.detector import epochs_for

    assert epochs_for(5, 450, 93) == 5    # the generated set: 465 steps already
    assert epochs_for(5, 450, 47) == 10   # 25 real species: 470 steps
    assert epochs_for(5, 0, 10) == 5      # off
    assert epochs_for(5, 450, 0) == 5     # no batches: nothing to stretch


def test_refine_extents_moves_a_box_towards_the_salient_region_around_it():
    info = ResizeInfo(1.0, 1.0, 0.0, 0.0, 160, 160)
    saliency = np.zeros((1, 5, 5), np.float32)
    saliency[0, 1:4, 1:4] = 1.0  # an object over input pixels ~32-128
    small = np.array([[64.0, 64.0, 96.0, 96.0]], np.float32)  # the detector found its middle only
    full = refine_extents(small, saliency, info, (160, 160), blend=1.0)
    grown = np.array([56.0, 56.0, 104.0, 104.0])  # the search region: the box grown 1.5x
    assert np.all(full[0, :2] <= small[0, :2]) and np.all(full[0, 2:] >= small[0, 2:])
    assert np.all(full[0, :2] >= grown[:2] - 1) and np.all(full[0, 2:] <= grown[2:] + 1)
    half = refine_extents(small, saliency, info, (160, 160), blend=0.5)
    np.testing.assert_allclose(half, (small + full) / 2, atol=1e-3)
    np.testing.assert_array_equal(refine_extents(small, saliency, info, (160, 160), blend=0.0), small)
    flat = np.ones((1, 5, 5), np.float32)  # nothing stands out: the detector's box stays
    np.testing.assert_array_equal(refine_extents(small, flat, info, (160, 160), blend=1.0), small)
    # letterboxed: the map's padding is not part of the photo (orig 320 x 160 on a 160 input)
    wide = ResizeInfo(0.5, 0.5, 0.0, 40.0, 320, 160)
    moved = refine_extents(info_box := wide.to_original(small), saliency, wide, (160, 160), blend=1.0)
    assert moved.shape == info_box.shape and np.all(moved[:, 2] <= 320) and np.all(moved[:, 3] <= 160)


def test_consensus_scores_rank_photos_by_agreement_and_first_boxes_first():
    kept = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    kept_scores = np.array([0.6, 0.5], np.float32)
    agreeing = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [1, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    many = consensus_scores(kept, kept_scores, agreeing, np.array([0.6, 0.5, 0.5, 0.5], np.float32))
    few = consensus_scores(kept, kept_scores, agreeing[[0, 3]], np.array([0.6, 0.5], np.float32))
    # brute force: confidence from the first box's agreeing mass, then relative score x decay^rank
    for got, mass in ((many, 1.6), (few, 0.6)):
        confidence = 1 - np.exp(-MASS_SCALE * mass)
        np.testing.assert_allclose(got, [confidence, confidence * 0.5 / 0.6 * RANK_DECAY], rtol=1e-5)
    assert many[0] > few[0]  # more candidates agree: the photo's first box ranks higher
    assert many[1] < few[0]  # a second box ranks after the first box of another photo
    assert consensus_scores(kept[:0], kept_scores[:0], agreeing, np.ones(4, np.float32)).shape == (0,)


def test_postprocess_applies_consensus_and_extent_refinement_only_when_asked():
    info = ResizeInfo(1.0, 1.0, 0.0, 0.0, 160, 160)
    boxes = np.array([[[64, 64, 96, 96], [65, 64, 96, 97], [0, 0, 20, 20]]], np.float32)
    scores = np.array([[0.9, 0.8, 0.7]], np.float32)
    saliency = np.zeros((1, 1, 5, 5), np.float32)
    saliency[0, 0, 1:4, 1:4] = 1.0
    (plain,) = postprocess(boxes, scores, [info], 0.1, 0.5, 5)
    (both,) = postprocess(boxes, scores, [info], 0.1, 0.5, 5, saliency=saliency, extent_blend=0.5,
                          consensus=True, input_size=(160, 160))
    assert len(plain) == len(both) == 2
    np.testing.assert_allclose(both[:, 4], consensus_scores(plain[:, :4], plain[:, 4], boxes[0], scores[0]))
    np.testing.assert_allclose(both[:, :4], refine_extents(plain[:, :4], saliency[0], info, (160, 160), 0.5))
    with pytest.raises(ValueError, match="saliency"):
        postprocess(boxes, scores, [info], 0.1, 0.5, 5, extent_blend=0.5, input_size=(160, 160))
    with pytest.raises(ValueError, match="extent_blend"):
        postprocess(boxes, scores, [info], 0.1, 0.5, 5, saliency=saliency, extent_blend=1.5, input_size=(160, 160))
