"""Training the mainbody detector with the shared engine.

Data: the split stage's ``train_coco.json`` for training and ``test_coco.json`` (unseen
species) for validation. During training a fixed, evenly spread subset of
``eval_images`` validation images is evaluated every ``eval_every`` epochs (it picks
``best_model`` by AP50); after training the best model is evaluated on the whole
validation set, and a picture of its predictions (red) beside the ground truth (green)
is written for a few validation images.

Trained on generated data, the detector gets one more FPN + head member per generated scene
style (``detector.synthetic_styles``, sets made by ``visrec.data.scenes``), each trained the
same way on its own scenes in ``members/styleK/``; the run's checkpoints then hold them all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paddle
from tqdm import tqdm

from visrec.config import Config, DetectorConfig
from visrec.imaging import load_image
from visrec.data.det_dataset import DetectionDataset, make_detection_loader
from visrec.inference.detection_post import NEUTRAL_CALIBRATION, check_calibration, postprocess
from visrec.inference.detector_runtime import DensePredictFn, dygraph_predict_fn, exported_predict_fn
from visrec.metrics.detection import DETECTION_KEYS, coco_detection_metrics
from visrec.models.registry import backbone_normalization
from visrec.models.weights import load_pretrained
from visrec.models.detector import DetectionLoss, MainbodyDetector, build_detector, check_input_size
from visrec.models.extractor import param_groups
from visrec.training.checkpoint import (load_checkpoint, load_finished_run, prepare_work_dir,
                                       prune_epoch_checkpoints, save_checkpoint)
from visrec.training.engine import EngineConfig, Trainer, TrainerState
from visrec.training.frozen_backbone import exported_stages
from visrec.training.optim import build_optimizer, build_scheduler
from visrec.utils.fs import replace_dir, write_json

logger = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
PREDICTIONS_PNG = "val_predictions.png"
SUMMARY_FILE = "summary.json"
TRAIN_COCO, VAL_COCO = "train_coco.json", "test_coco.json"


def normalization(cfg: DetectorConfig) -> tuple[list[float], list[float]]:
    """The input mean/std: params, or the backbone's own when they are null."""
    return backbone_normalization(cfg.backbone.get("name", ""), cfg.image.mean, cfg.image.std)


def make_dataset(cfg: DetectorConfig, raw_root: Path, coco_path: Path, train: bool,
                 max_images: int = 0) -> DetectionDataset:
    img, aug = cfg.image, cfg.augment
    mean, std = normalization(cfg)
    return DetectionDataset(
        raw_root, coco_path, img.size, img.resize, mean=mean, std=std, scale=img.scale, train=train,
        crop_prob=aug.crop_prob, crop_min=aug.crop_min, flip_prob=aug.flip_prob, zoom_out=tuple(aug.zoom_out),
        color_jitter=aug.color_jitter, cache_images=img.cache_images, max_images=max_images, seed=cfg.seed)


def detector_calibration(cfg: DetectorConfig, generated: bool) -> dict[str, Any]:
    """What the export adds to post-processing (``export_detector``'s keywords): after training on
    the generated set (``generated``), the ``synthetic_*`` settings; after real boxes, none: such a
    detector learned real extents, real scores and where photographers put things."""
    if not generated:
        return {**NEUTRAL_CALIBRATION, "consensus": False}
    calibration = {"box_scale": float(cfg.synthetic_box_scale), "center_prior": float(cfg.synthetic_center_prior),
                   "extent_blend": float(cfg.synthetic_extent_blend)}
    # checked here, where the knob's name is known; the runtime would blame its recognition override
    check_calibration(calibration, knob=lambda name: f"detector.synthetic_{name}")
    return {**calibration, "consensus": bool(cfg.synthetic_consensus)}


def export_calibration(cfg: Config) -> dict[str, Any]:
    """:func:`detector_calibration` of the pipeline's detector, trained on ``data.source``."""
    return detector_calibration(cfg.detector, generated=not cfg.data.real_photos)


def postprocess_params(cfg: DetectorConfig) -> dict[str, Any]:
    return {"score_threshold": cfg.score_threshold, "nms_iou": cfg.nms_iou, "max_det": cfg.max_det,
            "pre_nms_top_k": cfg.pre_nms_top_k}


def model_config(cfg: DetectorConfig, members: int = 1) -> dict[str, Any]:
    """What export and evaluation need to rebuild the network, feed it and read its outputs."""
    mean, std = normalization(cfg)  # resolved: model.json must say exactly what the network expects
    return {"backbone": cfg.backbone, "strides": cfg.strides, "neck_channels": cfg.neck_channels,
            "head_convs": cfg.head_convs, "members": members,
            "image": {**asdict(cfg.image), "mean": mean, "std": std}, "postprocess": postprocess_params(cfg)}


