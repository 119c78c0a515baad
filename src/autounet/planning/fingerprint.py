"""Dataset fingerprint (DESIGN §4.1): what the planner needs to know about a dataset.

Written to ``W/NAME/fingerprint.json``; the schema is documented in ``docs/formats.md``.
Per case: spacing, shape before and after cropping to the nonzero region, how much cropping
shrank it, label voxel counts and connected components per class, foreground intensities.
Per dataset: foreground intensity statistics of each channel, pooled from a sample of every case.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autounet.data.dataset import RawDataset
from autounet.data.inspect import COMPONENT_CONNECTIVITY, CaseInspection
from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write_json
from autounet.utils.plain_data import load_json_dataclass, to_plain

FINGERPRINT_SCHEMA_VERSION = 1


@dataclass
class IntensityStats:
    """Statistics of one channel's intensities inside the labelled foreground."""

    mean: float
    std: float
    min: float
    max: float
    median: float
    percentile_00_5: float
    percentile_99_5: float
    num_samples: int


@dataclass
class CaseFingerprint:
    case_id: str
    spacing: list[float]  # (z, y, x) mm
    shape_before_crop: list[int]  # (Z, Y, X)
    shape_after_crop: list[int]
    crop_bbox: list[list[int]]  # per axis [start, stop), in the original array
    crop_voxel_fraction: float  # voxels after crop / voxels before
    label_voxel_counts: dict[str, int]  # label value -> voxels, labels present only
    components_per_class: dict[str, int]  # label value -> connected components
    foreground_source: str  # "label", or "nonzero" when the case has no labelled voxel
    foreground_intensity: list[dict[str, float]]  # per channel: mean, std, min, max
    orientation: str
    # Per channel: the value of the 8 corner voxels when they all agree, else null (None: not
    # recorded, an older fingerprint). The brats preset treats such a value as background.
    corner_values: list[float | None] | None = None
    # Crop box when voxels equal to the corner values count as zero (equals crop_bbox when no
    # corner value is non-zero).
    background_crop_bbox: list[list[int]] | None = None


@dataclass
class Fingerprint:
    dataset_name: str
    layout: str
    channel_names: list[str]
    labels: dict[str, str]  # label value -> name
    component_connectivity: int
    foreground_intensity_per_channel: list[IntensityStats]
    cases: list[CaseFingerprint]
    regions: dict[str, list[int]] = field(default_factory=dict)
    source_signature: str = ""
    schema_version: int = FINGERPRINT_SCHEMA_VERSION

    @property
    def num_cases(self) -> int:
        return len(self.cases)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def spacings(self) -> np.ndarray:
        return np.array([c.spacing for c in self.cases], dtype=float)

    def shapes_after_crop(self) -> np.ndarray:
        return np.array([c.shape_after_crop for c in self.cases], dtype=float)


def pooled_intensity_stats(samples: np.ndarray) -> IntensityStats:
    """Statistics of a 1D sample of intensities."""
    if samples.size == 0:
        return IntensityStats(0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    s = samples.astype(np.float64)
    p_lo, med, p_hi = np.percentile(s, [0.5, 50.0, 99.5])
    return IntensityStats(
        mean=float(s.mean()),
        std=float(s.std()),
        min=float(s.min()),
        max=float(s.max()),
        median=float(med),
        percentile_00_5=float(p_lo),
        percentile_99_5=float(p_hi),
        num_samples=int(s.size),
    )


def build_fingerprint(dataset: RawDataset, inspections: list[CaseInspection], signature: str = "") -> Fingerprint:
    """Assemble the fingerprint from valid case inspections (each must carry ``stats``)."""
    cases = []
    for ins in inspections:
        st = ins.stats
        if st is None:
            raise AutounetError(f"{ins.case_id}: no statistics (the case did not pass validation)")
        cases.append(
            CaseFingerprint(
                case_id=ins.case_id,
                spacing=list(st.geometry.spacing),
                shape_before_crop=list(st.shape_before_crop),
                shape_after_crop=list(st.shape_after_crop),
                crop_bbox=[list(b) for b in st.crop_bbox],
                crop_voxel_fraction=st.crop_voxel_fraction,
                label_voxel_counts={str(k): v for k, v in st.label_voxel_counts.items()},
                components_per_class={str(k): v for k, v in st.components_per_class.items()},
                foreground_source=st.foreground_source,
                foreground_intensity=st.foreground_intensity,
                orientation=st.geometry.orientation(),
                corner_values=list(st.corner_values),
                background_crop_bbox=[list(b) for b in st.background_crop_bbox]
                if st.background_crop_bbox is not None
                else None,
            )
        )
    # Pool foreground samples from cases that have labelled voxels; fall back to the nonzero
    # region only when no case has any (an unlabelled dataset cannot tell us more).
    labelled = [i.stats for i in inspections if i.stats.foreground_source == "label"]
    pool = labelled or [i.stats for i in inspections]
    per_channel = []
    for c in range(dataset.num_channels):
        parts = [s.intensity_samples[c] for s in pool if s.intensity_samples.size]
        per_channel.append(pooled_intensity_stats(np.concatenate(parts) if parts else np.zeros(0)))
    return Fingerprint(
        dataset_name=dataset.name,
        layout=dataset.layout,
        channel_names=list(dataset.channel_names),
        labels={str(k): v for k, v in dataset.labels.items()},
        component_connectivity=COMPONENT_CONNECTIVITY,
        foreground_intensity_per_channel=per_channel,
        cases=cases,
        regions={k: list(v) for k, v in dataset.regions.items()},
        source_signature=signature,
    )


def dataset_signature(dataset: RawDataset) -> str:
    """Hash of dataset.json and the name, size and modification time of every case file.

    Cheap (no file is read) and changes whenever a file is replaced, so a stored fingerprint
    with the same signature is still valid.
    """
    h = hashlib.sha256()
    h.update(json.dumps(dataset.descriptor, sort_keys=True).encode())
    for case in dataset.cases:
        for p in (*case.images, case.label):
            if p is None:
                continue
            # Paths relative to the dataset folder: planning with a relative RAW path and
            # preprocessing from the stored absolute one must give the same signature.
            try:
                name = Path(p).resolve().relative_to(Path(dataset.root).resolve())
            except ValueError:
                name = Path(p).resolve()
            try:
                st = Path(p).stat()
                h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{name}|missing\n".encode())
    return h.hexdigest()


def save_fingerprint(fp: Fingerprint, path: str | Path) -> None:
    atomic_write_json(path, to_plain(fp))


def load_fingerprint(path: str | Path) -> Fingerprint:
    """Read a fingerprint.json, with one clear error if it is missing or malformed."""
    fp = load_json_dataclass(Fingerprint, path, "fingerprint", FINGERPRINT_SCHEMA_VERSION)
    if not fp.cases:
        raise AutounetError(f"{path}: the fingerprint lists no cases")
    if any(len(c.spacing) != 3 or len(c.shape_after_crop) != 3 for c in fp.cases):
        raise AutounetError(f"{path}: every case needs a 3-value spacing and shape_after_crop")
    if len(fp.foreground_intensity_per_channel) != fp.num_channels:
        raise AutounetError(
            f"{path}: foreground_intensity_per_channel has {len(fp.foreground_intensity_per_channel)} entries for {fp.num_channels} channels"
        )
    return fp
