"""Weekly (or manual) retraining: the DVC stages of dvc.yaml, a promotion gate, a reload check.

One task per stage (``dvc repro --single-item``: DVC skips unchanged stages), in the order dvc.yaml
gives (``stage_graph``), nested under one MLflow parent run (start_tracking); then the promotion gate
(``run_promotion_gate``: MLflow registry with tracking on, else files), which publishes a better
candidate as the served champion; notify_service (only if promoted) checks the service switched.
Env: VISREC_REPO (default: this folder's parent), VISREC_RETRAIN_SCHEDULE (@weekly), VISREC_SERVICE_URL.
"""

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, task

from visrec.workflows.pipeline import (final_stages, notify_service_reload, run_dvc_stage, stage_graph,
                                      start_pipeline_run)

REPO = Path(os.environ.get("VISREC_REPO", Path(__file__).resolve().parents[1]))
RETRIES = {"retries": 2, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": 2.0,
           "max_retry_delay": timedelta(minutes=30)}


@task(task_id="start_tracking")
def start_tracking(run_id: str | None = None) -> str | None:
    """One MLflow parent run per DAG run: every stage's tracked run nests under it."""
    return start_pipeline_run(REPO, f"airflow {run_id}")


def run_stage(stage: str, parent_run: str | None) -> None:
    run_dvc_stage(stage, REPO, pipeline_run=parent_run)


@task.short_circuit(task_id="promotion_gate")
def promotion_gate() -> str | bool:
    """The published champion's name, or False (kept champion: notify_service is skipped)."""
    from visrec.workflows.promotion import run_promotion_gate  # logs its decision

    return run_promotion_gate(REPO).get("published") or False


@task(task_id="notify_service")
def notify_service(champion: str) -> str:
    return notify_service_reload(os.environ.get("VISREC_SERVICE_URL"), expected_champion=champion)


@dag(dag_id="visrec_retrain", schedule=os.environ.get("VISREC_RETRAIN_SCHEDULE", "@weekly"),
     start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1, tags=["visrec"], doc_md=__doc__)
def visrec_retrain():
    parent_run = start_tracking()
    graph = stage_graph(REPO)  # {stage: [stages it needs]}, from dvc.yaml
    tasks = {stage: task(run_stage, task_id=stage, **RETRIES)(stage, parent_run) for stage in graph}
    for stage, needs in graph.items():
        [tasks[need] for need in needs] >> tasks[stage]
    champion = promotion_gate()
    [tasks[stage] for stage in final_stages(graph)] >> champion
    notify_service(champion)


visrec_retrain()
