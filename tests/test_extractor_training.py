"""The extractor trained end to end on a tiny synthetic set: checkpoints, resume, export parity."""

import functools
import json

import numpy as np
import paddle
import pytest

from recipes import scratch

from visrec.config import ExtractorConfig, config_from_dict
from visrec.inference.export import EmbeddingNet, export_extractor, read_model_json, weights_fingerprint
from visrec.evaluation.retrieval_eval import eval_dataset_for
from visrec.inference.predictors import Predictor
from visrec.training import extractor_training as extractor_mod
from visrec.training.engine import EngineConfig
from visrec.training.extractor_training import load_trained, run_training, train_extractor

pytestmark = pytest.mark.slow


def tiny_config(**extra) -> ExtractorConfig:
    raw = {
        "backbone": {"name": "mobilenet_v1", "scale": 0.25},
        "neck": {"name": "FCNeck", "embedding_size": 32},
        "image": {"size": 48},
        "sampler": {"classes_per_batch": 4, "images_per_class": 4},
        "optimizer": {"lr": 0.02},
        "epochs": 2, "eval_every": 1, "eval_batch_size": 16, "seed": 1,
    }
    raw.update(extra)
    return config_from_dict({"extractor": scratch("extractor", raw)}).extractor


def state(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_train_writes_run_and_metrics(tiny_cub, tmp_path):
    raw, split = tiny_cub
    summary = run_training(tiny_config(), raw, split, tmp_path / "extractor", tmp_path / "m.json")
    run = tmp_path / "extractor"
    assert not (tmp_path / "extractor.run").exists()  # promoted on success
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"best_model", "latest", "epoch_2"}
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and "val_recall@1" in history[0] and len(history) == 3
    assert json.loads((tmp_path / "m.json").read_text()) == {k: v for k, v in summary.items() if k != "finetune_reason"}
    assert 0.0 <= summary["best_recall@1"] <= 1.0 and summary["epochs"] == 2 and summary["finetuned"] is True


def test_synthetic_photos_leave_the_pretrained_backbone_untouched(tiny_cub, tmp_path):
    """extractor.finetune real_only on the generator's shapes: the finished run is the pretrained
    network as it is (no training step, no evaluation), exportable like any run."""
    raw, split = tiny_cub
    cfg = tiny_config(backbone={"name": "efficientnet_lite0", "pretrained": "imagenet", "pool": "gem"},
                      neck=None, head={"name": "ProxyHead"},
                      losses=[{"name": "ProxyAnchorLoss", "alpha": 32.0, "delta": 0.1}], image={"size": 64})
    summary = run_training(cfg, raw, split, tmp_path / "extractor", tmp_path / "m.json", real_photos=False)
    assert summary["finetuned"] is False and summary["epochs"] == 0 and "synthetic" in summary["finetune_reason"]
    assert "finetune_reason" not in json.loads((tmp_path / "m.json").read_text())  # metrics stay numeric
    model, model_cfg = load_trained(tmp_path / "extractor", "best_model")
    pretrained = extractor_mod.build_model(cfg, class_num=model_cfg["class_num"])
    saved, fresh = state(model.backbone), state(pretrained.backbone)
    assert saved.keys() == fresh.keys() and all(np.array_equal(saved[k], fresh[k]) for k in saved)
    assert (tmp_path / "extractor" / "checkpoints" / "latest").is_dir()
    again = run_training(cfg, raw, split, tmp_path / "again", tmp_path / "m2.json", real_photos=False)
    assert again["finetuned"] is False  # and the same weights: the unused head is seeded
    a, b = state(load_trained(tmp_path / "extractor")[0]), state(load_trained(tmp_path / "again")[0])
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("finetune", "real", "pretrained", "expected"), [
    ("real_only", True, "imagenet", True), ("real_only", False, "imagenet", False),
    ("always", False, "imagenet", True), ("never", True, "imagenet", False),
    ("real_only", False, None, True),  # from scratch: untrained weights are no model at all
])
def test_when_training_may_change_the_weights(finetune, real, pretrained, expected):
    backbone = {"name": "mobilenet_v1", "scale": 0.25, **({"pretrained": pretrained} if pretrained else {})}
    allowed, reason = extractor_mod.finetune_allowed(tiny_config(finetune=finetune, backbone=backbone), real)
    assert allowed is expected and reason


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_cub, tmp_path, monkeypatch):
    raw, split = tiny_cub
    full_model, _ = train_extractor(tiny_config(), raw, split, tmp_path / "full")
    # "kill" after epoch 1: the engine stops early, leaving epoch-1 checkpoints behind
    with monkeypatch.context() as m:
        m.setattr(extractor_mod, "EngineConfig", functools.partial(EngineConfig, stop_after_epochs=1))
        train_extractor(tiny_config(), raw, split, tmp_path / "killed")
    resumed_model, st = train_extractor(
        tiny_config(resume=str(tmp_path / "killed" / "checkpoints" / "latest")), raw, split, tmp_path / "killed")
    assert st.epoch == 2
    a, b = state(full_model), state(resumed_model)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_export_parity_dygraph_paddle_inference_onnx(tiny_cub, tmp_path):
    raw, split = tiny_cub
    run_training(tiny_config(), raw, split, tmp_path / "extractor", tmp_path / "m.json")
    model, model_cfg = load_trained(tmp_path / "extractor")
    dataset = eval_dataset_for({"input_size": [48, 48], **model_cfg["image"]}, raw, split / "test_list.txt")
    batch = np.stack([dataset[i][0] for i in range(0, len(dataset), 4)])
    meta = export_extractor(model, model_cfg, tmp_path / "export")
    assert meta == read_model_json(tmp_path / "export")
    assert meta["embedding_dim"] == 32 and meta["input_size"] == [48, 48]
    assert meta["fingerprint"] == weights_fingerprint(EmbeddingNet(model))

    with paddle.no_grad():
        reference = model.embed(paddle.to_tensor(batch)).numpy()
    # trained weights and BN statistics: the images' embeddings differ by far more than
    # the parity tolerance, so a constant or mis-fed export could not pass
    assert np.abs(reference - reference.mean(axis=0)).max() > 100 * 1e-4
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-5)
    for backend in ("paddle", "onnx"):
        out = Predictor(tmp_path / "export", backend=backend)(batch)[0]
        assert np.abs(out - reference).max() < 1e-4, backend
    # auto: ONNX Runtime when the export has model.onnx, Paddle Inference when it has not
    assert Predictor(tmp_path / "export", backend="auto").backend == "onnx"
    (tmp_path / "export" / "model.onnx").unlink()
    assert Predictor(tmp_path / "export", backend="auto").backend == "paddle"


