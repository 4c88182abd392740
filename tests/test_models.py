"""Recognition model: backbones, necks, heads and RecModel, on tiny inputs."""

from __future__ import annotations

import logging
import math

import numpy as np
import paddle
import pytest
from paddle import nn
from paddle.nn import functional as F

from visrec.models.mobilenet_v1 import mobilenet_v1
from visrec.models.pplcnet_v2 import PPLCNetV2, RepDepthwise
from visrec.models.registry import create_backbone, list_backbones
from visrec.models.weights import load_pretrained
from visrec.models.extractor import RecModel, build_rec_model, param_groups
from visrec.models.heads import ArcMarginHead, CosMarginHead, FCHead, create_head
from visrec.models.necks import BNNeck, FCBNNeck, FCNeck, create_neck

SIZE = 64  # input side: small enough for speed, large enough for stride 32


@pytest.fixture(autouse=True)
def _seed():
    paddle.seed(0)
    np.random.seed(0)


def images(n: int = 2, size: int = SIZE) -> paddle.Tensor:
    return paddle.to_tensor(np.random.default_rng(1).normal(size=(n, 3, size, size)).astype("float32"))


def randomise_batchnorm(model: nn.Layer, seed: int = 0) -> None:
    """Give every BN non-trivial running statistics and affine parameters.

    An untrained net in eval mode has mean 0 / var 1 statistics, which makes a
    before/after comparison nearly vacuous; random ones exercise the BN folding.
    """
    rng = np.random.default_rng(seed)
    for layer in model.sublayers():
        if isinstance(layer, nn.layer.norm._BatchNormBase):
            c = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0, 0.5, c).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 2.0, c).astype("float32"))
            if layer.weight is not None:
                layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
                layer.bias.set_value(rng.normal(0, 0.5, c).astype("float32"))