def build_model(cfg: DetectorConfig) -> MainbodyDetector:
    check_input_size(cfg.image.size, cfg.strides)
    model = build_detector(cfg)
    if cfg.pretrained:
        missing, unexpected = load_pretrained(model, cfg.pretrained)
        logger.info("loaded %s (%d missing, %d unexpected keys)", cfg.pretrained, len(missing), len(unexpected))
    if cfg.freeze_backbone:
        if not cfg.backbone.get("pretrained") and not cfg.pretrained:
            raise ValueError("detector.freeze_backbone is on but the backbone has no pretrained weights: "
                             "a frozen random backbone learns nothing (set backbone.pretrained, e.g. imagenet)")
        model.freeze_backbone()
    return model


def predict_dataset(predict_fn: DensePredictFn, dataset: DetectionDataset, batch_size: int,
                    post: Mapping[str, Any], progress: bool = False) -> dict[int, np.ndarray]:
    """``{image_id: [K, 5] x1 y1 x2 y2 score}`` (original pixels) for every image of ``dataset``."""
    if dataset.train:
        raise ValueError("predict_dataset needs an evaluation dataset (train=False): augmented inputs "
                         "cannot be mapped back to the original image")
    detections: dict[int, np.ndarray] = {}
    for start in tqdm(range(0, len(dataset), batch_size), desc="detecting", disable=not progress, leave=False):
        indices = range(start, min(start + batch_size, len(dataset)))
        items = [dataset[i] for i in indices]
        boxes, scores, saliency = predict_fn(np.stack([it[0] for it in items]))
        results = postprocess(boxes, scores, [dataset.resize_info(i) for i in indices], **post,
                              saliency=saliency, input_size=(dataset.size, dataset.size))
        detections.update({int(it[2]): dets for it, dets in zip(items, results, strict=True)})
    return detections


def evaluate_detector(predict_fn: DensePredictFn, dataset: DetectionDataset, batch_size: int,
                      post: Mapping[str, Any], progress: bool = False) -> tuple[dict[str, float], dict[int, np.ndarray]]:
    detections = predict_dataset(predict_fn, dataset, batch_size, post, progress=progress)
    metrics = coco_detection_metrics(dataset.coco_path, detections, max_det=int(post["max_det"]),
                                     image_ids=dataset.image_ids)
    return metrics, detections


class DetectorTask:
    def __init__(self, loss: DetectionLoss, eval_dataset: DetectionDataset, eval_batch_size: int,
                 post: Mapping[str, Any]):
        self.loss = loss
        self.eval_dataset = eval_dataset
        self.eval_batch_size = eval_batch_size
        self.post = dict(post)

    def train_step(self, model, batch):
        images, boxes, counts, _ = batch
        return self.loss(model, images, np.asarray(boxes), np.asarray(counts))

    def evaluate(self, model) -> dict[str, float]:
        metrics, _ = evaluate_detector(dygraph_predict_fn(model), self.eval_dataset, self.eval_batch_size, self.post)
        return metrics


def epochs_for(epochs: int, min_steps: int, steps_per_epoch: int) -> int:
    """``epochs``, raised so that training takes at least ``min_steps`` optimizer steps.

    A small data set needs more passes: 25 real CUB species are 47 batches an epoch against
    93 for the generated set, and 5 epochs on them gave real AP50 0.91 where 10 gave 0.956.
    """
    if steps_per_epoch <= 0 or min_steps <= 0:
        return epochs
    return max(epochs, math.ceil(min_steps / steps_per_epoch))


def build_loss(cfg: DetectorConfig) -> DetectionLoss:
    return DetectionLoss(cfg.strides, cfg.assign.size_ranges, cfg.assign.center_radius, cfg.qfl_beta,
                         cfg.giou_weight)


