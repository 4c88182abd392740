"""Stage `train_extractor`: metric-learning training of the recognition model (shared engine)."""

from pathlib import Path

from visrec.config import Config
from visrec.data.cub import CUB_DIRNAME
from visrec.training.extractor_training import run_training
from visrec.workflows.stage_runner import main


def train(cfg: Config) -> None:
    run_training(cfg.extractor, Path(cfg.paths.raw) / CUB_DIRNAME, Path(cfg.paths.split),
                 Path(cfg.paths.extractor), Path(cfg.paths.metrics) / "train_extractor.json",
                 real_photos=cfg.data.real_photos)


if __name__ == "__main__":
    main("train_extractor", train)
