"""MLflow model registry (``visrec.model_registry``, the gate in ``visrec.workflows.promotion``): pyfunc round
trip, idempotent registration, alias gate.

Tiny exported models (``exported_models``) on a temp SQLite store with artifacts in tmp.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visrec.config import TrackingConfig


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(TrackingConfig on a temp SQLite store, MlflowClient on it)."""
    base = tmp_path_factory.mktemp("registry")
    cfg = TrackingConfig(uri=f"sqlite:///{base / 'mlruns.db'}", artifact_root=str(base / "mlartifacts"),
                         experiment="visrec-test")
    from mlflow import MlflowClient

    return cfg, MlflowClient(tracking_uri=cfg.uri)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def _images(n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 48, 56, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def models(exported_models, tmp_path_factory):
    """(extractor dir, detector dir): the detector copied with score_threshold 0, so that its random
    weights still give boxes on random images (else the box comparison would compare empty lists)."""
    import json
    import shutil

    ext_dir, det_dir = exported_models
    det_copy = tmp_path_factory.mktemp("det") / "detector"
    shutil.copytree(det_dir, det_copy)
    meta = json.loads((det_copy / "model.json").read_text())
    meta["score_threshold"] = 0.0
    (det_copy / "model.json").write_text(json.dumps(meta))
    return ext_dir, det_copy


@pytest.fixture(scope="module")
def registered(store, models):
    """Both tiny exports registered once: {kind: ModelVersion}."""
    from visrec.workflows.promotion import register_candidate

    cfg, _ = store
    ext_dir, det_dir = models
    return {"extractor": register_candidate(ext_dir, "extractor", {"recall@1": 0.5, "mAP": 0.4}, cfg),
            "detector": register_candidate(det_dir, "detector", {"det_AP50": 0.6}, cfg)}


def test_register_candidate(store, registered, models):
    from visrec.inference.export import read_model_json

    cfg, client = store
    ext = registered["extractor"]
    assert ext.name == "visrec-extractor"
    assert ext.tags["fingerprint"] == read_model_json(models[0])["fingerprint"]
    assert ext.tags["kind"] == "extractor" and "git_commit" in ext.tags
    assert float(ext.tags["recall_at_1"]) == 0.5
    assert float(registered["detector"].tags["det_AP50"]) == 0.6
    for kind, version in registered.items():
        assert client.get_model_version_by_alias(f"visrec-{kind}", "candidate").version == version.version
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the fluent API's URI does not leak
    run = client.get_run(ext.run_id)
    assert run.data.tags["visrec.fingerprint"] == ext.tags["fingerprint"]
    assert run.data.metrics["recall_at_1"] == 0.5


def test_pyfunc_predicts_like_the_models(store, registered, models):
    import mlflow

    from visrec.inference.detector_runtime import Detector
    from visrec.inference.extractor_runtime import Extractor

    cfg, _ = store
    ext_dir, det_dir = models
    images = _images()
    mlflow.set_tracking_uri(cfg.uri)
    try:
        ext_model = mlflow.pyfunc.load_model("models:/visrec-extractor@candidate")
        det_model = mlflow.pyfunc.load_model("models:/visrec-detector@candidate")
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    expected = Extractor(ext_dir).embed(list(images))
    got = np.asarray(ext_model.predict(images))
    assert got.shape == expected.shape and np.abs(got).max() > 1e-3  # real embeddings, not zeros
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ext_model.predict(list(images))), expected, atol=1e-5)

    expected_boxes = Detector(det_dir).detect_batch(list(images))
    got_boxes = det_model.predict(images)
    assert len(got_boxes) == len(images)
    assert sum(len(rows) for rows in expected_boxes) > 0, "no boxes: the comparison would prove nothing"
    for got_rows, want_rows in zip(got_boxes, expected_boxes):
        assert len(got_rows) == len(want_rows)
        if want_rows:
            np.testing.assert_allclose(np.asarray(got_rows, dtype=np.float64), np.asarray(want_rows), atol=1e-5)


