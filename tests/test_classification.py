"""Image classification on tiny synthetic data: sources and splits, mixing, training with the
shared engine, resume, evaluation report, top-k prediction, export parity and the CLI."""

from __future__ import annotations

import csv
import functools
import json
import shutil

import numpy as np
import paddle
import pytest
import yaml
from typer.testing import CliRunner

from visrec.classification import train as train_mod
from visrec.classification.data import (
    ClassDataError,
    hold_out,
    load_split,
    read_class_map,
    read_cub_split,
    read_folder_tree,
    read_label_list,
)
from visrec.classification.evaluate import evaluate_classifier
from visrec.classification.mixing import mix_batch, one_hot, soft_cross_entropy
from visrec.classification.model import load_trained
from visrec.classification.predict import ClassifierPredictor, export_run, top_k_entries
from visrec.classification.scoring import topk_accuracy
from recipes import scratch

from visrec.config import config_from_dict
from visrec.data.cub import read_cub
from visrec.imaging import load_image
from visrec.training.engine import EngineConfig

pytestmark = pytest.mark.slow


def tiny_raw(root, tmp, **extra) -> dict:
    raw = {
        "data": {"type": "cub", "root": str(root)},
        "backbone": {"name": "mobilenet_v1", "scale": 0.25},
        "dropout": 0.1,
        "image": {"size": 32, "crop_to_bbox": False},
        "augment": {"color_jitter": 0.0},
        "optimizer": {"lr": 0.05, "warmup_epochs": 0.0},
        "batch_size": 8, "eval_batch_size": 16, "epochs": 10, "eval_every": 1, "seed": 3,
        "out": str(tmp / "run"), "export": str(tmp / "export"), "num_threads": 1,
    }
    raw.update(extra)
    return scratch("classify", raw)


def tiny_config(root, tmp, **extra):
    return config_from_dict({"classify": tiny_raw(root, tmp, **extra)}).classify

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def colour_cub(tmp_path_factory):
    """A tiny CUB_200_2011 layout whose classes are learnable in seconds: noisy images of one
    dominant colour with a random grey patch; 4 classes x 24 images, every other image train."""
    import cv2

    root = tmp_path_factory.mktemp("colour_cub") / "CUB_200_2011"
    rng = np.random.default_rng(0)
    lines = {name: [] for name in ("images", "image_class_labels", "bounding_boxes", "train_test_split")}
    image_id = 0
    for class_id, (name, rgb) in enumerate(COLOURS.items(), 1):
        folder = root / "images" / f"{class_id:03d}.{name}"
        folder.mkdir(parents=True)
        for j in range(24):
            image_id += 1
            img = np.clip(np.array(rgb) + rng.normal(0, 35, (40, 40, 3)), 0, 255).astype(np.uint8)
            y, x = rng.integers(0, 24, 2)
            img[y:y + 14, x:x + 14] = rng.integers(60, 200)
            rel = f"{class_id:03d}.{name}/{name}_{j:02d}.jpg"
            cv2.imwrite(str(root / "images" / rel), img[:, :, ::-1])
            lines["images"].append(f"{image_id} {rel}")
            lines["image_class_labels"].append(f"{image_id} {class_id}")
            lines["bounding_boxes"].append(f"{image_id} {x}.0 {y}.0 14.0 14.0")
            lines["train_test_split"].append(f"{image_id} {int(j % 2 == 0)}")
    for name, rows in lines.items():
        (root / f"{name}.txt").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("".join(f"{i} {i:03d}.{n}\n" for i, n in enumerate(COLOURS, 1)))
    return root


@pytest.fixture(scope="module")
def trained(colour_cub, tmp_path_factory):
    """One finished 10-epoch run (about 3 s) shared by the evaluation, prediction, export and CLI tests."""
    root = colour_cub
    tmp = tmp_path_factory.mktemp("classify")
    cfg = tiny_config(root, tmp)
    summary = train_mod.run_training(cfg)
    return cfg, summary, tmp


