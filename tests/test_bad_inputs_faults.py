"""Hard to break: no silent data loss, no traceback (issue 15).

Each test plants one fault (files the command did not make in its way, a killed run's temporaries,
a full disk or a file size limit, a read-only folder, a file where a folder is needed, a second
process on the same fold, bad numbers) and checks that the command exits 2 with a message naming
the file or case, prints no traceback, and leaves every earlier output as it was.

A tiny model is trained once for the module (one epoch of two iterations).
"""

from __future__ import annotations

import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autounet import api
from autounet.cli import main
from autounet.data.image_io import read_label, write_image
from autounet.data.probabilities import save_probability_file
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.pipeline.fold import train_and_validate
from autounet.postprocessing.apply import Postprocessing, apply_to_folder
from autounet.postprocessing.brats_et import EtRule
from autounet.regions import brats_2017
from autounet.runtime import resolve_device
from autounet.training.checkpoint import load_checkpoint
from autounet.training.options import TrainOptions
from autounet.utils.lock import exclusive
from autounet.utils.temporary import PREFIX, _host_token, is_temporary, remove_stale_temporaries
from autounet.workspace import Workspace, checkpoint_path
from conftest import geometry

TINY = dict(epochs=1, iterations_per_epoch=2, validation_iterations=1, device="cpu")
ENV = {**os.environ, "AUTOUNET_PROGRESS": "0"}
CLI = [sys.executable, "-m", "autounet"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``root/raw`` (5 cases) and ``root/W/raw`` with 3d_fullres fold 0 trained (not validated)."""
    root = tmp_path_factory.mktemp("faults")
    raw = make_synthetic_dataset(root / "raw", SyntheticSpec(cases=5, shape=(12, 14, 16), seed=3))
    api.plan(raw, work=root / "W", workers=1)
    api.preprocess("raw", work=root / "W", workers=1, configurations=["3d_fullres"])
    train_and_validate(Workspace.at(root / "W", "raw"), TrainOptions("3d_fullres", 0, **TINY), validate=False)
    return root


def model(root: Path) -> Path:
    return root / "W" / "raw" / "results" / "3d_fullres"


def inputs(root: Path, tmp_path: Path, n: int = 2, suffix: str = ".nii.gz") -> Path:
    """``n`` raw images of the dataset, copied (or rewritten with ``suffix``) into a fresh folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    for f in sorted((root / "raw" / "imagesTr").glob("*.nii.gz"))[:n]:
        name = f.name[: -len(".nii.gz")]
        if suffix == ".nii.gz":
            shutil.copy(f, folder / f.name)
        else:
            image, geo = read_label(f)
            write_image(folder / (name + suffix), image, geo)
    return folder


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def segmentations(folder: Path) -> list[Path]:
    return [p for p in folder.glob("*.nii.gz") if not p.name.startswith(".")]


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if is_temporary(p.name))


def predict_args(root: Path, src: Path, out: Path, *extra) -> list:
    return ["predict", "-i", src, "-o", out, "-m", model(root), "--device", "cpu", "--no-tta", *extra]


def copy_workspace(root: Path, tmp_path: Path) -> Path:
    """A private copy of the trained workspace (for tests that write into it)."""
    work = tmp_path / "W"
    shutil.copytree(root / "W", work)
    return work


def file_size_limit(limit: int):
    """``preexec_fn``: files may grow to ``limit`` bytes; a bigger write fails with EFBIG (a full disk
    in miniature, also as root)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def without_privileges() -> list[str]:
    """A command prefix under which permission bits apply: none for a normal user; as root, a new
    user namespace (``unshare --user``), where root keeps its files but not its override."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") and subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode == 0:
        return ["unshare", "--user"]
    pytest.skip("running as root without user namespaces: permission bits cannot be made to apply")


# --- 1. never overwrite a file the command did not make ------------------------------------------


