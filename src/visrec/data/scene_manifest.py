"""Which generated scene sets the detector trains extra members on, and where they are.

Kept apart from ``visrec.data.scenes`` (which generates them) so that training reads the
manifest without depending on the generator's code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visrec.config.schema import DataConfig

MANIFEST = "scenes.json"
STYLES_KNOB = "detector.synthetic_styles"


def styles_for(data: DataConfig, styles: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The styles a pipeline on ``data`` trains members for: none on real photos (a detector
    trained on real boxes learned real objects; scenes would only dilute it)."""
    return [] if data.real_photos else list(styles)


def made_for(base: Any, train_classes: int) -> dict[str, Any]:
    """What a set of scenes depends on besides its styles: the generator settings they change, the split."""
    return {"synthetic": dataclasses.asdict(base), "train_classes": int(train_classes)}


def read_scene_sets(out_dir: str | Path, styles: Sequence[Mapping[str, Any]], base: Any = None,
                    train_classes: int | None = None) -> list[tuple[Path, Path]]:
    """``(raw root, split dir)`` of each style's set, checked against the styles asked for (and,
    when given, the generator settings and split they were made from)."""
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found: generate the detector's scenes first (dvc repro scenes)")
    contents = json.loads(manifest.read_text())
    entries = contents["styles"]
    made = [e["settings"] for e in entries]
    if made != [dict(s) for s in styles]:
        raise ValueError(f"{out_dir} holds scenes for the styles {made}, but {STYLES_KNOB} asks for "
                         f"{[dict(s) for s in styles]}: regenerate them (dvc repro scenes)")
    if entries and base is not None and train_classes is not None:
        if contents.get("made_for") != made_for(base, train_classes):
            raise ValueError(f"{out_dir} was generated from other data.synthetic / split.train_classes settings "
                             f"than the current ones: regenerate them (dvc repro scenes)")
    return [(out_dir / e["root"], out_dir / e["split"]) for e in entries]