def weights(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- data


def test_cub_split_is_cubs_own(colour_cub):
    root = colour_cub
    meta = read_cub(root)
    split = read_cub_split(root)
    assert split.num_classes == len(meta.classes)
    assert split.class_names == [meta.classes[c] for c in sorted(meta.classes)]
    flags = {str(meta.root / img.rel_path): img.is_train for img in meta.images}
    assert len(split.train) + len(split.val) == len(meta.images)
    assert all(flags[str(item.path)] for item in split.train)
    assert not any(flags[str(item.path)] for item in split.val)
    class_of = {str(meta.root / img.rel_path): sorted(meta.classes).index(img.class_id) for img in meta.images}
    assert all(class_of[str(item.path)] == item.class_id for item in split.train + split.val)


def test_folder_tree_and_list_sources(colour_cub, tmp_path):
    root = colour_cub
    images = sorted((root / "images").rglob("*.jpg"))
    tree = tmp_path / "tree"
    for i, name in enumerate(["cat", "dog", "owl"]):
        (tree / name).mkdir(parents=True)
        for j in range(5):
            shutil.copy(images[i * 24 + j], tree / name / f"{j}.jpg")
    (tree / "empty").mkdir()  # not a class
    items, names = read_folder_tree(tree)
    assert names == ["cat", "dog", "owl"] and len(items) == 15
    train, val = hold_out(items, 0.4, seed=0)
    assert [sum(i.class_id == c for i in val) for c in range(3)] == [2, 2, 2]
    assert hold_out(items, 0.4, seed=0) == (train, val)  # deterministic
    assert not {i.path for i in train} & {i.path for i in val}
    cfg = config_from_dict({"classify": {"data": {"type": "folder", "root": str(tree), "val_fraction": 0.4}}})
    assert load_split(cfg.classify.data).class_names == names

    # list files: the label is the LAST field, so paths may hold spaces
    (tree / "cat" / "a b.jpg").write_bytes((tree / "cat" / "0.jpg").read_bytes())
    lst = tmp_path / "train.txt"
    lst.write_text("cat/a b.jpg 10\ncat/1.jpg 10\ndog/0.jpg 9\ndog/1.jpg 9\n")
    items, labels = read_label_list(lst, tree, None)
    assert labels == ["9", "10"]  # numeric order
    assert items[0].path == tree / "cat" / "a b.jpg" and items[0].class_id == 1
    bad_val = tmp_path / "val.txt"
    bad_val.write_text("owl/0.jpg 7\n")
    with pytest.raises(ClassDataError, match="do not occur in the training list"):
        read_label_list(bad_val, tree, None, labels)
    cfg = config_from_dict({"classify": {"data": {"type": "list", "root": str(tree), "train_list": str(lst),
                                                  "val_list": str(lst)}}})
    assert load_split(cfg.classify.data).num_classes == 2
    with pytest.raises(ClassDataError, match="crop_to_bbox"):
        train_mod.make_dataset(config_from_dict({"classify": {"image": {"crop_to_bbox": True}}}).classify,
                               items, train=False)


# ----------------------------------------------------------------------------- mixing


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixing_gives_soft_targets_that_sum_to_one(kind):
    paddle.seed(0)
    images = paddle.rand([6, 3, 16, 16])
    labels = paddle.to_tensor(np.array([0, 1, 2, 3, 4, 0]))
    alphas = {"mixup_alpha": 0.4} if kind == "mixup" else {"cutmix_alpha": 1.0}
    mixed, target, used = mix_batch(images, labels, 5, np.random.default_rng(1), smoothing=0.1, **alphas)
    assert used == kind and mixed.shape == images.shape and target.shape == [6, 5]
    np.testing.assert_allclose(target.sum(axis=1).numpy(), 1.0, rtol=1e-6)
    assert (target.numpy() >= 0.1 / 5 - 1e-7).all()  # smoothing keeps every class possible
    if kind == "cutmix":  # pixels are copied, not blended: each one comes from some image
        x, m = images.numpy(), mixed.numpy()
        from_any = (m[:, None] == x[None]).all(axis=2).any(axis=1)
        assert from_any.all()
    _, unmixed, none = mix_batch(images, labels, 5, np.random.default_rng(1), mix_prob=0.0, **alphas)
    assert none is None
    np.testing.assert_allclose(unmixed.numpy(), one_hot(labels, 5).numpy())
    # soft CE with one-hot targets is plain CE
    logits = paddle.randn([6, 5])
    ce = paddle.nn.functional.cross_entropy(logits, labels.astype("int64"))
    np.testing.assert_allclose(float(soft_cross_entropy(logits, one_hot(labels, 5))), float(ce), rtol=1e-5)


def test_training_with_mixup_and_cutmix_logs_no_train_accuracy(colour_cub, tmp_path):
    root = colour_cub
    cfg = tiny_config(root, tmp_path, epochs=1, mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.8)
    _, state = train_mod.train_classifier(cfg, tmp_path / "mix")
    header = (tmp_path / "mix" / "history.csv").read_text().splitlines()[0].split(",")
    assert state.epoch == 1 and "train_loss" in header and "val_top1" in header
    assert "train_top1" not in header and "train_top5" not in header


# ----------------------------------------------------------------------------- training


def test_training_writes_a_promoted_run(trained):
    cfg, summary, tmp = trained
    run = tmp / "run"
    assert not (tmp / "run.run").exists()  # promoted on completion
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"best_model", "latest", "epoch_10"}
    with (run / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, 11)]
    assert {"train_loss", "train_top1", "train_top5", "val_top1", "val_top5", "images_per_s"} <= set(rows[0])
    assert summary["epochs"] == 10
    assert summary["best_top1"] == pytest.approx(max(float(r["val_top1"]) for r in rows), abs=1e-6)
    assert summary["images_per_s"] > 0
    assert summary["best_top1"] > 0.5  # 4 classes: well above chance, so training really learns
    assert read_class_map(run) == read_cub_split(cfg.data.root).class_names


