"""A fingerprint from nnU-Net v2's ``dataset_fingerprint.json`` and ``dataset.json``, so that
plans can be made from a fingerprint nnU-Net computed (``plan --fingerprint``).

nnU-Net's fingerprint keeps, per case, only the spacing and the cropped shape, and for the
dataset the median fraction of voxels cropping kept and the foreground intensity statistics.
The rest of ours is filled in neutrally: every case's crop fraction is that median (the only
statistic the planners read from it), its shape before cropping is the cropped shape, and no
label counts are known.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autounet.errors import AutounetError
from autounet.planning.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from autounet.utils.atomic import read_json

_STATS = ("mean", "std", "min", "max", "median", "percentile_00_5", "percentile_99_5")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AutounetError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _triples(values: Any, where: str) -> list[list[float]]:
    if not isinstance(values, list) or not values:
        raise AutounetError(f"{where}: expected a non-empty list of 3-value lists")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, list) or len(v) != 3:
            raise AutounetError(f"{where}[{i}]: expected 3 values, got {v!r}")
        out.append([_number(x, f"{where}[{i}]") for x in v])
    return out


def _labels(descriptor: dict, path: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    labels = descriptor.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise AutounetError(f"{path}: 'labels' must map names to values")
    plain: dict[str, str] = {}
    regions: dict[str, list[int]] = {}
    for name, value in labels.items():
        if isinstance(value, list):
            regions[str(name)] = [int(_number(v, f"{path}: labels.{name}")) for v in value]
            if len(value) == 1:
                plain[str(int(value[0]))] = str(name)
        else:
            plain[str(int(_number(value, f"{path}: labels.{name}")))] = str(name)
    return plain, (regions if any(len(v) > 1 for v in regions.values()) else {})


def fingerprint_from_nnunet(fingerprint_json: str | Path, dataset_json: str | Path) -> Fingerprint:
    """Our :class:`Fingerprint` of the dataset nnU-Net v2 fingerprinted."""
    fingerprint_json, dataset_json = Path(fingerprint_json), Path(dataset_json)
    data = read_json(fingerprint_json, dict)
    descriptor = read_json(dataset_json, dict)
    spacings = _triples(data.get("spacings"), f"{fingerprint_json}: spacings")
    shapes = _triples(data.get("shapes_after_crop"), f"{fingerprint_json}: shapes_after_crop")
    if len(spacings) != len(shapes):
        raise AutounetError(f"{fingerprint_json}: {len(spacings)} spacings for {len(shapes)} shapes")
    fraction = _number(data.get("median_relative_size_after_cropping"), f"{fingerprint_json}: median_relative_size")
    channels = descriptor.get("channel_names") or descriptor.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise AutounetError(f"{dataset_json}: 'channel_names' must map channel indices to names")
    names = [str(channels[k]) for k in sorted(channels, key=int)]
    intensity = data.get("foreground_intensity_properties_per_channel")
    if not isinstance(intensity, dict) or sorted(intensity, key=int) != sorted(channels, key=int):
        raise AutounetError(f"{fingerprint_json}: foreground intensity properties must list every channel")
    stats = []
    for k in sorted(intensity, key=int):
        entry = intensity[k]
        if not isinstance(entry, dict):
            raise AutounetError(f"{fingerprint_json}: intensity properties of channel {k} must be an object")
        values = {s: _number(entry.get(s), f"{fingerprint_json}: channel {k} {s}") for s in _STATS}
        stats.append(IntensityStats(**values, num_samples=0))
    labels, regions = _labels(descriptor, dataset_json)
    per_channel = [{"mean": s.mean, "std": s.std, "min": s.min, "max": s.max} for s in stats]
    cases = []
    for i, (spacing, shape) in enumerate(zip(spacings, shapes)):
        size = [int(s) for s in shape]
        cases.append(
            CaseFingerprint(
                case_id=f"case_{i:04d}",
                spacing=spacing,
                shape_before_crop=size,
                shape_after_crop=size,
                crop_bbox=[[0, s] for s in size],
                crop_voxel_fraction=fraction,
                label_voxel_counts={},
                components_per_class={},
                foreground_source="label",
                foreground_intensity=[dict(c) for c in per_channel],
                orientation="",
            )
        )
    return Fingerprint(
        dataset_name=str(descriptor.get("name") or dataset_json.parent.name),
        layout="nnunetv2",
        channel_names=names,
        labels=labels,
        component_connectivity=1,
        foreground_intensity_per_channel=stats,
        cases=cases,
        regions=regions,
    )
