"""`autounet run`, `select`, `postprocess` and `predict -m W/NAME` on a tiny synthetic dataset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from autounet.cli import main
from autounet.data.image_io import read_label
from autounet.data.probabilities import load_probability_file
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.evaluation.evaluate import evaluate_arrays
from autounet.inference.predictor import Predictor
from autounet.pipeline.run import RunOptions, fold_state, run_pipeline
from autounet.postprocessing.components import apply_postprocessing
from autounet.selection_document import load_selection, postprocessing_of
from autounet.workspace import Workspace, checkpoint_path

TINY = dict(epochs=1, iterations_per_epoch=2, validation_iterations=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("run")
    raw = make_synthetic_dataset(
        root / "raw" / "tiny", SyntheticSpec(cases=8, test_cases=2, shape=(16, 20, 18), classes=3, seed=3)
    )
    work = root / "W"
    result = run_pipeline(
        raw, Workspace.at(work, "tiny"), RunOptions(configurations=["2d", "3d_fullres"], folds=[0, 1], **TINY)
    )
    return {"raw": raw, "work": work, "result": result, "ws": result.workspace}


def test_run_trains_every_fold_then_selects_and_reports(trained):
    result, ws = trained["result"], trained["ws"]
    assert sorted(result.trained) == sorted(f"{c} fold {f}" for c in ("2d", "3d_fullres") for f in (0, 1))
    for c in ("2d", "3d_fullres"):
        for f in (0, 1):
            assert fold_state(ws.fold_dir(c, f)) == "done"
        assert (ws.results_dir(c) / "cv_summary.json").is_file()
    selection = json.loads(ws.selection_json.read_text())
    names = [r["name"] for r in selection["ranking"]]
    assert sorted(names) == ["2d", "2d+3d_fullres", "3d_fullres"]
    dice = [r["foreground_dice"] for r in selection["ranking"]]
    assert dice == sorted(dice, reverse=True)
    assert selection["winner"]["name"] == names[0] and selection["winner"]["folds"] == [0, 1]
    assert selection["postprocessing"]["kind"] == "components"
    assert "foreground" in selection["postprocessing"]["decision"]["evidence"]
    assert result.report is not None and "Selection" in result.report.read_text() or result.report.is_file()


def test_pair_ensemble_score_is_the_dice_of_the_averaged_probabilities(trained):
    ws = trained["ws"]
    selection = json.loads(ws.selection_json.read_text())
    pair = next(r for r in selection["ranking"] if r["name"] == "2d+3d_fullres")
    splits = json.loads(ws.splits_json.read_text())
    pairs = []
    for fold in (0, 1):
        for case in splits[fold]["val"]:
            a, labels, _ = load_probability_file(ws.fold_dir("2d", fold) / "validation" / f"{case}.npz")
            b, _, _ = load_probability_file(ws.fold_dir("3d_fullres", fold) / "validation" / f"{case}.npz")
            seg = np.asarray(labels)[np.argmax((a + b) / 2, axis=0)]
            ref, geo = read_label(trained["raw"] / "labelsTr" / f"{case}.nii.gz")
            pairs.append((case, seg, ref, geo.spacing))
    expected = evaluate_arrays(pairs, labels=[1, 2])
    assert pair["foreground_dice"] == pytest.approx(expected.foreground_mean["dice"], abs=1e-6)


def test_a_second_run_skips_every_finished_fold(trained, capsys):
    ws = trained["ws"]
    stamps = {p: p.stat().st_mtime_ns for p in ws.root.glob("results/*/fold_*/checkpoint_final.pt")}
    again = run_pipeline(
        trained["raw"], trained["ws"], RunOptions(configurations=["2d", "3d_fullres"], folds=[0, 1], **TINY)
    )
    assert again.trained == [] and len(again.skipped) == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_predict_with_the_workspace_uses_the_selection_and_its_postprocessing(trained, tmp_path):
    ws, raw = trained["ws"], trained["raw"]
    selection = json.loads(ws.selection_json.read_text())
    assert main(["predict", "-i", str(raw / "imagesTs"), "-o", str(tmp_path / "sel"), "-m", str(ws.root)]) == 0
    assert (
        main(
            [
                "predict",
                "-i",
                str(raw / "imagesTs"),
                "-o",
                str(tmp_path / "raw"),
                "-m",
                str(ws.root),
                "--no-postprocessing",
            ]
        )
        == 0
    )
    predictor = Predictor(ws.root)
    assert [m.configuration for m in predictor.members] == selection["winner"]["members"]
    decision = postprocessing_of(ws.root).decision
    for f in sorted((tmp_path / "sel").glob("*.nii.gz")):
        post, geo = read_label(f)
        plain, _ = read_label(tmp_path / "raw" / f.name)
        image_geo = read_label(raw / "labelsTs" / f.name)[1]
        assert geo == image_geo
        np.testing.assert_array_equal(post, apply_postprocessing(plain, decision))
    # `autounet postprocess` does the same to a folder
    assert main(["postprocess", str(tmp_path / "raw"), str(tmp_path / "pp"), "--from", str(ws.root), "-j", "1"]) == 0
    for f in sorted((tmp_path / "sel").glob("*.nii.gz")):
        np.testing.assert_array_equal(read_label(tmp_path / "pp" / f.name)[0], read_label(f)[0])


def test_interrupted_folds_are_resumed_or_revalidated_not_redone(trained, tmp_path):
    work = tmp_path / "W"
    shutil.copytree(trained["work"], work, symlinks=True)
    ws_root = work / trained["ws"].name
    # fold 1 of 3d_fullres lost its validation: only the validation is redone
    (ws_root / "results" / "3d_fullres" / "fold_1" / "validation" / "summary.json").unlink()
    final = ws_root / "results" / "3d_fullres" / "fold_1" / "checkpoint_final.pt"
    stamp = final.stat().st_mtime_ns
    # fold 0 of 2d was interrupted during training: resumed from checkpoint_latest.pt
    fold0 = ws_root / "results" / "2d" / "fold_0"
    checkpoint_path(fold0, "final").unlink()
    shutil.rmtree(fold0 / "validation")
    assert fold_state(fold0) == "resume"
    result = run_pipeline(
        trained["raw"],
        Workspace.at(work, trained["ws"].name),
        RunOptions(
            configurations=["2d", "3d_fullres"], folds=[0, 1], epochs=2, iterations_per_epoch=2, validation_iterations=1
        ),
    )
    assert sorted(result.trained) == ["2d fold 0", "3d_fullres fold 1"]
    assert final.stat().st_mtime_ns == stamp
    log = [json.loads(line) for line in (fold0 / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2]  # resumed after epoch 1, not restarted
    assert json.loads((ws_root / "selection.json").read_text())["winner"]


def test_run_killed_at_any_moment_completes_when_rerun(tmp_path):
    raw = make_synthetic_dataset(tmp_path / "raw" / "k", SyntheticSpec(cases=6, shape=(14, 16, 16), classes=2, seed=5))
    cmd = [
        sys.executable, "-m", "autounet", "run", str(raw), "--work", str(tmp_path / "W"), "--configs", "3d_fullres",
        "--folds", "0", "1", "--epochs", "2", "--iters-per-epoch", "2", "--val-iters", "1", "-j", "1",
    ]  # fmt: skip
    env = {**os.environ, "AUTOUNET_PROGRESS": "0"}
    for delay in (4.0, 9.0):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finals = {}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for f in (0, 1):
        finals[f] = (
            checkpoint_path(tmp_path / "W" / "k" / "results" / "3d_fullres" / f"fold_{f}", "final").stat().st_mtime_ns
        )
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0 and "complete, skipped" in rerun.stdout
    for f in (0, 1):
        path = checkpoint_path(tmp_path / "W" / "k" / "results" / "3d_fullres" / f"fold_{f}", "final")
        assert path.stat().st_mtime_ns == finals[f]
    assert json.loads((tmp_path / "W" / "k" / "selection.json").read_text())["winner"]["name"] == "3d_fullres"


def test_select_without_trained_folds_is_a_clear_error(tiny_msd, tmp_path, capsys):
    assert main(["plan", str(tiny_msd), "--work", str(tmp_path / "W")]) == 0
    assert main(["select", "tiny", "--work", str(tmp_path / "W")]) == 2
    assert "no configuration has validated folds" in capsys.readouterr().err


def test_run_refuses_unknown_configurations_and_folds(tiny_msd, tmp_path, capsys):
    assert main(["run", str(tiny_msd), "--work", str(tmp_path / "W"), "--configs", "3d_lowres"]) == 2
    assert "not planned" in capsys.readouterr().err
    assert main(["run", str(tiny_msd), "--work", str(tmp_path / "W"), "--folds", "7"]) == 2
    assert "fold 7" in capsys.readouterr().err


def test_region_models_get_the_et_rule_grid_searched_and_applied(tmp_path, monkeypatch):
    """`run --preset brats` on a tiny 5-class dataset: WT/TC/ET selection, the ET rule from the grid
    search in selection.json, and `predict -m W/NAME` writing labels in the dataset's values."""
    raw = make_synthetic_dataset(
        tmp_path / "raw" / "b", SyntheticSpec(cases=5, test_cases=1, shape=(18, 20, 20), channels=2, classes=5, seed=4)
    )
    options = RunOptions(configurations=["3d_fullres"], folds=[0, 1], recipe="brats", patch_size=[16, 16, 16], **TINY)
    from autounet.pipeline import run

    original = run.TrainOptions
    # a network small enough to train in seconds
    monkeypatch.setattr(run, "TrainOptions", lambda *a, **k: original(*a, **{**k, "features": [4, 8, 8, 8]}))
    result = run_pipeline(raw, Workspace.at(tmp_path / "W", "b"), options)
    selection = result.selection
    assert selection == load_selection(result.workspace.selection_json)
    assert selection.ranking[0].per_class.keys() == {"WT", "TC", "ET"}
    pp = selection.postprocessing
    assert pp.kind == "brats_et" and pp.dice_after >= pp.dice_before
    assert 0.3 - 1e-9 <= pp.rule.et_threshold <= 0.7 + 1e-9
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "-i",
                str(raw / "imagesTs"),
                "-o",
                str(out),
                "-m",
                str(result.workspace.root),
                "--save-probabilities",
            ]
        )
        == 0
    )
    seg, _ = read_label(next(out.glob("*.nii.gz")))
    assert set(np.unique(seg)) <= {0, 1, 2, 4}  # 2015 convention back from WT/TC/ET (3 is not painted)
    # `autounet postprocess` reproduces the prediction's post-processing from the saved probabilities
    assert (
        main(
            [
                "predict",
                "-i",
                str(raw / "imagesTs"),
                "-o",
                str(tmp_path / "plain"),
                "-m",
                str(result.workspace.root),
                "--no-postprocessing",
                "--save-probabilities",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "postprocess",
                str(tmp_path / "plain"),
                str(tmp_path / "pp"),
                "--from",
                str(result.workspace.root),
                "-j",
                "1",
            ]
        )
        == 0
    )
    for f in out.glob("*.nii.gz"):
        # the same up to voxels at a threshold: the saved probabilities are float16
        differ = np.mean(read_label(tmp_path / "pp" / f.name)[0] != read_label(f)[0])
        assert differ < 1e-3
