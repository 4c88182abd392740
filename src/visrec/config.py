"""Typed settings loaded from ``params.yaml``, with dotted command-line overrides.

``params.yaml`` is the single source of truth: each section maps onto one dataclass
below, and ``load_config`` refuses unknown keys and wrong types with a message that
names the key and the expected type, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
CUB_MD5 = "97eceeb196236b17998738112f37df78"


class ConfigError(ValueError):
    """A params file or override that does not match the typed schema."""


@dataclass
class PathsConfig:
    """Where each stage writes; ``dvc.yaml`` reads the same keys via ``${paths.*}``."""

    raw: str = "data/raw"
    downloads: str = "data/downloads"
    split: str = "data/split"
    validate: str = "data/validate"
    metrics: str = "data/metrics"
    extractor: str = "data/extractor"  # the finished training run (checkpoints, history)
    detector: str = "data/detector"  # the finished detector run (training works in data/detector.run/)
    export: str = "data/export"  # exported models: extractor/, detector/
    evaluate: str = "data/evaluate"
    index: str = "data/index"  # build_index's lists: gallery_list.txt, queries.jsonl, calibration.json
    champion: str = "data/champion"  # the promoted models + gallery, published by the promotion gate


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "gpu"] = "auto"
    num_threads: int = 2
    seed: int = 0


@dataclass
class SyntheticConfig:
    """The embedded default data set: procedurally drawn bird-like objects."""

    num_classes: int = 200
    images_per_class: int = 30
    image_size: int = 160
    seed: int = 0
    occlusion_prob: float = 0.25
    clutter_shapes: int = 12
    # longest object side / image side; above 1 the object is cut by the frame
    object_scale: list[float] = field(default_factory=lambda: [0.35, 0.8])
    texture: float = 0.0  # photo-like detail on backdrop and object, 0..1
    workers: int = 2


@dataclass
class DataConfig:
    # "synthetic" (embedded default), "cub" (official archive), or a path to a local
    # CUB_200_2011.tgz / extracted CUB_200_2011 folder.
    source: str = "synthetic"
    url: str = CUB_URL
    md5: str = CUB_MD5
    timeout_s: float = 30.0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def real_photos(self) -> bool:
        """False for the embedded generator's synthetic shapes; every other source is real CUB."""
        return self.source != "synthetic"


@dataclass
class SplitConfig:
    # PaddleClas's CUB protocol: the first N classes train, the rest are unseen test classes.
    train_classes: int = 100


@dataclass
class ValidateConfig:
    min_per_class: int = 5
    min_width: int = 32
    min_height: int = 32
    # Real CUB has a few boxes a pixel or two past the edge: those are clipped and
    # counted; an overshoot larger than this fraction of the image side is an error.
    max_box_overshoot: float = 0.1
    report_samples: int = 16
    max_failed_rows: int = 5


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

    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "mobilenet_v1", "scale": 0.5})
    neck: dict[str, Any] | None = field(default_factory=lambda: {"name": "FCNeck", "embedding_size": 512})  # null: pooled backbone features
    head: dict[str, Any] | None = field(
        default_factory=lambda: {"name": "ArcMarginHead", "margin": 0.2, "scale": 30.0})
    losses: list[dict[str, Any]] = field(default_factory=lambda: [
        {"name": "CELoss", "weight": 1.0, "epsilon": 0.1},
        {"name": "TripletAngularMarginLoss", "weight": 1.0, "margin": 0.5},
    ])
    image: ImageConfig = field(default_factory=ImageConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Fine-tuning a pretrained backbone: freeze its first N units (layers in forward order;
    # "all" for every one) and/or keep every BN at its running statistics.
    frozen_units: int | Literal["all"] = 0
    freeze_bn: bool = False
    # Before fine-tuning, train only neck + head this many steps on backbone features computed
    # once (LP-FT): the backbone's first updates then follow trained proxies, not random ones.
    head_warmup_steps: int = 0
    # When training may change the weights. real_only: only on real photos (data.source is not
    # the synthetic generator); on synthetic shapes the published extractor is the pretrained
    # backbone as it is, since shapes cannot teach it anything that holds on real photos.
    finetune: Literal["real_only", "always", "never"] = "real_only"
    epochs: int = 10
    eval_every: int = 2
    # Evaluate the starting weights first: with a pretrained backbone the zero-shot model then
    # competes for best_model, and the pipeline keeps whichever of the two is better.
    eval_before_training: bool = False
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

    size: int = 128  # network input side (a multiple of the largest stride)
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
    size_ranges: list[list[float]] = field(default_factory=lambda: [[0.0, 64.0], [32.0, 128.0], [64.0, 100000.0]])
    center_radius: float = 2.5  # positives lie within radius x stride of the box centre


@dataclass
class DetectorConfig:
    """The single-class mainbody detector (backbone + FPN + shared head) and its training."""

    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "mobilenet_v1", "scale": 0.25})
    freeze_backbone: bool = False  # train only FPN + head (for a pretrained backbone)
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
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        name="adamw", lr=0.004, weight_decay=0.0001, warmup_epochs=0.5, milestones=[]))
    batch_size: int = 32
    epochs: int = 6
    min_steps: int = 450  # more epochs when the data set is small (see training/detector.epochs_for)
    eval_every: int = 2
    eval_images: int = 500  # validation images evaluated during training (0 = all); the final one uses all
    eval_batch_size: int = 64
    vis_images: int = 8  # validation images drawn in val_predictions.png
    keep_last: int = 2
    resume: str | None = None  # a checkpoint dir, or "latest" (the unfinished run in <paths.detector>.run/)
    pretrained: str | None = None  # weights for the whole detector (a .pdparams)
    amp: bool = False
    seed: int = 0


