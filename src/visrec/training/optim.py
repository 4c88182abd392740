"""Optimisers and learning-rate schedules from params (stepped once per iteration)."""

from __future__ import annotations

import paddle

from visrec.config import OptimizerConfig


def build_scheduler(cfg: OptimizerConfig, steps_per_epoch: int, epochs: int) -> paddle.optimizer.lr.LRScheduler:
    total = max(1, steps_per_epoch * epochs)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if cfg.schedule == "cosine":
        sched = paddle.optimizer.lr.CosineAnnealingDecay(cfg.lr, T_max=max(1, total - warmup), eta_min=cfg.eta_min)
    elif cfg.schedule == "multistep":
        sched = paddle.optimizer.lr.MultiStepDecay(
            cfg.lr, milestones=[m * steps_per_epoch - warmup for m in cfg.milestones], gamma=cfg.gamma)
    else:
        sched = paddle.optimizer.lr.LambdaDecay(cfg.lr, lambda _: 1.0)
    if warmup > 0:
        sched = paddle.optimizer.lr.LinearWarmup(sched, warmup, cfg.warmup_start_lr, cfg.lr)
    return sched


def build_optimizer(cfg: OptimizerConfig, parameters, scheduler) -> paddle.optimizer.Optimizer:
    """``parameters``: a list of tensors, or groups ``[{"params": [...], "learning_rate": mult}]``."""
    clip = paddle.nn.ClipGradByGlobalNorm(cfg.grad_clip) if cfg.grad_clip > 0 else None
    if cfg.name == "momentum":
        return paddle.optimizer.Momentum(
            learning_rate=scheduler, momentum=cfg.momentum, parameters=parameters,
            weight_decay=paddle.regularizer.L2Decay(cfg.weight_decay) if cfg.weight_decay else None,
            grad_clip=clip)
    return paddle.optimizer.AdamW(learning_rate=scheduler, parameters=parameters,
                                  weight_decay=cfg.weight_decay, grad_clip=clip)


def current_lr(optimizer: paddle.optimizer.Optimizer) -> float:
    return float(optimizer.get_lr())
