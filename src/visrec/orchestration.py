"""What the Airflow DAGs (``dags/``) do, as plain functions: no Airflow import, unit-testable.

* :func:`run_dvc_stage`      one ``dvc repro --single-item <stage>`` (DVC's cache skips unchanged stages)
* :func:`promotion_gate`     candidate metrics vs the champion's; promote = copy ``data/export`` atomically
* :func:`mlflow_promotion_gate`  the same decision on the MLflow model registry: move alias ``champion``
                             to ``candidate`` (``visrec.registry.promote_if_better``)
* :func:`validate_gallery_images` / :func:`update_gallery`   add new labelled images to the live gallery
* :func:`notify_service_reload`   confirm a running service picked up the new gallery version

The file-based champion (``data/champion/``) is the gate when tracking is off; with tracking on, the
evaluate stage registers the candidates in MLflow and :func:`mlflow_promotion_gate` decides.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CANDIDATE_FILES = {"recall@1": "evaluate.json", "det_AP50": "train_detector.json"}
PROMOTION_METRICS = tuple(CANDIDATE_FILES)


# ----------------------------------------------------------------------------- DVC


def _dvc_executable() -> str:
    """``dvc`` beside this interpreter (the project venv), else whatever is on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def run_dvc_stage(stage: str, repo: str | Path, tail_lines: int = 20) -> None:
    """``dvc repro --single-item <stage>`` in ``repo``; unchanged stages are skipped by DVC.

    Raises RuntimeError naming the stage, its exit code and the last lines of its output.
    """
    repo = Path(repo)
    # Stage scripts run `python ...`: make it this environment's python.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
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


