"""Stage `evaluate`: retrieval metrics of the exported extractor on the unseen classes, then the
whole recognition system (detector + extractor + gallery) on the held-back query photos.
Then both exports are registered in the MLflow model registry as alias ``candidate``
(``visrec.registry``; best effort unless ``tracking.required``, skipped if tracking is off)."""

import json
import logging
from pathlib import Path

from visrec.config import Config
from visrec.data.cub import CUB_DIRNAME
from visrec.evaluation.retrieval_eval import evaluate_extractor
from visrec.evaluation.system_eval import REPORT, evaluate_recognition
from visrec.index.build import QUERIES, read_queries
from visrec.tracking import TrackingError, resolve_uri
from visrec.training.extractor import MODEL_CONFIG_FILE
from visrec.utils.fs import atomic_dir, write_json
from visrec.utils.stage import main

logger = logging.getLogger("visrec.stage.evaluate")


def evaluate(cfg: Config) -> None:
    ev = cfg.evaluate
    model_config = json.loads((Path(cfg.paths.extractor) / MODEL_CONFIG_FILE).read_text())
    with atomic_dir(cfg.paths.evaluate) as out:
        metrics = evaluate_extractor(
            Path(cfg.paths.export) / "extractor", model_config, Path(cfg.paths.raw) / CUB_DIRNAME,
            Path(cfg.paths.split), out, backend=ev.backend, num_threads=cfg.runtime.num_threads,
            batch_size=ev.batch_size, max_k=ev.max_k, grid_queries=ev.grid_queries,
            baseline=ev.baseline, baseline_calib_images=ev.baseline_calib_images, seed=cfg.runtime.seed)
        queries = [q for q in read_queries(Path(cfg.paths.index) / QUERIES) if q.part == REPORT]
        metrics.update(evaluate_recognition(cfg.recognition, queries, out))
    write_json(Path(cfg.paths.metrics) / "evaluate.json", metrics)
    register_candidates(cfg, metrics)


def register_candidates(cfg: Config, metrics: dict) -> None:
    """Register both exports (alias ``candidate``) with their gate metrics: the extractor with this
    stage's metrics, the detector with ``det_AP50`` of ``train_detector.json``."""
    if not cfg.tracking.enabled:
        return
    try:
        from visrec.registry import log_and_register

        det_metrics_path = Path(cfg.paths.metrics) / "train_detector.json"
        det_metrics = json.loads(det_metrics_path.read_text()) if det_metrics_path.is_file() else {}
        export = Path(cfg.paths.export)
        for kind, values in (("extractor", metrics), ("detector", {"det_AP50": det_metrics.get("det_AP50")})):
            version = log_and_register(export / kind, kind, values, cfg.tracking)
            logger.info("registered %s version %s as 'candidate'", version.name, version.version)
    except Exception as exc:  # best effort unless tracking.required
        uri = resolve_uri(cfg.tracking.uri)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if cfg.tracking.required:
            raise TrackingError(f"registering the candidates at {uri} failed: {reason} "
                                "(tracking.required is true; set it to false to make this best effort)") from None
        logger.warning("registering the candidates at %s failed: %s; the stage result stands", uri, reason)


if __name__ == "__main__":
    main("evaluate", evaluate)
