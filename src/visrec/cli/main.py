"""The ``visrec`` command: recognise images, embed one, and manage the gallery.

    visrec recognize photo.jpg                  # one JSON line per image
    visrec recognize photos/ --visualize out/   # + a PNG per image with boxes and labels
    visrec extract photo.jpg                    # the embedding as JSON
    visrec gallery build list.txt               # a new gallery from 'relative/path<TAB>label' lines
    visrec gallery add more.txt
    visrec gallery remove --ids 3 --ids 7 | --label "Blue Jay"
    visrec gallery info
    visrec gallery migrate --to milvus          # serve the Faiss gallery from Milvus (params index.milvus)
    visrec runs compare --stage evaluate        # the latest tracked stage runs (MLflow) side by side
    visrec champion promote                     # the promotion gate: publish the candidate if no worse
    visrec champion show                        # the served champion's record
    visrec classify train | eval | export       # image classification (params: classify)
    visrec classify predict photos/ --top-k 5   # one JSON line per image: top-k class ids, names, scores

Settings come from ``params.yaml`` (``recognition`` and ``index`` sections) with dotted
overrides (``-o recognition.top_k=3``). ``recognize``, ``extract`` and ``gallery`` work on what
the service serves: the promoted champion's models and gallery when there is one (``serve.champion``),
else the pipeline's latest outputs named in ``recognition``. Errors are one ``error:`` line and exit code 1; a
failed gallery change leaves the saved gallery as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from visrec.cli.classify import classify_app
from visrec.cli.common import CliError, OverrideOpt, ParamsOpt, fail_cleanly, images_in, load, served_config
from visrec.config import Config

app = typer.Typer(help="visrec: PP-ShiTu style recognition (detect -> embed -> search a Faiss gallery).",
                  no_args_is_help=True, add_completion=False)
gallery_app = typer.Typer(help="Build, change and inspect the gallery.", no_args_is_help=True)
app.add_typer(gallery_app, name="gallery")
runs_app = typer.Typer(help="Compare the pipeline's tracked stage runs (MLflow).", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
champion_app = typer.Typer(help="The promoted models + gallery that the service serves.", no_args_is_help=True)
app.add_typer(champion_app, name="champion")
app.add_typer(classify_app, name="classify")


# ------------------------------------------------------------------------- recognize


@app.command()
@fail_cleanly
def recognize(
    path: Annotated[Path, typer.Argument(help="an image, or a folder searched recursively")],
    top_k: Annotated[int | None, typer.Option(help="gallery candidates per box")] = None,
    threshold: Annotated[float | None, typer.Option(help="score a result needs (default: calibrated)")] = None,
    visualize: Annotated[Path | None, typer.Option(help="write <name>.png with boxes and labels here")] = None,
    with_topk: Annotated[bool, typer.Option("--with-topk", help="add each box's top-k candidates")] = False,
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Recognise the objects in images: one JSON line per image."""
    from visrec.imaging import load_image
    from visrec.inference.pipeline import RecognitionSystem
    from visrec.inference.visualize import save_visualization

    images = images_in(path)
    cfg = served_config(params, override)
    system = RecognitionSystem.from_config(cfg.recognition)
    failures = 0
    for image_path in images:
        try:
            image = load_image(image_path)
        except OSError as exc:  # one bad file in a folder does not stop the others
            failures += 1
            print(json.dumps({"image": str(image_path), "error": str(exc)}, ensure_ascii=False))
            continue
        results = system.predict(image, top_k=top_k, threshold=threshold, return_topk=with_topk)
        print(json.dumps({"image": str(image_path), "results": results}, ensure_ascii=False), flush=True)
        if visualize is not None:
            save_visualization(image, results, visualize / f"{image_path.stem}.png", cfg.recognition.font)
    if failures:
        raise CliError(f"{failures} of {len(images)} image(s) could not be read (see their JSON lines)")