@dataclass
class ExportConfig:
    checkpoint: Literal["best_model", "latest"] = "best_model"
    onnx: bool = True


@dataclass
class EvaluateConfig:
    backend: Literal["paddle", "onnx"] = "paddle"
    batch_size: int = 64
    max_k: int = 20  # recall@k curve up to this k
    grid_queries: int = 6  # rows of the top-5 retrieval picture
    baseline: bool = True  # also evaluate the same architecture with random weights
    baseline_calib_images: int = 256  # BN statistics of the random baseline come from these


@dataclass
class IndexConfig:
    """The Faiss gallery: index type and its knobs, and how the build_index stage fills it."""

    index_type: Literal["HNSW32", "IVF", "FLAT"] = "HNSW32"
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 64
    nprobe: int = 16  # IVF cells searched per query
    compact_fraction: float = 0.2  # HNSW: rebuild once this share of entries is deleted
    delimiter: str = "\t"  # gallery list files: relative/path<delimiter>label
    gallery_per_class: int = 5  # test-split images per class put in the gallery; the rest are queries
    open_set_fraction: float = 0.2  # test classes left out of a gallery copy to measure rejection
    calibration_fraction: float = 0.5  # queries used to choose the rejection threshold (rest: report)
    batch_size: int = 64
    seed: int = 0


@dataclass
class RecognitionConfig:
    """The recognition system: detector + extractor + gallery, and its post-processing."""

    # What the system loads (build_index writes the gallery; the other two come from export).
    detector: str | None = "data/export/detector"  # null: the whole image is the one object
    extractor: str = "data/export/extractor"
    gallery: str = "data/gallery"
    backend: Literal["paddle", "onnx"] = "paddle"
    # The detector's runtime; auto: ONNX Runtime when the export has model.onnx, else backend.
    # ONNX Runtime runs the small detector at ~1 ms a photo where Paddle Inference takes ~5 ms.
    detector_backend: Literal["auto", "paddle", "onnx"] = "auto"
    num_threads: int = 2
    det_threshold: float = 0.5  # mainbody boxes kept above this detector score
    max_det: int = 5  # mainbody boxes per image, as PP-ShiTu
    whole_image_box: bool = True  # also recognise the whole image, as PP-ShiTu does
    top_k: int = 5  # gallery candidates searched per box
    # cosine similarity a recognition needs; null uses the threshold calibrated by build_index
    score_threshold: float | None = None
    default_threshold: float = 0.5  # when neither is set (a gallery built without calibration)
    nms_iou: float = 0.05  # class-agnostic NMS over recognised boxes (PP-ShiTu's rec_nms_thresold)
    # A box's score for a label: the mean of its best class_top_m similarities to that label's
    # gallery vectors (1: plain nearest neighbour), over the search_k nearest neighbours.
    class_top_m: int = 3
    search_k: int = 50
    # Gallery images are embedded as these views, each a vector of the same label:
    # whole (the photo), object (its known box, else the detector's best box, if any).
    gallery_views: list[str] = field(default_factory=lambda: ["whole", "object"])
    font: str | None = None  # a TTF/OTF font for visualisations; null finds a Unicode (CJK) font if any


@dataclass
class ServeConfig:
    """The BentoML service (`make serve`); VISREC_MAX_UPLOAD_MB / VISREC_MAX_PIXELS override."""

    host: str = "127.0.0.1"
    port: int = 3000
    max_upload_mb: float = 10.0  # larger uploads get 413 before they are read
    max_pixels: int = 40_000_000  # declared width x height above this is refused before decoding
    # /embed groups concurrent requests into one extractor call with BentoML's adaptive dispatcher,
    # run in-process (VISREC_ADAPTIVE_BATCHING overrides): 1.4-1.9x the req/s at 16 clients here.
    adaptive_batching: bool = True
    max_batch_size: int = 32  # adaptive batching: most images per extractor call
    max_batch_latency_ms: int = 1000  # adaptive batching: a request waiting longer is refused (503)
    # Serve the promoted champion (paths.champion) when there is one; false, or none promoted
    # yet: the pipeline's latest outputs named in `recognition`.
    champion: bool = True
    # Images added through /gallery/add are kept here (content-addressed), so a new champion's
    # extractor can re-embed them when it replaces the old one.
    upload_dir: str = "data/gallery_uploads"


@dataclass
class TrackingConfig:
    """MLflow tracking of every stage run (``visrec.tracking``); env MLFLOW_TRACKING_URI overrides ``uri``."""

    enabled: bool = True
    uri: str | None = None  # null: sqlite:///<repo>/mlruns.db, the repo being the stage's working directory
    artifact_root: str = "mlartifacts"  # artifact location of a newly created experiment in a local store
    experiment: str = "visrec"
    required: bool = False  # false: a tracking failure is a warning; true: it fails the stage


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
    frozen_units: int | Literal["all"] = 0  # first N backbone units keep their (pretrained) weights
    freeze_bn: bool = False  # every backbone BN at its running statistics
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
        lr=0.02, weight_decay=1e-4, backbone_lr_mult=0.5))
    batch_size: int = 32
    eval_batch_size: int = 64
    epochs: int = 10
    eval_every: int = 1
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


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked against ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r} in the schema")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(
                f"unknown key '{where}' (known keys{' of ' + prefix if prefix else ''}: {', '.join(sorted(known))})"
            )
    kwargs = {}
    for name in known:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'split.train_classes=100'`` -> (['split', 'train_classes'], 100); values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. split.train_classes=100")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    return _build(Config, raw or {})


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file (run from the repository root or pass --params)")
    with path.open(encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def stage_argparser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, e.g. -o split.train_classes=25 (repeatable)",
    )
    return parser


def load_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.override)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b.c': value}; used for logging params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
