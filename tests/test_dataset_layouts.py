import json
from pathlib import Path

import numpy as np
import pytest

from autounet.data.dataset import MSD, NNUNET_V2, load_raw_dataset, parse_raw_dataset
from autounet.errors import DatasetInvalid
from conftest import rewrite_descriptor, write


def kinds(findings):
    return sorted({f.kind for f in findings})


def test_msd_layout_is_parsed(tiny_msd: Path):
    ds, findings = parse_raw_dataset(tiny_msd)
    assert findings == []
    assert ds.layout == MSD
    assert ds.channel_names == ("MRI",) or ds.channel_names == ("T1",)
    assert ds.labels == {0: "background", 1: "class_1", 2: "class_2"}
    assert [c.case_id for c in ds.cases] == [f"synth_{i:03d}" for i in range(5)]
    assert all(len(c.images) == 1 and c.images[0].is_file() and c.label.is_file() for c in ds.cases)


def test_nnunet_v2_layout_finds_one_file_per_channel(tiny_v2: Path):
    ds, findings = parse_raw_dataset(tiny_v2)
    assert findings == []
    assert ds.layout == NNUNET_V2
    assert ds.num_channels == 2
    assert ds.labels == {0: "background", 1: "class_1", 2: "class_2"}
    case = ds.cases[0]
    assert [p.name for p in case.images] == ["synth_000_0000.nii.gz", "synth_000_0001.nii.gz"]
    assert case.label.name == "synth_000.nii.gz"


def test_nnunet_v2_regions_and_explicit_file_mapping(tmp_path: Path):
    root = tmp_path / "ds"
    write(root / "img" / "a.nrrd", np.ones((3, 4, 5), np.float32))
    write(root / "seg" / "a.nrrd", np.zeros((3, 4, 5), np.uint8))
    desc = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "tumour": 2, "whole": [1, 2]},
        "regions_class_order": [1, 2],
        "numTraining": 1,
        "file_ending": ".nrrd",
        "dataset": {"a": {"images": ["img/a.nrrd"], "label": "seg/a.nrrd"}},
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    ds, findings = parse_raw_dataset(root)
    assert findings == []
    assert ds.regions == {"whole": (1, 2)}
    assert ds.labels == {0: "background", 1: "liver", 2: "tumour"}
    assert ds.cases[0].images[0] == root.resolve() / "img" / "a.nrrd"


@pytest.mark.parametrize("bad", ["../elsewhere/x.nii.gz", "/etc/passwd", "imagesTr/../../x.nii.gz"])
def test_paths_leaving_the_dataset_folder_are_refused(tiny_msd: Path, bad: str):
    d = json.loads((tiny_msd / "dataset.json").read_text())
    d["training"][2]["image"] = bad
    (tiny_msd / "dataset.json").write_text(json.dumps(d))
    ds, findings = parse_raw_dataset(tiny_msd)
    assert kinds(findings) == ["path_outside_dataset"]
    assert "leaves the dataset folder" in str(findings[0])
    assert len(ds.cases) == 4


@pytest.mark.parametrize(
    "change, text",
    [
        ({"labels": {"1": "a"}}, "must declare 0"),
        ({"labels": {"zero": "background"}}, "not an integer"),
        ({"modality": {"1": "MRI"}}, "keys must be 0"),
        ({"training": []}, "non-empty list"),
        ({"training": [{"image": "./imagesTr/synth_000.nii.gz"}]}, "must have 'image' and 'label'"),
    ],
)
def test_malformed_msd_descriptors_are_reported(tiny_msd: Path, change, text):
    rewrite_descriptor(tiny_msd, **change)
    _, findings = parse_raw_dataset(tiny_msd)
    assert "malformed_descriptor" in kinds(findings)
    assert any(text in str(f) for f in findings)
    with pytest.raises(DatasetInvalid):
        load_raw_dataset(tiny_msd)


def test_invalid_json_and_unknown_layout(tmp_path: Path):
    (tmp_path / "dataset.json").write_text("{not json")
    _, findings = parse_raw_dataset(tmp_path)
    assert kinds(findings) == ["malformed_descriptor"] and "not valid JSON" in str(findings[0])
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    _, findings = parse_raw_dataset(tmp_path)
    assert "neither MSD" in str(findings[0])
    _, findings = parse_raw_dataset(tmp_path / "missing")
    assert kinds(findings) == ["missing_file"]


def test_duplicate_case_is_reported(tiny_msd: Path):
    d = json.loads((tiny_msd / "dataset.json").read_text())
    d["training"].append(d["training"][0])
    (tiny_msd / "dataset.json").write_text(json.dumps(d))
    _, findings = parse_raw_dataset(tiny_msd)
    errs = [f for f in findings if f.severity == "error"]
    assert kinds(errs) == ["duplicate_case"] and errs[0].case == "synth_000"


def test_nnunet_v2_missing_label_extra_channel_and_count(tiny_v2: Path):
    (tiny_v2 / "labelsTr" / "synth_001.nii.gz").unlink()
    write(tiny_v2 / "imagesTr" / "synth_002_0002.nii.gz", np.ones((3, 3, 3), np.float32))
    _, findings = parse_raw_dataset(tiny_v2)
    by_kind = {f.kind: f for f in findings}
    assert by_kind["missing_file"].case == "synth_001"
    assert by_kind["channel_count"].case == "synth_002"
    assert "numTraining is 4 but labelsTr holds 3" in str(by_kind["malformed_descriptor"])


def test_msd_count_mismatch_is_only_a_warning(tiny_msd: Path):
    rewrite_descriptor(tiny_msd, numTraining=99)
    ds, findings = parse_raw_dataset(tiny_msd)
    assert ds is not None
    assert [(f.severity, f.kind) for f in findings] == [("warning", "count_mismatch")]
