"""Add newly labelled images to the live gallery (no retraining), triggered with params:

    airflow dags trigger visrec_gallery_update -c '{"images_dir": "/data/new", "label_file": "/data/new/labels.txt"}'

The label file holds ``relative/path<TAB>label`` lines (relative to ``images_dir``; the delimiter
is params ``index.delimiter``). Tasks: validate (every image exists, decodes, meets the validate
stage's min size, has a label: otherwise nothing is added) -> add_to_gallery (embed with
``recognition.extractor``, publish a new gallery version atomically) -> notify_service.

Env: VISREC_REPO (default: this folder's parent), VISREC_PARAMS (``<repo>/params.yaml``), VISREC_SERVICE_URL.
"""

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import Param, dag, task

REPO = Path(os.environ.get("VISREC_REPO", Path(__file__).resolve().parents[1]))


def _params_path() -> str:
    return os.environ.get("VISREC_PARAMS", str(REPO / "params.yaml"))


@dag(dag_id="visrec_gallery_update", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
     tags=["visrec"], doc_md=__doc__,
     params={"images_dir": Param("", type="string", description="folder the label file's paths are relative to"),
             "label_file": Param("", type="string", description="relative/path<TAB>label lines")})
def visrec_gallery_update():
    @task(task_id="validate")
    def validate(params=None) -> dict:
        from visrec.config import load_config
        from visrec.workflows.gallery import check_gallery_update

        if not params["images_dir"] or not params["label_file"]:
            raise ValueError("trigger with params {'images_dir': ..., 'label_file': ...}")
        return check_gallery_update(load_config(_params_path()), params["images_dir"], params["label_file"])

    @task(task_id="add_to_gallery")
    def add(checked: dict, params=None) -> dict:
        from visrec.workflows.gallery import update_served_gallery

        result = update_served_gallery(_params_path(), params["images_dir"], params["label_file"])
        print(f"gallery update: {result}")
        return result

    @task(task_id="notify_service")
    def notify(result: dict) -> str:
        from visrec.workflows.pipeline import notify_service_reload

        line = notify_service_reload(os.environ.get("VISREC_SERVICE_URL"), expected_version=result["version"])
        print(line)
        return line

    notify(add(validate()))


visrec_gallery_update()
