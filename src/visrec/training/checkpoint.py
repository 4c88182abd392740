"""Checkpoints: ``latest``, ``best_model`` and ``epoch_N`` (the last k kept).

A checkpoint is a directory holding ``model.pdparams``, ``optimizer.pdopt`` (with the LR
schedule's state) and ``trainer_state.json``; it is written to a temporary directory and
renamed into place, so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paddle

from visrec.utils.fs import atomic_dir

MODEL_FILE = "model.pdparams"
OPTIMIZER_FILE = "optimizer.pdopt"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # of the last evaluation


def _rename_optimizer_state(opt_state: dict, names: dict[str, str]) -> dict:
    """Re-key accumulators (``<param name>_velocity_0``) through ``names`` (old -> new prefix).

    Paddle keys optimiser state by run-time parameter names (``linear_6.w_0``), which
    depend on how many layers the process built before; checkpoints use the structured
    names of ``model.named_parameters()`` instead so a new process can resume.
    """
    by_length = sorted(names, key=len, reverse=True)
    out = {}
    for key, value in opt_state.items():
        if key == "master_weights" and isinstance(value, dict):
            out[key] = {names.get(k, k): v for k, v in value.items()}
            continue
        prefix = next((p for p in by_length if key.startswith(p + "_")), None)
        out[names[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def _param_names(model: paddle.nn.Layer) -> dict[str, str]:
    """run-time name -> structured name."""
    return {p.name: f"@{n}" for n, p in model.named_parameters()}


def save_checkpoint(path: Path, model: paddle.nn.Layer, optimizer, state: TrainerState) -> None:
    with atomic_dir(path) as tmp:
        paddle.save(model.state_dict(), str(tmp / MODEL_FILE))
        if optimizer is not None:
            opt_state = _rename_optimizer_state(optimizer.state_dict(), _param_names(model))
            paddle.save(opt_state, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, its ``model.pdparams``, or a run directory (-> latest)."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if (path / "latest" / MODEL_FILE).exists():
        path = path / "latest"
    if not (path / MODEL_FILE).exists():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a directory with {MODEL_FILE} and {STATE_FILE} "
            "(e.g. data/extractor/checkpoints/latest)")
    return path


def load_checkpoint(path: str | Path, model: paddle.nn.Layer, optimizer=None) -> TrainerState:
    path = resolve_checkpoint(path)
    model.set_state_dict(paddle.load(str(path / MODEL_FILE)))
    if optimizer is not None and (path / OPTIMIZER_FILE).exists():
        structured_to_runtime = {v: k for k, v in _param_names(model).items()}
        opt_state = _rename_optimizer_state(paddle.load(str(path / OPTIMIZER_FILE)), structured_to_runtime)
        optimizer.set_state_dict(opt_state)
    state_file = path / STATE_FILE
    return TrainerState(**json.loads(state_file.read_text())) if state_file.exists() else TrainerState()


def prune_epoch_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    epochs = sorted(
        (int(m.group(1)), p) for p in ckpt_dir.glob("epoch_*") if (m := re.fullmatch(r"epoch_(\d+)", p.name))
    )
    for _, path in epochs[: max(0, len(epochs) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)


def load_finished_run(run_dir: str | Path, checkpoint: str, stage: str,
                      build: Callable[[dict[str, Any]], paddle.nn.Layer]) -> tuple[paddle.nn.Layer, dict[str, Any]]:
    """Rebuild the network of a finished training run (``model_config.json``) and load a checkpoint.

    ``build`` makes the network from the run's model config; the backbone's ``pretrained``
    key is dropped first (the checkpoint holds every weight). A missing ``checkpoint``
    falls back to ``latest``. Returns the network in eval mode and the model config.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "model_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: train the model first (dvc repro {stage})")
    model_cfg = json.loads(config_file.read_text())
    backbone = {k: v for k, v in model_cfg["backbone"].items() if k != "pretrained"}
    model = build({**model_cfg, "backbone": backbone})
    ckpt = run_dir / "checkpoints" / checkpoint
    if not ckpt.exists():
        logging.getLogger(__name__).warning("%s not found; using the latest checkpoint", ckpt)
        ckpt = run_dir / "checkpoints" / "latest"
    load_checkpoint(ckpt, model)
    model.eval()
    return model, model_cfg


def prepare_work_dir(out_dir: str | Path, resume: str | None, section: str,
                     main: bool = True) -> tuple[Path, str | None]:
    """Where a run trains (``<out_dir>.run/``, promoted to ``out_dir`` when it completes) and
    what it resumes from.

    ``resume: latest`` continues the unfinished run there (an error naming the fix if there is
    none); no ``resume`` starts afresh, deleting a stale work directory (only on the main
    process); any other value is a checkpoint path, passed on as is.
    """
    out_dir = Path(out_dir)
    work_dir = out_dir.with_name(out_dir.name + ".run")
    if resume == "latest":
        latest = work_dir / "checkpoints" / "latest"
        if not latest.exists():
            raise FileNotFoundError(f"{section}.resume=latest but {latest} does not exist: no unfinished run "
                                    f"to continue (set {section}.resume: null to start afresh)")
        return work_dir, str(latest)
    if resume is None and work_dir.exists() and main:
        shutil.rmtree(work_dir)  # a fresh run: stale checkpoints of another run would mislead
    return work_dir, resume
