"""Stage `build_index`: the Faiss gallery of the unseen classes + its calibrated rejection threshold."""

from pathlib import Path

from visrec.config import Config
from visrec.data.cub import CUB_DIRNAME
from visrec.workflows.build_index import run_build_index
from visrec.workflows.stage_runner import main


def build_index(cfg: Config) -> None:
    run_build_index(cfg, Path(cfg.paths.raw) / CUB_DIRNAME, Path(cfg.paths.split), Path(cfg.paths.index),
                    Path(cfg.paths.metrics) / "build_index.json")


if __name__ == "__main__":
    main("build_index", build_index)
