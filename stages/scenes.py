"""Stage `scenes`: the detector's extra generated scene sets, one per `detector.synthetic_styles` entry."""

from pathlib import Path

from visrec.config import Config
from visrec.data.scene_manifest import styles_for
from visrec.data.scenes import generate_scene_sets
from visrec.workflows.stage_runner import main


def scenes(cfg: Config) -> None:
    styles = styles_for(cfg.data, cfg.detector.synthetic_styles)
    generate_scene_sets(cfg.data.synthetic, styles, cfg.split.train_classes, Path(cfg.paths.scenes))


if __name__ == "__main__":
    main("scenes", scenes)
