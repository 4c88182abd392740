"""Stage `split`: first `split.train_classes` classes train, the rest test; lists + COCO JSON."""

from pathlib import Path

from visrec.config import Config
from visrec.data.cub import CUB_DIRNAME, read_cub
from visrec.data.split import write_split
from visrec.utils.fs import atomic_dir, write_json
from visrec.workflows.stage_runner import main


def split(cfg: Config) -> None:
    meta = read_cub(Path(cfg.paths.raw) / CUB_DIRNAME)
    with atomic_dir(cfg.paths.split) as out:
        stats = write_split(meta, cfg.split.train_classes, out)
    write_json(Path(cfg.paths.metrics) / "split.json", stats)


if __name__ == "__main__":
    main("split", split)
