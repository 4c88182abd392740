"""Training the feature extractor with the shared engine.

Data: the split stage's train list (P x K batches over the train classes) for training,
the test list (unseen classes, query = gallery, self removed) for validation, as in
PaddleClas's CUB protocol.
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

from visrec.config import ExtractorConfig
from visrec.data.cub import read_cub
from visrec.data.datasets import RetrievalDataset, make_loader
from visrec.data.split_list import read_split_list
from visrec.data.samplers import PKSampler
from visrec.data.transforms import build_transforms, train_resize_size
from visrec.training.embedding import dygraph_embed_fn, embed_dataset
from visrec.metrics.retrieval import retrieval_metrics
from visrec.models.registry import backbone_normalization
from visrec.models.weights import load_pretrained
from visrec.models.extractor import RecModel, build_rec_model, param_groups
from visrec.models.freezing import freeze_pretrained
from visrec.models.losses import CombinedLoss, build_loss
from visrec.training.checkpoint import prepare_work_dir
from visrec.training.engine import EngineConfig, Trainer, TrainerState, is_main_process
from visrec.training.head_warmup import warm_up_head
from visrec.training.optim import build_optimizer, build_scheduler
from visrec.utils.fs import replace_dir, write_json

logger = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
RETRIEVAL_KEYS = ("recall@1", "recall@5", "mAP", "MAP@R")


def normalization(cfg: ExtractorConfig) -> tuple[list[float], list[float]]:
    """The input mean/std: params, or the backbone's own when they are null."""
    return backbone_normalization(cfg.backbone.get("name", ""), cfg.image.mean, cfg.image.std)


def make_transform(cfg: ExtractorConfig, train: bool):
    img, aug = cfg.image, cfg.augment
    mean, std = normalization(cfg)
    common = {"mean": mean, "std": std, "scale": img.scale}
    if not train:
        return build_transforms(img.size, False, **common)
    return build_transforms(
        img.size, True, **common, resize_scale=aug.resize_scale,
        random_resized_crop=aug.random_resized_crop, crop_scale=tuple(aug.crop_scale),
        flip_prob=aug.flip_prob, rotate_degrees=aug.rotate_degrees, rotate_prob=aug.rotate_prob,
        color_jitter=aug.color_jitter, erase_prob=aug.erase_prob, erase_sl=aug.erase_sl,
        erase_sh=aug.erase_sh, erase_r1=aug.erase_r1)


def make_dataset(cfg: ExtractorConfig, raw_root: Path, list_file: Path, train: bool,
                 boxes: dict | None = None) -> RetrievalDataset:
    img = cfg.image
    # Train crops are cached a little larger than the input so random crops have room;
    # eval images at the input size, which makes cached and uncached samples identical.
    cache_size = train_resize_size(img.size, cfg.augment.resize_scale) if train else img.size
    return RetrievalDataset(
        raw_root, list_file, make_transform(cfg, train), boxes=boxes,
        crop_to_bbox=img.crop_to_bbox, bbox_pad=img.bbox_pad,
        cache_images=img.cache_images, cache_size=cache_size, seed=cfg.seed)


def build_model(cfg: ExtractorConfig, class_num: int) -> RecModel:
    model = build_rec_model(cfg.backbone, cfg.neck, cfg.head, class_num=class_num)
    if cfg.pretrained:
        missing, unexpected = load_pretrained(model, cfg.pretrained)
        logger.info("loaded %s (%d missing, %d unexpected keys)", cfg.pretrained, len(missing), len(unexpected))
    freeze_pretrained(model, cfg, "extractor")
    return model


def model_config(cfg: ExtractorConfig, class_num: int) -> dict[str, Any]:
    """What export and evaluation need to rebuild the network and feed it."""
    mean, std = normalization(cfg)  # resolved: model.json must say exactly what the network expects
    return {"backbone": cfg.backbone, "neck": cfg.neck, "head": cfg.head, "class_num": class_num,
            "image": {**asdict(cfg.image), "mean": mean, "std": std}}


