"""Stage `export`: Paddle inference model + ONNX + model.json for the trained extractor and detector."""

from pathlib import Path

from visrec.config import Config
from visrec.inference.detector_runtime import export_detector
from visrec.inference.export import export_extractor
from visrec.training.detector import export_calibration
from visrec.training.detector import load_trained as load_trained_detector
from visrec.training.extractor_training import load_trained as load_trained_extractor
from visrec.workflows.stage_runner import main


def export(cfg: Config) -> None:
    out = Path(cfg.paths.export)
    model, model_cfg = load_trained_extractor(Path(cfg.paths.extractor), cfg.export.checkpoint)
    export_extractor(model, model_cfg, out / "extractor", onnx=cfg.export.onnx)
    detector, detector_cfg = load_trained_detector(Path(cfg.paths.detector), cfg.export.checkpoint)
    export_detector(detector, detector_cfg, out / "detector", onnx=cfg.export.onnx,
                    **export_calibration(cfg))


if __name__ == "__main__":
    main("export", export)
