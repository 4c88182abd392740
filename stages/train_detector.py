"""Stage `train_detector`: the single-class mainbody detector (shared engine), judged on unseen species."""

from pathlib import Path

from visrec.config import Config
from visrec.data.cub import CUB_DIRNAME
from visrec.data.scene_manifest import read_scene_sets, styles_for
from visrec.training.detector import run_training
from visrec.workflows.stage_runner import main


def train(cfg: Config) -> None:
    styles = styles_for(cfg.data, cfg.detector.synthetic_styles)
    run_training(cfg.detector, Path(cfg.paths.raw) / CUB_DIRNAME, Path(cfg.paths.split),
                 Path(cfg.paths.detector), Path(cfg.paths.metrics) / "train_detector.json",
                 scene_sets=read_scene_sets(Path(cfg.paths.scenes), styles, cfg.data.synthetic, cfg.split.train_classes))


if __name__ == "__main__":
    main("train_detector", train)
