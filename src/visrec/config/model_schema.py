"""The settings schema of the networks and their training: ``extractor``, ``detector`` and
``classify`` sections of ``params.yaml`` and the parts they share (optimizer, image, augment).

Shared parts hold generic defaults; each section's field gives its own (params.yaml's) values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class OptimizerConfig:
    name: Literal["momentum", "adamw"] = "momentum"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # The backbone's LR is lr * backbone_lr_mult (a lower one fine-tunes pretrained weights).
    backbone_lr_mult: float = 1.0
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: float = 1.0
    warmup_start_lr: float = 0.0
    eta_min: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [30, 60])
    gamma: float = 0.1
    grad_clip: float = 0.0  # global-norm clipping; 0 turns it off


@dataclass
class ImageConfig:
    """How images reach a network: size, box crop, and the backbone's normalisation."""

    size: int = 128
    crop_to_bbox: bool = True
    bbox_pad: float = 0.05  # fraction of the box side added around it
    # (x * scale - mean) / std per channel; null: the backbone's own (ImageNet's, or
    # (x - 127) / 128 for efficientnet_lite0, whose TF-Lite weights expect it)
    mean: list[float] | None = None
    std: list[float] | None = None
    scale: float = 0.00392156862745098  # 1/255
    cache_images: bool = True  # decode + resize every image once into memory
    num_workers: int = 0


@dataclass
class AugmentConfig:
    resize_scale: float = 1.15  # resize to size*resize_scale, then random-crop size
    random_resized_crop: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    flip_prob: float = 0.5
    rotate_degrees: float = 15.0
    rotate_prob: float = 0.5
    color_jitter: float = 0.2
    erase_prob: float = 0.3
    erase_sl: float = 0.02
    erase_sh: float = 0.4
    erase_r1: float = 0.3


@dataclass
class SamplerConfig:
    classes_per_batch: int = 16  # P
    images_per_class: int = 4  # K; batch size = P * K


@dataclass
class ExtractorConfig:
    """The recognition model (Backbone + Neck + Head, each built by name) and its training."""

    backbone: dict[str, Any] = field(default_factory=lambda: {
        "name": "efficientnet_lite0", "pretrained": "imagenet", "pool": "gem", "gem_p": 2.0})
    neck: dict[str, Any] | None = None  # null: the pooled backbone features are the embedding
    head: dict[str, Any] | None = field(default_factory=lambda: {"name": "ProxyHead"})
    losses: list[dict[str, Any]] = field(default_factory=lambda: [
        {"name": "ProxyAnchorLoss", "weight": 1.0, "alpha": 32.0, "delta": 0.1}])
    image: ImageConfig = field(default_factory=lambda: ImageConfig(size=224, bbox_pad=0.0))
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(rotate_degrees=0.0, erase_prob=0.0))
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        name="adamw", lr=0.003, weight_decay=0.0001, backbone_lr_mult=0.033, warmup_epochs=0.0))
    # Fine-tuning a pretrained backbone: freeze its first N units (layers in forward order;
    # "all" for every one) and/or keep every BN at its running statistics.
    frozen_units: int | Literal["all"] = 12
    freeze_bn: bool = True
    # Before fine-tuning, train only neck + head this many steps on backbone features computed
    # once (LP-FT): the backbone's first updates then follow trained proxies, not random ones.
    head_warmup_steps: int = 500
    # When training may change the weights. real_only: only on real photos (data.source is not
    # the synthetic generator); on synthetic shapes the published extractor is the pretrained
    # backbone as it is, since shapes cannot teach it anything that holds on real photos.
    finetune: Literal["real_only", "always", "never"] = "real_only"
    epochs: int = 2
    eval_every: int = 1
    # Evaluate the starting weights first: with a pretrained backbone the zero-shot model then
    # competes for best_model, and the pipeline keeps whichever of the two is better.
    eval_before_training: bool = True
    eval_batch_size: int = 64
    keep_last: int = 2
    # A checkpoint directory to continue from, or "latest": the unfinished run in
    # <paths.extractor>.run/ (training works there and is promoted when it completes).
    resume: str | None = None
    pretrained: str | None = None  # weights for the whole RecModel (a .pdparams); backbone-only via backbone.pretrained
    amp: bool = False
    seed: int = 0


@dataclass
class DetectorImageConfig:
    """How images reach the detector: square input, resize policy, normalisation."""

    size: int = 160  # network input side (a multiple of the largest stride)
    # keep_ratio: letterbox (scale to fit, pad the rest, centred); stretch: resize to size x size
    resize: Literal["keep_ratio", "stretch"] = "keep_ratio"
    mean: list[float] | None = None  # null: the backbone's own normalisation
    std: list[float] | None = None
    scale: float = 0.00392156862745098  # 1/255
    cache_images: bool = True  # decode every image once, longest side shrunk to `size`
    num_workers: int = 0


@dataclass
class DetectorAugmentConfig:
    """Box-safe training augmentations (every box stays whole and correct)."""

    crop_prob: float = 0.5  # random crop that keeps every box inside
    crop_min: float = 0.5  # smallest crop side, as a fraction of the image side
    flip_prob: float = 0.5
    zoom_out: list[float] = field(default_factory=lambda: [0.6, 1.0])  # fitted-image scale, placed at random
    color_jitter: float = 0.3  # brightness / contrast / saturation strength


