"""End of training: full-case validation of a fold, its summary, --validate-only, cv_summary.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autounet.api import plan, preprocess
from autounet.cli import main
from autounet.data.geometry import geometry_differences
from autounet.data.image_io import read_image, read_label
from autounet.data.probabilities import load_probability_file
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.evaluation.evaluate import evaluate_folders
from autounet.pipeline.fold import train_and_validate
from autounet.training.checkpoint import load_checkpoint
from autounet.training.options import TrainOptions
from autounet.validation.cross_validation import load_cv_summary, pool_folds
from autounet.validation.fold import is_validated
from autounet.workspace import Workspace, cv_summary_path

TINY = dict(epochs=1, iterations_per_epoch=2, validation_iterations=1, device="cpu")
CONFIG = "3d_fullres"


def train(work, name, options, validate=True, validation_tta=True):
    """Train one fold and validate it in full, as `autounet train` does."""
    return train_and_validate(Workspace.at(work, name), options, validate, validation_tta).training


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks gain nothing from a second thread, and OpenMP threads that spin while the
    other core is busy (another process) make each forward pass many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Folds 0 and 1 of 3d_fullres, trained and validated; the summaries as first written."""
    root = tmp_path_factory.mktemp("validation")
    raw = make_synthetic_dataset(
        root / "raw", SyntheticSpec(cases=6, shape=(16, 20, 18), classes=3, seed=31, spacing_jitter=0.15)
    )
    plan(raw, work=root / "W", workers=1)
    preprocess("raw", work=root / "W", workers=1)
    summaries = {}
    for fold in (0, 1):
        result = train(root / "W", "raw", TrainOptions(CONFIG, fold, **TINY))
        summaries[fold] = json.loads((result.fold_dir / "validation" / "summary.json").read_text())
    cv = json.loads(cv_summary_path(root / "W" / "raw" / "results" / CONFIG).read_text())
    return {"work": root / "W", "raw": raw, "summaries": summaries, "cv": cv}


def fold_dir(work: Path, fold: int) -> Path:
    return work / "raw" / "results" / CONFIG / f"fold_{fold}"


def val_cases(work: Path, fold: int) -> list[str]:
    return json.loads((work / "raw" / "splits.json").read_text())[fold]["val"]


def test_a_trained_fold_holds_a_segmentation_and_probabilities_per_validation_case(trained):
    work, raw = trained["work"], trained["raw"]
    for fold in (0, 1):
        folder = fold_dir(work, fold) / "validation"
        cases = val_cases(work, fold)
        assert cases == load_checkpoint(fold_dir(work, fold) / "checkpoint_final.pt")["training"]["val_cases"]
        expected = {f"{c}.nii.gz" for c in cases} | {f"{c}.npz" for c in cases} | {"summary.json"}
        assert {p.name for p in folder.iterdir()} == expected
        for case in cases:
            seg, geo = read_label(folder / f"{case}.nii.gz")
            ref, ref_geo = read_label(raw / "labelsTr" / f"{case}.nii.gz")
            assert seg.shape == ref.shape and not geometry_differences(ref_geo, geo)
            probs, labels, kind = load_probability_file(folder / f"{case}.npz")
            assert labels == [0, 1, 2] and kind == "softmax" and probs.shape == (3, *ref.shape)
            np.testing.assert_allclose(probs.sum(0), 1, atol=3e-3)
            assert (seg == probs.argmax(0)).mean() > 0.99  # float16 may flip near-ties
        assert is_validated(fold_dir(work, fold))
        step = load_checkpoint(fold_dir(work, fold) / "checkpoint_final.pt")["training"]["step"]
        assert is_validated(fold_dir(work, fold), step) and not is_validated(fold_dir(work, fold), step + 1)


