"""The settings schema: one dataclass per ``params.yaml`` section.

The defaults are params.yaml's values (``tests/test_config.py`` compares every field), so
``Config()`` and a config loaded from the repo's params build the same models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from visrec.config.model_schema import ClassifyConfig, DetectorConfig, ExtractorConfig

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
    scenes: str = "data/scenes"  # the detector's extra generated scene sets (detector.synthetic_styles)
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
class ExportConfig:
    checkpoint: Literal["best_model", "latest"] = "best_model"
    onnx: bool = True


@dataclass
class EvaluateConfig:
    backend: Literal["paddle", "onnx"] = "onnx"  # ONNX Runtime embeds the test split in 25 s, Paddle Inference 57 s
    batch_size: int = 64
    max_k: int = 20  # recall@k curve up to this k
    grid_queries: int = 6  # rows of the top-5 retrieval picture
    baseline: bool = True  # also evaluate the same architecture with random weights
    baseline_calib_images: int = 256  # BN statistics of the random baseline come from these


@dataclass
class MilvusConfig:
    """The Milvus gallery backend (``index.backend: milvus``). The access token is read from the
    environment (``VISREC_MILVUS_TOKEN``), never from params."""

    # A Milvus Lite data directory (one process at a time; relative to the working directory)
    # or a server URI such as http://milvus:19530 (any number of processes and hosts).
    uri: str = "data/milvus.db"
    alias_prefix: str = "visrec"  # served names (aliases) and their collections start with this
    # What a search waits for: Strong | Bounded | Session | Eventually (docs/deploy.md).
    consistency_level: Literal["Strong", "Bounded", "Session", "Eventually"] = "Session"
    keep_versions: int = 2  # collections kept per served name after a switch (the live one included)
    insert_batch: int = 2000  # rows per insert call


@dataclass
class IndexConfig:
    """The gallery: backend, index type and its knobs, and how the build_index stage fills it."""

    backend: Literal["faiss", "milvus"] = "faiss"  # where the vectors live (faiss: files under the gallery dir)
    milvus: MilvusConfig = field(default_factory=MilvusConfig)
    index_type: Literal["HNSW32", "IVF", "FLAT"] = "HNSW32"
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 64
    nprobe: int = 16  # IVF cells searched per query
    compact_fraction: float = 0.2  # HNSW: rebuild once this share of entries is deleted
    exact_below: int = 5_000  # HNSW/IVF galleries smaller than this are searched exhaustively (0: never)
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
    # auto: ONNX Runtime when the export has model.onnx (faster at recognition's batch sizes), else Paddle
    backend: Literal["auto", "paddle", "onnx"] = "auto"
    # The detector's runtime; auto: ONNX Runtime when the export has model.onnx, else backend.
    detector_backend: Literal["auto", "paddle", "onnx"] = "auto"
    num_threads: int = 2
    det_threshold: float = 0.5  # mainbody boxes kept above this detector score
    max_det: int = 5  # mainbody boxes per image, as PP-ShiTu
    det_box_scale: float | None = None  # detected boxes grown about their centres; None: the export's own
    det_center_prior: float | None = None  # sigma of the centre weighting of detector scores (0: none); None: the export's own
    det_extent_blend: float | None = None  # how far boxes move to the backbone's salient extent (0: none); None: the export's own
    whole_image_box: bool = True  # also recognise the whole image, as PP-ShiTu does
    # A cascade (needs whole_image_box): embed and search the whole image first; when its best
    # label passes the score threshold and leads the runner-up by at least this margin, skip the
    # detector (null: always detect, as PP-ShiTu). Real CUB: the same top-1 at ~1.6-1.9x the cost
    # of the whole image only instead of 2.5x, zero-shot and fine-tuned extractor (results.md).
    detect_unless_whole_margin: float | None = 0.02
    # Each detected object's label scores: (1 - w) x its own + w x the whole image's; the whole
    # image is then no result of its own when something is detected (0: PP-ShiTu's separate
    # results). 0.5: +0.7-0.8 points of top-1 on three real CUB sets, no cost (results.md).
    whole_context: float = 0.5
    top_k: int = 5  # gallery candidates searched per box
    # cosine similarity a recognition needs; null uses the threshold calibrated by build_index
    score_threshold: float | None = None
    default_threshold: float = 0.5  # when neither is set (a gallery built without calibration)
    nms_iou: float = 0.05  # class-agnostic NMS over recognised boxes (PP-ShiTu's rec_nms_thresold)
    # A box's score for a label: the mean of its best class_top_m similarities to that label's
    # gallery vectors (1: plain nearest neighbour), over the search_k nearest neighbours.
    class_top_m: int = 3
    search_k: int = 50
    # ... blended with the box's cosine to the label's centroid (unit mean of its gallery vectors):
    # (1 - w) x that score + w x the centroid's. 0: off (no pass over the gallery's vectors).
    centroid_weight: float = 0.5
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
    # Worker processes (VISREC_WORKERS overrides), each with its own models; every worker runs
    # its model calls on one thread with model_threads threads (null: recognition.num_threads
    # shared out among the workers), so N workers never ask for more threads than one would.
    # One single-threaded worker per core: 1.5x the /recognize photos/s of one worker with 2
    # threads on 2 cores (docs/results.md), at ~0.5 GB of memory per worker.
    workers: int = 2
    model_threads: int | None = None
    # Requests one worker handles at once (BentoML's `threads` for sync endpoints): upload
    # parsing, decoding and search of one request overlap with another's model call.
    request_threads: int = 2
    # Seconds between two reads of the served gallery's version by a worker (0: before every
    # request). A Faiss gallery's version is one readlink; a Milvus one costs a file read and two
    # RPCs, so replicas of a busy Milvus deployment poll every 0.5-1 s: another writer's change
    # then shows within that time; a worker's own changes and promotions show at once.
    gallery_poll_s: float = 0.0


@dataclass
class TrackingConfig:
    """MLflow tracking of every stage run (``visrec.tracking``); env MLFLOW_TRACKING_URI overrides ``uri``."""

    enabled: bool = True
    uri: str | None = None  # null: sqlite:///<repo>/mlruns.db, the repo being the stage's working directory
    artifact_root: str = "mlartifacts"  # artifact location of a newly created experiment in a local store
    experiment: str = "visrec"
    required: bool = False  # false: a tracking failure is a warning; true: it fails the stage


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
