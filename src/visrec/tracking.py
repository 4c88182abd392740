"""MLflow tracking of every DVC stage run, best effort.

``run_stage`` wraps each stage body in :func:`track_stage`. Once the body has run, one
MLflow run named after the stage is logged in experiment ``tracking.experiment`` with
tags (git commit + dirty flag, params hash, stage), the stage's own params sections,
the numbers of ``<paths.metrics>/<stage>.json``, per-epoch training history, and a few
small artifacts (never data sets or weights). Everything is logged *after* the body so a
stage pays the MLflow import and database cost (~3-4 s) once, and with the real start
time, so the run still shows the stage's duration.

Grouping: ``dvc repro`` runs each stage in its own process, so there is no shared
in-memory parent run. Each stage run is nested (tag ``mlflow.parentRunId``) under one
parent run per pipeline execution, found in this order:

1. env ``VISREC_PIPELINE_RUN``: an existing run id (Airflow or a Makefile can create the
   parent and pass it down);
2. otherwise the parent run tagged ``visrec.pipeline_id = <git short commit>-<params hash>``
   in the experiment, created by the first stage that does not find one.

The second rule is deterministic across processes without any shared state: all stages
of one ``dvc repro`` on one commit with one config land under the same parent, and
re-running with other params (``dvc exp run -S ...``) or after a commit starts a new one.
A re-run of the same commit and params joins the earlier parent (it is the same
experiment point); set ``VISREC_PIPELINE_RUN`` to separate such repeats.

Failures never change a stage's result unless ``tracking.required`` is true: an
unreachable server or a broken store logs one WARNING and the stage goes on.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from visrec.config import Config, flatten

logger = logging.getLogger(__name__)

PIPELINE_RUN_ENV = "VISREC_PIPELINE_RUN"
# the params sections each stage depends on (as in dvc.yaml's `params:`)
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "download": ("data",),
    "scenes": ("data", "split", "detector"),
    "split": ("split",),
    "validate": ("validate",),
    "train_extractor": ("extractor",),
    "train_detector": ("detector", "data"),
    "export": ("export",),
    "build_index": ("index", "recognition"),
    "evaluate": ("evaluate", "recognition"),
}
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
BATCH = 100  # params per log_batch call (the store limit)
PROBE_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """Tracking failed while ``tracking.required`` is true."""


# ----------------------------------------------------------------------------- small helpers


def sanitize_name(name: str) -> str:
    """A metric/param key MLflow accepts: ``recall@1`` -> ``recall_at_1``, other odd chars -> ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name.replace("@", "_at_"))


