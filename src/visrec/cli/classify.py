"""``visrec classify``: image classification on the shared engine (params: ``classify``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from visrec.cli.common import CliError, OverrideOpt, ParamsOpt, fail_cleanly, images_in, load

classify_app = typer.Typer(help="Image classification: train, evaluate, export, predict (params: classify).",
                           no_args_is_help=True)


def _info_logs() -> None:
    """Training and evaluation report progress at INFO unless VISREC_LOG_LEVEL says otherwise."""
    if "VISREC_LOG_LEVEL" not in os.environ:
        logging.getLogger("visrec").setLevel(logging.INFO)


@classify_app.command("train")
@fail_cleanly
def classify_train(
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Train (or, with -o classify.resume=latest, continue) the classifier; prints the summary JSON."""
    from visrec.classification.train import run_training

    cfg = load(params, override)
    _info_logs()
    summary = run_training(cfg.classify)
    print(json.dumps({"run": cfg.classify.out, **summary}))


@classify_app.command("eval")
@fail_cleanly
def classify_eval(
    exported: Annotated[bool, typer.Option("--exported", help="evaluate the exported model (classify.export)")] = False,
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Top-1 / top-5 on the validation split, per-class accuracy CSV and confusion matrix PNG."""
    from visrec.classification.evaluate import evaluate_classifier

    cfg = load(params, override)
    _info_logs()
    print(json.dumps(evaluate_classifier(cfg.classify, exported=exported), ensure_ascii=False))


@classify_app.command("export")
@fail_cleanly
def classify_export(
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Export the trained classifier (Paddle inference files, ONNX, model.json with the class map)."""
    from visrec.classification.predict import export_run

    cfg = load(params, override)
    c = cfg.classify
    meta = export_run(c.out, c.export, c.checkpoint, onnx=c.onnx)
    print(json.dumps({"export": c.export, "fingerprint": meta["fingerprint"], "num_classes": meta["num_classes"],
                      "files": meta["files"]}))


@classify_app.command("predict")
@fail_cleanly
def classify_predict(
    path: Annotated[Path, typer.Argument(help="an image, or a folder searched recursively")],
    top_k: Annotated[int | None, typer.Option("--top-k", help="classes per image (default: classify.top_k)")] = None,
    exported: Annotated[bool, typer.Option(
        "--exported", help="use the exported model (classify.export) instead of the checkpoint")] = False,
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Top-k class ids, names and scores: one JSON line per image."""
    from visrec.classification.predict import ClassifierPredictor

    images = images_in(path)
    cfg = load(params, override)
    c = cfg.classify
    k = c.top_k if top_k is None else top_k
    if k < 1:
        raise CliError(f"--top-k must be >= 1, got {k}")
    if exported:
        predictor = ClassifierPredictor.from_export(c.export, c.backend, c.num_threads)
    else:
        predictor = ClassifierPredictor.from_run(c.out, c.checkpoint)
    failures = 0
    for result in predictor.predict_files(images, k):
        if "error" in result:
            if len(images) == 1:
                raise CliError(result["error"])
            failures += 1  # one bad file in a folder does not stop the others
        print(json.dumps(result, ensure_ascii=False), flush=True)
    if failures:
        raise CliError(f"{failures} of {len(images)} image(s) could not be read (see their JSON lines)")
