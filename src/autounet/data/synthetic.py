"""Synthetic segmentation datasets in MSD (or nnU-Net v2) layout, for tests and the demo.

Each case is a "body" (an ellipsoid) holding one blob per foreground class. Classes differ in
intensity (differently in each channel), cases differ in size, position and, for MRI, intensity
scale; Gaussian noise and a slight blur make the task non-trivial but learnable by a small
network in minutes. MRI cases are 0 outside the body (so cropping and the nonzero mask matter);
CT cases are -1000 HU there, as air.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from autounet.data.geometry import Geometry
from autounet.data.image_io import write_image
from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write, atomic_write_json

MRI_CHANNEL_NAMES = ("T1", "T2", "FLAIR", "T1c")


MAX_CASES = 10_000


@dataclass(frozen=True)
class SyntheticSpec:
    cases: int = 12
    shape: tuple[int, int, int] = (32, 40, 36)  # (Z, Y, X) voxels, varied +-10% per case
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (z, y, x) mm
    spacing_jitter: float = 0.0  # per case, each axis's spacing is scaled by up to +-this fraction
    modality: str = "MRI"  # "MRI" or "CT"
    channels: int = 1
    classes: int = 3  # including background
    seed: int = 0
    test_cases: int = 0  # extra cases written to imagesTs/ and labelsTs/
    layout: str = "msd"  # "msd" or "nnunetv2"

    def validate(self) -> None:
        if self.cases < 1:
            raise AutounetError("--cases must be at least 1")
        if len(self.shape) != 3 or min(self.shape) < 4:
            raise AutounetError(f"--shape needs three sizes of at least 4 voxels, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise AutounetError(f"--spacing needs three positive values (mm), got {self.spacing}")
        if self.modality.upper() not in ("MRI", "CT"):
            raise AutounetError(f"--modality must be MRI or CT, got {self.modality!r}")
        if not 1 <= self.channels <= 8:
            raise AutounetError("--channels must be between 1 and 8")
        if not 2 <= self.classes <= 20:
            raise AutounetError("--classes must be between 2 (background + 1) and 20")
        if not 0 <= self.spacing_jitter < 0.5:
            raise AutounetError("--spacing-jitter must be in [0, 0.5)")
        if self.test_cases < 0:
            raise AutounetError("--test-cases cannot be negative")
        if self.cases + self.test_cases > MAX_CASES:  # a typo would otherwise fill the disk for hours
            raise AutounetError(
                f"--cases + --test-cases must be at most {MAX_CASES}, got {self.cases + self.test_cases}"
            )
        if self.layout not in ("msd", "nnunetv2"):
            raise AutounetError(f"layout must be 'msd' or 'nnunetv2', got {self.layout!r}")


def _ellipsoid(grid: list[np.ndarray], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def make_case(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One synthetic case: image ``(C, Z, Y, X)`` float32, label ``(Z, Y, X)`` uint8, geometry."""
    rng = np.random.default_rng([spec.seed, index])
    shape = tuple(max(4, int(round(s * rng.uniform(0.9, 1.1)))) for s in spec.shape)
    spacing = np.asarray(spec.spacing, dtype=float)
    if spec.spacing_jitter:
        spacing = spacing * rng.uniform(1 - spec.spacing_jitter, 1 + spec.spacing_jitter, 3)
    extent = np.asarray(shape) * spacing  # mm
    grid = [(np.arange(n) + 0.5) * sp for n, sp in zip(shape, spacing)]
    grid = np.meshgrid(*grid, indexing="ij")

    body_center = extent / 2 + rng.uniform(-0.05, 0.05, 3) * extent
    body_radii = extent * rng.uniform(0.36, 0.44, 3)
    body = _ellipsoid(grid, body_center, body_radii)
    label = np.zeros(shape, np.uint8)
    for k in range(1, spec.classes):
        radii = np.maximum(body_radii * rng.uniform(0.28, 0.42, 3), 1.5 * spacing)
        offset = rng.uniform(-0.45, 0.45, 3) * (body_radii - radii).clip(min=0)
        label[_ellipsoid(grid, body_center + offset, radii) & body] = k

    ct = spec.modality.upper() == "CT"
    image = np.empty((spec.channels, *shape), np.float32)
    for c in range(spec.channels):
        crng = np.random.default_rng([spec.seed, index, c])
        # Distinct intensity levels, assigned to the classes in a different order in each channel
        # so that channels carry complementary contrast (index 0 is the body outside the blobs).
        levels = (40.0 + 80.0 * np.arange(spec.classes)) if ct else (100.0 + 60.0 * np.arange(spec.classes))
        means = levels[(np.arange(spec.classes) + c) % spec.classes]
        vol = means[label].astype(np.float32)
        vol = ndimage.gaussian_filter(vol, sigma=0.6 / np.minimum(spacing / spacing.min(), 3.0))
        vol += crng.normal(0.0, 12.0 if ct else 10.0, shape).astype(np.float32)
        if ct:
            vol[~body] = -1000.0
        else:
            vol *= crng.uniform(0.5, 2.0)  # MRI intensities have no absolute scale
            vol[~body] = 0.0
        image[c] = vol
    origin = tuple(float(v) for v in rng.uniform(-100, 100, 3))
    geometry = Geometry(
        spacing=tuple(float(s) for s in spacing), origin_xyz=origin, direction_xyz=tuple(np.eye(3).ravel())
    )
    return image, label, geometry


