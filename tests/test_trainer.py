"""`autounet train` on a tiny synthetic dataset: outputs, exact resume, safety, limits, DDP."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autounet.api import plan, preprocess
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.pipeline.fold import train_and_validate
from autounet.planning.planner import PlannerOptions
from autounet.preprocessing.store import case_paths
from autounet.training.checkpoint import load_checkpoint
from autounet.training.options import TrainOptions
from autounet.training.trainer import train as train_fold
from autounet.workspace import Workspace, previous_stage_path

QUICK = dict(iterations_per_epoch=3, validation_iterations=2)


def train(work, name, options):
    return train_fold(Workspace.at(work, name), options)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    raw = make_synthetic_dataset(root / "raw", SyntheticSpec(cases=6, shape=(16, 20, 20), classes=3, seed=11))
    plan(raw, work=root / "W", workers=1)
    preprocess("raw", work=root / "W", workers=1)
    return root / "W"


@pytest.fixture
def work(base, tmp_path: Path) -> Path:
    """A private copy of the planned and preprocessed workspace."""
    shutil.copytree(base, tmp_path / "W", symlinks=True)
    return tmp_path / "W"


def fold_dir(work: Path, config="3d_fullres", fold=0) -> Path:
    return work / "raw" / "results" / config / f"fold_{fold}"


def log(work: Path, config="3d_fullres", fold=0) -> list[dict]:
    return [json.loads(line) for line in (fold_dir(work, config, fold) / "log.jsonl").read_text().splitlines()]


def test_a_fold_trains_and_writes_checkpoints_log_and_curves(work):
    result = train(work, "raw", TrainOptions("3d_fullres", 0, epochs=2, **QUICK))
    assert result.epochs == 2 and result.stopped == "max_epochs"
    folder = fold_dir(work)
    assert {p.name for p in folder.iterdir()} >= {
        "checkpoint_latest.pt",
        "checkpoint_best.pt",
        "checkpoint_final.pt",
        "log.jsonl",
        "progress.png",
    }
    entries = log(work)
    assert [e["epoch"] for e in entries] == [1, 2]
    assert set(entries[0]["val_dice"]) == {"1", "2"} and 0 <= entries[0]["data_wait_fraction"] <= 1
    final = load_checkpoint(folder / "checkpoint_final.pt")
    assert final["kind"] == "final" and final["training"]["epoch"] == 2 and final["training"]["stopped"] == "max_epochs"
    assert final["network_spec"]["features_per_stage"][0] == 30 and final["plan"]["name"] == "3d_fullres"
    assert final["training"]["train_cases"] and set(final["training"]["val_cases"]).isdisjoint(
        final["training"]["train_cases"]
    )
    splits = json.loads((work / "raw" / "splits.json").read_text())
    assert len(splits) == 5 and final["training"]["val_cases"] == splits[0]["val"]


def test_resume_continues_exactly_like_an_uninterrupted_run(work, tmp_path: Path):
    other = tmp_path / "other"
    shutil.copytree(work, other, symlinks=True)
    train(work, "raw", TrainOptions("3d_fullres", 0, epochs=4, **QUICK))
    train(other, "raw", TrainOptions("3d_fullres", 0, epochs=2, **QUICK))
    train(other, "raw", TrainOptions("3d_fullres", 0, epochs=4, resume=True))  # extends the finished run
    a, b = log(work), log(other)
    assert [e["epoch"] for e in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([e["train_loss"] for e in a], [e["train_loss"] for e in b], rtol=1e-6)
    np.testing.assert_allclose([e["val_loss"] for e in a], [e["val_loss"] for e in b], rtol=1e-6)
    wa = load_checkpoint(fold_dir(work) / "checkpoint_final.pt")["state_dict"]
    wb = load_checkpoint(fold_dir(other) / "checkpoint_final.pt")["state_dict"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_run_killed_mid_epoch_resumes_without_losing_finished_epochs(work, tmp_path: Path):
    reference = tmp_path / "reference"
    shutil.copytree(work, reference, symlinks=True)
    env = {**os.environ, "AUTOUNET_PROGRESS": "0"}
    args = [
        "-m",
        "autounet",
        "train",
        "raw",
        "-c",
        "3d_fullres",
        "-f",
        "0",
        "--epochs",
        "4",
        "--iters-per-epoch",
        "12",
        "--val-iters",
        "2",
    ]
    proc = subprocess.Popen(
        [sys.executable, *args, "--work", str(work)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    logfile = fold_dir(work) / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (logfile.is_file() and len(logfile.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    time.sleep(0.3)  # into the third epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived = len(log(work))
    assert 2 <= survived < 4, "the run was not killed part-way"
    subprocess.run([sys.executable, *args, "--work", str(work), "--resume"], env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, *args, "--work", str(reference)], env=env, check=True, capture_output=True)
    resumed, straight = log(work), log(reference)
    assert [e["epoch"] for e in resumed] == [1, 2, 3, 4]
    np.testing.assert_allclose([e["train_loss"] for e in resumed], [e["train_loss"] for e in straight], rtol=1e-6)


def test_an_existing_run_needs_resume_and_a_tampered_checkpoint_is_refused(work):
    train(work, "raw", TrainOptions("3d_fullres", 0, epochs=1, **QUICK))
    with pytest.raises(AutounetError, match="add --resume"):
        train(work, "raw", TrainOptions("3d_fullres", 0, epochs=2, **QUICK))

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch HACKED",))

    latest = fold_dir(work) / "checkpoint_latest.pt"
    content = torch.load(latest, weights_only=True)
    content["training"]["seed"] = Payload()
    torch.save(content, latest)
    with pytest.raises(AutounetError, match="refused: the file contains Python objects"):
        train(work, "raw", TrainOptions("3d_fullres", 0, epochs=2, resume=True))
    assert not Path("HACKED").exists()


def test_time_limit_ends_training_cleanly_with_a_final_checkpoint(work):
    result = train(
        work,
        "raw",
        TrainOptions("3d_fullres", 0, epochs=50, iterations_per_epoch=1000, validation_iterations=1, max_minutes=0.02),
    )
    assert result.stopped == "time_limit" and result.epochs == 1
    entry = log(work)[-1]
    assert entry["partial"] and entry["iterations"] < 1000
    final = load_checkpoint(fold_dir(work) / "checkpoint_final.pt")
    assert final["training"]["stopped"] == "time_limit" and final["training"]["step"] == entry["iterations"]


def test_a_non_finite_loss_stops_training_with_a_clear_message(work):
    folder = work / "raw" / "preprocessed" / "3d_fullres"
    for p in folder.glob("*_image.npy"):
        image = np.load(p)
        image[...] = np.nan
        np.save(p, image)
    with pytest.raises(AutounetError, match="non-finite training loss .* in epoch 1, iteration 1"):
        train(work, "raw", TrainOptions("3d_fullres", 0, epochs=1, **QUICK))


def test_fold_all_and_invalid_requests(work):
    result = train(work, "raw", TrainOptions("3d_fullres", "all", epochs=1, **QUICK))
    ck = load_checkpoint(result.fold_dir / "checkpoint_final.pt")
    assert len(ck["training"]["train_cases"]) == 6 and result.fold_dir.name == "fold_all"
    with pytest.raises(AutounetError, match="fold 7 does not exist"):
        train(work, "raw", TrainOptions("3d_fullres", 7, epochs=1, **QUICK))
    assert not list((work / "raw" / "results" / "3d_fullres").glob(".fold_7*"))  # refused before its lock
    with pytest.raises(AutounetError, match="not planned"):
        train(work, "raw", TrainOptions("3d_lowres", 0, epochs=1, **QUICK))
    if not torch.cuda.is_available():
        with pytest.raises(AutounetError, match="CUDA is not available"):
            train(work, "raw", TrainOptions("3d_fullres", 1, epochs=1, device="cuda", **QUICK))


def test_the_2d_configuration_trains(work):
    result = train(work, "raw", TrainOptions("2d", 0, epochs=1, **QUICK))
    assert result.epochs == 1 and load_checkpoint(result.fold_dir / "checkpoint_final.pt")["network_spec"]["dims"] == 2


def test_cascade_stage_two_trains_on_the_first_stage_predictions_of_every_fold(tmp_path: Path):
    raw = make_synthetic_dataset(tmp_path / "raw", SyntheticSpec(cases=5, shape=(24, 28, 26), seed=5))
    plan(raw, work=tmp_path / "W", workers=1, options=PlannerOptions(patch_edge_3d=12))
    preprocess("raw", work=tmp_path / "W", workers=1)
    with pytest.raises(AutounetError, match=r"autounet train raw -c 3d_lowres -f K"):
        train(tmp_path / "W", "raw", TrainOptions("3d_cascade_fullres", 0, epochs=1, **QUICK))
    splits = json.loads((tmp_path / "W" / "raw" / "splits.json").read_text())
    next_stage = tmp_path / "W" / "raw" / "results" / "3d_lowres" / "next_stage"
    full = tmp_path / "W" / "raw" / "preprocessed" / "3d_fullres"
    for fold in range(len(splits)):
        # the fold's full validation writes the next stage's inputs
        train_and_validate(Workspace.at(tmp_path / "W", "raw"), TrainOptions("3d_lowres", fold, epochs=1, **QUICK))
        for case in splits[fold]["val"]:  # each case predicted by the fold that did not train on it
            previous = np.load(previous_stage_path(next_stage, case))
            assert previous.shape == np.load(case_paths(full, case)["seg"], mmap_mode="r").shape
            assert previous.dtype == np.uint8 and previous.max() <= 2
    result = train(tmp_path / "W", "raw", TrainOptions("3d_cascade_fullres", 0, epochs=1, **QUICK))
    assert load_checkpoint(result.fold_dir / "checkpoint_final.pt")["network_spec"]["in_channels"] == 1 + 2


def test_two_processes_with_gloo_train_one_fold_into_one_log(work):
    env = {**os.environ, "AUTOUNET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "autounet",
        "train",
        "raw",
        "-c",
        "3d_fullres",
        "-f",
        "1",
    ]
    cmd += ["--work", str(work), "--epochs", "2", "--iters-per-epoch", "3", "--val-iters", "3", "--device", "cpu"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("epoch    2") == 1  # only rank 0 reports
    entries = log(work, fold=1)
    assert [e["epoch"] for e in entries] == [1, 2]
    final = load_checkpoint(fold_dir(work, fold=1) / "checkpoint_final.pt")
    assert final["training"]["world_size"] == 2
    assert sorted(p.name for p in fold_dir(work, fold=1).iterdir() if p.suffix == ".pt") == [
        "checkpoint_best.pt",
        "checkpoint_final.pt",
        "checkpoint_latest.pt",
    ]
