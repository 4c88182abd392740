"""One training engine for every visrec model (extractor, detector, classifier).

A model-specific *task* supplies ``train_step`` (loss of one batch) and ``evaluate``
(validation metrics); the engine owns everything else: epochs, the per-iteration LR
schedule, seeding, AMP, progress bar, evaluation every N epochs, checkpoints
(``latest``, ``best_model``, ``epoch_N``), exact resume and the per-epoch history CSV.

Exact resume: every epoch re-seeds Paddle / NumPy / ``random`` from (seed, epoch) and
calls ``set_epoch`` on the sampler and dataset, so an epoch's randomness depends only on
its number. Restoring weights, optimiser and LR state from ``latest`` therefore continues
a killed run exactly where an uninterrupted one would have gone.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import paddle
from tqdm import tqdm

from visrec.training.checkpoint import (
    TrainerState,
    load_checkpoint,
    prune_epoch_checkpoints,
    save_checkpoint,
)
from visrec.training.optim import current_lr

logger = logging.getLogger(__name__)


class TrainTask(Protocol):
    def train_step(self, model: paddle.nn.Layer, batch: Any) -> tuple[paddle.Tensor, dict[str, float]]:
        """Forward one batch; return the loss to minimise and named parts to log."""

    def evaluate(self, model: paddle.nn.Layer) -> dict[str, float]:
        """Validation metrics of ``model`` (called in eval mode, under no_grad)."""


@dataclass
class EngineConfig:
    epochs: int = 10
    eval_every: int = 1
    keep_last: int = 2  # epoch_N checkpoints kept
    metric: str = "recall@1"  # selects best_model
    metric_mode: str = "max"
    seed: int = 0
    amp: bool = False  # mixed precision; only used on GPU
    resume: str | None = None
    stop_after_epochs: int | None = None  # end this run early (tests simulate a kill with it)
    # Evaluate the starting weights as "epoch 0": with a pretrained backbone, the zero-shot
    # model competes for best_model, so training can only be kept if it beats it.
    eval_before_training: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    paddle.seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def is_main_process() -> bool:
    return paddle.distributed.get_rank() == 0


class Trainer:
    def __init__(
        self,
        model: paddle.nn.Layer,
        task: TrainTask,
        train_loader: Iterable,
        optimizer: paddle.optimizer.Optimizer,
        scheduler: paddle.optimizer.lr.LRScheduler | None,
        out_dir: str | Path,
        config: EngineConfig,
        epoch_aware: Iterable[Any] = (),
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.model = model
        self.task = task
        self.loader = train_loader
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.history_path = self.out_dir / "history.csv"
        self.cfg = config
        # Samplers / datasets whose randomness follows the epoch number.
        self.epoch_aware = [obj for obj in epoch_aware if hasattr(obj, "set_epoch")]
        self.on_epoch_end = on_epoch_end
        self.state = TrainerState()
        self.world_size = paddle.distributed.get_world_size()
        self.train_model = paddle.DataParallel(model) if self.world_size > 1 else model
        use_gpu = "gpu" in paddle.get_device()
        self.amp = config.amp and use_gpu
        self.scaler = paddle.amp.GradScaler() if self.amp else None
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ public
    def fit(self) -> TrainerState:
        if self.cfg.resume:
            self._resume(self.cfg.resume)
        if self.cfg.eval_before_training and self.state.epoch == 0 and not self.history:
            row = {"epoch": 0, **self._evaluate(0)}
            self._record(row)
            if row.pop("_improved", False) and is_main_process():
                save_checkpoint(self.ckpt_dir / "best_model", self.model, None, self.state)
        first = self.state.epoch + 1
        last = self.cfg.epochs
        if self.cfg.stop_after_epochs is not None:
            last = min(last, self.state.epoch + self.cfg.stop_after_epochs)
        for epoch in range(first, last + 1):
            row = self._train_epoch(epoch)
            if epoch % self.cfg.eval_every == 0 or epoch == self.cfg.epochs:
                row.update(self._evaluate(epoch))
            self.state.epoch = epoch
            self._record(row)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, row)
            self._save(epoch, improved=row.pop("_improved", False))
        return self.state

    # ----------------------------------------------------------------- private
    def _resume(self, path: str) -> None:
        self.state = load_checkpoint(path, self.model, self.optimizer)
        if self.history_path.exists():
            with self.history_path.open(newline="") as f:
                self.history = [r for r in csv.DictReader(f) if int(r["epoch"]) <= self.state.epoch]
        logger.info("resumed from %s at epoch %d (step %d)", path, self.state.epoch, self.state.global_step)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        seed_everything(epoch_seed(self.cfg.seed, epoch))
        for obj in self.epoch_aware:
            obj.set_epoch(epoch)
        self.train_model.train()
        totals: dict[str, float] = {}
        seen, steps, start = 0, 0, time.perf_counter()
        # In a log file (DVC, Airflow) a bar redrawn every step floods it: redraw rarely.
        bar = tqdm(self.loader, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False,
                   disable=not is_main_process(), dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30)
        for batch in bar:
            loss, parts = self._step(batch)
            steps += 1
            seen += int(batch[0].shape[0])
            for k, v in {"loss": float(loss), **parts}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{totals['loss'] / steps:.4f}", lr=f"{current_lr(self.optimizer):.2e}",
                            refresh=False)  # redraw at the bar's own pace (mininterval)
        if steps == 0:
            raise RuntimeError("the training loader yielded no batch: check batch size / sampler settings")
        elapsed = time.perf_counter() - start
        row = {"epoch": epoch, "lr": current_lr(self.optimizer), "seconds": round(elapsed, 2),
               "images_per_s": round(seen / elapsed, 2)}
        row.update({f"train_{k}": round(v / steps, 6) for k, v in totals.items()})
        if not math.isfinite(row["train_loss"]):
            raise FloatingPointError(f"epoch {epoch}: training loss is {row['train_loss']} (lower the LR?)")
        logger.info("epoch %d: loss %.4f, %.1f img/s, lr %.2e", epoch, row["train_loss"],
                    row["images_per_s"], row["lr"])
        return row

    def _step(self, batch: Any) -> tuple[paddle.Tensor, dict[str, float]]:
        if self.amp:
            with paddle.amp.auto_cast():
                loss, parts = self.task.train_step(self.train_model, batch)
            self.scaler.scale(loss).backward()
            self.scaler.minimize(self.optimizer, loss)
        else:
            loss, parts = self.task.train_step(self.train_model, batch)
            loss.backward()
            self.optimizer.step()
        self.optimizer.clear_grad()
        if self.scheduler is not None:
            self.scheduler.step()
        self.state.global_step += 1
        return loss.detach(), parts

    def _evaluate(self, epoch: int) -> dict[str, Any]:
        if not is_main_process():
            return {}
        self.model.eval()
        with paddle.no_grad():
            metrics = self.task.evaluate(self.model)
        self.state.metrics = {k: float(v) for k, v in metrics.items()}
        value = metrics.get(self.cfg.metric)
        improved = False
        if value is not None:
            best = self.state.best_metric
            better = best is None or (value > best if self.cfg.metric_mode == "max" else value < best)
            if better:
                self.state.best_metric, self.state.best_epoch, improved = float(value), epoch, True
        logger.info("epoch %d eval: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return {**{f"val_{k}": round(float(v), 6) for k, v in metrics.items()}, "_improved": improved}

    def _record(self, row: dict[str, Any]) -> None:
        if not is_main_process():
            return
        self.history.append({k: v for k, v in row.items() if not k.startswith("_")})
        fields: list[str] = []
        for r in self.history:
            fields += [k for k in r if k not in fields]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.history_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.history)
        tmp.replace(self.history_path)

    def _save(self, epoch: int, improved: bool) -> None:
        if not is_main_process():
            return
        save_checkpoint(self.ckpt_dir / f"epoch_{epoch}", self.model, self.optimizer, self.state)
        prune_epoch_checkpoints(self.ckpt_dir, self.cfg.keep_last)
        save_checkpoint(self.ckpt_dir / "latest", self.model, self.optimizer, self.state)
        if improved:
            save_checkpoint(self.ckpt_dir / "best_model", self.model, None, self.state)
