"""What every ``visrec`` command shares: clean errors, params loading, the served settings, image paths."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from visrec.config import Config, load_config
from visrec.workflows.stage_runner import EXPECTED_ERRORS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file")]
OverrideOpt = Annotated[list[str] | None, typer.Option("-o", "--override", help="dotted override KEY=VALUE")]


class CliError(Exception):
    """A problem the user can fix; printed as one line."""


def fail_cleanly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected errors into ``error: ...`` on stderr and exit code 1 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from visrec.utils.logs import setup_logging

        setup_logging("WARNING" if "VISREC_LOG_LEVEL" not in __import__("os").environ else None)
        logging.getLogger("visrec").setLevel(logging.NOTSET)  # undo an earlier command's _info_logs
        try:
            return func(*args, **kwargs)
        except (CliError, KeyError, *EXPECTED_ERRORS) as exc:  # KeyError: e.g. an unknown gallery id
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


def load(params: Path, overrides: list[str] | None) -> Config:
    return load_config(params, overrides or [])


def served_config(params: Path, overrides: list[str] | None) -> Config:
    """As :func:`load`, with ``recognition`` naming what is served: the champion's models and
    gallery when one is published (``serve.champion``), else the pipeline's latest outputs."""
    import dataclasses

    from visrec.workflows.champion import served_recognition

    cfg = load(params, overrides)
    rec, _ = served_recognition(cfg, Path(params).resolve().parent)
    return dataclasses.replace(cfg, recognition=rec)


def images_in(path: Path) -> list[Path]:
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise CliError(f"{path} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return images
    if not path.exists():
        raise CliError(f"{path} does not exist: give an image file or a folder of images")
    return [path]