def train_detector(cfg: DetectorConfig, raw_root: Path, split_dir: Path, out_dir: Path,
                   epoch_callback=None) -> tuple[MainbodyDetector, TrainerState, dict[str, Any]]:
    """Train in ``out_dir`` (checkpoints, history.csv, model_config.json); returns model, state, data stats.

    ``epoch_callback(epoch, row, model)`` runs after each epoch (e.g. scoring on other data).
    """
    raw_root, split_dir, out_dir = Path(raw_root), Path(split_dir), Path(out_dir)
    paddle.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg)  # first: a bad architecture setting fails before data loading
    train_ds = make_dataset(cfg, raw_root, split_dir / TRAIN_COCO, train=True)
    eval_ds = make_dataset(cfg, raw_root, split_dir / VAL_COCO, train=False, max_images=cfg.eval_images)
    loader, sampler = make_detection_loader(train_ds, cfg.batch_size, cfg.seed, cfg.image.num_workers)
    eval_ds.preload()

    epochs = epochs_for(cfg.epochs, cfg.min_steps, len(sampler))
    if epochs != cfg.epochs:
        logger.info("%d epochs instead of %d: %d batches an epoch, detector.min_steps %d",
                    epochs, cfg.epochs, len(sampler), cfg.min_steps)
        cfg = dataclasses.replace(cfg, epochs=epochs)
    scheduler = build_scheduler(cfg.optimizer, len(sampler), cfg.epochs)
    optimizer = build_optimizer(cfg.optimizer, param_groups(model, cfg.optimizer.backbone_lr_mult), scheduler)
    engine_cfg = EngineConfig(epochs=cfg.epochs, eval_every=cfg.eval_every, keep_last=cfg.keep_last,
                              metric="AP50", metric_mode="max", seed=cfg.seed, amp=cfg.amp, resume=cfg.resume)
    task = DetectorTask(build_loss(cfg), eval_ds, cfg.eval_batch_size, postprocess_params(cfg))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_config(cfg), indent=2) + "\n")
    logger.info("training the detector on %d images (%d batches of %d per epoch), validating on %d",
                len(train_ds), len(sampler), cfg.batch_size, len(eval_ds))
    trainer = Trainer(model, task, loader, optimizer, scheduler, out_dir, engine_cfg,
                      epoch_aware=[sampler, train_ds],
                      on_epoch_end=None if epoch_callback is None else functools.partial(epoch_callback, model=model))
    with exported_stages(model, cfg.image.size, cfg.frozen_backend, cfg.frozen_threads):
        state = trainer.fit()
    stats = {"train_images": len(train_ds), "skipped_train": sum(train_ds.skipped.values()),
             "val_subset_images": len(eval_ds)}
    return model, state, stats


def train_scene_members(cfg: DetectorConfig, first: MainbodyDetector, scene_sets: Sequence[tuple[Path, Path]],
                        work_dir: Path) -> tuple[MainbodyDetector, dict[str, Any]]:
    """One more FPN + head per generated scene set (``visrec.data.scenes``), each trained like the
    first in ``work_dir/members/styleK/``; returns the detector holding them all and their figures.

    Resuming (``cfg.resume`` set) continues a member from its own latest checkpoint, if it has one.
    """
    trained, figures = [first], {}
    for index, (raw_root, split_dir) in enumerate(scene_sets, start=1):
        member_dir = work_dir / "members" / f"style{index}"
        latest = member_dir / "checkpoints" / "latest"
        member_cfg = dataclasses.replace(cfg, resume=str(latest) if cfg.resume and latest.exists() else None)
        logger.info("detector member %d of %d: scenes %s", index + 1, 1 + len(scene_sets), raw_root)
        member, state, stats = train_detector(member_cfg, raw_root, split_dir, member_dir)
        best = member_dir / "checkpoints" / "best_model"
        if best.exists():
            load_checkpoint(best, member)
        trained.append(member)
        figures[f"style{index}"] = {"best_subset_AP50": state.best_metric, "train_images": stats["train_images"]}
    ensemble = MainbodyDetector.from_members(trained)
    ensemble.eval()
    return ensemble, figures


def save_members(model: MainbodyDetector, cfg: DetectorConfig, work_dir: Path, state: TrainerState) -> None:
    """The whole detector becomes the run's ``best_model`` and ``latest`` (what export and resume
    load, with a ``model_config.json`` naming its members); the first member's per-epoch
    checkpoints go (they hold one member, and the config now says more)."""
    ckpt_dir = work_dir / "checkpoints"
    for name in ("best_model", "latest"):
        save_checkpoint(ckpt_dir / name, model, None, state)
    prune_epoch_checkpoints(ckpt_dir, 0)
    (work_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_config(cfg, len(model.members)), indent=2) + "\n")