@dataclass
class DetectorAssignConfig:
    """FCOS-style assignment: box size picks the levels, centre sampling picks locations."""

    # per stride, the range of a box's longer side (input pixels) it handles; ranges may overlap
    size_ranges: list[list[float]] = field(default_factory=lambda: [[0.0, 80.0], [40.0, 160.0], [80.0, 100000.0]])
    center_radius: float = 2.5  # positives lie within radius x stride of the box centre


@dataclass
class DetectorConfig:
    """The single-class mainbody detector (backbone + FPN + shared head) and its training."""

    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "efficientnet_lite0", "pretrained": "imagenet"})
    freeze_backbone: bool = True  # train only FPN + head (for a pretrained backbone)
    # where a frozen backbone's forward pass runs while FPN + head train: onnx | paddle (an exported
    # copy, same outputs, ~12x faster than eager) | eager
    frozen_backend: Literal["onnx", "paddle", "eager"] = "onnx"
    frozen_threads: int = 2
    strides: list[int] = field(default_factory=lambda: [8, 16, 32])
    neck_channels: int = 48  # FPN width
    head_convs: int = 2  # depthwise-separable convs in the shared head
    image: DetectorImageConfig = field(default_factory=DetectorImageConfig)
    augment: DetectorAugmentConfig = field(default_factory=DetectorAugmentConfig)
    assign: DetectorAssignConfig = field(default_factory=DetectorAssignConfig)
    qfl_beta: float = 2.0  # quality focal loss modulation
    giou_weight: float = 2.0
    # post-processing (shared by evaluation and the exported detector)
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_det: int = 5  # boxes kept per image, as PP-ShiTu
    pre_nms_top_k: int = 100
    synthetic_center_prior: float = 0.25  # trained on the generated set: scores weighed by closeness to the photo's centre
    synthetic_box_scale: float = 1.0  # trained on the generated set: its boxes grown this much at inference
    synthetic_extent_blend: float = 0.0  # trained on the generated set: boxes moved this far to the backbone's salient extent
    synthetic_consensus: bool = True  # trained on the generated set: scores from the agreement of the dense candidates
    # trained on the generated set: one more FPN + head per style, each trained on scenes generated
    # with data.synthetic changed by the style (the `scenes` stage), averaged with the first
    synthetic_styles: list[dict[str, Any]] = field(
        default_factory=lambda: [{"object_scale": [0.45, 1.1], "texture": 1.0}])
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        name="adamw", lr=0.008, weight_decay=0.0001, warmup_epochs=0.5, milestones=[]))
    batch_size: int = 32
    epochs: int = 5
    min_steps: int = 450  # more epochs when the data set is small (training/detector.epochs_for)
    eval_every: int = 5
    eval_images: int = 500  # validation images evaluated during training (0 = all); the final one uses all
    eval_batch_size: int = 64
    vis_images: int = 8  # validation images drawn in val_predictions.png
    keep_last: int = 2
    resume: str | None = None  # a checkpoint dir, or "latest" (the unfinished run in <paths.detector>.run/)
    pretrained: str | None = None  # weights for the whole detector (a .pdparams)
    amp: bool = False
    seed: int = 0


@dataclass
class ClassifyDataConfig:
    """Where the classifier's images and labels come from, and how train / val are split."""

    # cub: a CUB_200_2011 folder (class = label, its own train_test_split.txt is the split);
    # folder: one sub-folder per class (the folder name is the class name);
    # list: `relative/path label` lines, paths relative to `root`.
    type: Literal["cub", "folder", "list"] = "cub"
    root: str = "data/raw/CUB_200_2011"
    train_list: str | None = None  # type list: the training list file
    val_list: str | None = None  # type list: a separate validation list; null: hold out val_fraction
    delimiter: str | None = None  # list files: null splits at the last run of whitespace
    val_fraction: float = 0.2  # folder / list without val_list: share of each class held out
    split_seed: int = 0  # which images the val_fraction hold-out picks


@dataclass
class ClassifyConfig:
    """Image classification (`visrec classify ...`): a registry backbone + FC head on the shared engine."""

    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "efficientnet_lite0", "pretrained": "imagenet"})
    dropout: float = 0.2  # before the FC head
    frozen_units: int | Literal["all"] = 13  # first N backbone units keep their (pretrained) weights
    freeze_bn: bool = True  # every backbone BN at its running statistics
    label_smoothing: float = 0.1
    # mixup / cutmix on training batches (0 = off); with both on, each mixed batch picks one.
    # With either on, training top-1/top-5 are not logged (mixed targets have no single label).
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # share of batches mixed
    image: ImageConfig = field(default_factory=lambda: ImageConfig(size=224, crop_to_bbox=False))
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        rotate_degrees=0.0, color_jitter=0.2, erase_prob=0.0))
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        lr=0.02, weight_decay=1e-4, backbone_lr_mult=0.3))
    batch_size: int = 32
    eval_batch_size: int = 64
    epochs: int = 6
    eval_every: int = 2
    keep_last: int = 2
    resume: str | None = None  # a checkpoint dir, or "latest" (the unfinished run in <out>.run/)
    pretrained: str | None = None  # weights for the whole classifier (a .pdparams)
    amp: bool = False
    seed: int = 0
    out: str = "data/classify"  # the finished training run; evaluation writes to <out>/eval/
    checkpoint: Literal["best_model", "latest"] = "best_model"  # what eval / export / predict load
    export: str = "data/export/classifier"
    onnx: bool = True
    backend: Literal["paddle", "onnx"] = "paddle"  # for the exported model
    top_k: int = 5
    num_threads: int = 2