def params_hash(config: Config) -> str:
    """First 12 hex of the sha256 of the canonical JSON of the config (tracking section excluded:
    where runs are logged is not part of the experiment)."""
    data = config.to_dict()
    data.pop("tracking", None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def git_info(cwd: str | Path = ".") -> tuple[str, str]:
    """(commit, dirty) of the repo at ``cwd``; ('unknown', 'unknown') outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit or "unknown", "true" if status.strip() else "false"


def resolve_uri(uri: str | None, base: str | Path | None = None) -> str:
    """The MLflow store: env MLFLOW_TRACKING_URI, else ``uri`` (``tracking.uri``), else
    ``sqlite:///<base>/mlruns.db`` (``base``: the repo root; default the working directory).
    The one place the address is worked out."""
    root = Path(base).resolve() if base is not None else Path.cwd().resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or uri or f"sqlite:///{root / 'mlruns.db'}"


def stage_params(config: Config, stage: str) -> dict[str, str]:
    """The stage's params sections flattened (``split.train_classes``), as MLflow-safe strings."""
    data = config.to_dict()
    sections = STAGE_SECTIONS.get(stage, ())
    out: dict[str, str] = {}
    for section in sections:
        for key, value in flatten(data[section], section).items():
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            out[sanitize_name(key)] = text[:MAX_PARAM_VALUE]
    return out


def numeric_metrics(data: Any, prefix: str = "") -> dict[str, float]:
    """Every finite number of a (nested) metrics JSON, keys joined with '.' and sanitised."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(numeric_metrics(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, (int, float)) and math.isfinite(data):  # bools too, as 0/1
        out[sanitize_name(prefix)] = float(data)
    return out


def history_metrics(path: Path) -> list[tuple[str, float, int]]:
    """(name, value, epoch) for every numeric cell of a training history CSV."""
    rows: list[tuple[str, float, int]] = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                epoch = int(float(row.get("epoch", "")))
            except ValueError:
                continue
            for key, text in row.items():
                if key in (None, "epoch"):
                    continue
                try:
                    value = float(text)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    rows.append((sanitize_name(key), value, epoch))
    return rows


def stage_files(config: Config, stage: str) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(history CSV or None, [(file or folder, artifact sub-path)]) for a stage: small files only."""
    p = config.paths
    files: list[tuple[Path, str]] = [(Path(p.metrics) / f"{stage}.json", "metrics")]
    history = None
    if stage in ("train_extractor", "train_detector"):
        run_dir = Path(p.extractor if stage == "train_extractor" else p.detector)
        history = run_dir / "history.csv"
        files += [(history, ""), (run_dir / "val_predictions.png", "")]
    elif stage == "validate":
        files.append((Path(p.validate) / "report", "report"))
    elif stage == "evaluate" and Path(p.evaluate).is_dir():
        files += [(f, "") for f in sorted(Path(p.evaluate).iterdir())
                  if f.is_file() and f.suffix.lower() in (".png", ".csv")]
    return (history if history is not None and history.is_file() else None), [
        (f, a) for f, a in files if f.exists()]


def probe(uri: str) -> None:
    """One quick request to an HTTP tracking server, so a dead one fails in seconds, not minutes
    of MLflow's retries. Any HTTP answer counts as reachable."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"server not reachable ({getattr(exc, 'reason', exc)})") from None
    # a server that answered once: bound MLflow's own retries if it dies mid-way
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stage stdout stays clean


def client_for(uri: str):
    """An ``MlflowClient`` on ``uri``, with MLflow's INFO chatter (DB migrations) silenced."""
    from visrec.utils.logs import NOISY_LOGGERS

    for name in NOISY_LOGGERS:  # mlflow resets its logger level when imported
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow import MlflowClient

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def connect(uri: str | None, base: str | Path | None = None):
    """``(uri, client)`` for the store :func:`resolve_uri` names, probed first so a dead server
    fails in seconds."""
    uri = resolve_uri(uri, base)
    probe(uri)
    return uri, client_for(uri)


def get_or_create_experiment(client, name: str, uri: str, artifact_root: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = Path(artifact_root).resolve().as_uri() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it meanwhile
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# ----------------------------------------------------------------------------- logging a stage


def _parent_run(client, experiment_id: str, pipeline_id: str, tags: dict[str, str]) -> str:
    explicit = os.environ.get(PIPELINE_RUN_ENV)
    if explicit:
        return client.get_run(explicit).info.run_id  # fails clearly if the id is wrong
    found = client.search_runs(
        [experiment_id], max_results=1, order_by=["attributes.start_time ASC"],
        filter_string=f"tags.`visrec.pipeline_id` = '{pipeline_id}' and tags.`visrec.role` = 'pipeline'")
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline {pipeline_id}",
                            tags={**tags, "visrec.role": "pipeline", "visrec.stage": "pipeline"})
    return run.info.run_id


def create_pipeline_run(config: Config, name: str, repo: str | Path) -> str:
    """A new parent run for one orchestrated pipeline execution (e.g. an Airflow DAG run); pass
    its id to the stages in env ``VISREC_PIPELINE_RUN``. Store: env, ``tracking.uri``, else the
    repo's ``mlruns.db``."""
    repo = Path(repo).resolve()
    cfg = config.tracking
    uri, client = connect(cfg.uri, repo)
    artifact_root = Path(cfg.artifact_root)
    experiment_id = get_or_create_experiment(client, cfg.experiment, uri,
                                             str(artifact_root if artifact_root.is_absolute() else repo / artifact_root))
    commit, dirty = git_info(repo)
    phash = params_hash(config)
    run = client.create_run(experiment_id, run_name=name, tags={
        "visrec.git_commit": commit, "visrec.git_dirty": dirty, "visrec.params_hash": phash,
        "visrec.pipeline_id": f"{commit[:8]}-{phash}", "mlflow.source.git.commit": commit,
        "visrec.role": "pipeline", "visrec.stage": "pipeline"})
    return run.info.run_id


def log_stage_run(config: Config, stage: str, start_s: float, ok: bool, uri: str) -> str:
    """Log one finished stage run (nested under its pipeline's parent); returns its run id."""
    from mlflow.entities import Metric, Param, RunTag

    probe(uri)
    client = client_for(uri)
    cfg = config.tracking
    experiment_id = get_or_create_experiment(client, cfg.experiment, uri, cfg.artifact_root)
    commit, dirty = git_info()
    phash = params_hash(config)
    pipeline_id = f"{commit[:8]}-{phash}"
    tags = {"visrec.git_commit": commit, "visrec.git_dirty": dirty, "visrec.params_hash": phash,
            "visrec.pipeline_id": pipeline_id, "mlflow.source.git.commit": commit}
    parent = _parent_run(client, experiment_id, pipeline_id, tags)
    run = client.create_run(experiment_id, start_time=int(start_s * 1000), run_name=stage,
                            tags={**tags, "visrec.stage": stage, "visrec.role": "stage",
                                  "mlflow.parentRunId": parent})
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in stage_params(config, stage).items()]
    for i in range(0, len(params), BATCH):
        client.log_batch(run_id, params=params[i:i + BATCH])
    status = "FAILED"
    if ok:
        now = int(time.time() * 1000)
        metrics_path = Path(config.paths.metrics) / f"{stage}.json"
        values: dict[str, float] = {}
        if metrics_path.is_file():
            values = numeric_metrics(json.loads(metrics_path.read_text(encoding="utf-8")))
        metrics = [Metric(k, v, now, 0) for k, v in values.items()]
        history, artifacts = stage_files(config, stage)
        if history is not None:
            metrics += [Metric(k, v, now, step) for k, v, step in history_metrics(history)]
        for i in range(0, len(metrics), 1000):  # log_batch takes up to 1000 metrics
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        for path, artifact_path in artifacts:
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path or None)
            else:
                client.log_artifact(run_id, str(path), artifact_path or None)
        status = "FINISHED"
    client.set_terminated(run_id, status)
    client.set_terminated(parent, status)  # the parent's end time and status follow its latest stage
    client.set_tag(parent, "visrec.last_stage", stage)
    return run_id


