"""The Airflow DAGs (dags/): both load with the expected task graphs; the gallery-update DAG
runs end to end (`airflow dags test`) on the tiny exported models.

The retrain DAG runs end to end twice on the tiny DVC config in a temporary repo copy (~1 min;
VISREC_DAG_E2E=0 skips it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
AIRFLOW = str(Path(sys.executable).parent / "airflow")


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    """A throwaway AIRFLOW_HOME with a migrated SQLite metadata DB, dags folder = the repo's dags/."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = dict(os.environ, AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__UNIT_TEST_MODE="False",
               VISREC_REPO=str(REPO),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("VISREC_SERVICE_URL", None)
    proc = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"airflow db migrate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return env


def test_dagbag_loads_both_dags_with_expected_graphs(airflow_env):
    code = f"""
import json
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(DAGS)!r})
out = {{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "dags": {{}}}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {{
        "schedule": str(dag.schedule), "catchup": dag.catchup, "params": sorted(dag.params),
        "tasks": {{t.task_id: {{"up": sorted(t.upstream_task_ids), "retries": t.retries,
                                "backoff": float(t.retry_exponential_backoff or 0)}} for t in dag.tasks}},
    }}
print("RESULT" + json.dumps(out))
"""
    env = dict(airflow_env, VISREC_RETRAIN_SCHEDULE="@daily")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[6:])
    assert out["errors"] == {}
    assert set(out["dags"]) == {"visrec_retrain", "visrec_gallery_update"}

    retrain = out["dags"]["visrec_retrain"]
    assert retrain["schedule"] == "@daily" and retrain["catchup"] is False  # from VISREC_RETRAIN_SCHEDULE
    ups = {task: info["up"] for task, info in retrain["tasks"].items()}
    stage_ups = {
        "download": [], "scenes": [], "split": ["download"], "validate": ["split"],
        "train_extractor": ["validate"], "train_detector": ["scenes", "validate"],
        "export": ["train_detector", "train_extractor"], "build_index": ["export"], "evaluate": ["build_index"]}
    assert ups == {  # every stage also takes the MLflow parent run id from start_tracking
        "start_tracking": [], **{k: sorted([*v, "start_tracking"]) for k, v in stage_ups.items()},
        "promotion_gate": ["evaluate"], "notify_service": ["promotion_gate"],
    }
    for stage in ("download", "scenes", "split", "validate", "train_extractor", "train_detector", "export",
                  "build_index", "evaluate"):
        assert retrain["tasks"][stage]["retries"] == 2 and retrain["tasks"][stage]["backoff"] > 1

    update = out["dags"]["visrec_gallery_update"]
    assert update["schedule"] == "None" and update["params"] == ["images_dir", "label_file"]
    assert {t: i["up"] for t, i in update["tasks"].items()} == {
        "validate": [], "add_to_gallery": ["validate"], "notify_service": ["add_to_gallery"]}


def test_retrain_dag_schedule_defaults_to_weekly(airflow_env):
    env = {k: v for k, v in airflow_env.items() if k != "VISREC_RETRAIN_SCHEDULE"}
    code = (f"from airflow.dag_processing.dagbag import DagBag; "
            f"print('RESULT', DagBag(dag_folder={str(DAGS / 'visrec_retrain.py')!r}).dags['visrec_retrain'].schedule)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RESULT @weekly" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture()
def gallery_setup(exported_models, tiny_cub, tmp_path):
    """A gallery of classes 1-4, params pointing at it, and class 8 as new labelled images."""
    from visrec.data.cub import read_cub
    from visrec.inference.extractor_runtime import Extractor
    from visrec.inference.gallery_ops import GalleryItem, build_gallery

    root, _ = tiny_cub
    meta = read_cub(root)
    items = [GalleryItem(meta.root / im.rel_path, f"class {im.class_id}") for im in meta.images if im.class_id <= 4]
    gallery_path = tmp_path / "gallery"
    build_gallery(Extractor(exported_models[0]), items, "FLAT", progress=False).save(gallery_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "recognition": {"extractor": str(exported_models[0]), "detector": None, "gallery": str(gallery_path)},
        "index": {"index_type": "FLAT"},
    }), encoding="utf-8")
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    rows = []
    for im in [im for im in meta.images if im.class_id == 8][:2]:
        (new_dir / Path(im.rel_path).name).write_bytes((meta.root / im.rel_path).read_bytes())
        rows.append(f"{Path(im.rel_path).name}\tAirflow bird\n")
    (new_dir / "labels.txt").write_text("".join(rows), encoding="utf-8")
    return params, gallery_path, new_dir, len(items)