def test_predict_refuses_existing_outputs_and_keeps_a_hand_edited_segmentation(trained, tmp_path, capsys):
    src, out = inputs(trained, tmp_path), tmp_path / "out"
    assert cli(capsys, *predict_args(trained, src, out, "--png"))[0] == 0
    cases = sorted(p.name for p in out.glob("*.nii.gz"))
    assert len(cases) == 2
    edited = out / cases[0]
    seg, geo = read_label(edited)
    write_image(edited, np.zeros_like(seg), geo)  # a hand correction: must survive
    before = snapshot(out)

    code, _, err = cli(capsys, *predict_args(trained, src, out, "--png"))
    assert code == 2 and cases[0] in err and "4 file(s)" in err and "--overwrite" in err and "--continue" in err
    assert snapshot(out) == before

    code, stdout, _ = cli(capsys, *predict_args(trained, src, out, "--png", "--continue"))
    assert code == 0 and "2 case(s) already complete, skipped" in stdout
    assert snapshot(out) == before

    (out / cases[1]).unlink()  # an interrupted run: one case incomplete
    code, stdout, _ = cli(capsys, *predict_args(trained, src, out, "--png", "--continue"))
    assert code == 0 and "1 segmentation(s)" in stdout and "1 case(s) already complete" in stdout
    assert snapshot(out)[cases[0]] == before[cases[0]] and (out / cases[1]).is_file()

    with pytest.raises(SystemExit) as exc:  # one or the other
        main([str(a) for a in predict_args(trained, src, out, "--overwrite", "--continue")])
    assert exc.value.code == 2
    with pytest.raises(AutounetError, match="not both"):
        api.predict(src, out, model=model(trained), device="cpu", overwrite=True, skip_complete=True)

    assert cli(capsys, *predict_args(trained, src, out, "--png", "--overwrite"))[0] == 0
    assert snapshot(out)[cases[0]] != before[cases[0]]  # replaced by the model's segmentation


