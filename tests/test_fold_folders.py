"""The one listing of a configuration's fold folders (workspace.fold_folders) and its users."""

from __future__ import annotations

from pathlib import Path

from autounet.inference.model import fold_dirs
from autounet.validation.cross_validation import fold_summaries
from autounet.workspace import Workspace, fold_folders, validation_summary_path


def test_folds_are_listed_in_fold_order_and_only_fold_folders_count(tmp_path: Path):
    ws = Workspace.at(tmp_path, "d")
    results = ws.results_dir("3d_fullres")
    for fold in ("10", "all", "2", "0"):
        ws.fold_dir("3d_fullres", fold).mkdir(parents=True)
    (results / "fold_3").write_text("a file, not a fold")
    (results / "fold_x").mkdir()
    (results / "next_stage").mkdir()
    listed = fold_folders(results)
    assert list(listed) == ["0", "2", "10", "all"]  # by number (not by name: fold_10 < fold_2), then all
    assert listed["10"] == results / "fold_10"
    assert fold_folders(tmp_path / "missing") == {}
    assert fold_dirs(results) == listed
    assert fold_dirs(results / "fold_2") == {"2": results / "fold_2"}
    for fold in ("10", "2", "all"):
        summary = validation_summary_path(results / f"fold_{fold}")
        summary.parent.mkdir()
        summary.write_text("{}")
    assert list(fold_summaries(results)) == [2, 10]  # numbered folds with a summary
