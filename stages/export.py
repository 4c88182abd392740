"""Stage `export`: Paddle inference model + ONNX + model.json for the trained extractor."""

from pathlib import Path

from visrec.config import Config
from visrec.inference.export import export_extractor
from visrec.training.extractor import load_trained
from visrec.utils.stage import main


def export(cfg: Config) -> None:
    model, model_cfg = load_trained(Path(cfg.paths.extractor), cfg.export.checkpoint)
    export_extractor(model, model_cfg, Path(cfg.paths.export) / "extractor", onnx=cfg.export.onnx)


if __name__ == "__main__":
    main("export", export)
