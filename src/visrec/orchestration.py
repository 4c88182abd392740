"""What the Airflow DAGs (``dags/``) do, as plain functions: no Airflow import, unit-testable.

* :func:`run_dvc_stage`      one ``dvc repro --single-item <stage>`` (DVC's cache skips unchanged stages)
* :func:`promotion_gate`     candidate metrics vs the champion's; promote = publish export + gallery as
                             the served champion (``visrec.serving.champion``)
* :func:`mlflow_promotion_gate`  the same decision on the MLflow model registry: move alias ``champion``
                             to ``candidate`` (``visrec.registry.promote_if_better``)
* :func:`validate_gallery_images` / :func:`update_gallery`   add new labelled images to the live gallery
* :func:`notify_service_reload`   confirm a running service picked up the new gallery version

The champion's own metrics (``data/champion/current/champion.json``) are the gate when tracking is
off; with tracking on, the evaluate stage registers the candidates in MLflow and
:func:`mlflow_promotion_gate` decides on the registry aliases. Either way a promotion publishes the
candidate as the champion that the service and the gallery-update DAG use.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from visrec.utils.fs import resolve_under

logger = logging.getLogger(__name__)

CANDIDATE_FILES = {"recall@1": "evaluate.json", "det_AP50": "train_detector.json"}
PROMOTION_METRICS = tuple(CANDIDATE_FILES)


# ----------------------------------------------------------------------------- DVC


def _dvc_executable() -> str:
    """``dvc`` beside this interpreter (the project venv), else whatever is on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def run_dvc_stage(stage: str, repo: str | Path, tail_lines: int = 20, pipeline_run: str | None = None) -> None:
    """``dvc repro --single-item <stage>`` in ``repo``; unchanged stages are skipped by DVC.

    ``pipeline_run``: an MLflow run id the stage's tracked run is nested under (env
    ``VISREC_PIPELINE_RUN``), so one DAG run's stages share one parent run.
    Raises RuntimeError naming the stage, its exit code and the last lines of its output.
    """
    from visrec.tracking import PIPELINE_RUN_ENV

    repo = Path(repo)
    # Stage scripts run `python ...`: make it this environment's python.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if pipeline_run:
        env[PIPELINE_RUN_ENV] = pipeline_run
    cmd = [_dvc_executable(), "repro", "--single-item", stage]
    logger.info("running %s in %s", " ".join(cmd), repo)
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.stdout:
        logger.info("%s", proc.stdout.rstrip())
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-tail_lines:])
        raise RuntimeError(f"DVC stage '{stage}' failed (exit {proc.returncode}): {tail}")


# ----------------------------------------------------------------------------- promotion


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run the pipeline (train_detector, evaluate) first") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def candidate_metrics(metrics_dir: Path) -> dict[str, float]:
    """``recall@1`` from evaluate.json and ``det_AP50`` from train_detector.json."""
    out = {}
    for key, name in CANDIDATE_FILES.items():
        data = _read_json(metrics_dir / name)
        if key not in data or not isinstance(data[key], int | float):
            raise ValueError(f"{metrics_dir / name} has no numeric {key!r} (keys: {sorted(data)[:10]})")
        out[key] = float(data[key])
    return out


def git_commit(repo: Path) -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def _repo_config(repo: Path, params_path: str = "params.yaml"):
    from visrec.config import Config, load_config

    path = repo / params_path
    return load_config(path) if path.exists() else Config()


