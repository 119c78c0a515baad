"""Every validation error and warning of `autounet check`, planted in a tiny dataset."""

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autounet.data.check import check_dataset
from autounet.data.findings import ERROR_KINDS, WARNING_KINDS
from conftest import listing, write


def errors(report):
    return {(f.case, f.kind) for f in report.errors}


def warnings(report):
    return {(f.case, f.kind) for f in report.warnings}


def label_path(root: Path, case: str) -> Path:
    return root / "labelsTr" / f"{case}.nii.gz"


def image_path(root: Path, case: str) -> Path:
    return root / "imagesTr" / f"{case}.nii.gz"


def load(path: Path):
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def resave(path: Path, array: np.ndarray, like: sitk.Image, **geometry):
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(like) if array.shape == sitk.GetArrayViewFromImage(like).shape else None
    for key, value in geometry.items():
        getattr(out, f"Set{key}")(value)
    if array.shape != sitk.GetArrayViewFromImage(like).shape:
        out.SetSpacing(like.GetSpacing())
        out.SetOrigin(like.GetOrigin())
    sitk.WriteImage(out, str(path))


def test_clean_dataset_passes_and_report_describes_it(tiny_msd: Path):
    report = check_dataset(tiny_msd, workers=1)
    assert report.ok and report.errors == []
    text = report.format()
    assert "Cases        5" in text
    assert "declared {0 background, 1 class_1, 2 class_2}; found {0, 1, 2}" in text
    assert "Spacing mm" in text and "Shape" in text and "Orientation" in text
    assert text.rstrip().endswith("OK: the dataset is valid.")


def test_every_problem_is_listed_with_its_case_and_nothing_is_written(tiny_msd: Path):
    before = listing(tiny_msd)
    label_path(tiny_msd, "synth_000").unlink()  # missing file
    image_path(tiny_msd, "synth_001").write_bytes(b"garbage")  # unreadable
    arr, img = load(label_path(tiny_msd, "synth_002"))
    resave(label_path(tiny_msd, "synth_002"), arr[:, :-1], img)  # shape mismatch
    arr, img = load(label_path(tiny_msd, "synth_003"))
    arr[0, 0, 0] = 7
    resave(label_path(tiny_msd, "synth_003"), arr, img)  # undeclared label
    arr, img = load(image_path(tiny_msd, "synth_004"))
    arr[1, 1, 1] = np.nan
    resave(image_path(tiny_msd, "synth_004"), arr, img)  # NaN
    report = check_dataset(tiny_msd, workers=1)
    assert errors(report) == {
        ("synth_000", "missing_file"),
        ("synth_001", "unreadable_file"),
        ("synth_002", "shape_mismatch"),
        ("synth_003", "undeclared_label"),
        ("synth_004", "nonfinite_intensity"),
    }
    text = report.format()
    assert "Problems (5)" in text and "FAILED" in text
    assert "synth_003: label labelsTr/synth_003.nii.gz has value(s) [7] not declared" in text
    assert listing(tiny_msd) == before - {"labelsTr/synth_000.nii.gz"}


def test_geometry_mismatch_between_image_and_label(tiny_msd: Path):
    arr, img = load(label_path(tiny_msd, "synth_001"))
    resave(label_path(tiny_msd, "synth_001"), arr, img, Origin=(5.0, 0.0, 0.0))
    arr, img = load(label_path(tiny_msd, "synth_002"))
    resave(label_path(tiny_msd, "synth_002"), arr, img, Spacing=(1.0, 1.0, 2.0))
    report = check_dataset(tiny_msd, workers=1)
    assert errors(report) == {("synth_001", "geometry_mismatch"), ("synth_002", "geometry_mismatch")}
    assert "origin" in str(report.errors[0]) and "spacing" in str(report.errors[1])


def test_non_integer_labels_and_nonfinite_labels(tiny_msd: Path):
    arr, img = load(label_path(tiny_msd, "synth_000"))
    frac = arr.astype(np.float32)
    frac[2, 2, 2] = 0.5
    resave(label_path(tiny_msd, "synth_000"), frac, img)
    arr, img = load(label_path(tiny_msd, "synth_001"))
    nanl = arr.astype(np.float32)
    nanl[0, 0, 0] = np.inf
    resave(label_path(tiny_msd, "synth_001"), nanl, img)
    report = check_dataset(tiny_msd, workers=1)
    assert errors(report) == {("synth_000", "non_integer_label"), ("synth_001", "non_integer_label")}
    assert "non-integer values (e.g. 0.5)" in report.format()


