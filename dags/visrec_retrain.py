"""Weekly (or manual) retraining: the DVC pipeline stage by stage, a promotion gate, a reload check.

Each task runs one ``dvc repro --single-item <stage>`` (task id = stage name), so DVC skips a
stage whose inputs did not change and a failure names its stage. Dependencies follow dvc.yaml:
download -> split -> validate -> {train_extractor, train_detector} -> export -> build_index ->
evaluate -> promotion_gate -> (only if promoted) notify_service. With ``tracking.enabled`` the gate
works on the MLflow model registry (alias ``champion`` of visrec-extractor / visrec-detector moves to
``candidate``), else on the file-based champion in ``data/champion``.

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


def _stage_task(stage: str):
    @task(task_id=stage, retries=2, retry_delay=timedelta(minutes=1), retry_exponential_backoff=2.0,
          max_retry_delay=timedelta(minutes=30))
    def run_stage() -> None:
        from visrec.orchestration import run_dvc_stage

        run_dvc_stage(stage, REPO)

    return run_stage()


@dag(dag_id="visrec_retrain", schedule=os.environ.get("VISREC_RETRAIN_SCHEDULE", "@weekly"),
     start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1, tags=["visrec"],
     doc_md=__doc__)
def visrec_retrain():
    t = {stage: _stage_task(stage) for stage in STAGES}
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
        from visrec.orchestration import notify_service_reload

        line = notify_service_reload(os.environ.get("VISREC_SERVICE_URL"))
        print(line)
        return line

    t["evaluate"] >> gate() >> notify()


visrec_retrain()