def test_reregister_same_fingerprint_is_idempotent(store, registered, models):
    from visrec.workflows.promotion import register_candidate

    cfg, client = store
    before = len(client.search_model_versions("name = 'visrec-extractor'"))
    again = register_candidate(models[0], "extractor", {"recall@1": 0.55}, cfg)
    assert again.version == registered["extractor"].version
    assert len(client.search_model_versions("name = 'visrec-extractor'")) == before
    assert float(again.tags["recall_at_1"]) == 0.55
    assert client.get_model_version_by_alias("visrec-extractor", "candidate").version == again.version
    client.set_model_version_tag("visrec-extractor", again.version, "recall_at_1", "0.5")  # as before


def _set_candidate(client, recall: float, ap50: float, versions: dict[str, str]) -> None:
    for kind, key, value in (("extractor", "recall_at_1", recall), ("detector", "det_AP50", ap50)):
        client.set_model_version_tag(f"visrec-{kind}", versions[kind], key, str(value))
        client.set_registered_model_alias(f"visrec-{kind}", "candidate", versions[kind])


def test_promotion_gate(store, registered, models, tmp_path):
    """No champion -> promote; a worse candidate leaves the champion; a better one replaces it."""
    import shutil

    from visrec.workflows.promotion import promote_if_better
    from visrec.workflows.promotion import register_candidate

    cfg, client = store
    first = {k: v.version for k, v in registered.items()}
    result = promote_if_better(client, cfg)
    assert result["promoted"] and result["reason"] == "no champion yet"
    for kind in first:
        assert client.get_model_version_by_alias(f"visrec-{kind}", "champion").version == first[kind]

    # a second extractor export (other fingerprint): a new version
    ext2 = tmp_path / "extractor2"
    shutil.copytree(models[0], ext2)
    import json

    meta = json.loads((ext2 / "model.json").read_text())
    meta["fingerprint"] = "0123456789abcdef"
    (ext2 / "model.json").write_text(json.dumps(meta))
    v2 = register_candidate(ext2, "extractor", {"recall@1": 0.4}, cfg)  # worse recall
    assert v2.version != first["extractor"]
    result = promote_if_better(client, cfg)
    assert not result["promoted"] and "recall_at_1" in result["reason"]
    assert client.get_model_version_by_alias("visrec-extractor", "champion").version == first["extractor"]

    # better recall; the detector candidate is the champion version itself (AP 0.6 vs 0.6)
    _set_candidate(client, 0.9, 0.5, {"extractor": v2.version, "detector": first["detector"]})
    client.set_model_version_tag("visrec-detector", first["detector"], "det_AP50", "0.6")
    result = promote_if_better(client, cfg)
    assert result["promoted"] and result["candidate"]["recall_at_1"] == 0.9
    assert client.get_model_version_by_alias("visrec-extractor", "champion").version == v2.version
    assert "promoted_at" in client.get_model_version("visrec-extractor", v2.version).tags

    # candidate back to the first extractor (recall 0.5 < champion 0.9): kept
    client.set_registered_model_alias("visrec-extractor", "candidate", first["extractor"])
    result = promote_if_better(None, cfg)
    assert not result["promoted"] and result["champion"]["recall_at_1"] == 0.9
    assert client.get_model_version_by_alias("visrec-extractor", "champion").version == v2.version


def test_gate_without_candidates(tmp_path):
    from mlflow import MlflowClient

    from visrec.workflows.promotion import promote_if_better

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(ValueError, match="candidate"):
        promote_if_better(MlflowClient(tracking_uri=cfg.uri), cfg)


def test_to_images_accepts_dataframe():
    import pandas as pd

    from visrec.model_registry import _to_images

    images = _images(2)
    frame = pd.DataFrame({"image": list(images)})
    out = _to_images(frame)
    assert len(out) == 2 and np.array_equal(out[1], images[1])
    assert len(_to_images(images[0])) == 1
    with pytest.raises(ValueError):
        _to_images(np.zeros((2, 3)))


