"""The frozen backbone's exported copy: same stage outputs, same loss, and the eager path back afterwards."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from visrec.models.detector import DetectionLoss, build_detector
from visrec.training.frozen_backbone import exported_stages

SIZE = 64


def frozen_tiny_detector():
    paddle.seed(0)
    model = build_detector({"backbone": {"name": "mobilenet_v1", "scale": 0.25}, "neck_channels": 8,
                            "head_convs": 1, "strides": [8, 16, 32]})
    model.freeze_backbone()  # random weights are enough: only equality of the two paths is checked
    model.train()
    return model


def batch(n: int = 4, size: int = SIZE) -> paddle.Tensor:
    return paddle.to_tensor(np.random.RandomState(1).uniform(-1, 1, (n, 3, size, size)).astype("float32"))


@pytest.mark.parametrize("backend", ["onnx", "paddle"])
def test_exported_stages_match_the_eager_backbone_and_give_the_same_loss(backend):
    model = frozen_tiny_detector()
    x = batch()
    boxes = np.array([[[8.0, 8.0, 40.0, 50.0]]] * 4, dtype="float32")
    counts = np.ones(4, dtype="int64")
    loss_fn = DetectionLoss(model.strides, [[0, 32], [16, 64], [32, 1e5]])
    with paddle.no_grad():
        eager = [f.numpy() for f in model.backbone.forward_stages(x)]
    eager_loss, _ = loss_fn(model, x, boxes, counts)
    with exported_stages(model, SIZE, backend, num_threads=1):
        assert model.stage_features is not None
        fast = [f.numpy() for f in model.stage_features(x)]
        fast_loss, _ = loss_fn(model, x, boxes, counts)
        fast_loss.backward()  # gradients reach the trainable FPN + head through the exported features
        assert all(p.grad is not None for p in model.neck.parameters() if not p.stop_gradient)
        assert all(p.grad is None for p in model.backbone.parameters())
    assert model.stage_features is None  # eager again: checkpoints and exports see the ordinary model
    for a, b in zip(eager, fast, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert float(fast_loss) == pytest.approx(float(eager_loss), rel=1e-4)


def test_another_input_size_falls_back_to_the_eager_backbone():
    model = frozen_tiny_detector()
    x = batch(2, SIZE * 2)
    with paddle.no_grad():
        eager = [f.numpy() for f in model.backbone.forward_stages(x)]
        with exported_stages(model, SIZE, "onnx", num_threads=1):
            other = [f.numpy() for f in model.stage_features(x)]
    for a, b in zip(eager, other, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_trainable_backbone_or_eager_setting_changes_nothing():
    model = build_detector({"backbone": {"name": "mobilenet_v1", "scale": 0.25}, "neck_channels": 8,
                            "head_convs": 1})
    with exported_stages(model, SIZE, "onnx"):
        assert model.stage_features is None  # it trains: its features change every step
    frozen = frozen_tiny_detector()
    with exported_stages(frozen, SIZE, "eager"):
        assert frozen.stage_features is None
    with pytest.raises(ValueError, match="frozen_backend"):
        with exported_stages(frozen, SIZE, "tensorrt"):
            pass


def test_an_export_inside_the_context_traces_the_real_backbone(tmp_path):
    """An epoch callback may export the detector mid-training: tracing must not go through the hook."""
    from visrec.inference.export import PADDLE_PREFIX, export_layer

    model = frozen_tiny_detector()
    model.eval()
    x = batch(2)
    with paddle.no_grad():
        expected = model(x)[0].numpy()
    with exported_stages(model, SIZE, "onnx", num_threads=1):
        export_layer(model, tmp_path / "det", [None, 3, SIZE, SIZE], {"kind": "test"}, onnx=False)
    loaded = paddle.jit.load(str(tmp_path / "det" / PADDLE_PREFIX))
    np.testing.assert_allclose(loaded(x)[0].numpy(), expected, atol=1e-4)
