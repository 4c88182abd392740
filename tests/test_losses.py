"""Losses against brute-force numpy references (loops over anchors) on small batches."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from visrec.models.losses import (
    LOSSES,
    CELoss,
    CombinedLoss,
    ProxyAnchorLoss,
    TripletAngularMarginLoss,
    TripletLossV2,
    build_loss,
)

paddle.set_device("cpu")

TOL = {"rtol": 1e-5, "atol": 1e-5}

LAYOUTS = {
    "PxK_4x3": [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3],
    "PxK_3x2_shuffled": [2, 0, 1, 0, 2, 1],
    "uneven_with_singletons": [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4],
}


# --------------------------------------------------------------------------- references
def _normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_triplet_euclidean(feats, labels, margin, normalize=True):
    x = _normalise(feats) if normalize else feats
    losses = []
    for a in range(len(x)):
        pos = [np.linalg.norm(x[a] - x[p]) for p in range(len(x)) if p != a and labels[p] == labels[a]]
        neg = [np.linalg.norm(x[a] - x[n]) for n in range(len(x)) if labels[n] != labels[a]]
        if not pos or not neg:
            continue  # anchor without a positive or a negative is left out
        losses.append(max(0.0, max(pos) - min(neg) + margin))
    return float(np.mean(losses)) if losses else 0.0


def ref_triplet_angular(feats, labels, margin, normalize=True, weight=1.0, ap_value=0.9, an_value=0.5):
    x = _normalise(feats) if normalize else feats
    rank, abs_ap, abs_an = [], [], []
    for a in range(len(x)):
        pos = [float(x[a] @ x[p]) for p in range(len(x)) if p != a and labels[p] == labels[a]]
        neg = [float(x[a] @ x[n]) for n in range(len(x)) if labels[n] != labels[a]]
        if not pos or not neg:
            continue
        s_ap, s_an = min(pos), max(neg)
        rank.append(max(0.0, s_an - s_ap + margin))
        abs_ap.append(max(0.0, ap_value - s_ap))
        abs_an.append(max(0.0, s_an - an_value))
    if not rank:
        return 0.0
    loss = np.mean(rank)
    if weight > 0:
        loss += weight * (np.mean(abs_ap) + np.mean(abs_an))
    return float(loss)


def ref_cross_entropy(logits, labels, epsilon):
    total = 0.0
    n, c = logits.shape
    for i in range(n):
        z = logits[i] - logits[i].max()
        log_probs = z - np.log(np.exp(z).sum())
        target = np.full(c, epsilon / c)
        target[labels[i]] += 1.0 - epsilon
        total += -(target * log_probs).sum()
    return total / n


def numeric_grad(fn, x, eps=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += eps
        minus[idx] -= eps
        grad[idx] = (fn(plus) - fn(minus)) / (2 * eps)
    return grad


def _tensor(x, stop_gradient=True):
    return paddle.to_tensor(x, stop_gradient=stop_gradient)


# --------------------------------------------------------------------------- triplet, Euclidean
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("seed", range(3))
def test_triplet_v2_matches_reference(seed, layout, dtype):
    labels = np.array(LAYOUTS[layout])
    feats = np.random.default_rng(seed).normal(size=(len(labels), 5)).astype(dtype)
    for margin, normalize in [(0.5, True), (0.1, True), (2.0, False)]:
        got = TripletLossV2(margin=margin, normalize_feature=normalize)(_tensor(feats), _tensor(labels))
        want = ref_triplet_euclidean(feats.astype(np.float64), labels, margin, normalize)
        np.testing.assert_allclose(float(got), want, **TOL)


def test_triplet_v2_gradient_matches_finite_differences():
    labels = np.array(LAYOUTS["uneven_with_singletons"])
    feats = np.random.default_rng(5).normal(size=(len(labels), 4))
    x = _tensor(feats, stop_gradient=False)
    loss = TripletLossV2(margin=0.5)(x, _tensor(labels))
    loss.backward()
    assert float(loss) > 0
    assert np.abs(x.grad.numpy()).sum() > 0
    want = numeric_grad(lambda f: ref_triplet_euclidean(f, labels, 0.5), feats)
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- triplet, angular
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("seed", range(3))
def test_triplet_angular_matches_reference(seed, layout, dtype):
    labels = np.array(LAYOUTS[layout])
    feats = np.random.default_rng(10 + seed).normal(size=(len(labels), 5)).astype(dtype)
    options = [
        {"margin": 0.5, "absolute_loss_weight": 1.0},
        {"margin": 0.3, "absolute_loss_weight": 0.0},
        {"margin": 0.2, "absolute_loss_weight": 0.5, "ap_value": 0.8, "an_value": 0.3},
    ]
    for opt in options:
        got = TripletAngularMarginLoss(**opt)(_tensor(feats), _tensor(labels))
        want = ref_triplet_angular(
            feats.astype(np.float64), labels, opt["margin"], weight=opt["absolute_loss_weight"],
            ap_value=opt.get("ap_value", 0.9), an_value=opt.get("an_value", 0.5),
        )
        np.testing.assert_allclose(float(got), want, **TOL)


def test_triplet_angular_gradient_matches_finite_differences():
    labels = np.array(LAYOUTS["PxK_4x3"])
    feats = np.random.default_rng(6).normal(size=(len(labels), 4))
    x = _tensor(feats, stop_gradient=False)
    loss = TripletAngularMarginLoss()(x, _tensor(labels))
    loss.backward()
    assert float(loss) > 0
    assert np.abs(x.grad.numpy()).sum() > 0
    want = numeric_grad(lambda f: ref_triplet_angular(f, labels, 0.5), feats)
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-4, atol=1e-6)


def test_triplet_angular_has_no_constant_term():
    # Class 0 all along e0, class 1 all along e1: s_ap = 1 >= ap_value 0.9,
    # s_an = 0 <= an_value 0.5, s_an - s_ap + margin = -0.5 < 0. Every term is
    # satisfied, so the loss is exactly 0 (the reference's ones_like would give 1).
    feats = np.array([[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0], [0, 1.0, 0], [0, 0.5, 0]])
    labels = np.array([0, 0, 0, 1, 1])
    loss = TripletAngularMarginLoss(margin=0.5, absolute_loss_weight=1.0)(_tensor(feats), _tensor(labels))
    assert float(loss) == 0.0


def test_triplet_angular_hand_computed_example():
    # a0=(1,0) a1=(0.8,0.6) class 0; a2=(0.6,0.8) a3=(0,1) class 1; margin 0.1.
    # anchor  s_ap  s_an  rank relu(s_an-s_ap+0.1)  relu(0.9-s_ap)  relu(s_an-0.5)
    #   a0    0.8   0.6   0                         0.1             0.1
    #   a1    0.8   0.96  0.26                      0.1             0.46
    #   a2    0.8   0.96  0.26                      0.1             0.46
    #   a3    0.8   0.6   0                         0.1             0.1
    # means: rank 0.13, ap 0.1, an 0.28 -> loss = 0.13 + weight * 0.38
    feats = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = np.array([0, 0, 1, 1])
    for weight in (0.0, 1.0, 2.5):
        loss = TripletAngularMarginLoss(margin=0.1, absolute_loss_weight=weight)(_tensor(feats), _tensor(labels))
        np.testing.assert_allclose(float(loss), 0.13 + weight * 0.38, **TOL)


# --------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("loss_cls", [TripletLossV2, TripletAngularMarginLoss])
@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [7, 7, 7, 7]], ids=["no_positives", "no_negatives"])
def test_no_valid_anchor_gives_zero_with_gradient_path(loss_cls, labels):
    x = _tensor(np.random.default_rng(0).normal(size=(4, 3)), stop_gradient=False)
    loss = loss_cls()(x, _tensor(np.array(labels)))
    assert float(loss) == 0.0
    assert not loss.stop_gradient
    loss.backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.zeros((4, 3)))


@pytest.mark.parametrize("loss_cls", [TripletLossV2, TripletAngularMarginLoss])
def test_singleton_anchors_are_excluded_from_the_mean(loss_cls):
    # Appending a singleton class must not dilute the loss of the other anchors
    # when the singleton is far from everyone (it is an easy negative for all).
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(6, 4))
    labels = np.array([0, 0, 0, 1, 1, 1])
    far = -feats.sum(axis=0, keepdims=True)  # points away from the batch
    base = float(loss_cls(margin=0.5)(_tensor(feats), _tensor(labels)))
    with_singleton = float(
        loss_cls(margin=0.5)(_tensor(np.vstack([feats, far])), _tensor(np.append(labels, 9)))
    )
    if loss_cls is TripletAngularMarginLoss:
        want = ref_triplet_angular(np.vstack([feats, far]), np.append(labels, 9), 0.5)
    else:
        want = ref_triplet_euclidean(np.vstack([feats, far]), np.append(labels, 9), 0.5)
    np.testing.assert_allclose(with_singleton, want, **TOL)
    assert base > 0
    assert with_singleton > 6 / 7 * base  # not averaged over 7 anchors with a 0


@pytest.mark.parametrize("loss_cls", [TripletLossV2, TripletAngularMarginLoss])
def test_unnormalised_large_features_and_singletons(loss_cls):
    # Distances/cosines far above any finite "mask" constant must still be masked right.
    labels = np.array(LAYOUTS["uneven_with_singletons"])
    feats = np.random.default_rng(8).normal(scale=1e5, size=(len(labels), 3))
    got = float(loss_cls(margin=0.5, normalize_feature=False)(_tensor(feats), _tensor(labels)))
    if loss_cls is TripletLossV2:
        want = ref_triplet_euclidean(feats, labels, 0.5, normalize=False)
    else:
        want = ref_triplet_angular(feats, labels, 0.5, normalize=False)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("loss_cls", [TripletLossV2, TripletAngularMarginLoss])
def test_batch_of_one_gives_zero_and_finite_gradients(loss_cls):
    x = _tensor(np.ones((1, 3)), stop_gradient=False)
    loss = loss_cls()(x, _tensor(np.array([4])))
    loss.backward()
    assert float(loss) == 0.0
    np.testing.assert_array_equal(x.grad.numpy(), np.zeros((1, 3)))


def test_labels_as_column_vector_are_accepted():
    feats = np.random.default_rng(1).normal(size=(6, 3))
    labels = np.array([0, 0, 1, 1, 2, 2])
    flat = TripletLossV2()(_tensor(feats), _tensor(labels))
    column = TripletLossV2()(_tensor(feats), _tensor(labels.reshape(-1, 1)))
    assert float(flat) == float(column)


# --------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("seed", range(3))
def test_ce_without_smoothing_is_plain_cross_entropy(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(8, 5)).astype("float32")
    labels = rng.integers(0, 5, size=8)
    got = float(CELoss()(_tensor(logits), _tensor(labels)))
    z = logits.astype(np.float64)
    log_softmax = z - z.max(axis=1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
    want = -log_softmax[np.arange(8), labels].mean()
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_ce_with_label_smoothing_matches_reference(seed, epsilon):
    rng = np.random.default_rng(20 + seed)
    logits = rng.normal(scale=2.0, size=(7, 4))
    labels = rng.integers(0, 4, size=7)
    got = float(CELoss(epsilon=epsilon)(_tensor(logits), _tensor(labels)))
    np.testing.assert_allclose(got, ref_cross_entropy(logits, labels, epsilon), **TOL)


def test_ce_rejects_out_of_range_labels():
    logits = _tensor(np.zeros((2, 3)))
    for bad in ([0, 3], [-1, 0]):
        with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
            CELoss()(logits, _tensor(np.array(bad)))


# --------------------------------------------------------------------------- combined
def _outputs(seed=0, n=6, classes=3, dim=4):
    rng = np.random.default_rng(seed)
    return {
        # within [-1, 1]: valid cosines for ProxyAnchorLoss, ordinary logits for the others
        "logits": _tensor(np.tanh(rng.normal(size=(n, classes))), stop_gradient=False),
        "features": _tensor(rng.normal(size=(n, dim)), stop_gradient=False),
    }


def test_build_loss_weighted_sum():
    outputs = _outputs()
    labels = _tensor(np.array([0, 0, 1, 1, 2, 2]))
    combined = build_loss(
        [
            {"name": "CELoss", "weight": 0.7, "epsilon": 0.1},
            {"name": "TripletLossV2", "weight": 2.0, "margin": 0.3},
            {"name": "TripletAngularMarginLoss", "margin": 0.5},  # weight defaults to 1
        ]
    )
    assert isinstance(combined, CombinedLoss)
    total, parts = combined(outputs, labels)
    ce = float(CELoss(epsilon=0.1)(outputs["logits"], labels))
    tri = float(TripletLossV2(margin=0.3)(outputs["features"], labels))
    ang = float(TripletAngularMarginLoss(margin=0.5)(outputs["features"], labels))
    assert parts == pytest.approx({"CELoss": ce, "TripletLossV2": tri, "TripletAngularMarginLoss": ang})
    np.testing.assert_allclose(float(total), 0.7 * ce + 2.0 * tri + ang, **TOL)
    total.backward()
    assert np.abs(outputs["logits"].grad.numpy()).sum() > 0
    assert np.abs(outputs["features"].grad.numpy()).sum() > 0


def test_build_loss_same_name_twice_gets_distinct_parts():
    combined = build_loss([{"name": "TripletLossV2", "margin": 0.1}, {"name": "TripletLossV2", "margin": 1.0}])
    _, parts = combined(_outputs(1), _tensor(np.array([0, 0, 1, 1, 2, 2])))
    assert list(parts) == ["TripletLossV2", "TripletLossV2_2"]
    assert parts["TripletLossV2"] < parts["TripletLossV2_2"]


def test_build_loss_unknown_name_lists_available():
    with pytest.raises(ValueError, match="unknown loss 'ArcLoss'") as err:
        build_loss([{"name": "ArcLoss"}])
    for name in LOSSES:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        ([], "at least one loss spec"),
        ([{"weight": 1.0}], "'name' key"),
        ([{"name": "CELoss", "margin": 0.5}], "bad options for loss 'CELoss'"),
        ([{"name": "CELoss", "weight": -1}], "weight must be a number >= 0"),
        ([{"name": "CELoss", "epsilon": 1.5}], r"epsilon must be in \[0, 1\)"),
    ],
)
def test_build_loss_bad_specs(specs, match):
    with pytest.raises(ValueError, match=match):
        build_loss(specs)


def test_combined_loss_names_missing_output():
    combined = build_loss([{"name": "TripletLossV2"}])
    with pytest.raises(ValueError, match=r"needs outputs\['features'\]"):
        combined({"logits": _tensor(np.zeros((2, 2)))}, _tensor(np.array([0, 1])))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_builds_and_returns_a_scalar(name):
    combined = build_loss([{"name": name}])
    total, parts = combined(_outputs(2), _tensor(np.array([0, 0, 1, 1, 2, 2])))
    assert total.shape == []
    assert list(parts) == [name]
    assert np.isfinite(float(total))


# --------------------------------------------------------------------------- proxy anchor
def ref_proxy_anchor(cos, labels, alpha, delta):
    """Loops over proxies, as the paper's equation reads."""
    n, classes = cos.shape
    pos_terms, neg_terms = [], []
    for c in range(classes):
        pos = [np.exp(-alpha * (cos[i, c] - delta)) for i in range(n) if labels[i] == c]
        neg = [np.exp(alpha * (cos[i, c] + delta)) for i in range(n) if labels[i] != c]
        if pos:
            pos_terms.append(np.log1p(sum(pos)))
        neg_terms.append(np.log1p(sum(neg)))
    return sum(pos_terms) / max(len(pos_terms), 1) + sum(neg_terms) / classes


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("alpha, delta", [(32.0, 0.1), (8.0, 0.0)])
def test_proxy_anchor_matches_reference(layout, alpha, delta):
    labels = np.array(LAYOUTS[layout])
    classes = labels.max() + 2  # one proxy without a positive in the batch
    cos = np.random.default_rng(len(labels)).uniform(-1, 1, size=(len(labels), classes))
    got = ProxyAnchorLoss(alpha, delta)(_tensor(cos), _tensor(labels))
    np.testing.assert_allclose(float(got), ref_proxy_anchor(cos, labels, alpha, delta), **TOL)


