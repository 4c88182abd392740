"""MLflow model registry mechanics: exported models as pyfunc models, versions and aliases.

* :class:`VisrecPyfunc`       an exported extractor or detector folder as an ``mlflow.pyfunc`` model
* :func:`log_and_register`    log an export folder, register it (``visrec-extractor`` / ``visrec-detector``),
                              point alias ``candidate`` at it; idempotent per model fingerprint
* :func:`alias_version`       the version behind ``name@alias``
* :func:`crown`               move alias ``champion`` to given versions, with the reason

Whether a candidate becomes the champion is decided in :mod:`visrec.workflows.promotion`.

MLflow 3: aliases, not stages (``get_latest_versions`` is deprecated); ``name=`` not ``artifact_path=``.
The tracking URI / experiment come from ``TrackingConfig`` as for stage runs (``visrec.tracking``).

    model = mlflow.pyfunc.load_model("models:/visrec-extractor@champion")
    model.predict(np.stack(images))   # [N, D] embeddings (detector: per image [[x1, y1, x2, y2, score], ...])
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from visrec.tracking import connect, get_or_create_experiment, git_info, sanitize_name

logger = logging.getLogger(__name__)

KINDS = ("extractor", "detector")
MODEL_NAMES = {"extractor": "visrec-extractor", "detector": "visrec-detector"}
CANDIDATE, CHAMPION = "candidate", "champion"
FINGERPRINT_TAG = "fingerprint"


# ----------------------------------------------------------------------------- pyfunc model


def _to_images(model_input: Any) -> list[np.ndarray]:
    """What pyfunc may hand ``predict``: an [N, H, W, 3] array, a list of HWC arrays, a single HWC
    array, or a pandas DataFrame / Series whose (first) column holds HWC arrays."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas comes with mlflow
        pd = None
    if pd is not None and isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        model_input = model_input[column]
    if pd is not None and isinstance(model_input, pd.Series):
        model_input = model_input.tolist()
    if isinstance(model_input, np.ndarray):
        if model_input.ndim == 3:
            return [np.asarray(model_input, dtype=np.uint8)]
        if model_input.ndim == 4:
            return [np.asarray(img, dtype=np.uint8) for img in model_input]
        raise ValueError(f"expected images [N, H, W, 3] or [H, W, 3], got shape {model_input.shape}")
    if isinstance(model_input, (list, tuple)):
        return [np.asarray(img, dtype=np.uint8) for img in model_input]
    raise ValueError(f"unsupported model input {type(model_input).__name__}: pass a uint8 array [N, H, W, 3] "
                     "or a list of HWC uint8 arrays")


def _kind_of(model_dir: Path) -> str:
    from visrec.inference.export import read_model_json

    kind = read_model_json(model_dir).get("kind")
    if kind not in KINDS:
        raise ValueError(f"{model_dir}/model.json has kind {kind!r}, expected one of {KINDS}")
    return kind


try:
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # pragma: no cover - mlflow is a project dependency
    _PythonModel = object


class VisrecPyfunc(_PythonModel):
    """An exported visrec model folder (artifact ``model_dir``) served through ``mlflow.pyfunc``.

    ``predict`` takes RGB uint8 images (``[N, H, W, 3]`` array or a list of ``[H, W, 3]``) and returns
    the extractor's ``[N, D]`` float32 embeddings, or the detector's boxes: per image a list of
    ``[x1, y1, x2, y2, score]`` rows in original pixels.
    """

    # no type-hint based input validation (nor MLflow's warning about its absence): the input is
    # images, an array or a list, which no pyfunc schema describes
    _skip_type_hint_validation = True

    def __init__(self, backend: str = "paddle", num_threads: int = 2):
        self.backend = backend
        self.num_threads = num_threads
        self.kind: str | None = None
        self.model = None

    def load_context(self, context) -> None:
        model_dir = Path(context.artifacts["model_dir"])
        self.kind = _kind_of(model_dir)
        if self.kind == "extractor":
            from visrec.inference.extractor_runtime import Extractor

            self.model = Extractor(model_dir, backend=self.backend, num_threads=self.num_threads)
        else:
            from visrec.inference.detector_runtime import Detector

            self.model = Detector(model_dir, backend=self.backend, num_threads=self.num_threads)

    def predict(self, context, model_input, params=None):  # noqa: ARG002 (pyfunc's signature)
        images = _to_images(model_input)
        if self.kind == "extractor":
            return self.model.embed(images)
        return [[list(box) for box in boxes] for boxes in self.model.detect_batch(images)]


