"""Stage `evaluate`: retrieval metrics of the exported extractor on the unseen classes, then the
whole recognition system (detector + extractor + gallery) on the held-back query photos.
Then both exports are registered in the MLflow model registry as alias ``candidate``
(``visrec.workflows.promotion``; best effort unless ``tracking.required``, skipped if tracking is off)."""

import json
from pathlib import Path

from visrec.config import Config
from visrec.data.cub import CUB_DIRNAME
from visrec.evaluation.retrieval_eval import evaluate_extractor
from visrec.evaluation.system_eval import QUERIES_FILE, REPORT, evaluate_recognition, read_queries
from visrec.training.extractor_training import MODEL_CONFIG_FILE
from visrec.utils.fs import atomic_dir, write_json
from visrec.workflows.promotion import register_candidates
from visrec.workflows.stage_runner import main


def evaluate(cfg: Config) -> None:
    ev = cfg.evaluate
    model_config = json.loads((Path(cfg.paths.extractor) / MODEL_CONFIG_FILE).read_text())
    with atomic_dir(cfg.paths.evaluate) as out:
        metrics = evaluate_extractor(
            Path(cfg.paths.export) / "extractor", model_config, Path(cfg.paths.raw) / CUB_DIRNAME,
            Path(cfg.paths.split), out, backend=ev.backend, num_threads=cfg.runtime.num_threads,
            batch_size=ev.batch_size, max_k=ev.max_k, grid_queries=ev.grid_queries,
            baseline=ev.baseline, baseline_calib_images=ev.baseline_calib_images, seed=cfg.runtime.seed)
        queries = [q for q in read_queries(Path(cfg.paths.index) / QUERIES_FILE) if q.part == REPORT]
        metrics.update(evaluate_recognition(cfg.recognition, queries, out))
    write_json(Path(cfg.paths.metrics) / "evaluate.json", metrics)
    register_candidates(cfg, metrics)


if __name__ == "__main__":
    main("evaluate", evaluate)
