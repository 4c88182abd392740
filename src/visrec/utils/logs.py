"""Logging set-up for commands and stages.

Paddle installs an INFO root handler at import and Great Expectations then floods the
log, so the entry points call ``setup_logging`` *after* their imports: it replaces
whatever handlers a library installed with one plain handler and quiets chatty loggers.
"""

from __future__ import annotations

import logging
import os

NOISY_LOGGERS = ("great_expectations", "urllib3", "matplotlib", "PIL", "alembic", "git", "mlflow")


def setup_logging(level: str | int | None = None) -> None:
    level = level or os.environ.get("VISREC_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