def evaluate_retrieval(embed_fn, dataset: RetrievalDataset, batch_size: int,
                       progress: bool = False, return_per_query: bool = False) -> dict[str, Any]:
    """Query = gallery = ``dataset``; each query's own image is removed from its ranking."""
    feats, labels, ids = embed_dataset(embed_fn, dataset, batch_size, progress=progress)
    return retrieval_metrics(feats, labels, feats, labels, query_ids=ids, gallery_ids=ids,
                             ks=(1, 5), progress=False, return_per_query=return_per_query)


class ExtractorTask:
    def __init__(self, loss: CombinedLoss, eval_dataset: RetrievalDataset, eval_batch_size: int):
        self.loss = loss
        self.eval_dataset = eval_dataset
        self.eval_batch_size = eval_batch_size

    def train_step(self, model, batch):
        images, labels, _ = batch
        outputs = model(images, labels)
        return self.loss(outputs, labels)

    def evaluate(self, model) -> dict[str, float]:
        metrics = evaluate_retrieval(dygraph_embed_fn(model), self.eval_dataset, self.eval_batch_size)
        return {k: float(metrics[k]) for k in RETRIEVAL_KEYS}


def train_extractor(cfg: ExtractorConfig, raw_root: Path, split_dir: Path, out_dir: Path,
                    epoch_callback=None) -> tuple[RecModel, TrainerState]:
    raw_root, split_dir, out_dir = Path(raw_root), Path(split_dir), Path(out_dir)
    paddle.seed(cfg.seed)
    np.random.seed(cfg.seed)
    boxes = {img.image_id: img.box for img in read_cub(raw_root).images} if cfg.image.crop_to_bbox else None
    train_ds = make_dataset(cfg, raw_root, split_dir / "train_list.txt", train=True, boxes=boxes)
    eval_ds = make_dataset(cfg, raw_root, split_dir / "test_list.txt", train=False, boxes=boxes)
    train_ds.preload()
    eval_ds.preload()

    world = paddle.distributed.get_world_size()
    if world > 1:  # launched by paddle.distributed.launch: one process per device
        paddle.distributed.init_parallel_env()
    sampler = PKSampler(train_ds.labels, p=cfg.sampler.classes_per_batch, k=cfg.sampler.images_per_class,
                        seed=cfg.seed, rank=paddle.distributed.get_rank(), world_size=world)
    loader = make_loader(train_ds, batch_sampler=sampler, num_workers=cfg.image.num_workers)

    model = build_model(cfg, class_num=train_ds.num_classes)
    scheduler = build_scheduler(cfg.optimizer, len(sampler), cfg.epochs)
    optimizer = build_optimizer(cfg.optimizer, param_groups(model, cfg.optimizer.backbone_lr_mult), scheduler)
    engine_cfg = EngineConfig(epochs=cfg.epochs, eval_every=cfg.eval_every, keep_last=cfg.keep_last,
                              metric="recall@1", metric_mode="max", seed=cfg.seed, amp=cfg.amp,
                              resume=cfg.resume, eval_before_training=cfg.eval_before_training)
    task = ExtractorTask(build_loss(cfg.losses), eval_ds, cfg.eval_batch_size)
    if cfg.head_warmup_steps and not cfg.resume:  # a resumed run already has its warmed-up head
        warm_up_head(model, train_ds, task.loss, cfg.head_warmup_steps, cfg.optimizer.lr,
                     cfg.sampler.classes_per_batch * cfg.sampler.images_per_class, cfg.seed)
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_config(cfg, train_ds.num_classes), indent=2) + "\n")
    logger.info("training %s on %d images of %d classes (%d batches of %d per epoch)",
                cfg.backbone.get("name"), len(train_ds), train_ds.num_classes, len(sampler),
                cfg.sampler.classes_per_batch * cfg.sampler.images_per_class)
    trainer = Trainer(model, task, loader, optimizer, scheduler, out_dir, engine_cfg,
                      epoch_aware=[sampler, train_ds], on_epoch_end=epoch_callback)
    state = trainer.fit()
    return model, state