def test_proxy_anchor_refuses_scaled_logits_and_missing_head():
    labels = _tensor(np.array([0, 1]))
    with pytest.raises(ValueError, match="ProxyHead"):
        ProxyAnchorLoss()(_tensor(np.array([[30.0, -2.0], [1.5, 3.0]])), labels)
    with pytest.raises(ValueError, match="ProxyHead"):
        build_loss([{"name": "ProxyAnchorLoss"}])({"logits": None, "features": _tensor(np.ones((2, 3)))}, labels)


def test_proxy_anchor_step_pulls_embeddings_towards_their_proxies():
    from visrec.models.heads import create_head

    paddle.seed(0)
    head = create_head("ProxyHead", embedding_size=8, class_num=3)
    feats = _tensor(np.random.default_rng(0).normal(size=(6, 8)).astype("float32"), stop_gradient=False)
    labels = _tensor(np.array([0, 0, 1, 1, 2, 2]))
    head.train()
    cos = head(feats, labels)
    assert float(cos.abs().max()) <= 1.0 + 1e-6
    np.testing.assert_allclose(cos.numpy(), head(feats).numpy(), atol=1e-6)  # no margin, no scale
    loss = ProxyAnchorLoss()(cos, labels)
    loss.backward()
    step = feats - 0.05 * feats.grad
    assert float(ProxyAnchorLoss()(head(step), labels)) < float(loss)
    before = head(feats).numpy()[np.arange(6), labels.numpy()]
    after = head(step).numpy()[np.arange(6), labels.numpy()]
    assert after.mean() > before.mean() + 0.05