def _replace_dir(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` atomically: a temp copy beside ``dest``, then renames.

    The old ``dest`` is moved aside (not deleted) until the new one is in place, and is
    restored if the final rename fails.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        shutil.copytree(src, tmp / "new", symlinks=True)
        old = None
        if dest.exists():
            old = tmp / "old"
            os.rename(dest, old)
        try:
            os.rename(tmp / "new", dest)
        except BaseException:
            if old is not None:
                os.rename(old, dest)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def promotion_gate(repo: str | Path, metrics_dir: str = "data/metrics", champion_dir: str = "data/champion",
                   export_dir: str = "data/export") -> dict[str, Any]:
    """Promote the candidate iff recall@1 and det_AP50 are both >= the champion's (none: promote).

    On promotion ``export_dir`` is copied to ``<champion_dir>/export`` atomically and
    ``<champion_dir>/metrics.json`` records the metrics, a UTC timestamp and the git commit.
    """
    repo = Path(repo)
    candidate = candidate_metrics(repo / metrics_dir)
    champion_root = repo / champion_dir
    champion_file = champion_root / "metrics.json"
    champion: dict[str, Any] = _read_json(champion_file) if champion_file.exists() else {}
    if not champion:
        promoted, reason = True, "no champion yet"
    else:
        worse = [f"{k} {candidate[k]:.4f} < champion {float(champion[k]):.4f}"
                 for k in PROMOTION_METRICS if k in champion and candidate[k] < float(champion[k])]
        promoted = not worse
        reason = ("candidate >= champion on " + ", ".join(
            f"{k} ({candidate[k]:.4f} vs {float(champion[k]):.4f})" for k in PROMOTION_METRICS if k in champion)
            if promoted else "candidate worse: " + "; ".join(worse))
    if promoted:
        src = repo / export_dir
        if not src.is_dir():
            raise FileNotFoundError(f"{src} not found: run the export stage before promoting")
        _replace_dir(src, champion_root / "export")
        record = {**candidate, "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "git_commit": git_commit(repo), "reason": reason}
        _write_json_atomic(champion_file, record)
    logger.info("promotion gate: %s (%s)", "PROMOTED" if promoted else "kept champion", reason)
    return {"promoted": promoted, "candidate": candidate, "champion": champion, "reason": reason}


def tracking_enabled(repo: str | Path, params_path: str = "params.yaml") -> bool:
    """``tracking.enabled`` of the repo's params file (the default config when there is none)."""
    from visrec.config import Config, load_config

    path = Path(repo) / params_path
    return (load_config(path) if path.exists() else Config()).tracking.enabled


def mlflow_promotion_gate(repo: str | Path, params_path: str = "params.yaml") -> dict[str, Any]:
    """The promotion gate on the MLflow model registry (aliases ``candidate`` / ``champion`` of
    ``visrec-extractor`` and ``visrec-detector``, registered by the evaluate stage).

    Same rule and result keys as :func:`promotion_gate`. The store is the repo's ``tracking``
    config: env MLFLOW_TRACKING_URI, else ``tracking.uri``, else ``sqlite:///<repo>/mlruns.db``.
    """
    from visrec.config import Config, load_config
    from visrec.registry import promote_if_better
    from visrec.tracking import client_for, probe

    repo = Path(repo).resolve()
    path = repo / params_path
    cfg = (load_config(path) if path.exists() else Config()).tracking
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri or f"sqlite:///{repo / 'mlruns.db'}"
    probe(uri)
    result = promote_if_better(client_for(uri), cfg)
    logger.info("registry promotion gate at %s: %s", uri, result)
    return result


# ----------------------------------------------------------------------------- gallery update


def validate_gallery_images(items: Sequence[Any], min_width: int, min_height: int) -> list[str]:
    """Problems with new gallery images (empty list: all good).

    The checks of the validate stage's ``file_decodes`` and ``min_size`` rules, on the same
    probe (:func:`visrec.data.validation._probe_image`: exists, full decode, size), plus a
    non-empty label. Done directly, not through a Great Expectations suite (GX takes ~10 s to
    import for a handful of images).
    """
    from visrec.data.validation import _probe_image

    problems = []
    for item in items:
        path, label = Path(item.path), item.label
        if not isinstance(label, str) or not label.strip():
            problems.append(f"{path}: empty label")
        probe = _probe_image(path)
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

    items = items_from_list(label_file, root=images_dir, delimiter=delimiter)
    if not items:
        raise ValueError(f"{label_file} lists no images")
    return items


def _resolve(path: str | Path, base: Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else base / path


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
    ``images_dir``) to the gallery at ``recognition.gallery``, embedded by
    ``recognition.extractor``, and publish a new gallery version atomically.

    Relative paths in the params file are resolved against its folder (the repo root).
    Invalid images raise ValueError before anything is embedded or saved.
    """
    from visrec.config import load_config
    from visrec.index.gallery import Gallery, update_lock
    from visrec.inference.extractor import Extractor
    from visrec.inference.gallery_ops import add_items

    params_path = Path(params_path).resolve()
    cfg = load_config(params_path)
    check_gallery_update(images_dir, label_file, params_path)
    items = _read_items(images_dir, label_file, cfg.index.delimiter)
    base = params_path.parent
    rec = cfg.recognition
    extractor = Extractor(_resolve(rec.extractor, base), backend=rec.backend, num_threads=rec.num_threads)
    gallery_path = _resolve(rec.gallery, base)
    if not gallery_path.is_dir():
        raise FileNotFoundError(f"no gallery at {gallery_path} (recognition.gallery in {params_path}): "
                                "build one first (the build_index stage or `visrec gallery build LIST`)")
    # The lock the service's /gallery/add and /gallery/remove hold around their load-modify-save,
    # so neither update is lost when both run at once.
    with update_lock(gallery_path):
        gallery = Gallery.load(gallery_path, expected_fingerprint=extractor.fingerprint,
                               num_threads=rec.num_threads)
        old_version, before = gallery.version, len(gallery)
        ids = add_items(gallery, extractor, items, batch_size=cfg.index.batch_size, progress=False)
        version_dir = gallery.save(gallery_path)
    result = {"added": len(ids), "ids": ids, "labels": sorted({i.label for i in items}),
              "count_before": before, "count": len(gallery), "old_version": old_version,
              "version": gallery.version, "version_dir": version_dir, "gallery": str(gallery_path)}
    logger.info("gallery update: %s", result)
    return result


# ----------------------------------------------------------------------------- service


def notify_service_reload(url: str | None, timeout: float = 3, expected_version: str | None = None) -> str:
    """Confirm a running service serves the new gallery (it reloads by itself when the
    gallery's version changes): GET ``{url}/gallery/info``. Never raises; returns a log line."""
    if not url:
        return "no running service at <VISREC_SERVICE_URL unset>; skipped"
    endpoint = url.rstrip("/") + "/gallery/info"
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout) as response:  # noqa: S310 (configured URL)
            info = json.loads(response.read().decode("utf-8"))
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad JSON
        return f"no running service at {url}; skipped ({exc})"
    version = info.get("version")
    if expected_version is not None and version != expected_version:
        return (f"service at {url} serves gallery version {version}, expected {expected_version} "
                f"({info.get('count')} entries); it reloads on its next request")
    return f"service at {url} serves gallery version {version} ({info.get('count')} entries)"