# ------------------------------------------------------------------------ backbones
@pytest.mark.parametrize("name", list_backbones())
def test_backbone_shapes(name):
    kwargs = {"scale": 0.25} if name in ("mobilenet_v1", "pplcnetv2_base") else {}
    model = create_backbone(name, **kwargs)
    model.eval()
    x = images()
    out = model(x)
    assert list(out.shape) == [2, model.out_channels]
    stages = model.forward_stages(x)
    assert len(stages) == len(model.feature_channels) == len(model.feature_strides) == 3
    for fmap, channels, stride in zip(stages, model.feature_channels, model.feature_strides):
        assert list(fmap.shape) == [2, channels, SIZE // stride, SIZE // stride]
    last = model.forward_features(x)
    np.testing.assert_array_equal(last.numpy(), stages[-1].numpy())


def test_registry_lists_and_rejects():
    assert {"mobilenet_v1", "pplcnetv2_base", "resnet18", "resnet50"} <= set(list_backbones())
    with pytest.raises(ValueError, match="mobilenet_v1.*pplcnetv2_base"):
        create_backbone("mobilenet_v9")
    with pytest.raises(ValueError, match="does not take scale"):
        create_backbone("resnet18", scale=0.5)


@pytest.mark.parametrize("scale, expected", [(0.25, 256), (0.5, 512), (1.0, 1024)])
def test_mobilenet_v1_width(scale, expected):
    model = mobilenet_v1(scale=scale)
    assert model.out_channels == expected
    assert model.feature_channels == [int(256 * scale), int(512 * scale), expected]
    # stem + 13 blocks of (depthwise, pointwise) convs = 27 convs
    assert sum(isinstance(layer, nn.Conv2D) for layer in model.sublayers()) == 27


def test_pplcnetv2_last_stride_one_gives_output_stride_16():
    model = PPLCNetV2(scale=0.5)
    assert model.feature_strides[-1] == 16
    assert list(model.forward_features(images()).shape[2:]) == [SIZE // 16, SIZE // 16]
    strided = PPLCNetV2(scale=0.5, last_stride=2)
    assert list(strided.forward_features(images()).shape[2:]) == [SIZE // 32, SIZE // 32]


def test_pplcnetv2_has_no_final_relu():
    model = PPLCNetV2(scale=0.5)
    model.eval()
    randomise_batchnorm(model)
    out = model(images(4)).numpy()
    assert (out < 0).any() and (out > 0).any()


def test_pplcnetv2_rep_keeps_outputs():
    model = PPLCNetV2(scale=0.5)
    randomise_batchnorm(model)
    model.eval()
    x = images(2)
    before = model(x).numpy()
    assert before.std() > 0.1, "outputs near constant: the comparison would prove nothing"
    n_rep = sum(isinstance(layer, RepDepthwise) for layer in model.sublayers())
    identity_branches = sum(
        isinstance(layer, RepDepthwise) and layer.identity is not None for layer in model.sublayers()
    )
    assert n_rep > 0 and identity_branches > 0  # stride-1 blocks exercise the identity branch
    model.rep()
    after = model(x).numpy()
    np.testing.assert_allclose(after, before, atol=1e-4, rtol=1e-4)
    # only the fused convs remain
    keys = list(model.state_dict())
    assert not any("branches" in k or "identity" in k for k in keys)
    assert sum(".fused." in k for k in keys) == 2 * n_rep
    model.rep()  # idempotent
    np.testing.assert_allclose(model(x).numpy(), after, atol=1e-6)


def test_rep_depthwise_strided_branches_align():
    """Stride 2: the zero-padded 3x3 and 1x1 kernels must line up with the 5x5 centre."""
    layer = RepDepthwise(channels=4, kernel=5, stride=2)
    randomise_batchnorm(layer, seed=3)
    layer.eval()
    x = paddle.randn([2, 4, 9, 9])
    before = layer(x).numpy()
    layer.rep()
    np.testing.assert_allclose(layer(x).numpy(), before, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ weights
def test_load_pretrained_round_trip(tmp_path):
    source = PPLCNetV2(scale=0.25)
    randomise_batchnorm(source)
    source.eval()
    path = tmp_path / "source.pdparams"
    paddle.save(source.state_dict(), str(path))
    target = PPLCNetV2(scale=0.25)
    target.eval()
    x = images()
    assert not np.allclose(target(x).numpy(), source(x).numpy())
    missing, unexpected = load_pretrained(target, path)
    assert missing == [] and unexpected == []
    np.testing.assert_allclose(target(x).numpy(), source(x).numpy(), atol=1e-6)


def test_load_pretrained_reports_mismatches(tmp_path, caplog):
    model = mobilenet_v1(scale=0.25)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state.pop("stem.bn.weight")
    state["extra.weight"] = np.zeros(3, dtype="float32")
    state["blocks.0.pw.conv.weight"] = np.zeros((5, 5, 1, 1), dtype="float32")
    kept_before = model.state_dict()["blocks.0.pw.conv.weight"].numpy().copy()
    path = tmp_path / "mismatched.pdparams"
    paddle.save(state, str(path))
    with caplog.at_level(logging.WARNING, logger="visrec.models.weights"):
        missing, unexpected = load_pretrained(model, path)
    assert missing == ["stem.bn.weight"]
    assert sorted(unexpected) == ["blocks.0.pw.conv.weight", "extra.weight"]
    assert "shape" in caplog.text and "stem.bn.weight" in caplog.text
    np.testing.assert_array_equal(model.state_dict()["blocks.0.pw.conv.weight"].numpy(), kept_before)


def test_load_pretrained_refuses_unrelated_file(tmp_path):
    path = tmp_path / "other.pdparams"
    paddle.save({"foo.weight": np.zeros(2, dtype="float32")}, str(path))
    with pytest.raises(ValueError, match="none of the 1 keys"):
        load_pretrained(mobilenet_v1(scale=0.25), path)
    with pytest.raises(FileNotFoundError):
        load_pretrained(mobilenet_v1(scale=0.25), tmp_path / "absent.pdparams")


# ------------------------------------------------------------------------ necks
def test_necks_shapes_and_registry():
    x = paddle.randn([4, 16])
    fc_neck = create_neck("FCNeck", 16, embedding_size=8)
    assert isinstance(fc_neck, FCNeck) and list(fc_neck(x).shape) == [4, 8]
    assert create_neck("fcbnneck", 16, embedding_size=8).out_channels == 8
    identity = create_neck(None, 16)
    assert identity.out_channels == 16 and identity(x) is x
    assert create_neck("null", 16).out_channels == 16
    with pytest.raises(ValueError, match="BNNeck.*FCBNNeck.*FCNeck"):
        create_neck("GeMNeck", 16)
    assert isinstance(create_neck("BNNeck", 16), BNNeck)


@pytest.mark.parametrize("use_param_groups", [True, False])
def test_bnneck_bias_stays_zero_while_training(use_param_groups):
    model = RecModel(nn.Linear(6, 8), BNNeck(8), FCHead(8, 3))
    parameters = param_groups(model) if use_param_groups else model.parameters()
    optimizer = paddle.optimizer.Momentum(
        learning_rate=0.5, momentum=0.9, parameters=parameters, weight_decay=0.1
    )
    weight_before = model.neck.weight.numpy().copy()
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.normal(size=(12, 6)).astype("float32"))
    y = paddle.to_tensor(rng.integers(0, 3, 12))
    for _ in range(5):
        loss = F.cross_entropy(model(x, y)["logits"], y)
        loss.backward()
        assert model.neck.bias.grad is None
        optimizer.step()
        optimizer.clear_grad()
    assert model.neck.bias.stop_gradient
    np.testing.assert_array_equal(model.neck.bias.numpy(), np.zeros(8, dtype="float32"))
    assert not np.allclose(model.neck.weight.numpy(), weight_before)
    assert not np.allclose(model.neck.norm._mean.numpy(), 0)  # running stats updated


def test_bnneck_normalises_like_batchnorm():
    """Explicit affine on a plain normalisation = BatchNorm1D with the same weight, zero bias."""
    neck = FCBNNeck(6, embedding_size=4)
    reference = nn.BatchNorm1D(4)
    weight = np.array([0.5, 1.0, 2.0, 3.0], dtype="float32")
    neck.bnneck.weight.set_value(weight)
    reference.weight.set_value(weight)
    x = paddle.randn([10, 6])
    projected = neck.fc(x)
    np.testing.assert_allclose(neck(x).numpy(), reference(projected).numpy(), atol=1e-5)


# ------------------------------------------------------------------------ heads
def cosine_reference(features: np.ndarray, weight: np.ndarray) -> np.ndarray:
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=0, keepdims=True)
    return f @ w


def arcface_reference(features, weight, labels, margin, scale, easy_margin):
    cos = cosine_reference(features.astype(np.float64), weight.astype(np.float64))
    out = cos.copy()
    for i, label in enumerate(labels):
        c = cos[i, label]
        theta = math.acos(min(1.0, max(-1.0, c)))
        if easy_margin:
            out[i, label] = math.cos(theta + margin) if c > 0 else c
        elif c > math.cos(math.pi - margin):
            out[i, label] = math.cos(theta + margin)
        else:
            out[i, label] = c - math.sin(math.pi - margin) * margin
    return scale * out


def head_inputs(head, n=6):
    """Random features; sample 0 points away from its class, so cos < cos(pi - m)."""
    rng = np.random.default_rng(2)
    weight = head.weight.numpy()
    labels = rng.integers(0, weight.shape[1], n)
    features = rng.normal(size=(n, weight.shape[0])).astype("float32")
    features[0] = -weight[:, labels[0]] + 0.01 * features[0]
    features[1] = weight[:, labels[1]] + 0.5 * features[1]  # a well-aligned positive
    return features, labels


@pytest.mark.parametrize("easy_margin", [False, True])
def test_arc_margin_head_matches_reference(easy_margin):
    head = ArcMarginHead(8, 5, margin=0.5, scale=30.0, easy_margin=easy_margin)
    features, labels = head_inputs(head)
    got = head(paddle.to_tensor(features), paddle.to_tensor(labels)).numpy()
    expected = arcface_reference(features, head.weight.numpy(), labels, 0.5, 30.0, easy_margin)
    assert cosine_reference(features, head.weight.numpy())[0, labels[0]] < math.cos(math.pi - 0.5)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-5)


def test_cos_margin_head_matches_reference():
    head = CosMarginHead(8, 5, margin=0.35, scale=64.0)
    features, labels = head_inputs(head)
    got = head(paddle.to_tensor(features), paddle.to_tensor(labels.reshape(-1, 1))).numpy()
    expected = cosine_reference(features.astype(np.float64), head.weight.numpy().astype(np.float64))
    expected[np.arange(len(labels)), labels] -= 0.35
    np.testing.assert_allclose(got, 64.0 * expected, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("cls, scale", [(ArcMarginHead, 30.0), (CosMarginHead, 64.0)])
def test_margin_heads_give_scaled_cosines_without_labels_or_in_eval(cls, scale):
    head = cls(8, 5)
    features, labels = head_inputs(head)
    expected = scale * cosine_reference(features, head.weight.numpy())
    np.testing.assert_allclose(head(paddle.to_tensor(features)).numpy(), expected, atol=1e-4)
    head.eval()
    with_labels = head(paddle.to_tensor(features), paddle.to_tensor(labels)).numpy()
    np.testing.assert_allclose(with_labels, expected, atol=1e-4)


def test_head_registry():
    assert create_head(None, 8, 5) is None and create_head("null", 8, 5) is None
    assert isinstance(create_head("arcmarginhead", 8, 5, margin=0.2), ArcMarginHead)
    with pytest.raises(ValueError, match="ArcMarginHead.*CosMarginHead.*FCHead"):
        create_head("CircleMargin", 8, 5)
    with pytest.raises(ValueError, match="bad options for head ArcMarginHead"):
        create_head("ArcMarginHead", 8, 5, radius=3)


# ------------------------------------------------------------------------ RecModel
def test_build_rec_model_from_dicts():
    model = build_rec_model(
        {"name": "mobilenet_v1", "scale": 0.25},
        {"name": "FCNeck", "embedding_size": 32},
        {"name": "ArcMarginHead", "margin": 0.2, "scale": 30},
        class_num=5,
    )
    labels = paddle.to_tensor([0, 4])
    out = model(images(), labels)
    assert list(out["features"].shape) == [2, 32] and list(out["logits"].shape) == [2, 5]
    assert model.head.margin == 0.2 and model.embedding_size == 32
    model.eval()
    embedded = model.embed(images()).numpy()
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)
    raw = model(images())["features"].numpy()
    np.testing.assert_allclose(embedded, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)

    metric_only = build_rec_model({"name": "pplcnetv2_base", "scale": 0.25}, {"name": "BNNeck"}, None, class_num=5)
    assert metric_only.head is None and metric_only(images())["logits"] is None
    assert metric_only.embedding_size == 512


@pytest.mark.parametrize(
    "backbone, neck, head, message",
    [
        ({"name": "vgg16"}, None, None, "unknown backbone 'vgg16'.*mobilenet_v1"),
        ({"name": "mobilenet_v1", "scale": 0.25}, {"name": "SENeck"}, None, "unknown neck.*BNNeck"),
        ({"name": "mobilenet_v1", "scale": 0.25}, None, {"name": "Softmax"}, "unknown head.*ArcMarginHead"),
        ({"scale": 0.25}, None, None, "'name' key"),
        ({"name": "mobilenet_v1", "scale": 0.25}, None, {"name": "FCHead", "embedding_size": 7}, "differs"),
    ],
)
def test_build_rec_model_rejects_bad_configs(backbone, neck, head, message):
    with pytest.raises(ValueError, match=message):
        build_rec_model(backbone, neck, head, class_num=5)


def test_build_rec_model_loads_pretrained_backbone(tmp_path):
    source = mobilenet_v1(scale=0.25)
    randomise_batchnorm(source)
    path = tmp_path / "backbone.pdparams"
    paddle.save(source.state_dict(), str(path))
    model = build_rec_model({"name": "mobilenet_v1", "scale": 0.25, "pretrained": str(path)}, None, None, 5)
    source.eval()
    model.eval()
    np.testing.assert_allclose(model(images())["features"].numpy(), source(images()).numpy(), atol=1e-6)


def test_param_groups_split_backbone_and_skip_frozen():
    model = build_rec_model(
        {"name": "mobilenet_v1", "scale": 0.25}, {"name": "FCBNNeck", "embedding_size": 16}, {"name": "FCHead"}, 5
    )
    groups = param_groups(model, backbone_lr_mult=0.1)
    assert len(groups) == 2 and groups[0]["learning_rate"] == 0.1 and groups[1]["learning_rate"] == 1.0
    trainable_backbone = {id(p) for p in model.backbone.parameters() if not p.stop_gradient}
    assert {id(p) for p in groups[0]["params"]} == trainable_backbone
    rest = {id(p) for p in groups[1]["params"]}
    neck, head = model.neck, model.head
    assert rest == {id(neck.fc.weight), id(neck.bnneck.weight), id(head.fc.weight), id(head.fc.bias)}
    grouped = {id(p) for group in groups for p in group["params"]}
    assert id(model.neck.bnneck.bias) not in grouped
    assert not any(p.stop_gradient for group in groups for p in group["params"])

    # the multiplier really scales the backbone step: plain SGD, one step
    optimizer = paddle.optimizer.SGD(learning_rate=1.0, parameters=groups)
    head_w, stem_w = model.head.fc.weight, model.backbone.stem.conv.weight
    before = {"head": head_w.numpy().copy(), "stem": stem_w.numpy().copy()}
    labels = paddle.to_tensor([0, 1])
    F.cross_entropy(model(images(), labels)["logits"], labels).backward()
    grads = {"head": head_w.grad.numpy().copy(), "stem": stem_w.grad.numpy().copy()}
    optimizer.step()
    np.testing.assert_allclose(head_w.numpy(), before["head"] - grads["head"], atol=1e-6)
    np.testing.assert_allclose(stem_w.numpy(), before["stem"] - 0.1 * grads["stem"], atol=1e-6)