def _publish(repo: Path, cfg, candidate: dict[str, Any], reason: str, gate: str) -> str:
    """Publish ``paths.export`` + ``recognition.gallery`` as the champion the service serves."""
    from visrec.serving.champion import publish_champion

    record = {**candidate, "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "git_commit": git_commit(repo), "reason": reason, "gate": gate}
    return publish_champion(resolve_under(cfg.paths.export, repo), resolve_under(cfg.recognition.gallery, repo),
                            resolve_under(cfg.paths.champion, repo), record,
                            num_threads=cfg.recognition.num_threads, batch_size=cfg.index.batch_size)


def promotion_gate(repo: str | Path, params_path: str = "params.yaml") -> dict[str, Any]:
    """Promote the candidate iff recall@1 and det_AP50 are both >= the champion's (none: promote).

    The candidate is the pipeline's latest output: ``paths.export`` with the gallery that
    build_index made for it (``recognition.gallery``), metrics from ``paths.metrics``. On
    promotion both are published together as the new champion under ``paths.champion``
    (:func:`visrec.serving.champion.publish_champion`, atomic, carrying over live gallery
    changes); its ``champion.json`` records the metrics, the time and the git commit.
    """
    from visrec.serving.champion import champion_record

    repo = Path(repo)
    cfg = _repo_config(repo, params_path)
    candidate = candidate_metrics(resolve_under(cfg.paths.metrics, repo))
    record = champion_record(resolve_under(cfg.paths.champion, repo)) or {}
    champion = {k: record[k] for k in PROMOTION_METRICS if isinstance(record.get(k), int | float)}
    if not record:
        promoted, reason = True, "no champion yet"
    else:
        worse = [f"{k} {candidate[k]:.4f} < champion {champion[k]:.4f}"
                 for k in PROMOTION_METRICS if k in champion and candidate[k] < champion[k]]
        promoted = not worse
        reason = ("candidate >= champion on " + ", ".join(
            f"{k} ({candidate[k]:.4f} vs {champion[k]:.4f})" for k in PROMOTION_METRICS if k in champion)
            if promoted else "candidate worse: " + "; ".join(worse))
    result = {"promoted": promoted, "candidate": candidate, "champion": champion, "reason": reason}
    if promoted:
        result["published"] = _publish(repo, cfg, candidate, reason, gate="files")
    logger.info("promotion gate: %s (%s)", "PROMOTED" if promoted else "kept champion", reason)
    return result


def start_pipeline_run(repo: str | Path, name: str, params_path: str = "params.yaml") -> str | None:
    """Create the parent MLflow run of one DAG run (its stages nest under it); None when tracking
    is off, or unreachable and not required (the stages then group by commit + params)."""
    from visrec.tracking import TrackingError, create_pipeline_run

    repo = Path(repo).resolve()
    cfg = _repo_config(repo, params_path)
    if not cfg.tracking.enabled:
        return None
    try:
        return create_pipeline_run(cfg, name, repo)
    except Exception as exc:  # best effort, as for every stage
        if cfg.tracking.required:
            raise TrackingError(f"creating the pipeline run failed: {exc}") from None
        logger.warning("creating the pipeline run failed (%s); stages group by commit + params instead", exc)
        return None


def tracking_enabled(repo: str | Path, params_path: str = "params.yaml") -> bool:
    """``tracking.enabled`` of the repo's params file (the default config when there is none)."""
    from visrec.config import Config, load_config

    path = Path(repo) / params_path
    return (load_config(path) if path.exists() else Config()).tracking.enabled


def mlflow_promotion_gate(repo: str | Path, params_path: str = "params.yaml") -> dict[str, Any]:
    """The promotion gate on the MLflow model registry (aliases ``candidate`` / ``champion`` of
    ``visrec-extractor`` and ``visrec-detector``, registered by the evaluate stage).

    Same rule and result keys as :func:`promotion_gate`; on promotion the local export (checked
    to be the registered candidate first) is published as the served champion, as there. The
    store is the repo's ``tracking`` config: env MLFLOW_TRACKING_URI, else ``tracking.uri``, else
    ``sqlite:///<repo>/mlruns.db``.
    """
    from visrec.inference.export import read_model_json
    from visrec.registry import CANDIDATE, FINGERPRINT_TAG, MODEL_NAMES, _alias_version, promote_if_better
    from visrec.tracking import client_for, probe

    repo = Path(repo).resolve()
    cfg = _repo_config(repo, params_path)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or f"sqlite:///{repo / 'mlruns.db'}"
    probe(uri)
    client = client_for(uri)
    export = resolve_under(cfg.paths.export, repo)
    for kind, name in MODEL_NAMES.items():  # what gets served must be what the registry judged
        version = _alias_version(client, name, CANDIDATE)
        local = read_model_json(export / kind)["fingerprint"]
        registered = version.tags.get(FINGERPRINT_TAG) if version is not None else None
        if version is not None and registered != local:
            raise ValueError(f"{export / kind} (fingerprint {local}) is not the registered candidate {name} "
                             f"version {version.version} ({registered}): run `dvc repro evaluate`, which "
                             "registers the current export, then the gate")
    result = promote_if_better(client, cfg.tracking)
    if result["promoted"]:
        metrics = {k: v for k, v in result["candidate"].items() if k != "versions"}
        result["published"] = _publish(repo, cfg, {**metrics, "registry_versions": result["candidate"]["versions"]},
                                       result["reason"], gate=f"mlflow {uri}")
    logger.info("registry promotion gate at %s: %s", uri, result)
    return result


# ----------------------------------------------------------------------------- gallery update


def validate_gallery_images(items: Sequence[Any], min_width: int, min_height: int) -> list[str]:
    """Problems with new gallery images (empty list: all good).

    The checks of the validate stage's ``file_decodes`` and ``min_size`` rules, on the same
    probe (:func:`visrec.data.validation.probe_image`: exists, full decode, size), plus a
    non-empty label. Done directly, not through a Great Expectations suite (GX takes ~10 s to
    import for a handful of images).
    """
    from visrec.data.validation import probe_image

    problems = []
    for item in items:
        path, label = Path(item.path), item.label
        if not isinstance(label, str) or not label.strip():
            problems.append(f"{path}: empty label")
        probe = probe_image(path)
        if not probe["exists"]:
            problems.append(f"{path}: file not found (file_decodes)")
        elif not probe["decodes"]:
            problems.append(f"{path}: does not decode as an image (file_decodes)")
        elif probe["width"] < min_width or probe["height"] < min_height:
            problems.append(f"{path}: {probe['width']}x{probe['height']} is smaller than "
                            f"{min_width}x{min_height} (min_size)")
    return problems


def _read_items(images_dir: str | Path, label_file: str | Path, delimiter: str) -> list[Any]:
    from visrec.inference.gallery_ops import items_from_list

    # Absolute paths: they are stored in the gallery so a future champion can re-embed the images.
    items = items_from_list(label_file, root=Path(images_dir).resolve(), delimiter=delimiter)
    if not items:
        raise ValueError(f"{label_file} lists no images")
    return items


def check_gallery_update(images_dir: str | Path, label_file: str | Path,
                         params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate the label file; raise ValueError listing up to 5 problems."""
    from visrec.config import load_config

    cfg = load_config(params_path)
    items = _read_items(images_dir, label_file, cfg.index.delimiter)
    problems = validate_gallery_images(items, cfg.validate.min_width, cfg.validate.min_height)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{len(problems)} problem(s) in {label_file}; nothing was added:\n  "
                         + "\n  ".join(problems[:5]) + more)
    return {"images": len(items), "labels": sorted({i.label for i in items})}


def update_gallery(images_dir: str | Path, label_file: str | Path,
                   params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """Add the images of ``label_file`` (``relative/path<delimiter>label``, relative to
    ``images_dir``) to the served gallery, embedded by the served extractor, and publish a new
    gallery version atomically. Served = the champion's (``paths.champion``) when there is one
    and ``serve.champion`` is on, else ``recognition.gallery`` / ``recognition.extractor``.

    Relative paths in the params file are resolved against its folder (the repo root).
    Invalid images raise ValueError before anything is embedded or saved.
    """
    from visrec.config import load_config
    from visrec.index.gallery import Gallery, update_lock
    from visrec.inference.extractor_runtime import Extractor
    from visrec.inference.gallery_ops import add_items
    from visrec.inference.pipeline import load_detector
    from visrec.serving.champion import served_recognition

    params_path = Path(params_path).resolve()
    cfg = load_config(params_path)
    check_gallery_update(images_dir, label_file, params_path)
    items = _read_items(images_dir, label_file, cfg.index.delimiter)
    rec, champion = served_recognition(cfg, params_path.parent)
    extractor = Extractor(rec.extractor, backend=rec.backend, num_threads=rec.num_threads)
    gallery_path = Path(rec.gallery)
    if not gallery_path.is_dir():
        raise FileNotFoundError(f"no gallery at {gallery_path} (recognition.gallery in {params_path}): "
                                "build one first (the build_index stage or `visrec gallery build LIST`)")
    # The lock the service's /gallery/add and /gallery/remove hold around their load-modify-save,
    # so neither update is lost when both run at once.
    with update_lock(gallery_path):
        gallery = Gallery.load(gallery_path, expected_fingerprint=extractor.fingerprint,
                               num_threads=rec.num_threads)
        old_version, before = gallery.version, len(gallery)
        ids = add_items(gallery, extractor, items, batch_size=cfg.index.batch_size, progress=False,
                        views=rec.gallery_views,
                        detector=load_detector(rec) if "object" in rec.gallery_views else None)
        version_dir = gallery.save(gallery_path)
    result = {"added": len(ids), "ids": ids, "labels": sorted({i.label for i in items}),
              "count_before": before, "count": len(gallery), "old_version": old_version,
              "version": gallery.version, "version_dir": version_dir, "gallery": str(gallery_path),
              "champion": champion}
    logger.info("gallery update: %s", result)
    return result


# ----------------------------------------------------------------------------- service


def notify_service_reload(url: str | None, timeout: float = 3, expected_version: str | None = None,
                          expected_champion: str | None = None) -> str:
    """Confirm a running service serves what was just published (it follows promotions and gallery
    versions by itself, on its next request): GET ``{url}/gallery/info``, which is such a request,
    and compare its champion and gallery version. Never raises; returns a log line."""
    if not url:
        return "no running service at <VISREC_SERVICE_URL unset>; skipped"
    endpoint = url.rstrip("/") + "/gallery/info"
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout) as response:  # noqa: S310 (configured URL)
            info = json.loads(response.read().decode("utf-8"))
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad JSON
        return f"no running service at {url}; skipped ({exc})"
    version, champion = info.get("version"), info.get("champion")
    served = f"champion {champion}, gallery version {version} ({info.get('count')} entries)"
    if expected_champion is not None and champion != expected_champion:
        return f"service at {url} serves {served}, NOT the new champion {expected_champion}: restart it"
    if expected_version is not None and version != expected_version:
        return f"service at {url} serves {served}, expected gallery version {expected_version}"
    return f"service at {url} serves {served}"