def test_gallery_update_dag_runs_end_to_end(airflow_env, gallery_setup):
    from visrec.index.gallery import Gallery

    params, gallery_path, new_dir, before = gallery_setup
    old_version = Gallery.current_version(gallery_path)
    conf = json.dumps({"images_dir": str(new_dir), "label_file": str(new_dir / "labels.txt")})
    env = dict(airflow_env, VISREC_PARAMS=str(params))
    proc = subprocess.run([AIRFLOW, "dags", "test", "visrec_gallery_update", "-c", conf], env=env,
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert Gallery.current_version(gallery_path) != old_version, log[-5000:]
    gallery = Gallery.load(gallery_path)
    assert len(gallery) == before + 2 and "Airflow bird" in gallery.labels()
    assert "no running service at" in log  # the notify task ran and skipped (no VISREC_SERVICE_URL)


def test_gallery_update_dag_refuses_a_bad_image(airflow_env, gallery_setup):
    from visrec.index.gallery import Gallery

    params, gallery_path, new_dir, before = gallery_setup
    (new_dir / "broken.jpg").write_bytes(b"not an image")
    with (new_dir / "labels.txt").open("a", encoding="utf-8") as f:
        f.write("broken.jpg\tAirflow bird\n")
    old_version = Gallery.current_version(gallery_path)
    conf = json.dumps({"images_dir": str(new_dir), "label_file": str(new_dir / "labels.txt")})
    proc = subprocess.run([AIRFLOW, "dags", "test", "visrec_gallery_update", "-c", conf],
                          env=dict(airflow_env, VISREC_PARAMS=str(params)), capture_output=True, text=True,
                          timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "broken.jpg: does not decode as an image" in log, log[-5000:]
    assert Gallery.current_version(gallery_path) == old_version
    assert len(Gallery.load(gallery_path)) == before


@pytest.mark.skipif(os.environ.get("VISREC_DAG_E2E") == "0", reason="VISREC_DAG_E2E=0: skip the ~1 min run")
def test_retrain_dag_runs_end_to_end_then_is_idempotent(airflow_env, tmp_path_factory):
    """The whole tiny pipeline through Airflow, promoted (no champion yet); a second run skips
    every stage (DVC cache), the gate keeps a better champion and the notify task is skipped."""
    from .test_dvc_pipeline import ALL_STAGES, TINY, ran_stages, set_params

    repo = tmp_path_factory.mktemp("retrain_repo")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (REPO / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / rel).write_bytes((REPO / rel).read_bytes())
    set_params(repo / "params.yaml", {**TINY, "tracking.enabled": False})
    git = ["git", "-c", "user.name=visrec-test", "-c", "user.email=test@localhost"]
    for cmd in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-q", "-m", "tiny"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    env = dict(airflow_env, VISREC_REPO=str(repo), AIRFLOW__CORE__DAGS_FOLDER=str(repo / "dags"))

    def run_dag() -> str:
        proc = subprocess.run([AIRFLOW, "dags", "test", "visrec_retrain"], env=env, capture_output=True,
                              text=True, timeout=1200)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-8000:]
        return log

    log = run_dag()
    assert ran_stages("\n".join(line.split("] ", 1)[-1].lstrip() for line in log.splitlines())) == ALL_STAGES
    champion_file = repo / "data/champion/current/champion.json"
    champion = json.loads(champion_file.read_text())
    assert {"recall_at_1", "det_AP50", "promoted_at", "git_commit"} <= set(champion)
    assert (repo / "data/champion/current/export/extractor/model.json").exists()
    assert (repo / "data/champion/current/gallery/current").is_symlink()  # the candidate's gallery, published
    assert "PROMOTED (no champion yet)" in log
    assert "no running service at" in log  # promoted -> the notify task ran (and skipped: no service)

    champion_file.write_text(json.dumps({**champion, "recall_at_1": 1.0, "det_AP50": 1.0}))
    log = run_dag()
    assert "Running stage" not in log, log[-8000:]  # nothing changed: DVC skipped every stage
    assert "candidate worse" in log and "no running service at" not in log  # short-circuited
    assert json.loads(champion_file.read_text())["recall_at_1"] == 1.0
