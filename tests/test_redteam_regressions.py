"""Faults found by the red-team corpus (/work/notes/redteam/corpus.py), each failing before its fix:
the command exits 2 with one clear line instead of a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from autounet.cli import main


def test_an_infinite_memory_limit_exits_2_not_an_overflow(tmp_path, capsys):
    code = main(
        ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path), "--memory-limit", "inf"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "--memory-limit must be a positive number of GB, got inf" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "field, value",
    [("patch_size", [-4, 14, 16, 14]), ("spacing", [float("nan"), 1.0, 1.0]), ("transpose_backward", [0, 0, 0])],
)
def test_plans_from_a_source_with_impossible_values_is_refused_naming_the_file(
    tiny_msd: Path, tmp_path: Path, capsys, field, value
):
    assert main(["plan", str(tiny_msd), "--work", str(tmp_path / "A"), "-j", "1"]) == 0
    source = json.loads((tmp_path / "A" / "tiny" / "plans.json").read_text())
    source["configurations"]["3d_fullres"][field] = value
    bad = tmp_path / "bad_plans.json"
    bad.write_text(json.dumps(source))  # Python writes NaN as the bare token NaN
    capsys.readouterr()
    assert main(["plan", str(tiny_msd), "--work", str(tmp_path / "B"), "--name", "t", "--plans-from", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}" in err and field in err and "Traceback" not in err
    assert not (tmp_path / "B" / "t" / "plans.json").exists()


def test_export_with_an_unknown_checkpoint_kind_exits_2_naming_it(tmp_path: Path, capsys):
    code = main(["export", str(tmp_path), "-o", str(tmp_path / "e"), "--checkpoint", "../../x"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--checkpoint '../../x': expected one of" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()


def test_plans_from_a_fifo_is_refused_instead_of_blocking(tmp_path: Path):
    from autounet.errors import AutounetError
    from autounet.planning.transfer import source_plans_path

    fifo = tmp_path / "plans.json"
    os.mkfifo(fifo)
    with pytest.raises(AutounetError, match="not a plans file"):
        source_plans_path(fifo)


def test_postprocess_refuses_to_replace_a_file_already_in_out_unless_overwrite(tmp_path: Path):
    from autounet.data.image_io import write_image
    from autounet.errors import AutounetError
    from autounet.postprocessing.apply import apply_to_folder
    from conftest import geometry

    src, out = tmp_path / "seg", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    seg = np.zeros((6, 7, 8), np.uint8)
    seg[1:4, 2:5, 2:6] = 1
    write_image(src / "a.nii.gz", seg, geometry())
    (out / "a.nii.gz").write_bytes(b"not the command's")
    with pytest.raises(AutounetError, match=f"{out}: already holds a.nii.gz; give --overwrite"):
        apply_to_folder(src, out, None, workers=1)
    assert (out / "a.nii.gz").read_bytes() == b"not the command's"
    assert [p.name for p in apply_to_folder(src, out, None, workers=1, overwrite=True)] == ["a.nii.gz"]
    assert [p.name for p in apply_to_folder(src, src, None, workers=1)] == ["a.nii.gz"]  # IN = OUT: in place


def test_show_with_a_huge_slice_count_exits_2_at_once(tmp_path: Path, capsys):
    from autounet.data.image_io import write_image
    from conftest import geometry

    image = tmp_path / "a.nii.gz"
    write_image(image, np.zeros((6, 7, 8), np.float32), geometry())
    code = main(["show", str(image), "--out", str(tmp_path / "a.png"), "--slices", "100000000"])
    assert code == 2
    assert "slices must be between 1 and 32, got 100000000" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_make_synthetic_with_a_billion_cases_exits_2_before_writing(tmp_path: Path, capsys):
    code = main(["make-synthetic", str(tmp_path / "s"), "--cases", "1000000000"])
    assert code == 2
    assert "--cases + --test-cases must be at most 10000" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_report_refuses_a_folder_that_is_not_a_workspace_and_keeps_its_files(tmp_path: Path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "report.md").write_text("my own notes")
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: workspace not found (no dataset.json or plans.json there" in err
    assert (folder / "report.md").read_text() == "my own notes" and not (folder / "report.html").exists()


@pytest.mark.parametrize("content", [b"hello", b"hello\n" * 3, b"\x80\x02}q\x00X\x01"])
def test_a_damaged_or_foreign_checkpoint_is_one_error_not_a_traceback(tmp_path: Path, content: bytes):
    from autounet.errors import AutounetError
    from autounet.training.checkpoint import load_checkpoint

    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(AutounetError, match="x.pt"):
        load_checkpoint(path)