# ----------------------------------------------------------------------------- logging + registering


@contextlib.contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, register_model) at ``uri`` for a while, then restore it."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # set_*_uri also export these
    old = tracking_utils._tracking_uri, registry_utils._registry_uri, {k: os.environ.get(k) for k in env_keys}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = old[0], old[1]
        for key, value in old[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _key_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Top-level finite numbers of ``metrics`` under MLflow-safe names (``recall@1`` -> ``recall_at_1``)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[sanitize_name(str(key))] = float(value)
    return out


def _versions(client, name: str) -> list:
    try:
        return list(client.search_model_versions(f"name = '{name}'"))
    except Exception:  # noqa: BLE001 - a model that does not exist yet
        return []


def alias_version(client, name: str, alias: str):
    """The model version behind ``name@alias``, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def log_and_register(export_dir: Path, kind: str, metrics: dict[str, Any], tracking_cfg,
                     tag_metrics: tuple[str, ...] = ()):
    """Log ``export_dir`` as a pyfunc model, register it as ``visrec-<kind>``, alias it ``candidate``.

    The version gets tags ``fingerprint``, ``kind``, ``git_commit`` and the metrics named in
    ``tag_metrics`` (MLflow-safe names, e.g. ``recall_at_1``: the promotion gate reads these).
    A version with the same fingerprint already registered is reused (its metric tags are
    updated and ``candidate`` moved to it): re-running evaluate does not pile up versions.
    Returns the ``ModelVersion``.
    """
    import mlflow

    export_dir = Path(export_dir).resolve()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    from visrec.inference.export import read_model_json

    meta = read_model_json(export_dir)
    if meta.get("kind") != kind:
        raise ValueError(f"{export_dir} holds a {meta.get('kind')!r} model, not a {kind}")
    fingerprint = str(meta["fingerprint"])
    name = MODEL_NAMES[kind]
    values = _key_metrics(metrics)
    version_tags = {k: str(v) for k, v in values.items() if k in tag_metrics}
    commit, dirty = git_info()

    uri, client = connect(tracking_cfg.uri)
    existing = [v for v in _versions(client, name) if v.tags.get(FINGERPRINT_TAG) == fingerprint]
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        logger.info("%s: fingerprint %s already registered as version %s; moving alias '%s'",
                    name, fingerprint, version.version, CANDIDATE)
    else:
        experiment_id = get_or_create_experiment(client, tracking_cfg.experiment, uri, tracking_cfg.artifact_root)
        tags = {"visrec.role": "model", "visrec.kind": kind, "visrec.fingerprint": fingerprint,
                "visrec.git_commit": commit, "visrec.git_dirty": dirty, "mlflow.source.git.commit": commit}
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stage output clean
        with _fluent_uri(uri):
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"register {kind}", tags=tags) as run:
                if values:
                    mlflow.log_metrics(values)
                info = mlflow.pyfunc.log_model(
                    name=kind, python_model=VisrecPyfunc(), artifacts={"model_dir": str(export_dir)},
                    # explicit: inferring them would load the model in a subprocess (slow)
                    pip_requirements=_pip_requirements(),
                    metadata={"visrec": {"kind": kind, "fingerprint": fingerprint}})
            version = mlflow.register_model(
                info.model_uri, name, await_registration_for=60,
                tags={FINGERPRINT_TAG: fingerprint, "kind": kind, "git_commit": commit, "run_id": run.info.run_id})
        logger.info("registered %s version %s (fingerprint %s)", name, version.version, fingerprint)
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return client.get_model_version(name, version.version)


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in ("mlflow", "numpy", "opencv-python-headless", "paddlepaddle", "visrec"):
        try:
            reqs.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return reqs


# ----------------------------------------------------------------------------- aliases


def crown(client, versions: dict[str, str], reason: str) -> None:
    """Point alias ``champion`` of each kind's model at ``versions[kind]``, tagging when and why."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for kind, version in versions.items():
        name = MODEL_NAMES[kind]
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, "promoted_at", now)
        client.set_model_version_tag(name, version, "promotion_reason", reason[:500])


def describe(client) -> str:
    """One line per model: which version each alias points at (for logs)."""
    parts = []
    for kind in KINDS:
        name = MODEL_NAMES[kind]
        aliases = {a: getattr(alias_version(client, name, a), "version", None) for a in (CANDIDATE, CHAMPION)}
        parts.append(f"{name}: {json.dumps(aliases)}")
    return "; ".join(parts)
