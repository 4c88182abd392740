"""The shared shell of every ``stages/*.py`` script: args, params, logging, clean errors, a tracked run."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from visrec.config import Config, ConfigError, load_from_args, stage_argparser
from visrec.tracking import TrackingError, track_stage
from visrec.utils.logs import setup_logging

logger = logging.getLogger("visrec.stage")


class StageError(RuntimeError):
    """A stage failed for a reason the user can fix; the message says how."""


# Failures a user can fix, whose message says how: a stage and the `visrec` command print them as
# one `error:` line and exit 1 (VISREC_LOG_LEVEL=DEBUG shows the traceback). ValueError covers
# the config, layout, list-file, split and validation errors; OSError missing and unreadable files
# and downloads (DownloadError).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ConfigError, StageError, TrackingError, ValueError, OSError)


def run_stage(name: str, body: Callable[[Config], None], argv: list[str] | None = None) -> int:
    """Parse ``--params`` / ``-o`` overrides, run ``body(config)``, map known errors to exit 1.

    :data:`EXPECTED_ERRORS` (bad input: config, layout, split, download, validation) are
    printed as one ``error:`` line instead of a traceback. Each run
    is logged to MLflow afterwards (``visrec.tracking``, best effort unless
    ``tracking.required``).
    """
    args = stage_argparser(f"visrec stage '{name}'").parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    try:
        config = load_from_args(args)
        with track_stage(name, config):
            body(config)
    except EXPECTED_ERRORS as exc:
        logger.debug("stage '%s' failed", name, exc_info=True)  # VISREC_LOG_LEVEL=DEBUG shows it
        print(f"error: stage '{name}': {exc}", file=sys.stderr)
        return 1
    logger.info("stage '%s' done in %.1f s", name, time.perf_counter() - start)
    return 0


def main(name: str, body: Callable[[Config], None]) -> None:
    sys.exit(run_stage(name, body, sys.argv[1:]))
