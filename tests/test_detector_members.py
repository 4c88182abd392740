"""A detector of several FPN + head members, and the generated scene sets they train on."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import paddle
import pytest

from test_detector import STRIDES, tiny_config
from visrec.config import SyntheticConfig
from visrec.config.schema import ConfigError, DataConfig
from visrec.data.scene_manifest import MANIFEST, read_scene_sets, styles_for
from visrec.data.scenes import generate_scene_sets
from visrec.inference.detector_runtime import Detector, dygraph_predict_fn, export_detector
from visrec.models.detector import MainbodyDetector, average_members, build_detector
from visrec.training.detector import load_trained, make_dataset, run_training

TINY = SyntheticConfig(num_classes=4, images_per_class=6, image_size=64, workers=1)
PHOTO_LIKE = {"object_scale": [0.45, 1.1], "texture": 1.0}


def reference_average(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One location at a time: mean score, box weighted by each member's score."""
    members, batch, points = scores.shape
    box = np.zeros((batch, points, 4))
    for n in range(batch):
        for p in range(points):
            weights = scores[:, n, p] / max(scores[:, n, p].sum(), 1e-9)
            box[n, p] = sum(w * boxes[m, n, p] for m, w in enumerate(weights))
    return box, scores.mean(axis=0)


def test_members_average_scores_and_weigh_boxes_by_score():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 64, (3, 2, 7, 4)).astype(np.float32)
    scores = rng.uniform(0, 1, (3, 2, 7)).astype(np.float32)
    scores[1, 0, 0] = 0.0  # a member that sees nothing has no say on the box there
    box, score = average_members([paddle.to_tensor(b) for b in boxes], [paddle.to_tensor(s) for s in scores])
    ref_box, ref_score = reference_average(boxes, scores)
    np.testing.assert_allclose(box.numpy(), ref_box, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(score.numpy(), ref_score, rtol=1e-6)
    one_box, one_score = average_members([paddle.to_tensor(boxes[0])], [paddle.to_tensor(scores[0])])
    np.testing.assert_array_equal(one_box.numpy(), boxes[0])
    np.testing.assert_array_equal(one_score.numpy(), scores[0])


def tiny_detector(seed: int, members: int = 1) -> MainbodyDetector:
    paddle.seed(seed)
    cfg = {"backbone": {"name": "mobilenet_v1", "scale": 0.25}, "strides": STRIDES, "neck_channels": 16,
           "head_convs": 1, "members": members}
    model = build_detector(cfg)
    for layer in model.sublayers():  # non-trivial heads: the default init scores every location alike
        if isinstance(layer, paddle.nn.Conv2D):
            layer.weight.set_value(paddle.randn(layer.weight.shape) * 0.3)
    model.eval()
    return model


def test_a_detector_of_members_predicts_their_average_from_one_backbone_pass():
    first, second = tiny_detector(1), tiny_detector(2)
    second.backbone.set_state_dict(first.backbone.state_dict())
    ensemble = tiny_detector(3, members=2)
    ensemble.backbone.set_state_dict(first.backbone.state_dict())
    ensemble.set_member(0, first)
    ensemble.set_member(1, second)
    batch = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    (b1, s1, sal1), (b2, s2, _), (box, score, saliency) = (dygraph_predict_fn(m)(batch)
                                                          for m in (first, second, ensemble))
    assert np.abs(s1 - s2).max() > 1e-3  # the members differ, so the average is a real test
    ref_box, ref_score = reference_average(np.stack([b1, b2]), np.stack([s1, s2]))
    np.testing.assert_allclose(box, ref_box, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(score, ref_score, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(saliency, sal1, rtol=1e-6)
    # training sees the first member only
    logits, _ = ensemble(paddle.to_tensor(batch))
    np.testing.assert_allclose(paddle.nn.functional.sigmoid(logits).numpy(), s1, rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError):
        ensemble.set_member(2, first)
    with pytest.raises(ValueError, match="at least one"):
        tiny_detector(0, members=0)


def test_scene_sets_are_generated_per_style_split_and_checked(tmp_path):
    out = tmp_path / "scenes"
    entries = generate_scene_sets(TINY, [PHOTO_LIKE], 2, out, progress=False)
    assert [e["settings"] for e in entries] == [PHOTO_LIKE]
    (root, split), = read_scene_sets(out, [PHOTO_LIKE], TINY, 2)
    assert len(list((root / "images").rglob("*.jpg"))) == 24
    train = json.loads((split / "train_coco.json").read_text())
    assert len(train["images"]) == 12 and len(train["annotations"]) == 12  # classes 1-2, one box each
    # the style reached the generator: photo-like scenes hold larger objects than the base setting
    base_boxes = generate_scene_sets(TINY, [{}], 2, tmp_path / "base", progress=False)
    base_train = json.loads((tmp_path / "base" / base_boxes[0]["split"] / "train_coco.json").read_text())
    area = lambda coco: np.median([a["bbox"][2] * a["bbox"][3] for a in coco["annotations"]])  # noqa: E731
    assert area(train) > area(base_train)

    with pytest.raises(ValueError, match="dvc repro scenes"):
        read_scene_sets(out, [{"texture": 0.5}])
    with pytest.raises(ValueError, match="dvc repro scenes"):
        read_scene_sets(out, [PHOTO_LIKE], SyntheticConfig(num_classes=5, images_per_class=6, image_size=64), 2)
    with pytest.raises(FileNotFoundError, match="dvc repro scenes"):
        read_scene_sets(tmp_path / "none", [PHOTO_LIKE])
    # a bad style fails before any work and leaves the last good sets in place
    manifest = (out / MANIFEST).read_text()
    with pytest.raises(ConfigError, match=r"detector.synthetic_styles\[1\].*textures"):
        generate_scene_sets(TINY, [PHOTO_LIKE, {"textures": 1.0}], 2, out, progress=False)
    with pytest.raises(ConfigError, match=r"texture=2.0"):
        generate_scene_sets(TINY, [{"texture": 2.0}], 2, out, progress=False)
    assert (out / MANIFEST).read_text() == manifest
    # real photos need no scenes: an empty manifest
    assert styles_for(DataConfig(source="/data/CUB_200_2011"), [PHOTO_LIKE]) == []
    assert styles_for(DataConfig(), [PHOTO_LIKE])
    assert generate_scene_sets(TINY, [], 2, tmp_path / "real", progress=False) == []
    assert read_scene_sets(tmp_path / "real", [], TINY, 2) == []


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """The pipeline's own generated set (classes 1-2 train, 3-4 validate)."""
    from visrec.data.cub import read_cub
    from visrec.data.split import write_split
    from visrec.data.synthetic import generate

    base = tmp_path_factory.mktemp("tiny_set")
    root = generate(base / "raw", TINY, progress=False)
    write_split(read_cub(root), 2, base / "split")
    return root, base / "split"


@pytest.fixture(scope="module")
def member_run(tiny_set, tmp_path_factory):
    root, split = tiny_set
    out = tmp_path_factory.mktemp("member_run")
    scenes = out / "scenes"
    generate_scene_sets(TINY, [PHOTO_LIKE], 2, scenes, progress=False)
    cfg = tiny_config(epochs=3, eval_every=3)
    summary = run_training(cfg, root, split, out / "detector", out / "metrics.json",
                           scene_sets=read_scene_sets(scenes, [PHOTO_LIKE], TINY, 2))
    return out, summary


def test_a_run_with_scene_sets_trains_a_member_on_each_and_exports_them_together(member_run, tiny_set, tmp_path):
    out, summary = member_run
    run = out / "detector"
    assert set(summary["members"]) == {"style1"} and summary["members"]["style1"]["train_images"] == 12
    assert json.loads((out / "metrics.json").read_text()) == summary
    # what export loads holds both members (the first member's per-epoch checkpoints are gone)
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best_model", "latest"}
    assert (run / "members" / "style1" / "history.csv").exists()
    model, model_cfg = load_trained(run)
    assert model_cfg["members"] == 2 and len(model.members) == 2
    first = model.members[0][1].cls.weight.numpy()
    assert np.abs(first - model.members[1][1].cls.weight.numpy()).max() > 1e-4  # two different heads

    root, split = tiny_set
    dataset = make_dataset(tiny_config(), root, split / "test_coco.json", train=False)
    batch = np.stack([dataset[i][0] for i in range(4)])
    boxes, scores, saliency = dygraph_predict_fn(model)(batch)
    export_detector(model, model_cfg, tmp_path / "export")
    for backend in ("paddle", "onnx"):
        dense = Detector(tmp_path / "export", backend=backend, num_threads=1).predict_dense(batch)
        np.testing.assert_allclose(dense[0], boxes, rtol=1e-4, atol=1e-3, err_msg=backend)
        np.testing.assert_allclose(dense[1], scores, rtol=1e-5, atol=1e-4, err_msg=backend)
        np.testing.assert_allclose(dense[2], saliency, rtol=1e-4, atol=1e-4, err_msg=backend)


def test_a_run_killed_after_its_members_trained_resumes_without_training_them_again(tiny_set, tmp_path, monkeypatch):
    import visrec.training.detector as training

    root, split = tiny_set
    generate_scene_sets(TINY, [PHOTO_LIKE], 2, tmp_path / "scenes", progress=False)
    scene_sets = read_scene_sets(tmp_path / "scenes", [PHOTO_LIKE], TINY, 2)
    cfg = tiny_config(epochs=2, eval_every=2)

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(training, "save_members", killed)
        with pytest.raises(RuntimeError, match="killed"):
            run_training(cfg, root, split, tmp_path / "detector", tmp_path / "metrics.json", scene_sets=scene_sets)
    work = tmp_path / "detector.run"
    assert not (tmp_path / "detector").exists() and (work / "members" / "style1" / "checkpoints" / "latest").exists()
    member_best = paddle.load(str(work / "members" / "style1" / "checkpoints" / "best_model" / "model.pdparams"))

    trained = []
    original = training.train_detector

    def counting(member_cfg, *args, **kwargs):
        model, state, stats = original(member_cfg, *args, **kwargs)
        trained.append(state.global_step)
        return model, state, stats

    monkeypatch.setattr(training, "train_detector", counting)
    summary = run_training(dataclasses.replace(cfg, resume="latest"), root, split, tmp_path / "detector",
                           tmp_path / "metrics.json", scene_sets=scene_sets)
    assert len(trained) == 2 and summary["members"]["style1"]["train_images"] == 12
    for run in (tmp_path / "detector", tmp_path / "detector" / "members" / "style1"):
        history = (run / "history.csv").read_text().splitlines()
        assert len(history) == 1 + 2, run  # header + two epochs: nothing trained twice
    model, _ = load_trained(tmp_path / "detector")
    np.testing.assert_array_equal(model.members[1][1].cls.weight.numpy(), member_best["head.cls.weight"].numpy())