def test_show_replaces_only_a_png_and_evaluate_only_an_evaluation(tiny_msd, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = sorted((tiny_msd / "imagesTr").glob("*.nii.gz"))[0]
    label = tiny_msd / "labelsTr" / image.name
    keep = {label: label.read_bytes()}
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    keep[notes] = notes.read_bytes()

    for target in (label, notes, tmp_path / "new.nii.gz"):
        code, _, err = cli(capsys, "show", image, "--seg", label, "-o", target)
        assert code == 2 and str(target) in err
    picture = tmp_path / "pic.png"
    assert cli(capsys, "show", image, "--seg", label, "-o", picture)[0] == 0
    assert cli(capsys, "show", image, "--seg", label, "-o", picture)[0] == 0  # its own kind: replaced

    pred, gt = tmp_path / "pred", tiny_msd / "labelsTr"
    shutil.copytree(gt, pred)
    other_json = tmp_path / "plans.json"
    other_json.write_text('{"not": "an evaluation"}')
    keep[other_json] = other_json.read_bytes()
    for target in (label, other_json, notes, tmp_path):
        code, _, err = cli(capsys, "evaluate", pred, gt, "--json", target, "-j", "1")
        assert code == 2 and str(target) in err, err
    mine = tmp_path / "eval.json"
    assert cli(capsys, "evaluate", pred, gt, "--json", mine, "-j", "1")[0] == 0
    assert cli(capsys, "evaluate", pred, gt, "--json", mine, "-j", "1")[0] == 0  # its own: replaced
    for path, data in keep.items():
        assert path.read_bytes() == data


# --- 2. temporaries -------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_predict_leaves_temporaries_that_the_next_run_removes(trained, tmp_path, capsys):
    src, out = inputs(trained, tmp_path, n=1), tmp_path / "out"
    hang = (
        "import sys, time\n"
        "import autounet.data.image_io as io\n"
        "real = io.write_image\n"
        "def slow(path, *a, **k):\n"
        "    real(path, *a, **k)\n"
        "    print('WRITING', path, flush=True)\n"
        "    time.sleep(600)\n"
        "io.write_image = slow\n"
        "from autounet.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [str(a) for a in predict_args(trained, src, out)]
    proc = subprocess.Popen([sys.executable, "-c", hang, *args], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("WRITING"), line
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    left = temporaries(out)
    assert left and f"-{proc.pid}." in left[0]
    assert not segmentations(out)

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = out / f"{PREFIX}{_host_token()}-{sleeper.pid}.abcd1234.other.nii.gz"  # a live process's write
        live.write_bytes(b"in progress")
        stale_dir = out / f"{PREFIX}{_host_token()}-{_dead_pid()}.abcd1234.x.mhd"  # a killed .mhd write
        stale_dir.mkdir()
        (stale_dir / "x.zraw").write_bytes(b"partial")
        other_host = out / f"{PREFIX}00000000-{_dead_pid()}.abcd1234.y.nii.gz"
        other_host.write_bytes(b"another machine's")
        user = out / ".tmp.notes"  # not ours
        user.write_bytes(b"mine")

        assert cli(capsys, *predict_args(trained, src, out))[0] == 0
        assert temporaries(out) == sorted([live.name, other_host.name])
        assert user.read_bytes() == b"mine" and len(segmentations(out)) == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(out) == [live]  # its process has ended


def test_postprocess_writes_mhd_and_nhdr_headers_naming_their_data_files(tmp_path, capsys):
    src, out = tmp_path / "seg", tmp_path / "out"
    seg = np.zeros((6, 7, 8), np.uint8)
    seg[1:4, 2:5, 2:6] = 1
    seg[5, 6, 7] = 1  # a speck the largest-component rule removes
    src.mkdir()
    write_image(src / "a.mhd", seg, geometry())  # + a.zraw
    written = apply_to_folder(src, out, None, workers=1)
    assert [p.name for p in written] == ["a.mhd"]
    assert sorted(p.name for p in out.iterdir()) == ["a.mhd", "a.zraw"]
    assert "ElementDataFile = a.zraw" in (out / "a.mhd").read_text()
    np.testing.assert_array_equal(read_label(out / "a.mhd")[0], seg)

    regions = brats_2017()
    brats_in, brats_out = tmp_path / "brats", tmp_path / "brats_out"
    brats_in.mkdir()
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[1:5, 1:5, 1:5] = 2
    labels[2:4, 2:4, 2:4] = 4
    write_image(brats_in / "b.nhdr", labels, geometry())
    probs = np.stack([(labels > 0), np.isin(labels, [1, 4]), labels == 4]).astype(np.float32)
    save_probability_file(brats_in / "b.npz", probs, [0, 1, 2, 4], "sigmoid")
    pp = Postprocessing("brats_et", rule=EtRule(component_voxels=0, total_voxels=0), regions=regions)
    apply_to_folder(brats_in, brats_out, pp, workers=1)
    assert sorted(p.name for p in brats_out.iterdir()) == ["b.nhdr", "b.raw.gz"]
    assert "data file: b.raw.gz" in (brats_out / "b.nhdr").read_text()
    assert read_label(brats_out / "b.nhdr")[0].shape == labels.shape


# --- 3. file-system faults ------------------------------------------------------------------------


def test_a_full_disk_while_saving_a_checkpoint_exits_2_and_keeps_the_earlier_one(trained, tmp_path):
    work = copy_workspace(trained, tmp_path)
    fold = work / "raw" / "results" / "3d_fullres" / "fold_0"
    before = snapshot(fold)
    cmd = [*CLI, "train", "raw", "-c", "3d_fullres", "-f", "0", "-w", work, "--resume", "--epochs", "2"]
    cmd += ["--iters-per-epoch", "1", "--val-iters", "1", "--no-validate", "--device", "cpu"]
    done = subprocess.run(
        [str(c) for c in cmd], env=ENV, capture_output=True, text=True, preexec_fn=file_size_limit(64 * 1024)
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "File too large" in done.stderr
    assert "checkpoint_" in done.stderr and str(fold) in done.stderr
    assert snapshot(fold) == before and not temporaries(fold)


def test_a_short_nifti_write_is_caught_and_the_earlier_prediction_kept(trained, tmp_path, capsys):
    """ITK's NIfTI writer reports nothing when the disk fills: the written file is checked."""
    src, out = inputs(trained, tmp_path, n=1, suffix=".nii"), tmp_path / "out"
    assert cli(capsys, *predict_args(trained, src, out))[0] == 0
    before = snapshot(out)
    cmd = [str(a) for a in [*CLI, *predict_args(trained, src, out, "--overwrite")]]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, preexec_fn=file_size_limit(1024))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "File too large" in done.stderr
    assert str(out / next(iter(before))) in done.stderr
    assert snapshot(out) == before and not temporaries(out)


def test_a_read_only_output_folder_and_an_unreadable_checkpoint_exit_2(trained, tmp_path):
    prefix = without_privileges()
    src = inputs(trained, tmp_path, n=1)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    cmd = [str(a) for a in [*prefix, *CLI, *predict_args(trained, src, read_only)]]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "Permission denied" in done.stderr and str(read_only) in done.stderr
    assert not list(read_only.iterdir())

    fold = tmp_path / "fold_0"
    shutil.copytree(model(trained) / "fold_0", fold)
    checkpoint_path(fold, "final").chmod(0)
    cmd = [str(a) for a in [*prefix, *CLI, "predict", "-i", src, "-o", tmp_path / "o2", "-m", fold, "--device", "cpu"]]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "checkpoint_final.pt: checkpoint cannot be read (Permission denied)" in done.stderr, done.stderr


def test_a_file_where_a_folder_is_needed_and_the_reverse_exit_2(trained, tmp_path, capsys):
    src = inputs(trained, tmp_path, n=1)
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep")
    code, _, err = cli(capsys, *predict_args(trained, src, a_file))
    assert code == 2 and str(a_file) in err and "not a folder" in err
    code, _, err = cli(capsys, *predict_args(trained, src, a_file / "sub"))
    assert code == 2 and str(a_file) in err
    code, _, err = cli(capsys, "preprocess", "raw", "--work", a_file)
    assert code == 2 and str(a_file) in err and "--work" in err
    image = next(src.iterdir())
    code, _, err = cli(capsys, "show", image, "-o", a_file / "pic.png")
    assert code == 2 and str(a_file) in err and "folder is needed" in err
    code, _, err = cli(capsys, "make-synthetic", a_file)
    assert code == 2 and str(a_file) in err
    assert a_file.read_text() == "keep"


# --- 4. arguments ---------------------------------------------------------------------------------

TRAIN = ["train", "nowhere", "-c", "3d_fullres", "-f", "0"]


@pytest.mark.parametrize(
    "args, option",
    [
        ([*TRAIN, "--lr", "nan"], "--lr"),
        ([*TRAIN, "--lr", "-1"], "--lr"),
        ([*TRAIN, "--batch-size", "0"], "--batch-size"),
        ([*TRAIN, "--epochs", "0"], "--epochs"),
        ([*TRAIN, "--iters-per-epoch", "0"], "--iters-per-epoch"),
        ([*TRAIN, "--val-iters", "-1"], "--val-iters"),
        ([*TRAIN, "--max-minutes", "0"], "--max-minutes"),
        ([*TRAIN, "--drop-block", "1"], "--drop-block"),
        ([*TRAIN, "--width-multiplier", "0"], "--width-multiplier"),
        ([*TRAIN, "--threads", "0"], "--threads"),
        (["train", "nowhere", "-c", "3d_fullres", "-f", "x"], "--fold"),
        (["predict", "-i", "a", "-o", "b", "-m", "c", "--step", "0"], "--step"),
        (["predict", "-i", "a", "-o", "b", "-m", "c", "--step", "1.5"], "--step"),
        (["check", "raw", "-j", "0"], "-j/--workers"),
        (["run", "raw", "--folds", "7"], "fold 7"),
        (["run", "raw", "--epochs", "0"], "--epochs"),
        (["evaluate", "a", "b", "--tolerance", "0"], "--tolerance"),
        (["show", "a.nii.gz", "--slices", "0"], "--slices"),
        (["make-synthetic", "out", "--cases", "0"], "--cases"),
        (["demo", "--epochs", "0"], "--epochs"),
    ],
)
def test_bad_numbers_exit_2_naming_the_option(args, option, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, *args)
    assert code == 2 and option in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_api_checks_its_numbers_too(tmp_path):
    with pytest.raises(AutounetError, match="--batch-size"):
        api.train("x", "3d_fullres", 0, work=tmp_path, batch_size=0)
    with pytest.raises(AutounetError, match="--lr"):
        api.train("x", "3d_fullres", 0, work=tmp_path, lr=float("inf"))
    with pytest.raises(AutounetError, match="--step"):
        api.predict(tmp_path, tmp_path / "o", model=tmp_path, step=0)
    with pytest.raises(AutounetError, match="-j/--workers"):
        api.preprocess("x", work=tmp_path, workers=0)
    with pytest.raises(AutounetError, match="-j/--workers"):
        api.plan(tmp_path, work=tmp_path, workers=0)
    assert not list(tmp_path.iterdir())


def test_postprocess_of_an_empty_folder_exits_2(trained, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(capsys, "postprocess", empty, tmp_path / "out", "--from", trained / "W" / "raw")
    assert code == 2 and f"no segmentations in {empty}" in err
    assert not (tmp_path / "out").exists()


# --- 5. messages ----------------------------------------------------------------------------------


def test_a_checkpoint_of_another_configuration_is_named_as_such(trained, tmp_path, capsys):
    work = copy_workspace(trained, tmp_path)
    other = work / "raw" / "results" / "2d" / "fold_0"
    other.mkdir(parents=True)
    shutil.copy(checkpoint_path(model(trained) / "fold_0", "latest"), checkpoint_path(other, "latest"))
    code, _, err = cli(capsys, "train", "raw", "-c", "2d", "-f", "0", "-w", work, "--resume", "--device", "cpu")
    assert code == 2 and "resuming a 3d_fullres run's checkpoint into a 2d fold" in err
    assert "plans" not in err


def test_a_checkpoint_of_another_fold_is_not_resumed(trained, tmp_path, capsys):
    """A fold's checkpoint copied into another fold holds another split's training cases."""
    work = copy_workspace(trained, tmp_path)
    other = work / "raw" / "results" / "3d_fullres" / "fold_3"
    other.mkdir(parents=True)
    shutil.copy(checkpoint_path(model(trained) / "fold_0", "latest"), checkpoint_path(other, "latest"))
    code, _, err = cli(capsys, "train", "raw", "-c", "3d_fullres", "-f", "3", "-w", work, "--resume", "--device", "cpu")
    assert code == 2 and "checkpoint is of fold 0, not fold 3" in err and "Traceback" not in err


class _Code:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_with_code_is_refused_and_a_folder_is_not_a_checkpoint(tmp_path):
    plain = tmp_path / "legacy.pt"
    plain.write_bytes(pickle.dumps({"state_dict": _Code()}, protocol=4))
    with pytest.raises(AutounetError, match=r"refused: .*could run code.*system"):
        load_checkpoint(plain)
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(AutounetError, match="not a checkpoint file"):
        load_checkpoint(tmp_path / "folder.pt")
    with pytest.raises(AutounetError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_check_through_a_symlinked_folder_names_files_relative_to_it(tiny_msd, tmp_path, capsys):
    label = sorted((tiny_msd / "labelsTr").glob("*.nii.gz"))[1]
    label.write_bytes(b"not an image")
    link = tmp_path / "link"
    link.symlink_to(tiny_msd, target_is_directory=True)
    code, out, _ = cli(capsys, "check", link, "-j", "1")
    assert code == 2 and f"label: labelsTr/{label.name}: cannot read" in out
    assert str(link) not in out


# --- 7. run --folds with a cascade ----------------------------------------------------------------


def test_run_with_a_subset_of_folds_skips_the_cascade_with_one_line(tmp_path, capsys, monkeypatch):
    from autounet.pipeline import run as run_module
    from autounet.planning.planner import PlannerOptions

    real = run_module.plan_dataset
    monkeypatch.setattr(  # small patches, so that these small images get a cascade
        run_module, "plan_dataset", lambda *a, **k: real(*a, **k, options=PlannerOptions(patch_edge_3d=12))
    )
    raw = make_synthetic_dataset(tmp_path / "raw", SyntheticSpec(cases=5, shape=(24, 28, 26), seed=5))
    args = ["run", raw, "-w", tmp_path / "W", "-c", "3d_lowres", "3d_cascade_fullres", "--folds", "0", "-j", "1"]
    args += ["--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1", "--no-validation-tta", "--device", "cpu"]
    code, out, _ = cli(capsys, *args)
    assert code == 0
    assert "3d_cascade_fullres: skipped: it trains on the 3d_lowres predictions of every case" in out
    assert "--folds 0 1 2 3 4" in out
    assert not (tmp_path / "W" / "raw" / "results" / "3d_cascade_fullres" / "fold_0").exists()


# --- 6. locks and devices -------------------------------------------------------------------------


def test_a_second_train_of_the_same_fold_fails_at_once_naming_it(trained, tmp_path):
    work = copy_workspace(trained, tmp_path)
    cmd = [*CLI, "train", "raw", "-c", "3d_fullres", "-f", "1", "-w", work, "--device", "cpu", "--no-validate"]
    cmd = [str(c) for c in cmd]
    first = subprocess.Popen(
        [*cmd, "--epochs", "1000", "--iters-per-epoch", "1", "--val-iters", "0"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fold = work / "raw" / "results" / "3d_fullres" / "fold_1"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not checkpoint_path(fold, "latest").is_file():
            assert first.poll() is None, "the first training ended early"
            time.sleep(0.1)
        assert checkpoint_path(fold, "latest").is_file() and first.poll() is None
        start = time.time()
        second = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert "another `autounet train` of 3d_fullres fold 1 is running" in second.stderr
        assert time.time() - start < 60 and first.poll() is None  # the first one trains on
    finally:
        first.kill()
        first.wait()
    with exclusive(tmp_path / "x.lock", "test"):  # the lock is free again once its holder is gone
        with pytest.raises(AutounetError, match="another test is running"):
            with exclusive(tmp_path / "x.lock", "test"):
                pass


def test_the_api_imports_without_fcntl_and_mps_falls_back_to_the_cpu(capsys):
    code = (
        "import sys; sys.modules['fcntl'] = None; import autounet.api, autounet.utils.lock, autounet.preprocessing.run"
    )
    assert subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True).returncode == 0
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert resolve_device("mps") == torch.device("cpu")
        assert "using the CPU" in capsys.readouterr().err
