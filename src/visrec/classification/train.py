"""Training the classifier with the shared engine (checkpoints, resume, best model by val top-1).

The task: cross-entropy with label smoothing; with mixup / CutMix on, soft-target CE on the
mixed batch and no training top-1/top-5 (a mixed image has no single true class), as in
PaddleClas. Validation: top-1, top-5 and loss on the held-out split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from visrec.classification.data import ClassificationDataset, ClassSplit, load_split, write_class_map
from visrec.classification.mixing import mix_batch, soft_cross_entropy
from visrec.classification.model import MODEL_CONFIG_FILE, Classifier, build_classifier
from visrec.classification.scoring import classification_metrics, dygraph_probs_fn, predict_probs, topk_accuracy
from visrec.config import ClassifyConfig
from visrec.data.datasets import make_loader
from visrec.data.transforms import train_resize_size
from visrec.models.weights import load_pretrained
from visrec.models.extractor import param_groups
from visrec.models.freezing import freeze_pretrained
from visrec.models.losses import CELoss
from visrec.training.checkpoint import prepare_work_dir
from visrec.training.engine import EngineConfig, Trainer, TrainerState, is_main_process
from visrec.training.extractor_training import make_transform as _make_transform
from visrec.training.extractor_training import normalization
from visrec.training.optim import build_optimizer, build_scheduler
from visrec.utils.fs import replace_dir, write_json

logger = logging.getLogger(__name__)



def make_transform(cfg: ClassifyConfig, train: bool):
    """The extractor's pipeline (it reads only ``backbone``, ``image`` and ``augment``)."""
    return _make_transform(cfg, train)  # type: ignore[arg-type]


def make_dataset(cfg: ClassifyConfig, items, train: bool) -> ClassificationDataset:
    img = cfg.image
    # Train images are cached a little larger than the input so random crops have room;
    # eval images at the input size (then cached and uncached samples are identical).
    cache_size = train_resize_size(img.size, cfg.augment.resize_scale) if train else img.size
    return ClassificationDataset(items, make_transform(cfg, train), crop_to_bbox=img.crop_to_bbox,
                                 bbox_pad=img.bbox_pad, cache_images=img.cache_images, cache_size=cache_size,
                                 seed=cfg.seed)


def model_config(cfg: ClassifyConfig, num_classes: int) -> dict[str, Any]:
    """What evaluation, export and prediction need to rebuild the network and feed it."""
    mean, std = normalization(cfg)  # type: ignore[arg-type]  # resolved: the exact input convention
    return {"backbone": cfg.backbone, "num_classes": num_classes, "dropout": cfg.dropout,
            "image": {**asdict(cfg.image), "mean": mean, "std": std}}


def build_model(cfg: ClassifyConfig, num_classes: int) -> Classifier:
    model = build_classifier(cfg.backbone, num_classes, cfg.dropout)
    if cfg.pretrained:
        missing, unexpected = load_pretrained(model, cfg.pretrained)
        logger.info("loaded %s (%d missing, %d unexpected keys)", cfg.pretrained, len(missing), len(unexpected))
    freeze_pretrained(model, cfg, "classify")
    return model


class ClassifierTask:
    def __init__(self, cfg: ClassifyConfig, num_classes: int, eval_dataset: ClassificationDataset):
        self.cfg = cfg
        self.num_classes = num_classes
        self.eval_dataset = eval_dataset
        self.mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
        self.ce = CELoss(epsilon=cfg.label_smoothing)

    def train_step(self, model, batch):
        images, labels, _ = batch
        if self.mixing:
            # The engine seeds NumPy per epoch: drawing the batch's generator from it keeps
            # the mixing reproducible across a resume.
            rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
            images, target, _ = mix_batch(images, labels, self.num_classes, rng, self.cfg.mixup_alpha,
                                          self.cfg.cutmix_alpha, self.cfg.mix_prob, self.cfg.label_smoothing)
            return soft_cross_entropy(model(images), target), {}
        logits = model(images)
        scores, truth = logits.detach().numpy(), labels.numpy().reshape(-1)
        return self.ce(logits, labels), {"top1": topk_accuracy(scores, truth, 1),
                                         "top5": topk_accuracy(scores, truth, 5)}

    def evaluate(self, model) -> dict[str, float]:
        probs, labels = predict_probs(dygraph_probs_fn(model), self.eval_dataset, self.cfg.eval_batch_size)
        return classification_metrics(probs, labels)