@app.command()
@fail_cleanly
def extract(
    image: Annotated[Path, typer.Argument(help="an image file")],
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Print the L2-normalised embedding of an image (the whole image) as JSON."""
    from visrec.imaging import load_image
    from visrec.inference.pipeline import load_extractor

    extractor = load_extractor(served_config(params, override).recognition)
    vector = extractor.embed([load_image(image)])[0]
    print(json.dumps({"image": str(image), "fingerprint": extractor.fingerprint, "dim": int(vector.size),
                      "embedding": [round(float(v), 7) for v in vector]}))


# ------------------------------------------------------------------------- gallery


def _load_gallery(cfg: Config):
    from visrec.index.factory import open_gallery

    return open_gallery(cfg.recognition.gallery, num_threads=cfg.recognition.num_threads)


@gallery_app.command("build")
@fail_cleanly
def gallery_build(
    list_file: Annotated[Path, typer.Argument(help="lines 'relative/path<delimiter>label'")],
    root: Annotated[Path | None, typer.Option(help="image paths are relative to this (default: the list's folder)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Build a new gallery from a list file (replaces the current one only once complete)."""
    from visrec.workflows.gallery import build_from_list

    gallery = build_from_list(served_config(params, override), list_file, root)
    print(json.dumps(gallery.info(), ensure_ascii=False))


@gallery_app.command("add")
@fail_cleanly
def gallery_add(
    list_file: Annotated[Path, typer.Argument(help="lines 'relative/path<delimiter>label'")],
    root: Annotated[Path | None, typer.Option(help="image paths are relative to this (default: the list's folder)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Add images to the gallery: new labels are recognised at once, no retraining."""
    from visrec.workflows.gallery import add_from_list

    result = add_from_list(served_config(params, override), list_file, root)
    print(json.dumps({k: result[k] for k in ("added", "ids", "count")}, ensure_ascii=False))


@gallery_app.command("remove")
@fail_cleanly
def gallery_remove(
    ids: Annotated[list[int] | None, typer.Option("--ids", help="gallery ids to remove (repeatable)")] = None,
    label: Annotated[str | None, typer.Option(help="remove every image of this label")] = None,
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Remove entries by id or by label (works on HNSW32, IVF and FLAT)."""
    if bool(ids) == (label is not None):
        raise CliError("give either --ids or --label (one of them)")
    from visrec.workflows.gallery import change_gallery

    cfg = served_config(params, override)

    def remove(gallery) -> int:
        if label is None:
            return gallery.remove(ids)
        removed = gallery.remove_label(label)
        if removed == 0:
            raise CliError(f"no gallery entry has label {label!r}: nothing removed "
                           "(`visrec gallery info` lists the labels)")
        return removed

    removed, gallery = change_gallery(cfg.recognition.gallery, remove, num_threads=cfg.recognition.num_threads)
    print(json.dumps({"removed": removed, "count": len(gallery)}, ensure_ascii=False))


@gallery_app.command("info")
@fail_cleanly
def gallery_info(
    labels: Annotated[bool, typer.Option("--labels", help="also list the labels with their counts")] = False,
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Print the gallery's metadata (type, size, fingerprint, threshold) as JSON."""
    cfg = served_config(params, override)
    gallery = _load_gallery(cfg)
    info = gallery.info()
    if labels:
        info["label_counts"] = dict(sorted(gallery.label_counts().items()))
    print(json.dumps(info, ensure_ascii=False, indent=2))


@gallery_app.command("migrate")
@fail_cleanly
def gallery_migrate(
    to: Annotated[str, typer.Option("--to", help="the backend to move the served gallery to: milvus")],
    gallery: Annotated[Path | None, typer.Option(help="the gallery directory (default: the served one)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Copy the served Faiss gallery (ids, labels, metadata, vectors, fingerprint) into a Milvus
    collection at index.milvus.uri and serve it from there; the Faiss files stay as the way back."""
    if to != "milvus":
        raise CliError(f"--to {to!r}: only 'milvus' is supported (to go back to Faiss, delete milvus.json "
                       "in the gallery directory: its Faiss versions were left in place)")
    from visrec.workflows.gallery import migrate_gallery

    cfg = served_config(params, override)
    print(json.dumps(migrate_gallery(cfg, gallery or Path(cfg.recognition.gallery)), ensure_ascii=False, indent=2))


# ------------------------------------------------------------------------- runs


def _csv(text: str | None) -> list[str] | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


@runs_app.command("compare")
@fail_cleanly
def runs_compare(
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: tracking.experiment)")] = None,
    stage: Annotated[str | None, typer.Option(help="only this stage's runs, e.g. evaluate")] = None,
    limit: Annotated[int, typer.Option(help="newest runs shown")] = 10,
    metrics: Annotated[str | None, typer.Option(help="comma-separated metrics, e.g. recall_at_1,mAP")] = None,
    show_params: Annotated[str | None, typer.Option(
        "--show-params", help="comma-separated params (default: those that differ between the runs)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    override: OverrideOpt = None,
) -> None:
    """Print the latest stage runs as a table: start, stage, commit, params hash, params, metrics."""
    from visrec.tracking import find_runs, resolve_uri, runs_table

    cfg = load(params, override)
    uri = resolve_uri(cfg.tracking.uri, Path(params).resolve().parent)
    try:
        runs = find_runs(uri, experiment or cfg.tracking.experiment, stage, limit)
    except ConnectionError as exc:
        raise CliError(f"tracking server {uri}: {exc}") from None
    print(runs_table(runs, _csv(metrics), _csv(show_params)))


# ------------------------------------------------------------------------- champion


@champion_app.command("show")
@fail_cleanly
def champion_show(params: ParamsOpt = Path("params.yaml"), override: OverrideOpt = None) -> None:
    """Print the live champion's record (metrics, time, commit, carried-over gallery changes) as JSON."""
    from visrec.utils.fs import resolve_under
    from visrec.workflows.champion import champion_record

    cfg = load(params, override)
    root = resolve_under(cfg.paths.champion, Path(params).resolve().parent)
    record = champion_record(root)
    if record is None:
        raise CliError(f"no champion under {root} yet: run the promotion gate (`visrec champion promote`)")
    print(json.dumps(record, indent=2, ensure_ascii=False))


@champion_app.command("promote")
@fail_cleanly
def champion_promote(params: ParamsOpt = Path("params.yaml")) -> None:
    """Run the promotion gate on the pipeline's latest outputs: with tracking on, on the MLflow
    registry aliases; else on the champion's recorded metrics. Prints the decision as JSON."""
    from visrec.workflows.promotion import run_promotion_gate

    params = Path(params).resolve()
    try:
        result = run_promotion_gate(params.parent, params.name)
    except ConnectionError as exc:
        raise CliError(f"tracking server: {exc} (set tracking.enabled: false to use the file-based gate)") from None
    print(json.dumps(result, indent=2, default=str))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