def test_evaluate_stage_registers_candidates(models, tmp_path, caplog):
    """The evaluate stage's registration step: registers both exports; off -> skipped; failure -> warning,
    or TrackingError when tracking.required."""
    import shutil

    from mlflow import MlflowClient

    from visrec.config import Config
    from visrec.tracking import TrackingError

    from visrec.workflows import promotion as stage
    cfg = Config()
    cfg.paths.export = str(tmp_path / "export")
    cfg.paths.metrics = str(tmp_path / "metrics")
    shutil.copytree(models[0], tmp_path / "export" / "extractor")
    shutil.copytree(models[1], tmp_path / "export" / "detector")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train_detector.json").write_text('{"det_AP50": 0.7}')
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg.tracking.artifact_root = str(tmp_path / "mlartifacts")

    cfg.tracking.enabled = False
    stage.register_candidates(cfg, {"recall@1": 0.3})
    assert not (tmp_path / "mlruns.db").exists()

    cfg.tracking.enabled = True
    stage.register_candidates(cfg, {"recall@1": 0.3})
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    assert float(client.get_model_version_by_alias("visrec-extractor", "candidate").tags["recall_at_1"]) == 0.3
    assert float(client.get_model_version_by_alias("visrec-detector", "candidate").tags["det_AP50"]) == 0.7

    shutil.rmtree(tmp_path / "export" / "detector")  # a broken export: warn, or fail when required
    with caplog.at_level("WARNING"):
        stage.register_candidates(cfg, {"recall@1": 0.3})
    assert "registering the candidates" in caplog.text
    cfg.tracking.required = True
    with pytest.raises(TrackingError, match="tracking.required"):
        stage.register_candidates(cfg, {"recall@1": 0.3})


def test_mlflow_promotion_gate(models, tmp_path, monkeypatch):
    """workflows.promotion.mlflow_promotion_gate: the repo's default store (<repo>/mlruns.db)."""
    import yaml

    from visrec.config import Config
    from visrec.workflows.pipeline import repo_config
    from visrec.workflows.promotion import mlflow_promotion_gate
    from visrec.workflows.promotion import register_candidate

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"artifact_root": str(tmp_path / "art")}}))
    assert repo_config(tmp_path).tracking.enabled
    cfg = Config().tracking
    cfg.uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg.artifact_root = str(tmp_path / "art")
    import shutil

    from visrec.inference.extractor_runtime import Extractor
    from visrec.inference.gallery_ops import GalleryItem, build_gallery
    from visrec.workflows.champion import champion_record

    register_candidate(models[0], "extractor", {"recall@1": 0.3}, cfg)
    register_candidate(models[1], "detector", {"det_AP50": 0.2}, cfg)
    export = tmp_path / "data" / "export"  # the pipeline's latest outputs: what the gate publishes
    shutil.copytree(models[0], export / "extractor")
    shutil.copytree(models[1], export / "detector")
    image = tmp_path / "a.png"
    Image.fromarray(_images(1)[0]).save(image)
    build_gallery(Extractor(export / "extractor"), [GalleryItem(image, "a")], "FLAT", progress=False).save(
        tmp_path / "data" / "gallery")
    monkeypatch.chdir(tmp_path.parent)  # the gate must not depend on the working directory
    result = mlflow_promotion_gate(tmp_path)
    assert result["promoted"] and result["candidate"]["recall_at_1"] == 0.3
    record = champion_record(tmp_path / "data" / "champion")
    assert record["name"] == result["published"] and record["gate"].startswith("mlflow")
    assert mlflow_promotion_gate(tmp_path)["promoted"]  # equal metrics: still >=

    model_json = export / "detector" / "model.json"  # a local export that is not the registered candidate
    model_json.write_text(model_json.read_text().replace(json.loads(model_json.read_text())["fingerprint"], "other"))
    with pytest.raises(ValueError, match="is not the registered candidate visrec-detector"):
        mlflow_promotion_gate(tmp_path)