def _check(cfg: ClassifyConfig, train_size: int) -> None:
    if cfg.batch_size < 2:
        raise ValueError(f"classify.batch_size must be >= 2 (BatchNorm needs a batch), got {cfg.batch_size}")
    if train_size < cfg.batch_size:
        raise ValueError(f"classify.batch_size {cfg.batch_size} exceeds the {train_size} training images: "
                         "lower classify.batch_size")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"classify.label_smoothing must be in [0, 1), got {cfg.label_smoothing}")


def train_classifier(cfg: ClassifyConfig, out_dir: Path, split: ClassSplit | None = None,
                     epoch_callback=None) -> tuple[Classifier, TrainerState]:
    out_dir = Path(out_dir)
    paddle.seed(cfg.seed)
    np.random.seed(cfg.seed)
    split = split or load_split(cfg.data)
    _check(cfg, len(split.train))
    train_ds = make_dataset(cfg, split.train, train=True)
    val_ds = make_dataset(cfg, split.val, train=False)
    val_ds.preload()
    # drop_last: a last batch of one image would break BatchNorm statistics.
    loader = make_loader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                         num_workers=cfg.image.num_workers)
    model = build_model(cfg, split.num_classes)
    steps = len(train_ds) // cfg.batch_size
    scheduler = build_scheduler(cfg.optimizer, steps, cfg.epochs)
    optimizer = build_optimizer(cfg.optimizer, param_groups(model, cfg.optimizer.backbone_lr_mult), scheduler)
    engine_cfg = EngineConfig(epochs=cfg.epochs, eval_every=cfg.eval_every, keep_last=cfg.keep_last,
                              metric="top1", metric_mode="max", seed=cfg.seed, amp=cfg.amp, resume=cfg.resume)
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MODEL_CONFIG_FILE).write_text(
            json.dumps(model_config(cfg, split.num_classes), indent=2) + "\n")
        write_class_map(split, out_dir)
    logger.info("training classifier %s on %d images of %d classes (%d val; %d batches of %d per epoch)",
                cfg.backbone.get("name"), len(train_ds), split.num_classes, len(val_ds), steps, cfg.batch_size)
    trainer = Trainer(model, ClassifierTask(cfg, split.num_classes, val_ds), loader, optimizer, scheduler,
                      out_dir, engine_cfg, epoch_aware=[train_ds], on_epoch_end=epoch_callback)
    return model, trainer.fit()


def run_training(cfg: ClassifyConfig, out_dir: str | Path | None = None,
                 metrics_file: str | Path | None = None) -> dict[str, Any]:
    """Train in ``<out>.run/`` and promote it to ``out`` only once training completes.

    A failed or killed run keeps the last good ``out`` and leaves its checkpoints in the
    work directory for ``resume: latest``.
    """
    out_dir = Path(out_dir or cfg.out)
    main = is_main_process()
    work_dir, resume = prepare_work_dir(out_dir, cfg.resume, "classify", main)
    cfg = dataclasses.replace(cfg, resume=resume)
    start = time.perf_counter()
    _, state = train_classifier(cfg, work_dir)
    history = _read_history(work_dir / "history.csv")
    speeds = [float(r["images_per_s"]) for r in history if r.get("images_per_s")]
    summary = {"best_top1": state.best_metric, "best_epoch": state.best_epoch, "epochs": state.epoch,
               "train_minutes": round((time.perf_counter() - start) / 60, 2),
               "images_per_s": round(float(np.mean(speeds)), 2) if speeds else None,
               **{f"final_{k}": round(v, 6) for k, v in state.metrics.items()}}
    if main:
        write_json(work_dir / "summary.json", summary)
        replace_dir(work_dir, out_dir)
        if metrics_file is not None:
            write_json(metrics_file, summary)
    return summary


def _read_history(path: Path) -> list[dict[str, str]]:
    import csv

    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
