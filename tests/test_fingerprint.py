"""Fingerprint values on constructed data with known answers."""

import json
from pathlib import Path

import numpy as np
import pytest

from autounet.api import fingerprint_dataset
from autounet.errors import AutounetError
from autounet.planning.fingerprint import load_fingerprint, save_fingerprint
from conftest import write


def make_known_dataset(root: Path, modality: str = "MRI") -> Path:
    """Two cases whose crop boxes, label counts, components and intensities are known exactly."""
    entries = []
    for i, (shape, spacing) in enumerate([((10, 12, 14), (2.0, 1.0, 1.0)), ((8, 12, 12), (2.0, 0.5, 0.5))]):
        image = np.zeros(shape, np.float32)
        label = np.zeros(shape, np.uint8)
        image[2:8, 3:9, 4:10] = 5.0  # nonzero box: 6 x 6 x 6 at (2, 3, 4)
        label[3:5, 4:6, 5:7] = 1  # class 1: a blob of 8 voxels and a separate single voxel
        label[6:7, 7:8, 8:9] = 1
        label[3:4, 7:8, 5:7] = 2  # class 2: one blob of 2 voxels
        image[label == 1] = 10.0
        image[label == 2] = 30.0 + i  # 30 in case 0, 31 in case 1
        name = f"case_{i}"
        write(root / "imagesTr" / f"{name}.nii.gz", image, spacing=spacing)
        write(root / "labelsTr" / f"{name}.nii.gz", label, spacing=spacing)
        entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    desc = {
        "name": "known",
        "modality": {"0": modality},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": 2,
        "training": entries,
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    return root


def test_per_case_values_are_exact(tmp_path: Path):
    _, fp = fingerprint_dataset(make_known_dataset(tmp_path / "ds"), workers=1)
    assert fp.num_cases == 2 and fp.channel_names == ["MRI"]
    c0, c1 = fp.cases
    assert c0.spacing == [2.0, 1.0, 1.0] and c1.spacing == [2.0, 0.5, 0.5]
    assert c0.shape_before_crop == [10, 12, 14] and c1.shape_before_crop == [8, 12, 12]
    assert c0.crop_bbox == [[2, 8], [3, 9], [4, 10]]
    assert c0.shape_after_crop == [6, 6, 6]
    assert c0.crop_voxel_fraction == pytest.approx(216 / (10 * 12 * 14))
    assert c1.crop_voxel_fraction == pytest.approx(216 / (8 * 12 * 12))
    assert c0.label_voxel_counts == {"0": 10 * 12 * 14 - 11, "1": 9, "2": 2}
    assert c0.components_per_class == {"1": 2, "2": 1}
    assert c0.foreground_source == "label"
    fg = c0.foreground_intensity[0]
    assert fg["mean"] == pytest.approx((9 * 10 + 2 * 30) / 11)
    assert fg["min"] == 10.0 and fg["max"] == 30.0
    assert c0.orientation == "LPS"


def test_pooled_foreground_statistics(tmp_path: Path):
    _, fp = fingerprint_dataset(make_known_dataset(tmp_path / "ds"), workers=1)
    st = fp.foreground_intensity_per_channel[0]
    values = np.array([10.0] * 9 + [30.0] * 2 + [10.0] * 9 + [31.0] * 2)
    assert st.num_samples == 22
    assert st.mean == pytest.approx(values.mean())
    assert st.std == pytest.approx(values.std())
    assert st.median == 10.0 and st.max == 31.0
    assert st.percentile_99_5 == pytest.approx(np.percentile(values, 99.5))


def test_fingerprint_round_trips_through_json(tmp_path: Path):
    _, fp = fingerprint_dataset(make_known_dataset(tmp_path / "ds"), workers=1)
    save_fingerprint(fp, tmp_path / "fp.json")
    assert load_fingerprint(tmp_path / "fp.json") == fp


def test_parallel_fingerprint_equals_serial(tiny_msd: Path):
    _, serial = fingerprint_dataset(tiny_msd, workers=1)
    _, parallel = fingerprint_dataset(tiny_msd, workers=2)
    assert serial == parallel


def test_intensity_sample_is_capped_per_case(tmp_path: Path):
    root = tmp_path / "big"
    image = np.random.default_rng(0).normal(100, 10, (30, 30, 30)).astype(np.float32)
    label = np.ones((30, 30, 30), np.uint8)
    write(root / "imagesTr" / "a.nii.gz", image)
    write(root / "labelsTr" / "a.nii.gz", label)
    desc = {
        "modality": {"0": "CT"},
        "labels": {"0": "bg", "1": "x"},
        "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    _, fp = fingerprint_dataset(root, workers=1)
    st = fp.foreground_intensity_per_channel[0]
    assert st.num_samples == 10_000
    assert st.mean == pytest.approx(100, abs=0.5) and st.std == pytest.approx(10, abs=0.5)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ('{"dataset_name": "x"}', "missing field"),
        ('{"dataset_name": 1, "layout": "msd"}', "expected a string"),
    ],
)
def test_malformed_fingerprint_files_are_refused(tmp_path: Path, content: str, message: str):
    p = tmp_path / "fp.json"
    p.write_text(content)
    with pytest.raises(AutounetError, match=message):
        load_fingerprint(p)
    with pytest.raises(AutounetError, match="not found"):
        load_fingerprint(tmp_path / "none.json")