def _channel_names(spec: SyntheticSpec) -> list[str]:
    if spec.modality.upper() == "CT":
        return ["CT"] * spec.channels
    return [
        MRI_CHANNEL_NAMES[c % len(MRI_CHANNEL_NAMES)] + ("" if c < len(MRI_CHANNEL_NAMES) else f"_{c}")
        for c in range(spec.channels)
    ]


def _write(path: Path, array: np.ndarray, geometry: Geometry) -> None:
    atomic_write(path, lambda p: write_image(p, array, geometry))


def make_synthetic_dataset(out: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a synthetic dataset to ``out`` (which must not hold a dataset.json yet)."""
    spec.validate()
    out = Path(out)
    if (out / "dataset.json").exists():
        raise AutounetError(f"{out}: already holds a dataset.json; choose an empty folder")
    names = _channel_names(spec)
    labels = {0: "background", **{k: f"class_{k}" for k in range(1, spec.classes)}}
    training, test = [], []
    for i in range(spec.cases + spec.test_cases):
        is_test = i >= spec.cases
        case_id = f"synth_{i:03d}"
        image, label, geo = make_case(spec, i)
        img_dir, lab_dir = out / ("imagesTs" if is_test else "imagesTr"), out / ("labelsTs" if is_test else "labelsTr")
        if spec.layout == "msd":
            _write(img_dir / f"{case_id}.nii.gz", image if spec.channels > 1 else image[0], geo)
        else:
            for c in range(spec.channels):
                _write(img_dir / f"{case_id}_{c:04d}.nii.gz", image[c], geo)
        _write(lab_dir / f"{case_id}.nii.gz", label, geo)
        if is_test:
            test.append(f"./imagesTs/{case_id}.nii.gz")
        else:
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    common = {
        "name": out.name,
        "description": f"autounet synthetic dataset ({spec.modality}, {spec.channels} channel(s), {spec.classes} classes, seed {spec.seed})",
        "reference": "generated by `autounet make-synthetic`",
        "licence": "CC0",
        "numTraining": spec.cases,
    }
    if spec.layout == "msd":
        descriptor = {
            **common,
            "tensorImageSize": "4D" if spec.channels > 1 else "3D",
            "modality": {str(c): n for c, n in enumerate(names)},
            "labels": {str(k): v for k, v in labels.items()},
            "numTest": spec.test_cases,
            "training": training,
            "test": test,
        }
    else:
        descriptor = {
            **common,
            "channel_names": {str(c): n for c, n in enumerate(names)},
            "labels": {v: k for k, v in labels.items()},
            "file_ending": ".nii.gz",
        }
    atomic_write_json(out / "dataset.json", descriptor)
    return out