def _draw(image: np.ndarray, boxes: np.ndarray, colour: tuple[int, int, int], scores: bool) -> None:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:  # an image with no detection above the threshold
        return
    for row in boxes.reshape(len(boxes), -1):
        x1, y1, x2, y2 = (int(round(v)) for v in row[:4])
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, 2)
        if scores and row.size > 4:
            cv2.putText(image, f"{row[4]:.2f}", (x1 + 2, max(y1 + 12, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        colour, 1, cv2.LINE_AA)


def write_prediction_sheet(dataset: DetectionDataset, detections: Mapping[int, np.ndarray], path: Path,
                           count: int = 8, tile: int = 200) -> Path | None:
    """PNG grid of ``count`` validation images: ground truth green, predictions red (with scores)."""
    if count <= 0 or len(dataset) == 0:
        return None
    tiles = []
    for record in dataset.records[:count]:
        image = load_image(record.path).copy()
        _draw(image, record.boxes, (0, 200, 0), scores=False)
        _draw(image, detections.get(record.image_id, np.zeros((0, 5))), (230, 0, 0), scores=True)
        fit = tile / max(image.shape[:2])
        image = cv2.resize(image, (round(image.shape[1] * fit), round(image.shape[0] * fit)),
                           interpolation=cv2.INTER_AREA)
        canvas = np.full((tile, tile, 3), 255, dtype=np.uint8)
        canvas[: image.shape[0], : image.shape[1]] = image
        tiles.append(canvas)
    cols = min(4, len(tiles))
    while len(tiles) % cols:
        tiles.append(np.full((tile, tile, 3), 255, dtype=np.uint8))
    rows = [np.concatenate(tiles[i:i + cols], axis=1) for i in range(0, len(tiles), cols)]
    sheet = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


def final_evaluation(model: MainbodyDetector, cfg: DetectorConfig, raw_root: Path, split_dir: Path,
                     out_dir: Path) -> dict[str, Any]:
    """The whole validation set with ``model`` (exported: eager Paddle would take minutes); writes
    the predictions picture into ``out_dir``."""
    dataset = make_dataset(cfg, raw_root, split_dir / VAL_COCO, train=False)
    dataset.preload()
    model.eval()
    with tempfile.TemporaryDirectory(prefix="visrec-det-eval-") as tmp:
        predict = exported_predict_fn(model, model_config(cfg, len(model.members)), Path(tmp) / "detector")
        metrics, detections = evaluate_detector(predict, dataset, cfg.eval_batch_size, postprocess_params(cfg),
                                                progress=True)
    write_prediction_sheet(dataset, detections, out_dir / PREDICTIONS_PNG, cfg.vis_images)
    logger.info("final evaluation on %d validation images: %s", len(dataset),
                ", ".join(f"{k} {metrics[k]:.4f}" for k in DETECTION_KEYS))
    return {**{k: round(metrics[k], 6) for k in DETECTION_KEYS}, "val_images": len(dataset),
            "skipped_val": sum(dataset.skipped.values())}


def run_training(cfg: DetectorConfig, raw_root: Path, split_dir: Path, out_dir: Path,
                 metrics_file: Path, scene_sets: Sequence[tuple[Path, Path]] = ()) -> dict[str, Any]:
    """Train in ``<out_dir>.run/``, evaluate the best model on all validation images, promote to ``out_dir``.

    ``scene_sets`` (``(raw root, split dir)`` of generated scene sets) each add a member trained
    on them (:func:`train_scene_members`). A failed or killed run leaves the last good
    ``out_dir`` in place, and its own checkpoints in the work directory for ``resume: latest``.
    """
    raw_root, split_dir, out_dir, metrics_file = Path(raw_root), Path(split_dir), Path(out_dir), Path(metrics_file)
    work_dir, resume = prepare_work_dir(out_dir, cfg.resume, "detector")
    cfg = dataclasses.replace(cfg, resume=resume)
    start = time.perf_counter()
    model, state, stats = train_detector(cfg, raw_root, split_dir, work_dir)
    train_minutes = (time.perf_counter() - start) / 60
    best = work_dir / "checkpoints" / "best_model"
    if best.exists():
        load_checkpoint(best, model)
    members: dict[str, Any] = {}
    if scene_sets:
        model, members = train_scene_members(cfg, model, scene_sets, work_dir)
        save_members(model, cfg, work_dir, state)
        train_minutes = (time.perf_counter() - start) / 60
    final = final_evaluation(model, cfg, raw_root, split_dir, work_dir)
    summary = {**final, "best_subset_AP50": state.best_metric, "best_epoch": state.best_epoch,
               "epochs": state.epoch, "train_minutes": round(train_minutes, 2), **stats,
               **({"members": members} if members else {})}
    write_json(work_dir / SUMMARY_FILE, summary)
    replace_dir(work_dir, out_dir)
    write_json(metrics_file, summary)
    return summary


def load_trained(run_dir: Path, checkpoint: str = "best_model") -> tuple[MainbodyDetector, dict[str, Any]]:
    """Rebuild the detector of a finished run and load one of its checkpoints."""
    return load_finished_run(run_dir, checkpoint, "train_detector", build_detector)
