"""MLflow tracking of stage runs (``visrec.tracking`` through ``run_stage``), on a temp SQLite store."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import yaml

from visrec.config import Config, load_config
from visrec.tracking import history_metrics, numeric_metrics, params_hash, sanitize_name, stage_params
from visrec.workflows.stage_runner import run_stage


def write_metrics(cfg: Config, stage: str) -> None:
    path = Path(cfg.paths.metrics) / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"recall@1": 0.5, "num": 3, "note": "text", "nested": {"mAP": 0.25}}))


def body_for(stage: str):
    return lambda cfg: write_metrics(cfg, stage)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A temp working directory with a params file whose tracking store is mlruns.db there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("VISREC_PIPELINE_RUN", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"split": {"train_classes": 7}}))
    return tmp_path


def client(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns.db'}")


def stage_runs(c, experiment_id: str):
    return c.search_runs([experiment_id], filter_string="tags.`visrec.role` = 'stage'")


def test_helpers():
    assert sanitize_name("val_recall@1") == "val_recall_at_1"
    assert sanitize_name("a:b(c) d/e-f.g") == "a_b_c_ d/e-f.g"
    assert numeric_metrics({"r@5": 1, "s": "x", "n": {"k": 2.5}, "bad": float("nan")}) == {"r_at_5": 1.0, "n.k": 2.5}
    params = stage_params(Config(), "train_extractor")
    assert params["extractor.backbone.name"] == "efficientnet_lite0"
    assert json.loads(params["extractor.optimizer.milestones"]) == [30, 60]
    cfg = Config()
    cfg.tracking.uri = "http://elsewhere"  # where runs go is not part of the experiment
    assert params_hash(cfg) == params_hash(Config()) and len(params_hash(cfg)) == 12


def test_history_csv(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,train_loss,val_recall@1\n1,2.0,\n2,1.5,0.4\n")
    assert sorted(history_metrics(path)) == [("train_loss", 1.5, 2), ("train_loss", 2.0, 1), ("val_recall_at_1", 0.4, 2)]


def test_stages_nest_under_one_parent(repo):
    assert run_stage("split", body_for("split"), argv=[]) == 0
    assert run_stage("validate", body_for("validate"), argv=[]) == 0
    assert (repo / "mlruns.db").exists()
    c = client(repo)
    experiment = c.get_experiment_by_name("visrec")
    assert experiment.artifact_location == (repo / "mlartifacts").resolve().as_uri()
    parents = c.search_runs([experiment.experiment_id], filter_string="tags.`visrec.role` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    runs = {r.info.run_name: r for r in stage_runs(c, experiment.experiment_id)}
    assert set(runs) == {"split", "validate"}
    cfg = load_config("params.yaml")
    for name, run in runs.items():
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["visrec.stage"] == name and tags["visrec.params_hash"] == params_hash(cfg)
        assert tags["visrec.git_commit"] and tags["visrec.git_dirty"]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["recall_at_1"] == 0.5 and run.data.metrics["num"] == 3
        assert run.data.metrics["nested.mAP"] == 0.25 and "note" not in run.data.metrics
    assert runs["split"].data.params["split.train_classes"] == "7"
    assert "validate.min_per_class" in runs["validate"].data.params
    artifacts = [a.path for a in c.list_artifacts(runs["split"].info.run_id, "metrics")]
    assert artifacts == ["metrics/split.json"]


def test_new_params_start_a_new_parent(repo):
    assert run_stage("split", body_for("split"), argv=[]) == 0
    assert run_stage("split", body_for("split"), argv=["-o", "split.train_classes=3"]) == 0
    c = client(repo)
    experiment = c.get_experiment_by_name("visrec")
    runs = stage_runs(c, experiment.experiment_id)
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 2


def test_an_offline_download_is_one_error_line(tmp_path, monkeypatch, capsys):
    """Expected failures end a stage as the CLI ends a command: one `error:` line, exit 1."""
    from visrec.data.download import DownloadError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking: {enabled: false}\n")

    def offline(cfg):
        raise DownloadError("cannot download https://example.invalid/CUB_200_2011.tgz: no network; "
                            "use a local copy (data.source: /path/to/CUB_200_2011.tgz)")

    assert run_stage("download", offline, argv=[]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: stage 'download': cannot download") and "Traceback" not in err


def test_failed_stage_is_logged_as_failed(repo):
    def broken(cfg):
        raise ValueError("bad input")

    assert run_stage("split", broken, argv=[]) == 1
    c = client(repo)
    (run,) = stage_runs(c, c.get_experiment_by_name("visrec").experiment_id)
    assert run.info.status == "FAILED"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_warns_and_the_stage_stands(repo, monkeypatch, caplog):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr("visrec.workflows.stage_runner.setup_logging", lambda: None)  # it would drop caplog's handler
    with caplog.at_level(logging.WARNING, logger="visrec.tracking"):
        assert run_stage("split", body_for("split"), argv=[]) == 0
    assert f"tracking to {uri} failed" in caplog.text and "tracking.required: true" in caplog.text
    assert (repo / "data/metrics/split.json").exists()


def test_unreachable_server_fails_the_stage_when_required(repo, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    ran = []
    assert run_stage("split", ran.append, argv=["-o", "tracking.required=true"]) == 1
    err = capsys.readouterr().err
    assert f"error: stage 'split': tracking to {uri} failed" in err and "tracking.required is true" in err
    assert ran == []  # a required store that is down fails before the work starts


def test_disabled_logs_nothing(repo):
    assert run_stage("split", body_for("split"), argv=["-o", "tracking.enabled=false"]) == 0
    assert not (repo / "mlruns.db").exists() and not (repo / "mlartifacts").exists()


def test_runs_compare_prints_a_table(repo):
    from typer.testing import CliRunner

    from visrec.cli import app

    assert run_stage("split", body_for("split"), argv=[]) == 0
    assert run_stage("split", body_for("split"), argv=["-o", "split.train_classes=3"]) == 0
    result = CliRunner().invoke(app, ["runs", "compare", "--stage", "split", "--metrics", "recall_at_1,num"])
    assert result.exit_code == 0, result.output
    header, *rows = result.output.strip().splitlines()
    assert header.split()[-3:] == ["split.train_classes", "recall_at_1", "num"]  # the param that differs
    assert len(rows) == 2 and rows[0].split()[-3:] == ["3", "0.5", "3"]  # newest first


def test_runs_compare_without_a_database_is_one_clear_error(repo):
    from typer.testing import CliRunner

    from visrec.cli import app

    result = CliRunner().invoke(app, ["runs", "compare"])
    assert result.exit_code == 1 and "no tracking database" in result.output


def test_explicit_parent_run_from_the_environment(repo, monkeypatch):
    assert run_stage("split", body_for("split"), argv=[]) == 0  # creates the store and experiment
    c = client(repo)
    experiment_id = c.get_experiment_by_name("visrec").experiment_id
    parent = c.create_run(experiment_id, run_name="airflow dag run").info.run_id
    monkeypatch.setenv("VISREC_PIPELINE_RUN", parent)
    assert run_stage("validate", body_for("validate"), argv=[]) == 0
    (run,) = c.search_runs([experiment_id], filter_string="tags.`visrec.stage` = 'validate'")
    assert run.data.tags["mlflow.parentRunId"] == parent
