"""GeM pooling (backbone option ``pool: gem``) and partial freezing for fine-tuning."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from visrec.models.layers import GeM
from visrec.models.registry import build_backbone
from visrec.models.extractor import build_rec_model, param_groups
from visrec.models.freezing import backbone_units


def test_gem_is_the_generalised_mean_and_its_limits():
    x = paddle.to_tensor(np.random.default_rng(0).uniform(0, 2, (2, 3, 4, 5)).astype("float32"))
    for p in (1.0, 2.0, 3.0):
        expected = (x.numpy() ** p).mean(axis=(2, 3)) ** (1 / p)
        np.testing.assert_allclose(GeM(p)(x).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(GeM(60.0)(x).numpy(), x.numpy().max(axis=(2, 3)), rtol=0.05)  # p -> inf: max
    with pytest.raises(ValueError, match="p must be >= 1"):
        GeM(0.5)


def test_gem_p_learns_and_is_a_backbone_parameter():
    backbone = build_backbone("mobilenet_v1", scale=0.25, pool="gem", gem_p=3.0)
    model = build_rec_model({"name": "mobilenet_v1", "scale": 0.25}, None, None, 4)
    model.backbone = backbone
    (group_bb, _) = param_groups(model, 0.1) if len(param_groups(model, 0.1)) == 2 else (param_groups(model)[0], None)
    assert any(p is backbone.pooling.p for p in group_bb["params"])
    out = backbone(paddle.rand([2, 3, 32, 32]))
    out.sum().backward()
    assert backbone.pooling.p.grad is not None and float(backbone.pooling.p.grad.abs().sum()) > 0
    fixed = build_backbone("mobilenet_v1", scale=0.25, pool="gem", gem_p=2.0, gem_learnable=False)
    assert fixed.pooling.p.stop_gradient


def test_pool_options_are_checked():
    with pytest.raises(ValueError, match="unknown pool 'mean'"):
        build_backbone("mobilenet_v1", scale=0.25, pool="mean")
    with pytest.raises(ValueError, match="no pooling option"):
        build_backbone("resnet18", pool="gem")


def test_gem_exports_with_parity(tmp_path):
    from visrec.inference.export import export_extractor
    from visrec.inference.predictors import Predictor

    paddle.seed(0)
    spec = {"name": "mobilenet_v1", "scale": 0.25, "pool": "gem", "gem_p": 2.5}
    model = build_rec_model(spec, None, None, 4)
    model.train()
    with paddle.no_grad():
        for _ in range(3):
            model.embed(paddle.rand([8, 3, 32, 32]))  # warm BN statistics
    cfg = {"backbone": spec, "neck": None, "image": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "scale": 1 / 255}}
    export_extractor(model, cfg, tmp_path / "export")
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype("float32")
    model.eval()
    with paddle.no_grad():
        expected = model.embed(paddle.to_tensor(x)).numpy()
    for backend in ("paddle", "onnx"):
        np.testing.assert_allclose(Predictor(tmp_path / "export", backend=backend)(x)[0], expected, atol=1e-4)


def test_frozen_units_and_bn_stay_fixed_while_the_rest_trains():
    model = build_rec_model({"name": "mobilenet_v1", "scale": 0.25}, {"name": "FCNeck", "embedding_size": 8},
                            {"name": "FCHead"}, 3)
    units = backbone_units(model.backbone)
    model.freeze(3, freeze_bn=True)
    model.train()
    frozen = [p for u in units[:3] for p in u.parameters()]
    assert frozen and all(p.stop_gradient for p in frozen)
    assert all(not u.training for u in units[:3])  # frozen units in eval mode
    bns = [layer for layer in model.backbone.sublayers() if isinstance(layer, paddle.nn.BatchNorm2D)]
    assert bns and all(not bn.training for bn in bns) and all(p.stop_gradient for bn in bns for p in bn.parameters())
    trainable = [p for u in units[3:] for p in u.parameters() if not p.stop_gradient]
    assert trainable  # the later convs still train
    before = {id(bn): bn._mean.numpy().copy() for bn in bns}
    before_w = [p.numpy().copy() for p in frozen]
    opt = paddle.optimizer.SGD(0.1, parameters=[p for g in param_groups(model) for p in g["params"]])
    out = model(paddle.rand([4, 3, 32, 32]), paddle.to_tensor([0, 1, 2, 0]))
    paddle.nn.functional.cross_entropy(out["logits"], paddle.to_tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert all(np.array_equal(bn._mean.numpy(), before[id(bn)]) for bn in bns)  # no running-stat drift
    assert all(np.array_equal(p.numpy(), w) for p, w in zip(frozen, before_w, strict=True))
    with pytest.raises(ValueError, match="frozen_units must be an integer"):
        model.freeze(len(units) + 1)
