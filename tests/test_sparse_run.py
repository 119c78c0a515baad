"""The whole `autounet run` on sparse annotations (an ``ignore`` label), through the CLI: check,
plan, preprocess, train, select and predict, with one case that is ``ignore`` everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autounet.cli import main
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.selection_document import load_selection

IGNORE = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> Path:
    """Six cases (nnU-Net v2 layout) annotated on every other z slice, ``"ignore": 3`` elsewhere;
    the first case is ``ignore`` everywhere."""
    root = tmp_path_factory.mktemp("sparse_run") / "sparse"
    spec = SyntheticSpec(cases=6, test_cases=1, shape=(12, 16, 16), classes=3, seed=4, layout="nnunetv2")
    make_synthetic_dataset(root, spec)
    for i, path in enumerate(sorted((root / "labelsTr").iterdir())):
        image = sitk.ReadImage(str(path))
        labels = sitk.GetArrayFromImage(image)
        keep = np.zeros(labels.shape[0], bool)
        keep[labels.shape[0] // 2 :: 2] = True
        keep[labels.shape[0] // 2 :: -2] = True
        labels[~keep] = IGNORE
        if i == 0:
            labels[:] = IGNORE
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(path))
    descriptor = json.loads((root / "dataset.json").read_text())
    descriptor["labels"] = {"background": 0, "class_1": 1, "class_2": 2, "ignore": IGNORE}
    (root / "dataset.json").write_text(json.dumps(descriptor))
    return root


def test_check_and_plan_warn_about_a_case_that_is_ignore_everywhere(sparse, tmp_path, capsys):
    assert main(["check", str(sparse), "-j", "1"]) == 0
    out = capsys.readouterr().out
    assert "synth_000: label labelsTr/synth_000.nii.gz is `ignore` (3) everywhere" in out
    assert main(["plan", str(sparse), "--work", str(tmp_path / "W"), "-j", "1"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and (tmp_path / "W" / "sparse" / "plans.json").is_file()


def test_run_on_a_sparse_dataset_reaches_a_selected_model_that_predicts(sparse, tmp_path, capsys):
    work = tmp_path / "W"
    code = main(
        ["run", str(sparse), "--work", str(work), "--configs", "3d_fullres", "--folds", "0", "1", "--epochs", "1",
         "--iters-per-epoch", "2", "--val-iters", "1", "-j", "1"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "selected: 3d_fullres (folds 0, 1)" in captured.out
    selection = load_selection(work / "sparse" / "selection.json")  # the typed reader takes what select wrote
    assert selection.winner.name == "3d_fullres"
    assert selection.postprocessing.evidence.ignore_label == IGNORE
    assert set(selection.ranking[0].per_class) == {"1", "2"}  # the ignore value is no class
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(sparse / "imagesTs"), "-o", str(out), "-m", str(work / "sparse")]) == 0
    (prediction,) = out.glob("*.nii.gz")
    assert IGNORE not in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))))
