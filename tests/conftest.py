"""Shared fixtures: paths to the repo and to the real CUB subset beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUB_SUBSET = REPO.parent / "shared" / "data" / "cub_subset" / "CUB_200_2011"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cub_subset() -> Path:
    if not (CUB_SUBSET / "images.txt").exists():
        pytest.skip(f"real CUB subset not found at {CUB_SUBSET}")
    return CUB_SUBSET


@pytest.fixture(scope="session")
def tiny_cub(tmp_path_factory):
    """A small synthetic CUB folder and its class split: (raw CUB root, split dir).

    8 classes x 8 images at 64 px; classes 1-4 train, 5-8 test. Generated once per session.
    """
    from visrec.config import SyntheticConfig
    from visrec.data.cub import read_cub
    from visrec.data.split import write_split
    from visrec.data.synthetic import generate

    base = tmp_path_factory.mktemp("tiny_cub")
    root = generate(base / "raw", SyntheticConfig(num_classes=8, images_per_class=8, image_size=64,
                                                  workers=1, seed=5), progress=False)
    write_split(read_cub(root), 4, base / "split")
    return root, base / "split"
