"""The real DVC graph on a tiny synthetic config, in a temporary copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

TINY = {
    "data.synthetic.num_classes": 6,
    "data.synthetic.images_per_class": 6,
    "data.synthetic.image_size": 64,
    "data.synthetic.workers": 1,
    "split.train_classes": 3,
    "validate.min_per_class": 3,
    "validate.report_samples": 4,
    # the default extractor (pretrained Lite0; synthetic data, so kept as it is), at a small input
    "extractor.image.size": 64,
    "detector.neck_channels": 16,
    "detector.head_convs": 1,
    "detector.image": {"size": 64},
    "detector.assign": {"size_ranges": [[0.0, 32.0], [16.0, 64.0], [32.0, 100000.0]]},
    "detector.batch_size": 4,
    "detector.epochs": 2,
    "detector.min_steps": 0,
    "detector.eval_every": 1,
    "detector.vis_images": 2,
    "index.gallery_per_class": 2,
    "index.open_set_fraction": 0.34,
    "evaluate.max_k": 5,
    "evaluate.baseline_calib_images": 16,
}
ALL_STAGES = {"download", "scenes", "split", "validate", "train_extractor", "train_detector", "export",
              "build_index", "evaluate"}


def set_params(path: Path, values: dict) -> None:
    """Set dotted keys in a params file (comments are not kept: it is a throwaway copy)."""
    params = yaml.safe_load(path.read_text())
    for dotted, value in values.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run(cmd: list[str], cwd: Path, stdout_only: bool = False) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory, repo_root) -> Path:
    """The repo's tracked and new files (not ignored ones) in a fresh git repo."""
    dest = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=repo_root, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        src = repo_root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    set_params(dest / "params.yaml", TINY)
    git = ["git", "-c", "user.name=visrec-test", "-c", "user.email=test@localhost"]
    run(["git", "init", "-q"], dest)
    run([*git, "add", "-A"], dest)
    run([*git, "commit", "-q", "-m", "tiny config"], dest)
    return dest


def test_repro_then_nothing_then_only_downstream(repo_copy):
    first = run(["dvc", "repro"], repo_copy)
    assert ran_stages(first) == ALL_STAGES
    assert (repo_copy / "data/raw/CUB_200_2011/images.txt").exists()
    assert (repo_copy / "data/split/test_coco.json").exists()
    assert (repo_copy / "data/validate/validation.json").exists()
    assert (repo_copy / "data/export/extractor/model.json").exists()
    assert json.loads((repo_copy / "data/export/detector/model.json").read_text())["kind"] == "detector"
    assert (repo_copy / "data/detector/val_predictions.png").exists()
    # the detector's second member trained on the photo-like scenes of the `scenes` stage
    assert json.loads((repo_copy / "data/scenes/scenes.json").read_text())["styles"][0]["name"] == "style1"
    assert json.loads((repo_copy / "data/detector/model_config.json").read_text())["members"] == 2
    assert (repo_copy / "data/evaluate/recall_curve.csv").exists()

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo_copy))
    flat = json.dumps(metrics)
    assert '"train_images": 18' in flat and '"test_images": 18' in flat
    assert '"recall@1"' in flat and '"baseline_recall@1"' in flat
    assert '"det_AP50"' in flat
    assert '"system_top1_accuracy"' in flat and '"system_unknown_rejected"' in flat and '"threshold"' in flat

    # the gallery the stage built serves the `visrec` command straight away
    info = json.loads(run(["visrec", "gallery", "info"], repo_copy, stdout_only=True))
    assert info["count"] == 3 * 2 * 2 and info["fingerprint"] == json.loads(  # whole + object views
        (repo_copy / "data/export/extractor/model.json").read_text())["fingerprint"]
    assert "threshold" in info["extra"]
    query = json.loads((repo_copy / "data/index/queries.jsonl").read_text().splitlines()[0])
    recognised = json.loads(run(["visrec", "recognize", query["path"]], repo_copy, stdout_only=True))
    assert recognised["image"] == query["path"] and isinstance(recognised["results"], list)

    # MLflow: one parent run for this pipeline execution, a child run per stage, both models
    # registered with alias `candidate`
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo_copy / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("visrec")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    stages = {r.data.tags.get("visrec.stage") for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert ALL_STAGES <= stages, stages
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs
               if r.data.tags.get("visrec.stage") in ALL_STAGES and r.data.tags.get("mlflow.parentRunId")}
    assert len(parents) == 1
    evaluated = next(r for r in runs if r.data.tags.get("visrec.stage") == "evaluate")
    assert "recall_at_1" in evaluated.data.metrics
    for name in ("visrec-extractor", "visrec-detector"):
        assert client.get_model_version_by_alias(name, "candidate").version

    second = run(["dvc", "repro"], repo_copy)
    assert ran_stages(second) == set(), second

    set_params(repo_copy / "params.yaml", {"split.train_classes": 4})
    third = run(["dvc", "repro"], repo_copy)
    assert ran_stages(third) == ALL_STAGES - {"download"}
    stats = json.loads((repo_copy / "data/metrics/split.json").read_text())
    assert stats["train_classes"] == 4 and stats["test_classes"] == 2


def test_exp_run_set_param(repo_copy):
    out = run(["dvc", "exp", "run", "validate", "-S", "split.train_classes=2"], repo_copy)
    assert ran_stages(out) == {"split", "validate"}
    stats = json.loads((repo_copy / "data/metrics/split.json").read_text())
    assert stats["train_classes"] == 2


def test_failed_validation_keeps_last_good_outputs(repo_copy):
    run(["dvc", "repro", "validate"], repo_copy)
    good = (repo_copy / "data/validate/validation.json").read_text()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "stages/validate.py", "-o", "validate.min_per_class=1000"],
                          cwd=repo_copy, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "min_per_class" in proc.stderr and "Traceback" not in proc.stderr
    assert (repo_copy / "data/validate/validation.json").read_text() == good
    assert (repo_copy / "data/validate.failed/validation.json").exists()


def test_bad_override_is_one_clear_line(repo_copy):
    proc = subprocess.run([sys.executable, "stages/split.py", "-o", "split.train_clases=3"],
                          cwd=repo_copy, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "unknown key 'split.train_clases'" in proc.stderr and "Traceback" not in proc.stderr
