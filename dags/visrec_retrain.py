"""Weekly (or manual) retraining: the DVC pipeline stage by stage, a promotion gate, a reload check.

Each task runs one ``dvc repro --single-item <stage>`` (task id = stage name), so DVC skips a
stage whose inputs did not change and a failure names its stage. Dependencies follow dvc.yaml:
start_tracking -> download -> split -> validate -> {train_extractor, train_detector} -> export ->
build_index -> evaluate -> promotion_gate -> (only if promoted) notify_service.

start_tracking creates one MLflow parent run for the DAG run; every stage's run nests under it.
The pipeline's outputs are the candidate; the service serves the champion (``data/champion``), so
building the candidate's gallery never touches what users query. With ``tracking.enabled`` the gate
works on the MLflow model registry (alias ``champion`` of visrec-extractor / visrec-detector moves to
``candidate``), else on the champion's recorded metrics; either way a promotion publishes the
candidate's models and gallery as the served champion, and notify_service checks that a running
service switched to it.

Env: VISREC_REPO (default: the parent of this dags folder), VISREC_RETRAIN_SCHEDULE
(default ``@weekly``), VISREC_SERVICE_URL (unset: the notify task logs a skip).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, task

REPO = Path(os.environ.get("VISREC_REPO", Path(__file__).resolve().parents[1]))
STAGES = ("download", "split", "validate", "train_extractor", "train_detector", "export", "build_index",
          "evaluate")


def _stage_task(stage: str, pipeline_run):
    @task(task_id=stage, retries=2, retry_delay=timedelta(minutes=1), retry_exponential_backoff=2.0,
          max_retry_delay=timedelta(minutes=30))
    def run_stage(parent_run: str | None) -> None:
        from visrec.orchestration import run_dvc_stage

        run_dvc_stage(stage, REPO, pipeline_run=parent_run)

    return run_stage(pipeline_run)


@dag(dag_id="visrec_retrain", schedule=os.environ.get("VISREC_RETRAIN_SCHEDULE", "@weekly"),
     start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1, tags=["visrec"],
     doc_md=__doc__)
def visrec_retrain():
    @task(task_id="start_tracking")
    def start_tracking(run_id: str | None = None) -> str | None:
        """One MLflow parent run per DAG run: every stage's tracked run nests under it."""
        from visrec.orchestration import start_pipeline_run

        parent = start_pipeline_run(REPO, f"airflow {run_id}")
        print(f"MLflow pipeline run: {parent or 'none (tracking off or unreachable)'}")
        return parent

    parent_run = start_tracking()
    t = {stage: _stage_task(stage, parent_run) for stage in STAGES}
    parent_run >> t["download"]
    t["download"] >> t["split"] >> t["validate"] >> [t["train_extractor"], t["train_detector"]] >> t["export"]
    t["export"] >> t["build_index"] >> t["evaluate"]

    @task.short_circuit(task_id="promotion_gate")
    def gate() -> bool:
        from visrec.orchestration import mlflow_promotion_gate, promotion_gate, tracking_enabled

        # tracking on: the evaluate stage registered the candidates; the gate moves the MLflow alias
        # `champion`. Off: the file-based champion (data/champion).
        result = mlflow_promotion_gate(REPO) if tracking_enabled(REPO) else promotion_gate(REPO)
        print(f"promotion gate: {result}")
        return result["promoted"]

    @task(task_id="notify_service")
    def notify() -> str:
        from visrec.config import load_config
        from visrec.orchestration import notify_service_reload
        from visrec.serving.champion import current_champion

        champion = current_champion(REPO / load_config(REPO / "params.yaml").paths.champion)
        line = notify_service_reload(os.environ.get("VISREC_SERVICE_URL"), expected_champion=champion)
        print(line)
        return line

    t["evaluate"] >> gate() >> notify()


visrec_retrain()