@contextlib.contextmanager
def track_stage(stage: str, config: Config) -> Iterator[None]:
    """Run the body, then log it to MLflow; failures warn (or raise TrackingError if required)."""
    cfg = config.tracking
    start_s = time.time()
    if cfg.enabled and cfg.required:  # a required server that is down fails before hours of training
        uri = resolve_uri(cfg.uri)
        try:
            probe(uri)
        except ConnectionError as exc:
            raise TrackingError(f"tracking to {uri} failed: {exc} (tracking.required is true; "
                                "set it to false to make tracking best effort)") from None
    ok = False
    try:
        yield
        ok = True
    finally:
        if cfg.enabled:
            uri = resolve_uri(cfg.uri)
            try:
                run_id = log_stage_run(config, stage, start_s, ok, uri)
                logger.info("stage '%s' tracked: run %s at %s", stage, run_id, uri)
            except Exception as exc:  # best effort: tracking never changes the stage's result
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                if cfg.required and ok:
                    raise TrackingError(f"tracking to {uri} failed: {reason} (tracking.required is true; "
                                        "set it to false to make tracking best effort)") from None
                logger.warning("tracking to %s failed: %s; the stage result stands "
                               "(set tracking.required: true to make this fatal)", uri, reason)


# ----------------------------------------------------------------------------- comparing runs

PREFERRED_METRICS = ("recall_at_1", "mAP", "det_AP50", "system_top1_accuracy", "val_recall_at_1", "train_loss")


def find_runs(uri: str, experiment: str, stage: str | None = None, limit: int = 10) -> list:
    """The latest stage runs (newest first), of one stage or of all; [] if nothing was tracked yet."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise FileNotFoundError(f"no tracking database at {uri}: run a stage (`dvc repro`) first")
    probe(uri)
    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} at {uri}")
    where = "tags.`visrec.role` = 'stage'" + (f" and tags.`visrec.stage` = '{stage}'" if stage else "")
    return client.search_runs([found.experiment_id], filter_string=where, max_results=limit,
                              order_by=["attributes.start_time DESC"])


def runs_table(runs: list, metrics: list[str] | None = None, params: list[str] | None = None) -> str:
    """A plain text table: start, stage, status, commit, params hash, then params and metrics.

    Without explicit lists it shows the preferred metrics present (else the first few) and the
    params whose values differ between the runs: what a comparison is about.
    """
    if not runs:
        return "no runs"
    if metrics is None:
        present = sorted({k for r in runs for k in r.data.metrics})
        metrics = [m for m in PREFERRED_METRICS if m in present] or present[:6]
    if params is None:
        keys = sorted({k for r in runs for k in r.data.params})
        params = [k for k in keys if len({r.data.params[k] for r in runs if k in r.data.params}) > 1][:4]
    header = ["start (UTC)", "stage", "status", "commit", "params_hash", *params, *metrics]
    rows = [header]
    for r in runs:
        tags = r.data.tags
        start = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.info.start_time / 1000))
        commit = tags.get("visrec.git_commit", "?")[:8] + ("+" if tags.get("visrec.git_dirty") == "true" else "")
        values = [f"{r.data.metrics[m]:.4g}" if m in r.data.metrics else "-" for m in metrics]
        rows.append([start, r.info.run_name or "?", r.info.status, commit, tags.get("visrec.params_hash", "?"),
                     *[r.data.params.get(p, "-")[:30] for p in params], *values])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