def test_channel_count_and_empty_image(tiny_msd: Path):
    arr, img = load(image_path(tiny_msd, "synth_000"))
    stacked = sitk.JoinSeries([sitk.GetImageFromArray(arr), sitk.GetImageFromArray(arr)])
    sitk.WriteImage(stacked, str(image_path(tiny_msd, "synth_000")))
    arr, img = load(image_path(tiny_msd, "synth_001"))
    resave(image_path(tiny_msd, "synth_001"), np.zeros_like(arr), img)
    report = check_dataset(tiny_msd, workers=1)
    assert ("synth_000", "channel_count") in errors(report)
    assert ("synth_001", "empty_image") in errors(report)
    assert "has 2 channel(s), dataset.json declares 1" in report.format()


def test_path_outside_and_malformed_descriptor_are_problems(tiny_msd: Path):
    d = json.loads((tiny_msd / "dataset.json").read_text())
    d["training"][0]["label"] = "../../secret.nii.gz"
    (tiny_msd / "dataset.json").write_text(json.dumps(d))
    report = check_dataset(tiny_msd, workers=1)
    assert errors(report) == {("synth_000", "path_outside_dataset")}
    (tiny_msd / "dataset.json").write_text("[1, 2")
    report = check_dataset(tiny_msd, workers=1)
    assert {k for _, k in errors(report)} == {"malformed_descriptor"}
    assert "FAILED" in report.format()


def test_warnings_do_not_fail_the_check(tiny_msd: Path):
    arr, img = load(label_path(tiny_msd, "synth_000"))
    resave(label_path(tiny_msd, "synth_000"), arr.astype(np.float32), img)  # float labels, whole numbers
    arr, img = load(label_path(tiny_msd, "synth_001"))
    resave(label_path(tiny_msd, "synth_001"), np.zeros_like(arr), img)  # empty label map
    arr, img = load(image_path(tiny_msd, "synth_002"))
    resave(image_path(tiny_msd, "synth_002"), np.clip(arr, 0, 255).astype(np.uint8), img)  # mixed dtypes
    for name in ("synth_003",):  # spacing 3x the others, image and label alike
        for path in (image_path(tiny_msd, name), label_path(tiny_msd, name)):
            arr, img = load(path)
            resave(path, arr, img, Spacing=(3.0, 3.0, 3.0))
    for path in (image_path(tiny_msd, "synth_004"), label_path(tiny_msd, "synth_004")):  # other orientation
        arr, img = load(path)
        resave(path, arr, img, Direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    report = check_dataset(tiny_msd, workers=1)
    assert report.ok, report.format()
    assert warnings(report) >= {
        ("synth_000", "float_label"),
        ("synth_001", "empty_label"),
        (None, "mixed_dtypes"),
        ("synth_003", "unusual_spacing"),
        (None, "mixed_orientation"),
    }
    assert "synth_004" in str(next(w for w in report.warnings if w.kind == "mixed_orientation"))


def test_class_never_present_and_constant_background_warnings(tiny_msd: Path):
    d = json.loads((tiny_msd / "dataset.json").read_text())
    d["labels"]["5"] = "unused"
    (tiny_msd / "dataset.json").write_text(json.dumps(d))
    arr, img = load(image_path(tiny_msd, "synth_000"))
    resave(image_path(tiny_msd, "synth_000"), np.where(arr == 0, -3.5, arr).astype(np.float32), img)
    report = check_dataset(tiny_msd, workers=1)
    assert report.ok
    assert (None, "class_never_present") in warnings(report)
    assert ("synth_000", "nonzero_background") in warnings(report)


def test_v2_layout_checks_each_channel_file(tiny_v2: Path):
    write(tiny_v2 / "imagesTr" / "synth_001_0001.nii.gz", np.ones((3, 3, 3), np.float32))
    report = check_dataset(tiny_v2, workers=1)
    assert errors(report) == {("synth_001", "shape_mismatch")}
    assert "synth_001_0001.nii.gz" in str(report.errors[0])


def test_parallel_check_finds_the_same_as_serial(tiny_msd: Path):
    label_path(tiny_msd, "synth_002").unlink()
    serial = check_dataset(tiny_msd, workers=1)
    parallel = check_dataset(tiny_msd, workers=2)
    assert [str(f) for f in serial.findings] == [str(f) for f in parallel.findings]


def test_every_finding_kind_is_documented():
    assert len(ERROR_KINDS) >= 12 and len(WARNING_KINDS) >= 5
    assert all(isinstance(v, str) and v for v in {**ERROR_KINDS, **WARNING_KINDS}.values())
