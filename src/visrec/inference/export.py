"""Exporting trained networks: Paddle inference files, ONNX, and ``model.json``.

An export directory holds ``inference.json`` + ``inference.pdiparams`` (Paddle 3 / PIR),
optionally ``model.onnx``, and ``model.json`` describing how to feed the network (input
size, normalisation), what it outputs, and a fingerprint of its weights. Galleries record
the fingerprint of the extractor that made their vectors, so they can refuse another one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import paddle
from paddle import nn
from paddle.static import InputSpec

from visrec.utils.fs import atomic_dir

logger = logging.getLogger(__name__)

MODEL_JSON = "model.json"
PADDLE_PREFIX = "inference"
ONNX_FILE = "model.onnx"


class ExportError(RuntimeError):
    pass


def weights_fingerprint(layer: nn.Layer) -> str:
    """sha256 over the state dict (names, shapes, bytes): changes iff the weights change."""
    digest = hashlib.sha256()
    for name, tensor in sorted(layer.state_dict().items()):
        array = np.ascontiguousarray(tensor.numpy())
        digest.update(name.encode())
        digest.update(str(array.shape).encode() + str(array.dtype).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


class EmbeddingNet(nn.Layer):
    """The extractor truncated at the L2-normalised embedding: what galleries store."""

    def __init__(self, model: nn.Layer):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.embed(x)


def export_onnx(model_dir: Path, opset: int = 13) -> Path:
    import paddle2onnx

    out = model_dir / ONNX_FILE
    # optimize_tool=None: the default optimiser tries to pip-install a package at run time.
    paddle2onnx.export(str(model_dir / f"{PADDLE_PREFIX}.json"), str(model_dir / f"{PADDLE_PREFIX}.pdiparams"),
                       save_file=str(out), opset_version=opset, enable_onnx_checker=True,
                       optimize_tool="None")
    if not out.exists():
        raise ExportError(f"paddle2onnx wrote no {out}")
    return out


def onednn_safe(layer: nn.Layer) -> bool:
    """False when Paddle Inference's oneDNN kernels would crash on this network.

    Paddle 3.3.1's oneDNN batch-norm kernel segfaults on a BatchNorm without its own
    scale/bias (``weight_attr=False``), which BNNeck uses to keep its bias frozen at 0.
    The plain CPU kernels run it correctly, so such models are served without oneDNN.
    """
    return not any(isinstance(sub, (nn.BatchNorm1D, nn.BatchNorm2D)) and sub.weight is None
                   for sub in layer.sublayers(include_self=True))


def export_layer(layer: nn.Layer, out_dir: str | Path, input_shape: list[int | None],
                 meta: dict[str, Any], onnx: bool = True) -> dict[str, Any]:
    """``paddle.jit.save`` ``layer`` (eval mode) with input spec ``input_shape``, then ONNX.

    Written atomically: ``out_dir`` is replaced only once every file is in place.
    """
    layer.eval()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        static = paddle.jit.to_static(layer, input_spec=[InputSpec(input_shape, "float32", "x")], full_graph=True)
        paddle.jit.save(static, str(tmp / PADDLE_PREFIX))
        files = {"paddle": [f"{PADDLE_PREFIX}.json", f"{PADDLE_PREFIX}.pdiparams"]}
        if onnx:
            export_onnx(tmp)
            files["onnx"] = ONNX_FILE
        meta = {**meta, "fingerprint": weights_fingerprint(layer), "files": files,
                "paddle_version": paddle.__version__, "onednn": onednn_safe(layer)}
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("exported %s to %s (fingerprint %s)", meta.get("kind"), out_dir, meta["fingerprint"])
    return meta


def input_meta(image: dict[str, Any]) -> dict[str, Any]:
    """What a predictor needs to feed an image model: input size, normalisation, box cropping."""
    size = int(image["size"])
    return {"input_size": [size, size], "mean": image["mean"], "std": image["std"], "scale": image["scale"],
            "crop_to_bbox": image.get("crop_to_bbox", False), "bbox_pad": image.get("bbox_pad", 0.0)}


def export_extractor(model: nn.Layer, model_config: dict[str, Any], out_dir: str | Path,
                     onnx: bool = True) -> dict[str, Any]:
    """Export a RecModel's embedding (re-parameterised for inference when it can be)."""
    model.eval()
    if hasattr(model, "rep"):
        model.rep()
    size = int(model_config["image"]["size"])
    meta = {
        "kind": "extractor",
        **input_meta(model_config["image"]),
        "embedding_dim": int(model.embedding_size),
        "output": "L2-normalised embedding [N, D]",
        "backbone": model_config["backbone"], "neck": model_config["neck"],
    }
    return export_layer(EmbeddingNet(model), out_dir, [None, 3, size, size], meta, onnx=onnx)


def read_model_json(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not an exported visrec model "
                                "(run the export stage, e.g. `dvc repro export`)")
    return json.loads(path.read_text())