def finetune_allowed(cfg: ExtractorConfig, real_photos: bool) -> tuple[bool, str]:
    """Whether training may change the weights, and why (``extractor.finetune``)."""
    if cfg.finetune == "never":
        return False, "extractor.finetune is never"
    if not cfg.backbone.get("pretrained") and not cfg.pretrained:
        return True, "no pretrained weights: training is the only way to a usable model"
    if cfg.finetune == "real_only" and not real_photos:
        return False, ("the training photos are synthetic (data.source: synthetic) and extractor.finetune is "
                       "real_only: shapes cannot teach the pretrained backbone what holds on real photos")
    return True, f"extractor.finetune is {cfg.finetune}"


def keep_pretrained(cfg: ExtractorConfig, split_dir: Path, out_dir: Path) -> TrainerState:
    """A finished run with no training: the pretrained network saved as ``latest`` and ``best_model``."""
    from visrec.training.checkpoint import save_checkpoint

    class_num = len({e.label for e in read_split_list(Path(split_dir) / "train_list.txt")})
    paddle.seed(cfg.seed)  # the (unused) head's initial weights are part of the checkpoint: keep them fixed
    model = build_model(cfg, class_num=class_num)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_config(cfg, class_num), indent=2) + "\n")
    state = TrainerState()
    for name in ("latest", "best_model"):
        save_checkpoint(out_dir / "checkpoints" / name, model, None, state)
    return state


def run_training(cfg: ExtractorConfig, raw_root: Path, split_dir: Path, out_dir: Path,
                 metrics_file: Path, real_photos: bool = True) -> dict[str, Any]:
    """Train in ``<out_dir>.run/`` and promote it to ``out_dir`` only when training completes.

    A failed or killed run therefore leaves the last good ``out_dir`` in place, and its
    own checkpoints in the work directory for ``resume: latest``. When ``extractor.finetune``
    forbids training on these photos (``real_photos`` false: the synthetic generator), the
    finished run holds the pretrained network unchanged.
    """
    main = is_main_process()  # under paddle.distributed.launch only rank 0 touches files
    work_dir, resume = prepare_work_dir(out_dir, cfg.resume, "extractor", main)
    cfg = dataclasses.replace(cfg, resume=resume)
    start = time.perf_counter()
    finetune, reason = finetune_allowed(cfg, real_photos)
    if finetune:
        _, state = train_extractor(cfg, raw_root, split_dir, work_dir)
    else:
        logger.info("not training the extractor: %s; the published extractor is the pretrained %s",
                    reason, cfg.backbone.get("name"))
        state = keep_pretrained(cfg, split_dir, work_dir) if main else TrainerState()
    summary = {"finetuned": finetune, "finetune_reason": reason,
               "best_recall@1": state.best_metric, "best_epoch": state.best_epoch, "epochs": state.epoch,
               "train_minutes": round((time.perf_counter() - start) / 60, 2),
               **{f"final_{k}": round(v, 6) for k, v in state.metrics.items()}}
    if main:
        write_json(work_dir / "summary.json", summary)
        replace_dir(work_dir, out_dir)
        write_json(metrics_file, {k: v for k, v in summary.items() if k != "finetune_reason"})  # numbers only
    return summary


def load_trained(run_dir: Path, checkpoint: str = "best_model") -> tuple[RecModel, dict[str, Any]]:
    """Rebuild the network of a finished run and load one of its checkpoints."""
    from visrec.training.checkpoint import load_finished_run

    return load_finished_run(run_dir, checkpoint, "train_extractor", lambda cfg: build_rec_model(
        cfg["backbone"], cfg["neck"], cfg["head"], cfg["class_num"]))
