import json
import math
from pathlib import Path

import numpy as np
import pytest

from autounet.cli import main
from autounet.errors import AutounetError
from autounet.evaluation.evaluate import (
    evaluate_arrays,
    evaluate_folders,
    format_table,
    label_names_near,
    load_evaluation,
    match_cases,
    parse_regions,
    save_evaluation,
)
from autounet.evaluation.metrics import binary_metrics
from conftest import write

SPACING = (2.0, 1.0, 1.0)


def label_map(cubes: dict[int, tuple[int, int, int]], shape=(10, 12, 12), size=4) -> np.ndarray:
    arr = np.zeros(shape, np.uint8)
    for value, (z, y, x) in cubes.items():
        arr[z : z + size, y : y + size, x : x + size] = value
    return arr


CASES = {  # case -> (prediction, reference)
    "a": (label_map({1: (1, 1, 1), 2: (5, 6, 6)}), label_map({1: (1, 1, 1), 2: (5, 7, 6)})),
    "b": (label_map({1: (2, 2, 2)}), label_map({1: (3, 2, 2)})),  # class 2 absent from both
    "c": (label_map({1: (1, 1, 1), 2: (5, 6, 6)}), label_map({1: (1, 1, 1)})),  # class 2 only predicted
}


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for case, (p, r) in CASES.items():
        write(pred / f"{case}.nii.gz", p, SPACING)
        write(ref / f"{case}.nii.gz", r, SPACING)
    return pred, ref


def test_folder_evaluation_round_trip(folders, tmp_path: Path):
    pred, ref = folders
    result = evaluate_folders(pred, ref, workers=1)
    assert result.n_cases == 3 and list(result.per_case) == ["a", "b", "c"]
    for case, (p, r) in CASES.items():
        for label in (1, 2):
            expected = binary_metrics(p == label, r == label, SPACING)
            got = result.per_case[case][str(label)]
            assert got.keys() == expected.keys()
            assert all(got[k] == expected[k] or (math.isnan(got[k]) and math.isnan(expected[k])) for k in got)
    # class 2: case a shifted by 1 voxel (0.75), case b empty pair (NaN, left out), case c only predicted (0)
    assert math.isnan(result.per_case["b"]["2"]["dice"])
    assert result.mean["2"]["dice"] == pytest.approx((0.75 + 0.0) / 2)
    assert result.mean["1"]["dice"] == pytest.approx((1 + 0.75 + 1) / 3)
    assert result.foreground_mean["dice"] == pytest.approx((result.mean["1"]["dice"] + result.mean["2"]["dice"]) / 2)
    assert result.mean["2"]["hd95"] == pytest.approx(1.0)  # NaN for case c (one empty) is left out

    path = save_evaluation(result, tmp_path / "out" / "evaluation.json")
    data = json.loads(path.read_text())
    assert data["per_case"]["b"]["2"]["dice"] is None and data["settings"]["empty"] == "nan"
    again = load_evaluation(path)
    assert again.to_dict() == result.to_dict()

    arrays = evaluate_arrays((case, p, r, SPACING) for case, (p, r) in CASES.items())
    assert arrays.to_dict() == result.to_dict()


def test_brats_convention_counts_empty_pairs_as_perfect(folders):
    pred, ref = folders
    result = evaluate_folders(pred, ref, regions={"TC": [1, 2], "ET": [2]}, empty="one", workers=1)
    assert list(result.mean) == ["TC", "ET"]
    assert result.per_case["b"]["ET"]["dice"] == 1.0 and result.per_case["b"]["ET"]["hd95"] == 0.0
    diagonal = math.sqrt((10 * 2) ** 2 + 12**2 + 12**2)
    assert result.per_case["c"]["ET"]["hd95"] == pytest.approx(diagonal)
    assert result.mean["ET"]["dice"] == pytest.approx((0.75 + 1 + 0) / 3)


