"""The ``visrec`` command (``visrec.cli:app``): :mod:`~visrec.cli.main` (recognise, embed, gallery,
runs, champion) and :mod:`~visrec.cli.classify`, over :mod:`~visrec.cli.common`."""

from visrec.cli.main import app, main

__all__ = ["app", "main"]
