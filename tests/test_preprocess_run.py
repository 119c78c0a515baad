"""`autounet preprocess` over a dataset: outputs, resume, interruption, failures."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autounet.api import plan, preprocess
from autounet.cli import main
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.planning.planner import PlannerOptions
from autounet.preprocessing.store import case_paths, open_case


def planned(tmp_path: Path, spec: SyntheticSpec, options: PlannerOptions | None = None) -> tuple[Path, Path, str]:
    raw = make_synthetic_dataset(tmp_path / "raw", spec)
    work = tmp_path / "W"
    plan(raw, work=work, workers=1, options=options)
    return raw, work, "raw"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def small(tmp_path: Path):
    return planned(tmp_path, SyntheticSpec(cases=4, shape=(12, 16, 14), classes=3, spacing_jitter=0.15, seed=3))


def test_all_planned_configurations_are_written_and_2d_shares_the_3d_files(small):
    _, work, name = small
    summary = preprocess(name, work=work, workers=1)
    assert summary.ok and summary.cases == 4 and summary.processed == 4
    assert summary.written == {"2d": 4, "3d_fullres": 4}
    d2, d3 = work / name / "preprocessed" / "2d", work / name / "preprocessed" / "3d_fullres"
    for case in ("synth_000", "synth_003"):
        p2, p3 = case_paths(d2, case), case_paths(d3, case)
        assert os.stat(p2["image"]).st_ino == os.stat(p3["image"]).st_ino  # hard link, computed once
        img, seg, loc, props = open_case(d3, case)
        assert isinstance(img, np.memmap) and img.dtype == np.float32 and seg.dtype == np.uint8
        assert list(img.shape[1:]) == props.shape_after_resampling == list(seg.shape)
        assert open_case(d2, case)[3].configuration == "2d"
    assert (d2 / "manifest.json").is_file() and (d3 / "manifest.json").is_file()


def test_a_second_run_skips_complete_cases_and_redoes_broken_ones(small):
    _, work, name = small
    preprocess(name, work=work, workers=1)
    folder = work / name / "preprocessed" / "3d_fullres"
    before = snapshot(folder)
    again = preprocess(name, work=work, workers=1)
    assert again.processed == 0 and again.skipped == {"2d": 4, "3d_fullres": 4}
    # interrupted states: marker missing, array truncated, temporary left behind
    case_paths(folder, "synth_001")["properties"].unlink()
    image = case_paths(folder, "synth_002")["image"]
    image.write_bytes(image.read_bytes()[:100])
    (folder / ".tmp.abc.synth_003_image.npy").write_bytes(b"partial")
    redo = preprocess(name, work=work, workers=1)
    assert redo.processed == 2 and redo.written["3d_fullres"] == 2
    assert snapshot(folder) == before


def test_changing_options_redoes_the_data(small):
    _, work, name = small
    preprocess(name, work=work, workers=1, configurations=["3d_fullres"])
    half = preprocess(name, work=work, workers=1, configurations=["3d_fullres"], float16=True)
    assert half.processed == 4
    img, _, _, props = open_case(work / name / "preprocessed" / "3d_fullres", "synth_000")
    assert img.dtype == np.float16 and props.image_dtype == "float16"


def test_failing_case_is_reported_and_the_others_finish(small, capsys):
    raw, work, name = small
    # corrupt a file after planning, keeping size and modification time so the plan stays current
    label = raw / "labelsTr" / "synth_002.nii.gz"
    st = label.stat()
    label.write_bytes(b"\0" * st.st_size)
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(["preprocess", name, "--work", str(work), "-j", "1"]) == 2
    captured = capsys.readouterr()
    assert "synth_002: " in captured.err and "cannot read image" in captured.err
    folder = work / name / "preprocessed" / "3d_fullres"
    assert sorted(p.stem for p in folder.glob("synth_*.json")) == ["synth_000", "synth_001", "synth_003"]
    assert not (folder / "manifest.json").exists()


def test_raw_data_changed_since_planning_is_an_error(small):
    raw, work, name = small
    (raw / "labelsTr" / "synth_000.nii.gz").touch()
    os.utime(raw / "labelsTr" / "synth_000.nii.gz", (1, 1))
    with pytest.raises(AutounetError, match="changed since it was planned"):
        preprocess(name, work=work, workers=1)


def test_unknown_configuration_and_missing_plans(small, tmp_path: Path, capsys):
    _, work, name = small
    assert main(["preprocess", name, "--work", str(work), "-c", "3d_lowres"]) == 2
    assert "not planned" in capsys.readouterr().err
    assert main(["preprocess", "nothing", "--work", str(tmp_path / "empty")]) == 2
    assert "run `autounet plan` first" in capsys.readouterr().err


def test_cases_removed_from_the_dataset_are_removed_from_the_preprocessed_folder(small):
    raw, work, name = small
    preprocess(name, work=work, workers=1, configurations=["3d_fullres"])
    folder = work / name / "preprocessed" / "3d_fullres"
    for suffix in ("_image.npy", "_seg.npy", "_locations.npy", ".json"):
        (folder / f"old_case{suffix}").write_bytes(b"x")
    preprocess(name, work=work, workers=1, configurations=["3d_fullres"])
    assert not list(folder.glob("old_case*"))


def test_anisotropic_data_take_the_separate_axis_path(tmp_path: Path):
    spec = SyntheticSpec(cases=3, shape=(8, 40, 40), spacing=(5.0, 1.0, 1.0), spacing_jitter=0.1, seed=4)
    _, work, name = planned(tmp_path, spec)
    preprocess(name, work=work, workers=1, configurations=["3d_fullres"])
    props = [open_case(work / name / "preprocessed" / "3d_fullres", f"synth_{i:03d}")[3] for i in range(3)]
    assert all(p.separate_axis == 0 for p in props)
    assert any(p.spacing_after_crop != p.target_spacing for p in props)


def test_low_resolution_stage_gets_its_own_data(tmp_path: Path):
    options = PlannerOptions(patch_edge_3d=12)  # small patches so that a tiny dataset needs the cascade
    _, work, name = planned(tmp_path, SyntheticSpec(cases=3, shape=(24, 28, 26), seed=5), options)
    summary = preprocess(name, work=work, workers=1)
    assert set(summary.configurations) == {"2d", "3d_fullres", "3d_lowres"}
    low = open_case(work / name / "preprocessed" / "3d_lowres", "synth_000")
    full = open_case(work / name / "preprocessed" / "3d_fullres", "synth_000")
    assert np.prod(low[0].shape) < np.prod(full[0].shape) / 4
    assert low[3].target_spacing == pytest.approx([s * 2 for s in full[3].target_spacing])
    assert (
        os.stat(case_paths(work / name / "preprocessed" / "3d_lowres", "synth_000")["image"]).st_ino
        != os.stat(case_paths(work / name / "preprocessed" / "3d_fullres", "synth_000")["image"]).st_ino
    )


def test_killed_run_resumes_to_outputs_identical_to_an_uninterrupted_run(tmp_path: Path):
    spec = SyntheticSpec(cases=24, shape=(40, 56, 56), spacing_jitter=0.2, seed=6)
    raw = make_synthetic_dataset(tmp_path / "raw", spec)
    for w in ("A", "B"):
        plan(raw, work=tmp_path / w, workers=1)
    env = {**os.environ, "AUTOUNET_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "autounet", "preprocess", "raw", "-c", "3d_fullres", "-j", "1"]
    folder = tmp_path / "A" / "raw" / "preprocessed" / "3d_fullres"
    proc = subprocess.Popen(
        [*cmd, "--work", str(tmp_path / "A")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 60
    while time.time() < deadline and len(list(folder.glob("synth_*.json"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(folder.glob("synth_*.json")))
    assert 3 <= done_at_kill < 24, "the run was not interrupted part-way"
    assert not (folder / "manifest.json").exists()
    subprocess.run([*cmd, "--work", str(tmp_path / "A")], env=env, check=True, capture_output=True)
    subprocess.run([*cmd, "--work", str(tmp_path / "B")], env=env, check=True, capture_output=True)
    a, b = snapshot(folder), snapshot(tmp_path / "B" / "raw" / "preprocessed" / "3d_fullres")
    assert a == b and len(a) == 24 * 4 + 1


def test_a_second_concurrent_run_is_refused(small):
    from autounet.utils.lock import exclusive

    _, work, name = small
    with exclusive(work / name / "preprocessed" / ".lock", "test"):
        with pytest.raises(AutounetError, match="another `autounet preprocess` is running"):
            preprocess(name, work=work, workers=1)
    assert preprocess(name, work=work, workers=1).ok