def test_format_table_lists_classes_the_foreground_mean_and_cases(folders):
    result = evaluate_folders(*folders, workers=1)
    table = format_table(result, label_names={"1": "liver", "2": "tumour"}, per_case=True)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["case", "class", "Dice"]
    assert any(line.startswith("1 liver") and "0.9167" in line for line in lines)
    assert any(line.startswith("foreground mean") for line in lines)
    assert any(line.startswith("b ") and "tumour" in line and line.split()[-4:] == ["-"] * 4 for line in lines)
    assert "3 case(s)" in lines[-1]


def test_cases_match_by_name_across_formats_and_other_files_are_ignored(tmp_path: Path):
    p, r = CASES["a"]
    write(tmp_path / "pred" / "a.nrrd", p, SPACING)
    write(tmp_path / "ref" / "a.nii.gz", r.astype(np.float32), SPACING)  # whole numbers stored as float
    (tmp_path / "pred" / "summary.json").write_text("{}")
    (tmp_path / "pred" / "a.npz").write_bytes(b"")
    assert [c for c, _, _ in match_cases(tmp_path / "pred", tmp_path / "ref")] == ["a"]
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels=[1], workers=1)
    assert list(result.mean) == ["1"] and result.mean["1"]["dice"] == 1.0


def test_a_geometry_mismatch_names_the_case(folders):
    pred, ref = folders
    write(pred / "b.nii.gz", CASES["b"][0], (3.0, 1.0, 1.0))
    with pytest.raises(
        AutounetError, match=r"^b: prediction and reference differ in spacing \(3, 1, 1\) vs \(2, 1, 1\)"
    ):
        evaluate_folders(pred, ref, workers=1)
    write(pred / "b.nii.gz", CASES["b"][0][:, :10], SPACING)
    with pytest.raises(AutounetError, match=r"^b: prediction and reference differ in shape"):
        evaluate_folders(pred, ref, workers=1)


def test_missing_files_are_listed(folders):
    pred, ref = folders
    (pred / "b.nii.gz").unlink()
    (pred / "c.nii.gz").unlink()
    with pytest.raises(AutounetError, match=r"2 reference\(s\) without a prediction in .*: b, c$"):
        evaluate_folders(pred, ref, workers=1)
    write(pred / "zz.nii.gz", CASES["a"][0], SPACING)
    with pytest.raises(AutounetError, match=r"1 prediction\(s\) without a reference in .*: zz$"):
        evaluate_folders(pred, ref, workers=1)


def test_many_missing_files_are_counted(tmp_path: Path):
    for i in range(7):
        write(tmp_path / "ref" / f"case_{i}.nii.gz", CASES["a"][1], SPACING)
    write(tmp_path / "pred" / "case_0.nii.gz", CASES["a"][0], SPACING)
    with pytest.raises(AutounetError, match="6 reference.*case_1, case_2, case_3, case_4, case_5 and 1 more"):
        match_cases(tmp_path / "pred", tmp_path / "ref")


def test_non_integer_predictions_are_refused(folders):
    pred, ref = folders
    write(pred / "c.nii.gz", CASES["c"][0].astype(np.float32) * 0.5, SPACING)
    with pytest.raises(AutounetError, match=r"^c: the prediction has non-integer values \(e\.g\. 0\.5\)"):
        evaluate_folders(pred, ref, workers=1)


def test_bad_settings_and_region_specs_are_refused(folders):
    with pytest.raises(AutounetError, match="empty"):
        evaluate_folders(*folders, empty="zero")
    with pytest.raises(AutounetError, match="tolerance"):
        evaluate_folders(*folders, tolerance_mm=-1)
    assert parse_regions(["WT=1,2,3", "ET=3"]) == {"WT": [1, 2, 3], "ET": [3]}
    for bad in (["WT"], ["WT="], ["=1"], ["WT=a"], ["WT=1", "WT=2"]):
        with pytest.raises(AutounetError):
            parse_regions(bad)


