"""Shared test helpers: tiny datasets written into temporary folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from autounet.data.geometry import Geometry
from autounet.data.image_io import write_image
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    """The shared real datasets (``$AUTOUNET_DATA`` or ``../shared/data`` beside the repository)."""
    for candidate in (os.environ.get("AUTOUNET_DATA"), REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if candidate and (Path(candidate) / "hippocampus" / "dataset.json").is_file():
            return Path(candidate)
    return None


def geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> Geometry:
    return Geometry(
        spacing=tuple(float(s) for s in spacing),
        origin_xyz=tuple(float(o) for o in origin),
        direction_xyz=tuple(float(d) for d in (np.eye(3).ravel() if direction is None else direction)),
    )


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, array, geometry(spacing, origin, direction))
    return path


def rewrite_descriptor(root: Path, **changes) -> dict:
    d = json.loads((root / "dataset.json").read_text())
    d.update(changes)
    (root / "dataset.json").write_text(json.dumps(d))
    return d


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture
def tiny_msd(tmp_path: Path) -> Path:
    """Five 1-channel MRI cases of about 12x14x16 voxels, 3 classes, MSD layout."""
    return make_synthetic_dataset(tmp_path / "tiny", SyntheticSpec(cases=5, shape=(12, 14, 16), classes=3, seed=1))


@pytest.fixture
def tiny_v2(tmp_path: Path) -> Path:
    """Four 2-channel cases in nnU-Net v2 layout (one file per channel)."""
    spec = SyntheticSpec(cases=4, shape=(10, 12, 14), channels=2, classes=3, seed=2, layout="nnunetv2")
    return make_synthetic_dataset(tmp_path / "tiny_v2", spec)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One PyTorch thread for a test module: tiny networks gain nothing from a second (and the
    inference engines follow torch's count)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