def test_predictor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported visrec model"):
        Predictor(tmp_path)


@pytest.mark.parametrize("neck", ["FCNeck", "FCBNNeck"])
def test_exported_necks_run_in_paddle_inference_and_onnx(neck, tmp_path):
    """An affine-free BatchNorm (BNNeck) crashes Paddle Inference's oneDNN kernel: such models
    are exported with "onednn": false and served by the plain CPU kernels instead."""
    from visrec.inference.predictors import Predictor
    from visrec.models.extractor import build_rec_model

    paddle.seed(0)
    model = build_rec_model({"name": "mobilenet_v1", "scale": 0.25}, {"name": neck, "embedding_size": 16}, None, 4)
    model.train()
    with paddle.no_grad():
        for _ in range(3):
            model.embed(paddle.randn([8, 3, 32, 32]))
    cfg = {"backbone": {"name": "mobilenet_v1", "scale": 0.25}, "neck": {"name": neck},
           "image": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "scale": 1 / 255}}
    meta = export_extractor(model, cfg, tmp_path / "export")
    assert meta["onednn"] is (neck == "FCNeck")
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype("float32")
    model.eval()
    with paddle.no_grad():
        expected = model.embed(paddle.to_tensor(x)).numpy()
    for backend in ("paddle", "onnx"):
        out = Predictor(tmp_path / "export", backend=backend)(x)[0]
        np.testing.assert_allclose(out, expected, atol=1e-4)


PROXY_ANCHOR = {"head": {"name": "ProxyHead"}, "losses": [{"name": "ProxyAnchorLoss"}]}


def test_head_warmup_trains_only_neck_and_head(tiny_cub):
    from visrec.models.losses import build_loss
    from visrec.training.head_warmup import warm_up_head

    raw, split = tiny_cub
    cfg = tiny_config(**PROXY_ANCHOR)
    train_ds = extractor_mod.make_dataset(cfg, raw, split / "train_list.txt", train=True)
    model = extractor_mod.build_model(cfg, class_num=train_ds.num_classes)
    before = state(model)
    losses = warm_up_head(model, train_ds, build_loss(cfg.losses), steps=40, lr=0.01, batch_size=16)
    after = state(model)
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5])
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.startswith(("neck.", "head.")) for k in changed), changed
    assert any(k.startswith("head.") for k in changed) and any(k.startswith("neck.") for k in changed)


def test_head_warmup_runs_once_before_training_and_not_on_resume(tiny_cub, tmp_path, monkeypatch):
    raw, split = tiny_cub
    calls = []
    real = extractor_mod.warm_up_head
    monkeypatch.setattr(extractor_mod, "warm_up_head", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    cfg = tiny_config(**PROXY_ANCHOR, head_warmup_steps=10, epochs=1)
    _, st = train_extractor(cfg, raw, split, tmp_path / "run")
    assert calls == [10] and st.epoch == 1
    resumed = tiny_config(**PROXY_ANCHOR, head_warmup_steps=10, epochs=2,
                          resume=str(tmp_path / "run" / "checkpoints" / "latest"))
    train_extractor(resumed, raw, split, tmp_path / "run")
    assert calls == [10]  # the resumed run keeps its checkpointed head


def test_head_warmup_needs_something_to_warm_up(tiny_cub):
    from visrec.models.losses import build_loss
    from visrec.training.head_warmup import warm_up_head

    cfg = tiny_config(neck=None, head=None, losses=[{"name": "TripletLossV2"}])
    model = extractor_mod.build_model(cfg, class_num=4)
    with pytest.raises(ValueError, match="head_warmup_steps=0"):
        warm_up_head(model, [], build_loss(cfg.losses), steps=5, lr=0.01, batch_size=4)
    with pytest.raises(ValueError, match=">= 0"):
        warm_up_head(model, [], build_loss(cfg.losses), steps=-1, lr=0.01, batch_size=4)