def test_resume_latest_continues_a_killed_run(trained, colour_cub, tmp_path, monkeypatch):
    root = colour_cub
    full_cfg, _, full_tmp = trained
    cfg = tiny_config(root, tmp_path)
    # a run killed after epoch 1 leaves its work directory <out>.run/ behind
    with monkeypatch.context() as m:
        m.setattr(train_mod, "EngineConfig", functools.partial(EngineConfig, stop_after_epochs=1))
        train_mod.train_classifier(cfg, tmp_path / "run.run")
    assert not (tmp_path / "run").exists()
    summary = train_mod.run_training(tiny_config(root, tmp_path, resume="latest"))
    assert summary["epochs"] == 10
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(rows) == 11  # epoch 1 from the killed run, epochs 2-10 from the resumed one
    # exact resume: the same weights as the uninterrupted run
    resumed, _, _ = load_trained(tmp_path / "run", "latest")
    full, _, _ = load_trained(full_tmp / "run", "latest")
    a, b = weights(full), weights(resumed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with pytest.raises(FileNotFoundError, match="no unfinished run"):
        train_mod.run_training(tiny_config(root, tmp_path / "none", resume="latest"))


# ----------------------------------------------------------------------------- evaluation / prediction


def test_evaluation_report(trained):
    cfg, summary, tmp = trained
    metrics = evaluate_classifier(cfg)
    out = tmp / "run" / "eval"
    assert {"top1", "top5", "loss", "images", "classes"} <= set(metrics)
    assert metrics == json.loads((out / "metrics.json").read_text())
    # the report evaluates best_model exactly as validation during training did
    assert metrics["top1"] == pytest.approx(summary["best_top1"], abs=1e-6)
    assert metrics["top1"] <= metrics["top5"] <= 1.0
    with (out / "per_class_accuracy.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["classes"] and sum(int(r["images"]) for r in rows) == metrics["images"]
    assert np.loadtxt(out / "confusion_matrix.csv", delimiter=",").sum() == metrics["images"]
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_topk_accuracy_and_entries_against_brute_force():
    rng = np.random.default_rng(0)
    scores, labels = rng.random((50, 7)), rng.integers(0, 7, 50)
    for k in (1, 3, 5):
        brute = np.mean([labels[i] in np.argsort(-scores[i])[:k] for i in range(50)])
        assert topk_accuracy(scores, labels, k) == pytest.approx(brute)
    entries = top_k_entries(np.array([0.1, 0.5, 0.15, 0.25]), list("abcd"), 3)
    assert [e["class_id"] for e in entries] == [1, 3, 2] and [e["name"] for e in entries] == ["b", "d", "c"]


def test_predict_top_k_format(trained, colour_cub):
    cfg, _, tmp = trained
    root = colour_cub
    predictor = ClassifierPredictor.from_run(cfg.out)
    names = read_class_map(cfg.out)
    paths = sorted((root / "images").rglob("*.jpg"))[:5]
    results = list(predictor.predict_files(paths, top_k=3, batch_size=2))
    assert [r["image"] for r in results] == [str(p) for p in paths]
    for r in results:
        scores = [e["score"] for e in r["top_k"]]
        assert len(r["top_k"]) == 3 and scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-5
        assert all(names[e["class_id"]] == e["name"] for e in r["top_k"])
    bad = tmp / "not_an_image.jpg"
    bad.write_text("hello")
    out = list(predictor.predict_files([paths[0], bad], top_k=2))
    assert "top_k" in out[0] and "not a decodable image" in out[1]["error"]


def test_export_matches_the_checkpoint(trained, colour_cub):
    cfg, _, tmp = trained
    root = colour_cub
    meta = export_run(cfg.out, cfg.export, "best_model", onnx=True)
    assert meta["kind"] == "classifier" and meta["input_size"] == [32, 32]
    assert [c["name"] for c in meta["classes"]] == read_class_map(cfg.out)
    images = [load_image(p) for p in sorted((root / "images").rglob("*.jpg"))[::7][:8]]
    reference = ClassifierPredictor.from_run(cfg.out).probabilities(images)
    # trained weights: the images' scores differ by far more than the parity tolerance
    assert np.ptp(reference, axis=0).max() > 100 * 1e-4
    for backend in ("paddle", "onnx"):
        probs = ClassifierPredictor.from_export(cfg.export, backend, 1).probabilities(images)
        assert probs.argmax(axis=1).tolist() == reference.argmax(axis=1).tolist(), backend
        np.testing.assert_allclose(probs, reference, atol=1e-4, err_msg=backend)


# ----------------------------------------------------------------------------- CLI


def test_cli_predict_and_errors(trained, colour_cub, tmp_path):
    from visrec.cli import app

    cfg, _, tmp = trained
    root = colour_cub
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"classify": tiny_raw(root, tmp)}))
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted((root / "images").rglob("*.jpg"))[:3]:
        shutil.copy(p, folder / p.name)
    runner = CliRunner()

    result = runner.invoke(app, ["classify", "predict", str(folder), "--top-k", "2", "--params", str(params)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3 and all(len(line["top_k"]) == 2 for line in lines)
    assert set(lines[0]["top_k"][0]) == {"class_id", "name", "score"}

    result = runner.invoke(app, ["classify", "eval", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 48
    export_dir = tmp_path / "cli_export"
    result = runner.invoke(app, ["classify", "export", "--params", str(params), "-o", "classify.onnx=false",
                                 "-o", f"classify.export={export_dir}"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_classes"] == 4 and (export_dir / "model.json").exists()
    result = runner.invoke(app, ["classify", "predict", str(folder / sorted(p.name for p in folder.iterdir())[0]),
                                 "--exported", "--params", str(params), "-o", "classify.top_k=4",
                                 "-o", f"classify.export={export_dir}"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["top_k"]) == 4

    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not an image")
    broken_run = tmp_path / "broken"
    shutil.copytree(tmp / "run", broken_run)
    (broken_run / "class_map.json").write_text('{"labels": []}')
    for args, message in [
        (["classify", "predict", str(tmp_path / "missing.jpg")], "does not exist"),
        (["classify", "predict", str(text_file)], "not a decodable image"),
        (["classify", "predict", str(folder), "-o", f"classify.out={broken_run}"], "not a visrec class map"),
        (["classify", "predict", str(folder), "-o", "classify.nope=1"], "unknown key 'classify.nope'"),
    ]:
        result = runner.invoke(app, [*args, "--params", str(params)])
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.strip().splitlines()[-1].startswith("error:") and message in result.stderr, result.stderr
