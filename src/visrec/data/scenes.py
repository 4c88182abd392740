"""Extra generated scene sets for the detector: the embedded generator run again in other styles.

A detector trained on generated scenes learns box sizes and what an object looks like from
one generator setting, and how that carries over to photos varies a lot with the setting and
the training seed (docs/experiments.md). Heads trained on differently styled scenes err
differently, so the detector averages one head per style (``MainbodyDetector`` members).
A style is a partial ``data.synthetic`` mapping (e.g. ``{texture: 1.0}``) laid over the
pipeline's own generator settings; each style's set is split like the pipeline's data.

Layout of the output folder (the ``scenes`` stage's DVC output)::

    scenes.json                      {"styles": [{"name", "settings", "root", "split"}, ...]}
    style1/CUB_200_2011/...          the generated set, CUB layout
    style1/split/{train,test}_coco.json ...
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visrec.config.schema import ConfigError, SyntheticConfig
from visrec.config.validation import build
from visrec.data.cub import read_cub
from visrec.data.scene_manifest import MANIFEST, STYLES_KNOB, made_for
from visrec.data.split import write_split
from visrec.utils.fs import atomic_dir, write_json

logger = logging.getLogger(__name__)


def styled(base: SyntheticConfig, style: Mapping[str, Any], index: int = 0) -> SyntheticConfig:
    """``base`` with the keys of ``style`` replaced, each checked like ``data.synthetic`` itself."""
    if not isinstance(style, Mapping):
        raise ConfigError(f"{STYLES_KNOB}[{index}] must be a mapping of data.synthetic keys, "
                          f"e.g. {{texture: 1.0}}; got {style!r}")
    return build(SyntheticConfig, {**dataclasses.asdict(base), **dict(style)}, prefix=f"{STYLES_KNOB}[{index}]")


def generate_scene_sets(base: SyntheticConfig, styles: Sequence[Mapping[str, Any]], train_classes: int,
                        out_dir: str | Path, progress: bool = True) -> list[dict[str, Any]]:
    """Generate and split one set per style into ``out_dir`` (replaced only when all succeed).

    No styles writes a manifest with none (a detector trained on real boxes needs no scenes).
    """
    configs = [styled(base, style, i) for i, style in enumerate(styles)]  # every style checked before any work
    entries = []
    with atomic_dir(out_dir) as tmp:
        for i, (style, cfg) in enumerate(zip(styles, configs, strict=True), start=1):
            name = f"style{i}"
            logger.info("generating scenes %s: %s", name, dict(style))
            from visrec.data.synthetic import generate  # lazy: heavy, and only generated data needs it

            root = generate(tmp / name, cfg, progress=progress)
            write_split(read_cub(root), train_classes, tmp / name / "split")
            entries.append({"name": name, "settings": dict(style), "root": f"{name}/{root.name}",
                            "split": f"{name}/split"})
        write_json(tmp / MANIFEST, {"styles": entries, "made_for": made_for(base, train_classes)})
    return entries
