"""The workspace report (``W/NAME/report.md``): built from a planned synthetic dataset with
hand-made training logs, validation summaries, a cross-validation summary and a selection."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from autounet import api
from autounet.data.dataset import load_raw_dataset
from autounet.data.image_io import read_label, write_image
from autounet.evaluation.evaluate import evaluate_arrays, save_evaluation
from autounet.regions import brats_2017
from autounet.reporting import read_log, render_report, write_report
from autounet.training.logbook import write_log
from autounet.utils.atomic import atomic_write_json
from autounet.utils.plain_data import to_plain
from autounet.validation.cross_validation import write_cv_summary
from autounet.workspace import Workspace

NAME = "syn"


def _planned(tmp_path: Path) -> Workspace:
    raw = api.make_synthetic(tmp_path / "raw", cases=4, shape=(12, 16, 14), classes=3, modality="CT")
    api.plan(raw, work=tmp_path / "w", name=NAME, workers=1)
    return Workspace.at(tmp_path / "w", NAME)


def _log(epochs: int, partial_last: bool = False, start_dice: float = 0.3) -> list[dict]:
    entries = []
    ema = None
    for e in range(1, epochs + 1):
        dice = {"1": start_dice + 0.1 * e, "2": start_dice + 0.05 * e}
        mean = (dice["1"] + dice["2"]) / 2
        ema = mean if ema is None else 0.9 * ema + 0.1 * mean
        entries.append(
            {
                "epoch": e,
                "lr": 0.01 / e,
                "train_loss": 1.0 / e,
                "val_loss": 1.2 / e,
                "val_dice": dice,
                "val_dice_mean": mean,
                "ema_dice": ema,
                "train_loss_avg": 1.0 / e,
                "val_loss_avg": 1.2 / e,
                "iterations": 10,
                "seconds": 30.0 * e,
                "iterations_per_s": 1.0,
                "data_wait_fraction": 0.1,
                "partial": partial_last and e == epochs,
            }
        )
    return entries


def _trained(tmp_path: Path) -> tuple[Workspace, dict]:
    """A planned workspace with 3d_fullres folds 0 and 1 trained and validated, and a selection."""
    ws = _planned(tmp_path)
    raw = load_raw_dataset(json.loads(ws.dataset_json.read_text())["raw_path"])
    cases = [c.case_id for c in raw.cases]
    labels = {c.case_id: c.label for c in raw.cases}
    splits = [{"train": cases[2:], "val": cases[:2]}, {"train": cases[:2], "val": cases[2:]}]
    atomic_write_json(ws.splits_json, splits)
    for fold, split in enumerate(splits):
        fold_dir = ws.fold_dir("3d_fullres", fold)
        write_log(fold_dir / "log.jsonl", _log(3 + fold, partial_last=fold == 1, start_dice=0.3 + 0.05 * fold))
        (fold_dir / "validation").mkdir(parents=True)
        pairs = []
        for case in split["val"]:
            ref, geometry = read_label(labels[case])
            pred = ref.copy()
            if case == cases[0]:
                pred[pred == 2] = 0  # one imperfect case
            write_image(fold_dir / "validation" / f"{case}.nii.gz", pred, geometry)
            pairs.append((case, pred, ref, geometry.spacing))
        result = evaluate_arrays(pairs, labels=[1, 2])
        save_evaluation(result, fold_dir / "validation" / "summary.json")
    (ws.fold_dir("3d_fullres", 0) / "checkpoint_final.pt").write_bytes(b"")
    (ws.fold_dir("3d_fullres", 0) / "progress.png").write_bytes(b"\x89PNG")
    write_log(ws.fold_dir("2d", 0) / "log.jsonl", _log(2))
    write_log(ws.root / "results" / "ensembles" / "fold_0" / "log.jsonl", _log(2))  # not a configuration
    write_cv_summary(ws.results_dir("3d_fullres"))
    selection = {
        "schema_version": 1,
        "dataset": NAME,
        "metric": "mean foreground Dice over the cross-validation cases",
        "n_cases": 4,
        "ranking": [
            {
                "name": "3d_fullres",
                "members": ["3d_fullres"],
                "foreground_dice": 0.8712,
                "per_class": {"1": 0.8823, "2": 0.8601},
                "n_cases": 4,
                "complete": True,
            },
            {
                "name": "2d+3d_fullres",
                "members": ["2d", "3d_fullres"],
                "foreground_dice": 0.8634,
                "per_class": {"1": 0.8711, "2": 0.8557},
                "n_cases": 4,
                "complete": False,
            },
        ],
        "winner": {"name": "3d_fullres", "members": ["3d_fullres"], "folds": [0, 1]},
        "postprocessing": {
            "kind": "components",
            "decision": {
                "keep_largest_foreground": True,
                "keep_largest_classes": [1],
                "candidates": [1, 2],
                "connectivity": 26,
                "evidence": {
                    "num_cases": 4,
                    "min_gain": 0.0,
                    "connectivity": 26,
                    "dice": "mean over cases per class",
                    "foreground": {
                        "dice_without": {"1": 0.8823, "2": 0.8601},
                        "dice_with": {"1": 0.8901, "2": 0.8655},
                        "mean_without": 0.8712,
                        "mean_with": 0.8778,
                        "gain": 0.0066,
                        "cases_changed": 2,
                        "adopted": True,
                    },
                    "classes": {
                        "1": {
                            "dice_without": {"1": 0.8901, "2": 0.8655},
                            "dice_with": {"1": 0.8944, "2": 0.8655},
                            "mean_without": 0.8778,
                            "mean_with": 0.87995,
                            "gain": 0.0043,
                            "cases_changed": 1,
                            "adopted": True,
                        },
                        "2": {
                            "dice_without": {"1": 0.8901, "2": 0.8655},
                            "dice_with": {"1": 0.8901, "2": 0.8512},
                            "mean_without": 0.8778,
                            "mean_with": 0.87065,
                            "gain": -0.0143,
                            "cases_changed": 3,
                            "adopted": False,
                        },
                    },
                    "final": {"dice": {"1": 0.8944, "2": 0.8655}, "mean": 0.87995},
                },
            },
            "rule": None,
            "regions": None,
            "candidates_from_training_labels": [1, 2],
            "dice_before": 0.8712,
            "dice_after": 0.87995,
            "per_class_before": {"1": 0.8823, "2": 0.8601},
            "per_class_after": {"1": 0.8944, "2": 0.8655},
        },
        "predict_command": f"autounet predict -i IMAGES -o OUT -m W/{NAME}",
    }
    atomic_write_json(ws.selection_json, selection)
    return ws, selection


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", text)


def test_full_report_summarises_every_stage(tmp_path: Path):
    ws, selection = _trained(tmp_path)
    (ws.root / "report").mkdir()
    (ws.root / "report" / "example_old_case.png").write_bytes(b"stale")
    path = write_report(ws)
    assert path == ws.root / "report.md"
    text = path.read_text(encoding="utf-8")
    assert not list(ws.root.glob(".autounet-tmp.*")) and not list((ws.root / "report").glob(".autounet-tmp.*"))

    # dataset and plans
    assert "**4 training cases**" in text
    assert "| 0 | CT |" in text and "class_1" in text and "class_2" in text
    assert "3d_fullres" in text and "```text" in text and "configuration  spacing mm" in text

    # training: 3d_fullres and 2d trained, the ensembles folder is not a configuration
    assert "### `3d_fullres`" in text and "### `2d`" in text and "ensembles" not in text
    assert "time limit" in text and "finished" in text  # fold 1's last epoch was cut; fold 0 has a final checkpoint
    fold0 = _log(3)
    minutes0 = sum(e["seconds"] for e in fold0) / 60
    assert f"| 0 | 3 | finished | {fold0[-1]['train_loss']:.4f} | {fold0[-1]['val_loss']:.4f} |" in text
    assert f"{max(e['ema_dice'] for e in fold0):.4f}" in text and f"{minutes0:.1f}" in text

    # cross-validation numbers are those of cv_summary.json
    cv = json.loads((ws.results_dir("3d_fullres") / "cv_summary.json").read_text())
    assert f"{cv['mean']['1']['dice']:.4f}" in text and f"{cv['mean']['2']['dice']:.4f}" in text
    assert f"**{cv['foreground_mean']['dice']:.4f}**" in text
    assert "4 cases pooled from folds 0, 1" in text
    fold_summary = json.loads((ws.fold_dir("3d_fullres", 0) / "validation" / "summary.json").read_text())
    assert f"{fold_summary['foreground_mean']['dice']:.4f} (2 cases)" in text

    # selection: ranking, winner, post-processing in words with both numbers and the verdicts
    assert "**Winner: `3d_fullres`**" in text
    assert "| 1 | `3d_fullres` |" in text and "| 2 | `2d+3d_fullres` |" in text and "0.8634" in text
    assert "largest foreground component" in text and "0.8712 without, 0.8778 with" in text
    assert "class 1 (class_1), after the foreground step: its Dice 0.8901 without, 0.8944 with" in text
    assert "class 2 (class_2), after the foreground step: its Dice 0.8655 without, 0.8512 with" in text
    assert "-0.0143" in text and "**not adopted**" in text and text.count("**adopted**") == 2
    assert "0.8712 before post-processing, 0.8800 after" in text
    assert selection["predict_command"] in text

    # every linked file exists; the curves and the example picture are among them
    links = _links(text)
    assert "report/training_curves.png" in links
    assert "results/3d_fullres/fold_0/progress.png" in links
    assert "results/3d_fullres/fold_1/progress.png" not in links  # not written for fold 1
    examples = [link for link in links if link.startswith("report/example_")]
    assert len(examples) == 1
    for link in links:
        assert (ws.root / link).is_file(), link
    assert (ws.root / examples[0]).read_bytes()[:4] == b"\x89PNG"
    assert not (ws.root / "report" / "example_old_case.png").exists()  # an earlier report's picture is gone
    assert "Skipped" not in text


def test_report_from_plans_only_skips_sections_with_notes(tmp_path: Path):
    ws = _planned(tmp_path)
    ws.fingerprint_json.unlink()
    text = write_report(ws).read_text(encoding="utf-8")
    assert "```text" in text and "3d_fullres" in text
    assert "Skipped: no readable fingerprint.json" in text
    assert "Skipped: no trained fold yet" in text
    assert "Skipped: no selection.json yet" in text
    assert "Skipped: no trained fold, so no validation prediction" in text
    assert not _links(text)


def test_report_without_selection_shows_best_configuration_and_survives_bad_files(tmp_path: Path):
    ws, _ = _trained(tmp_path)
    ws.selection_json.unlink()
    # the raw dataset has gone: the example is skipped, everything else still reported
    json_path = ws.dataset_json
    descriptor = json.loads(json_path.read_text())
    descriptor["raw_path"] = str(tmp_path / "gone")
    json_path.write_text(json.dumps(descriptor))
    text = render_report(ws)
    assert "Skipped: no selection.json yet" in text
    assert "### `3d_fullres`" in text
    example = text.split("## 5. Example prediction", 1)[1]
    assert "Skipped:" in example and len(example.strip().splitlines()) == 1

    # a selection of the other kind (the BraTS ET rule), with an empty ranking, is rendered too
    rule = {"component_voxels": 8, "total_voxels": 50, "min_mean_probability": 0.85, "et_threshold": 0.5}
    brats = {
        "schema_version": 1,
        "dataset": NAME,
        "metric": "mean foreground Dice over the cross-validation cases",
        "n_cases": 4,
        "ranking": [],
        "winner": {"name": "3d_fullres", "members": ["3d_fullres"], "folds": [0, 1]},
        "postprocessing": {
            "kind": "brats_et",
            "decision": None,
            "rule": {**rule, "connectivity": 26},
            "regions": to_plain(brats_2017()),
            "grid_search": {
                "num_cases": 4,
                "score": "mean over cases of the mean of the region Dice scores (both empty counts as 1)",
                "best": {**rule, "connectivity": 26},
                "best_score": 0.8123,
                "no_rule_score": 0.7901,
                "paper_rule_score": 0.8011,
                "per_threshold": [
                    {"et_threshold": 0.5, "best_score": 0.8123, "no_rule_score": 0.7901, "region_dice": {"WT": 0.9}}
                ],
            },
            "dice_before": 0.7901,
            "dice_after": 0.8123,
        },
        "predict_command": f"autounet predict -i IMAGES -o OUT -m W/{NAME}",
    }
    atomic_write_json(ws.selection_json, brats)
    text = render_report(ws)
    assert "**Winner: `3d_fullres`**" in text and "lists no ranking" in text
    assert "smaller than 8 voxels" in text and "fewer than 50 ET voxels" in text
    assert "chosen rule 0.8123" in text and "no rule 0.7901" in text

    # an incomplete selection is named as unreadable, with the missing field; the rest is reported
    del brats["winner"]["members"]
    atomic_write_json(ws.selection_json, brats)
    text = render_report(ws)
    assert f"{ws.selection_json}.winner: missing field 'members'" in text
    assert "Skipped: selection.json could not be read" in text and "### `3d_fullres`" in text


def test_read_log_and_missing_workspace(tmp_path: Path):
    write_log(tmp_path / "log.jsonl", _log(2))
    assert [e["epoch"] for e in read_log(tmp_path / "log.jsonl")] == [1, 2]
    from autounet.errors import AutounetError

    with pytest.raises(AutounetError, match="workspace not found"):
        write_report(Workspace.at(tmp_path / "nowhere", "x"))
    assert np.isfinite(_log(1)[0]["val_dice_mean"])
