"""The DVC pipeline as orchestrators (the Airflow DAGs) drive it: plain functions, no Airflow import.

* :func:`stage_graph`            the stages of ``dvc.yaml`` and which stages each one needs (read, not repeated)
* :func:`read_stages`            each stage's deps and outs, as paths
* :func:`run_dvc_stage`          one ``dvc repro --single-item <stage>`` (DVC's cache skips unchanged stages)
* :func:`start_pipeline_run`     the MLflow parent run one DAG run's stages nest under
* :func:`notify_service_reload`  confirm a running service serves what was just published
* :func:`repo_config`            the repo's params file as a Config
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from visrec.config import Config, load_config
from visrec.tracking import PIPELINE_RUN_ENV, TrackingError, create_pipeline_run

logger = logging.getLogger(__name__)


def repo_config(repo: str | Path, params_path: str | Path = "params.yaml") -> Config:
    """The config of ``repo``'s params file (the default config when there is none)."""
    path = Path(repo) / params_path
    return load_config(path) if path.exists() else Config()


_VARIABLE = re.compile(r"\$\{\s*([\w.-]+)\s*\}")


def _interpolate(text: str, variables: dict[str, Any]) -> str:
    """``${paths.raw}`` -> its value in ``variables`` (dvc.yaml reads params.yaml the same way)."""
    def value(match: re.Match) -> str:
        node: Any = variables
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"dvc.yaml uses ${{{match.group(1)}}}, which params.yaml does not define")
            node = node[part]
        return str(node)

    return _VARIABLE.sub(value, text)


def _paths(entries: list | None, variables: dict[str, Any]) -> list[str]:
    """The paths of a stage's ``deps`` / ``outs`` list (an entry is a path or ``{path: options}``)."""
    names = [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]
    return [os.path.normpath(_interpolate(str(name), variables)) for name in names]


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def read_stages(repo: str | Path, dvc_file: str = "dvc.yaml", params_file: str = "params.yaml"
                ) -> dict[str, dict[str, list[str]]]:
    """``{stage: {"deps": [...], "outs": [...]}}`` of ``dvc.yaml`` in its order, ``${...}`` resolved
    from the params file; outs include metrics files."""
    repo = Path(repo)
    stages = yaml.safe_load((repo / dvc_file).read_text(encoding="utf-8"))["stages"]
    params_path = repo / params_file
    variables = yaml.safe_load(params_path.read_text(encoding="utf-8")) if params_path.is_file() else {}
    return {name: {"deps": _paths(spec.get("deps"), variables),
                   "outs": _paths(spec.get("outs"), variables) + _paths(spec.get("metrics"), variables)}
            for name, spec in stages.items()}


def covers(paths: list[str], path: str) -> bool:
    """Whether ``path`` is one of ``paths`` or lies in one of them (a directory)."""
    return any(_within(path, other) for other in paths)


def stage_graph(repo: str | Path, dvc_file: str = "dvc.yaml", params_file: str = "params.yaml") -> dict[str, list[str]]:
    """``{stage: [stages it needs]}`` from ``dvc.yaml``, in its order, direct needs only.

    A stage needs another when one of its ``deps`` lies in (or is) one of the other's ``outs``.
    Needs already implied through another need are dropped (``evaluate`` needs ``build_index``,
    which needs ``export``: ``export`` is not listed for ``evaluate``), so the graph reads as the
    pipeline is drawn."""
    stages = read_stages(repo, dvc_file, params_file)
    needs: dict[str, set[str]] = {}
    for name, spec in stages.items():
        needs[name] = {other for other, theirs in stages.items() if other != name
                       and any(_within(dep, out) or _within(out, dep) for dep in spec["deps"] for out in theirs["outs"])}

    def reachable(stage: str) -> set[str]:
        seen, todo = set(), list(needs[stage])
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(needs[current])
        return seen

    return {name: [n for n in stages if n in direct and not any(n in reachable(m) for m in direct - {n})]
            for name, direct in needs.items()}


def final_stages(graph: dict[str, list[str]]) -> list[str]:
    """The stages no other stage needs: the pipeline is done when they are."""
    needed = {n for needs in graph.values() for n in needs}
    return [stage for stage in graph if stage not in needed]


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


def start_pipeline_run(repo: str | Path, name: str, params_path: str = "params.yaml") -> str | None:
    """Create the parent MLflow run of one DAG run (its stages nest under it); None when tracking
    is off, or unreachable and not required (the stages then group by commit + params)."""
    repo = Path(repo).resolve()
    cfg = repo_config(repo, params_path)
    if not cfg.tracking.enabled:
        return None
    try:
        return create_pipeline_run(cfg, name, repo)
    except Exception as exc:  # best effort, as for every stage
        if cfg.tracking.required:
            raise TrackingError(f"creating the pipeline run failed: {exc}") from None
        logger.warning("creating the pipeline run failed (%s); stages group by commit + params instead", exc)
        return None


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
