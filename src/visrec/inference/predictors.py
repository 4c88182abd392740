"""One predictor class for every exported visrec model: Paddle Inference or ONNX Runtime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from visrec.inference.export import ONNX_FILE, PADDLE_PREFIX, read_model_json

logger = logging.getLogger(__name__)

Backend = Literal["auto", "paddle", "onnx"]


def resolve_backend(model_dir: str | Path, backend: Backend) -> Literal["paddle", "onnx"]:
    """``auto``: ONNX Runtime when the export has ``model.onnx``, else Paddle Inference.

    ONNX Runtime is the faster of the two at the batch sizes of recognition (EfficientNet-Lite0
    at 224 px, one photo: 6.7-8.0 ms against 10.6-11.6 on 2 threads; docs/experiments.md).
    """
    if backend == "auto":
        return "onnx" if (Path(model_dir) / ONNX_FILE).is_file() else "paddle"
    return backend


class Predictor:
    """Runs an exported model on NCHW float32 batches; returns its outputs as numpy arrays."""

    def __init__(self, model_dir: str | Path, backend: Backend = "paddle", num_threads: int = 2):
        self.model_dir = Path(model_dir)
        self.meta = read_model_json(self.model_dir)
        backend = resolve_backend(self.model_dir, backend)
        self.backend = backend
        if backend == "paddle":
            self._run = self._paddle_runner(num_threads)
        elif backend == "onnx":
            self._run = self._onnx_runner(num_threads)
        else:
            raise ValueError(f"unknown backend {backend!r}: use 'auto', 'paddle' or 'onnx'")

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"expected an NCHW batch, got shape {batch.shape}")
        return self._run(batch)

    def _paddle_runner(self, num_threads: int):
        from paddle import inference

        config = inference.Config(str(self.model_dir / f"{PADDLE_PREFIX}.json"),
                                  str(self.model_dir / f"{PADDLE_PREFIX}.pdiparams"))
        config.disable_gpu()
        if self.meta.get("onednn", True):  # see export.onednn_safe: some layers crash its kernels
            config.enable_mkldnn()
        else:
            config.disable_mkldnn()
            logger.info("%s: oneDNN off (the model has a BatchNorm its oneDNN kernel cannot run)", self.model_dir)
        # Set explicitly: Paddle pins OMP_NUM_THREADS=1 at import when it is unset.
        config.set_cpu_math_library_num_threads(num_threads)
        config.disable_glog_info()
        # No enable_memory_optim(): it breaks PIR (inference.json) models in Paddle 3.3.
        predictor = inference.create_predictor(config)
        input_name = predictor.get_input_names()[0]
        output_names = predictor.get_output_names()

        def run(batch: np.ndarray) -> list[np.ndarray]:
            handle = predictor.get_input_handle(input_name)
            handle.reshape(batch.shape)
            handle.copy_from_cpu(batch)
            predictor.run()
            return [predictor.get_output_handle(n).copy_to_cpu() for n in output_names]

        return run

    def _onnx_runner(self, num_threads: int):
        import onnxruntime as ort

        path = self.model_dir / ONNX_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: export with ONNX enabled, or use backend 'paddle'")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        # No busy-waiting between calls: spinning ORT threads starved the Paddle extractor that
        # runs right after the detector in the same process (30 ms instead of 11 per photo).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(batch: np.ndarray) -> list[np.ndarray]:
            return list(session.run(None, {input_name: batch}))

        return run