def test_the_summary_equals_autounet_evaluate_on_the_written_files(trained, tmp_path):
    work, raw = trained["work"], trained["raw"]
    for fold in (0, 1):
        summary = trained["summaries"][fold]
        cases = val_cases(work, fold)
        assert sorted(summary["per_case"]) == sorted(cases) and summary["n_cases"] == len(cases)
        assert summary["configuration"] == CONFIG and summary["checkpoint"]["checkpoints"] == ["final"]
        refs = tmp_path / f"refs_{fold}"
        refs.mkdir()
        for case in cases:
            shutil.copy(raw / "labelsTr" / f"{case}.nii.gz", refs / f"{case}.nii.gz")
        pred = tmp_path / f"pred_{fold}"
        pred.mkdir()
        for case in cases:
            shutil.copy(fold_dir(work, fold) / "validation" / f"{case}.nii.gz", pred / f"{case}.nii.gz")
        json_out = tmp_path / f"eval_{fold}.json"
        assert main(["evaluate", str(pred), str(refs), "--labels", "1", "2", "--json", str(json_out), "-j", "1"]) == 0
        evaluated = json.loads(json_out.read_text())
        for case in cases:
            for label in ("1", "2"):
                a, b = summary["per_case"][case][label]["dice"], evaluated["per_case"][case][label]["dice"]
                assert (a is None and b is None) or a == pytest.approx(b, abs=1e-12), (case, label)
        api = evaluate_folders(pred, refs, labels=[1, 2], workers=1)
        assert summary["foreground_mean"]["dice"] == pytest.approx(api.foreground_mean["dice"], nan_ok=True)


def test_validate_only_reproduces_the_summary(trained, capsys):
    work = trained["work"]
    folder = fold_dir(work, 0) / "validation"
    before = {p.name: read_image([p])[0] for p in folder.glob("*.nii.gz")}
    (folder / "summary.json").unlink()
    for p in folder.glob("*.nii.gz"):
        p.unlink()
    code = main(["train", "raw", "-c", CONFIG, "-f", "0", "--work", str(work), "--validate-only", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "mean foreground Dice" in capsys.readouterr().out
    again = json.loads((folder / "summary.json").read_text())
    first = trained["summaries"][0]
    assert again["checkpoint"]["step"] == first["checkpoint"]["step"]
    assert again["per_case"].keys() == first["per_case"].keys()
    for case, metrics in first["per_case"].items():
        for label, values in metrics.items():
            assert again["per_case"][case][label]["dice"] == pytest.approx(values["dice"], abs=1e-9, nan_ok=True)
    for name, seg in before.items():
        np.testing.assert_array_equal(read_image([folder / name])[0], seg)
    assert main(["train", "raw", "-c", CONFIG, "-f", "all", "--work", str(work), "--validate-only"]) == 2


def test_cv_summary_pools_the_validated_folds(trained):
    work = trained["work"]
    results = work / "raw" / "results" / CONFIG
    cv = json.loads(cv_summary_path(results).read_text())
    summaries = trained["summaries"]
    assert cv["n_cases"] == summaries[0]["n_cases"] + summaries[1]["n_cases"] == len(cv["per_case"])
    assert set(cv["per_case"]) == set(val_cases(work, 0)) | set(val_cases(work, 1))
    assert cv["complete"] is False and cv["configuration"] == CONFIG  # 2 of the 5 folds of splits.json
    assert set(cv["folds"]) == {"0", "1"}
    for fold in (0, 1):
        assert cv["folds"][str(fold)]["n_cases"] == summaries[fold]["n_cases"]
        assert cv["folds"][str(fold)]["foreground_mean_dice"] == pytest.approx(
            summaries[fold]["foreground_mean"]["dice"], nan_ok=True
        )
        for case, metrics in summaries[fold]["per_case"].items():
            assert cv["per_case"][case] == metrics
    per_class = [np.mean([c[k]["dice"] for c in cv["per_case"].values()]) for k in ("1", "2")]
    assert cv["foreground_mean"]["dice"] == pytest.approx(np.mean(per_class))  # over the pool, not the folds
    assert load_cv_summary(results).n_cases == cv["n_cases"]
    result, folds = pool_folds(results)
    assert result.n_cases == cv["n_cases"] and set(folds) == {"0", "1"}
