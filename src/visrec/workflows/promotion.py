"""Promotion: one rule decides whether the candidate replaces the champion, in two stores.

The candidate is the pipeline's latest export with the gallery build_index made for it. It is
judged on one figure per model (:data:`GATE_METRICS`): the extractor's ``recall_at_1`` (``recall@1``
of evaluate.json) and the detector's ``det_AP50`` (train_detector.json). They carry the same
MLflow-safe names (MLflow refuses ``@``) in ``champion.json``, in the registry's version tags and
in the gates' results.

* :func:`decide`                 the rule: promote iff no figure of the candidate is worse than the champion's
* :func:`promotion_gate`         the rule on files: stage metrics vs the champion's ``champion.json``
* :func:`mlflow_promotion_gate`  the rule on the MLflow registry: aliases ``candidate`` / ``champion``
* :func:`register_candidates`    the evaluate stage's step: both exports registered as alias ``candidate``

Either gate publishes a promoted candidate as the served champion (:mod:`visrec.workflows.champion`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from visrec.config import Config, TrackingConfig
from visrec.inference.export import read_model_json
from visrec.model_registry import (CANDIDATE, CHAMPION, FINGERPRINT_TAG, MODEL_NAMES, alias_version, crown,
                                   log_and_register)
from visrec.tracking import TrackingError, connect, git_info, resolve_uri
from visrec.utils.fs import resolve_under
from visrec.workflows.champion import champion_record, publish_champion
from visrec.workflows.pipeline import repo_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateMetric:
    """A figure the gate compares: its name in the gate's records, the model it judges and
    where the pipeline writes it (a stage metrics file under ``paths.metrics`` and its key)."""

    name: str
    kind: str
    metrics_file: str
    key: str


GATE_METRICS = (GateMetric("recall_at_1", "extractor", "evaluate.json", "recall@1"),
                GateMetric("det_AP50", "detector", "train_detector.json", "det_AP50"))
METRIC_OF_KIND = {m.kind: m for m in GATE_METRICS}


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


def decide(candidate: Mapping[str, float | None], champion: Mapping[str, float | None] | None) -> Decision:
    """Promote iff there is no champion, or no gate figure of the candidate is below the champion's.

    A champion without a figure does not block on it; a candidate without one, where the
    champion has it, counts as worse."""
    if not champion:
        return Decision(True, "no champion yet")
    worse, compared = [], []
    for metric in GATE_METRICS:
        cand, champ = candidate.get(metric.name), champion.get(metric.name)
        if champ is None:
            continue
        if cand is None:
            worse.append(f"{metric.name}: candidate has no value, champion {champ:.4f}")
        elif cand < champ:
            worse.append(f"{metric.name} {cand:.4f} < champion {champ:.4f}")
        else:
            compared.append(f"{metric.name} ({cand:.4f} vs {champ:.4f})")
    if worse:
        return Decision(False, "candidate worse: " + "; ".join(worse))
    return Decision(True, "candidate >= champion on " + ", ".join(compared))


# ----------------------------------------------------------------------------- the gate on files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run the pipeline (train_detector, evaluate) first") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def candidate_metrics(metrics_dir: Path) -> dict[str, float]:
    """The gate figures of the pipeline's latest run, read from its stage metrics files."""
    out = {}
    for metric in GATE_METRICS:
        path = metrics_dir / metric.metrics_file
        value = _read_json(path).get(metric.key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{path} has no numeric {metric.key!r}")
        out[metric.name] = float(value)
    return out


def recorded_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The gate figures a champion record holds (records published before the figures were
    renamed hold ``recall@1``: read under the old key too)."""
    out = {}
    for metric in GATE_METRICS:
        value = record.get(metric.name, record.get(metric.key))
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[metric.name] = float(value)
    return out


def _publish(repo: Path, cfg: Config, candidate: dict[str, Any], reason: str, gate: str) -> str:
    """Publish ``paths.export`` + ``recognition.gallery`` as the champion the service serves."""
    record = {**candidate, "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "git_commit": git_info(repo)[0], "reason": reason, "gate": gate}
    return publish_champion(resolve_under(cfg.paths.export, repo), resolve_under(cfg.recognition.gallery, repo),
                            resolve_under(cfg.paths.champion, repo), record,
                            num_threads=cfg.recognition.num_threads, batch_size=cfg.index.batch_size)


def promotion_gate(repo: str | Path, params_path: str = "params.yaml") -> dict[str, Any]:
    """:func:`decide` on the pipeline's metrics files vs the champion's ``champion.json``; on
    promotion, publish the candidate as the champion (atomic, carrying over live gallery changes;
    its ``champion.json`` records the figures, the time and the git commit)."""
    repo = Path(repo)
    cfg = repo_config(repo, params_path)
    candidate = candidate_metrics(resolve_under(cfg.paths.metrics, repo))
    record = champion_record(resolve_under(cfg.paths.champion, repo))
    champion = recorded_metrics(record) if record else {}
    decision = decide(candidate, champion if record else None)
    result = {"promoted": decision.promoted, "candidate": candidate, "champion": champion, "reason": decision.reason}
    if decision.promoted:
        result["published"] = _publish(repo, cfg, candidate, decision.reason, gate="files")
    logger.info("promotion gate: %s (%s)", "PROMOTED" if decision.promoted else "kept champion", decision.reason)
    return result


# ----------------------------------------------------------------------------- the gate on the MLflow registry


def _version_metric(version, metric: GateMetric) -> float | None:
    text = version.tags.get(metric.name) if version is not None else None
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def promote_if_better(client=None, tracking_cfg: TrackingConfig | None = None) -> dict[str, Any]:
    """:func:`decide` on the registry: move alias ``champion`` of both models to their ``candidate``
    iff the candidate is no worse. ``client`` None: one on ``tracking_cfg``'s store.

    Returns ``promoted``, ``candidate``, ``champion`` (figures, with the versions under
    ``versions``) and ``reason``, as :func:`promotion_gate` does."""
    if client is None:
        _, client = connect(tracking_cfg.uri if tracking_cfg is not None else None)
    candidates = {m.kind: alias_version(client, MODEL_NAMES[m.kind], CANDIDATE) for m in GATE_METRICS}
    missing = [MODEL_NAMES[k] for k, v in candidates.items() if v is None]
    if missing:
        raise ValueError(f"no '{CANDIDATE}' alias on {', '.join(missing)}: run the evaluate stage "
                         "with tracking enabled first (it registers the candidates)")
    champions = {m.kind: alias_version(client, MODEL_NAMES[m.kind], CHAMPION) for m in GATE_METRICS}
    candidate: dict[str, Any] = {m.name: _version_metric(candidates[m.kind], m) for m in GATE_METRICS}
    champion: dict[str, Any] = {}
    if all(v is not None for v in champions.values()):
        champion = {m.name: _version_metric(champions[m.kind], m) for m in GATE_METRICS}
    decision = decide(candidate, champion or None)
    candidate["versions"] = {k: v.version for k, v in candidates.items()}
    if champion:
        champion["versions"] = {k: v.version for k, v in champions.items()}
    if decision.promoted:
        crown(client, candidate["versions"], decision.reason)
    logger.info("registry promotion gate: %s (%s)", "PROMOTED" if decision.promoted else "kept champion",
                decision.reason)
    return {"promoted": decision.promoted, "candidate": candidate, "champion": champion, "reason": decision.reason}


def _check_export_is_candidate(client, export: Path) -> None:
    """What gets served must be what the registry judged: the local export's fingerprints must
    be those of the registered candidates."""
    for kind, name in MODEL_NAMES.items():
        version = alias_version(client, name, CANDIDATE)
        local = read_model_json(export / kind)["fingerprint"]
        registered = version.tags.get(FINGERPRINT_TAG) if version is not None else None
        if version is not None and registered != local:
            raise ValueError(f"{export / kind} (fingerprint {local}) is not the registered candidate {name} "
                             f"version {version.version} ({registered}): run `dvc repro evaluate`, which "
                             "registers the current export, then the gate")


def mlflow_promotion_gate(repo: str | Path, params_path: str = "params.yaml") -> dict[str, Any]:
    """:func:`promote_if_better` on the repo's MLflow store (``tracking``: env MLFLOW_TRACKING_URI,
    else ``tracking.uri``, else ``<repo>/mlruns.db``); on promotion the local export (checked to
    be the registered candidate first) is published as the served champion, as in :func:`promotion_gate`."""
    repo = Path(repo).resolve()
    cfg = repo_config(repo, params_path)
    uri, client = connect(cfg.tracking.uri, repo)
    _check_export_is_candidate(client, resolve_under(cfg.paths.export, repo))
    result = promote_if_better(client)
    if result["promoted"]:
        figures = {k: v for k, v in result["candidate"].items() if k != "versions"}
        result["published"] = _publish(repo, cfg, {**figures, "registry_versions": result["candidate"]["versions"]},
                                       result["reason"], gate=f"mlflow {uri}")
    logger.info("registry promotion gate at %s: %s", uri, result)
    return result


# ----------------------------------------------------------------------------- registering the candidates


def register_candidate(export_dir: str | Path, kind: str, metrics: dict[str, Any], tracking_cfg: TrackingConfig):
    """Register one export as alias ``candidate``, its gate figure as a version tag."""
    return log_and_register(Path(export_dir), kind, metrics, tracking_cfg, tag_metrics=(METRIC_OF_KIND[kind].name,))


def register_candidates(cfg: Config, metrics: dict[str, Any]) -> None:
    """Register both exports (alias ``candidate``): the extractor with the evaluate stage's
    ``metrics``, the detector with its figure from ``train_detector.json``. Skipped when tracking
    is off; best effort (a warning) unless ``tracking.required``."""
    if not cfg.tracking.enabled:
        return
    try:
        det = METRIC_OF_KIND["detector"]
        det_metrics_path = Path(cfg.paths.metrics) / det.metrics_file
        det_metrics = json.loads(det_metrics_path.read_text()) if det_metrics_path.is_file() else {}
        export = Path(cfg.paths.export)
        for kind, values in (("extractor", metrics), ("detector", {det.key: det_metrics.get(det.key)})):
            version = register_candidate(export / kind, kind, values, cfg.tracking)
            logger.info("registered %s version %s as '%s'", version.name, version.version, CANDIDATE)
    except Exception as exc:  # best effort unless tracking.required
        uri = resolve_uri(cfg.tracking.uri)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if cfg.tracking.required:
            raise TrackingError(f"registering the candidates at {uri} failed: {reason} "
                                "(tracking.required is true; set it to false to make this best effort)") from None
        logger.warning("registering the candidates at %s failed: %s; the stage result stands", uri, reason)


def run_promotion_gate(repo: str | Path, params_path: str = "params.yaml") -> dict[str, Any]:
    """The gate the repo's params choose: on the MLflow registry when ``tracking.enabled`` (the
    evaluate stage registered the candidates there), else on files."""
    if repo_config(repo, params_path).tracking.enabled:
        return mlflow_promotion_gate(repo, params_path)
    return promotion_gate(repo, params_path)
