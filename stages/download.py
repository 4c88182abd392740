"""Stage `download`: put CUB_200_2011 (official, local copy, or the embedded default) in data/raw."""

from pathlib import Path

from visrec.config import Config
from visrec.data.download import materialize
from visrec.workflows.stage_runner import main


def download(cfg: Config) -> None:
    materialize(cfg.data, Path(cfg.paths.raw), Path(cfg.paths.downloads))


if __name__ == "__main__":
    main("download", download)