def test_label_names_from_a_dataset_json_beside_the_references(tmp_path: Path):
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "edema"}}))
    assert label_names_near(tmp_path / "labelsTr") == {"0": "background", "1": "edema"}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": 2, "WT": [1, 2]}}))
    assert label_names_near(tmp_path / "labelsTr") == {"0": "background", "2": "tumour"}
    assert label_names_near(tmp_path / "a" / "b" / "x.nii.gz") == {}


def test_cli_evaluate_exit_codes(folders, tmp_path: Path, capsys):
    pred, ref = folders
    assert main(["evaluate", str(pred), str(ref), "-j", "2", "--per-case"]) == 0
    out = capsys.readouterr().out
    assert "foreground mean" in out and (pred / "evaluation.json").is_file()
    data = json.loads((pred / "evaluation.json").read_text())
    assert data["n_cases"] == 3 and list(data["mean"]) == ["1", "2"]

    # the evaluation file in PRED is not mistaken for a prediction; regions, BraTS convention, --json
    out_json = tmp_path / "brats.json"
    args = [
        "evaluate",
        str(pred),
        str(ref),
        "-j",
        "1",
        "--regions",
        "WT=1,2",
        "ET=2",
        "--brats",
        "--json",
        str(out_json),
    ]
    assert main(args) == 0
    data = json.loads(out_json.read_text())
    assert list(data["mean"]) == ["WT", "ET"] and data["settings"]["empty"] == "one"

    # two single files
    assert main(["evaluate", str(pred / "a.nii.gz"), str(ref / "a.nii.gz"), "--labels", "1", "--tolerance", "2"]) == 0
    assert json.loads((pred / "a_evaluation.json").read_text())["settings"]["tolerance_mm"] == 2.0
    capsys.readouterr()

    write(pred / "a.nii.gz", CASES["a"][0], (1.0, 1.0, 1.0))
    assert main(["evaluate", str(pred), str(ref), "-j", "1"]) == 2
    assert "a: prediction and reference differ in spacing" in capsys.readouterr().err
    assert main(["evaluate", str(pred), str(ref), "--regions", "WT:1"]) == 2
    assert main(["evaluate", str(pred), str(tmp_path / "missing")]) == 2
    assert "missing: reference folder or file not found" in capsys.readouterr().err


def test_an_undeclared_value_only_the_references_hold_is_not_scored_as_a_class(tmp_path: Path, capsys):
    """Sparse references (3 = ignore) without a dataset.json beside them: value 3 is refused as a
    class, with the two ways out; --ignore-label 3 or a dataset.json declaring it evaluates 1 and 2."""
    pred, ref = tmp_path / "pred", tmp_path / "data" / "labelsTr"
    for case, (p, r) in CASES.items():
        sparse = r.copy()
        sparse[::2] = 3
        write(pred / f"{case}.nii.gz", p, SPACING)
        write(ref / f"{case}.nii.gz", sparse, SPACING)
    assert main(["evaluate", str(pred), str(ref), "-j", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{ref}: value 3 is in the references and in no prediction" in err
    assert "give --ignore-label 3" in err and "give --labels 1 2 3" in err and len(err.strip().splitlines()) == 1
    assert not (pred / "evaluation.json").exists()
    assert main(["evaluate", str(pred), str(ref), "-j", "1", "--ignore-label", "3"]) == 0
    assert list(json.loads((pred / "evaluation.json").read_text())["mean"]) == ["1", "2"]
    assert main(["evaluate", str(pred), str(ref), "-j", "1", "--labels", "1", "2", "3"]) == 0  # a class, if you say so
    (tmp_path / "data" / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}})
    )
    assert main(["evaluate", str(pred), str(ref), "-j", "1"]) == 0
    data = json.loads((pred / "evaluation.json").read_text())
    assert list(data["mean"]) == ["1", "2"] and data["settings"]["ignore_label"] == 3
