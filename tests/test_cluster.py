"""`autounet run --executor ray` and `autounet predict --executor ray` on a local Ray instance
(one for the module: 2 CPUs, and 2 declared GPUs so that a fold can run under torchrun with
gloo on the CPU)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time

import pytest

from autounet import api
from autounet.cli import main
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.pipeline.run import RunOptions, fold_state, run_pipeline
from autounet.workspace import Workspace, checkpoint_path, fold_console_path, training_log_path

ray = pytest.importorskip("ray")

TINY = dict(epochs=1, iterations_per_epoch=2, validation_iterations=1)
ATTEMPT = re.compile(r"^=== .* pid (\d+), ", re.MULTILINE)


@pytest.fixture(scope="module")
def ray_instance():
    os.environ["AUTOUNET_PROGRESS"] = "0"  # the workers inherit it
    ray.init(
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        object_store_memory=200 * 2**20,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_instance, one_torch_thread) -> dict:
    """The same run (2d and 3d_fullres x folds 0 and 1, same seed) locally and on Ray."""
    root = tmp_path_factory.mktemp("cluster")
    raw = make_synthetic_dataset(
        root / "raw" / "tiny", SyntheticSpec(cases=8, test_cases=2, shape=(16, 20, 18), classes=3, seed=3)
    )
    options = dict(configurations=["2d", "3d_fullres"], folds=[0, 1], workers=1, **TINY)
    local = run_pipeline(raw, Workspace.at(root / "local", "tiny"), RunOptions(**options))
    on_ray = api.run(raw, work=root / "ray", executor="ray", gpus_per_fold=0, cpus_per_fold=1, **options)
    return {"root": root, "raw": raw, "local": local, "ray": on_ray}


def _attempts(fold_dir) -> list[int]:
    """The worker pids of a fold's attempts, from its console.log."""
    path = fold_console_path(fold_dir)
    return [int(pid) for pid in ATTEMPT.findall(path.read_text())] if path.is_file() else []


def _fresh_copy(runs, name: str) -> Workspace:
    """The Ray run's workspace planned and preprocessed, without any trained fold."""
    work = runs["root"] / name
    shutil.copytree(runs["root"] / "ray", work)
    ws = Workspace.at(work, "tiny")
    shutil.rmtree(ws.root / "results")
    shutil.rmtree(ws.report_figures_dir)
    ws.selection_json.unlink()
    ws.report_md.unlink()
    return ws


def test_ray_run_makes_the_same_selection_as_the_local_run(runs):
    local, on_ray = runs["local"].selection, runs["ray"].selection
    assert sorted(runs["ray"].trained) == sorted(f"{c} fold {f}" for c in ("2d", "3d_fullres") for f in (0, 1))
    assert on_ray.winner.name == local.winner.name and on_ray.winner.folds == local.winner.folds
    assert [r.name for r in on_ray.ranking] == [r.name for r in local.ranking]
    for a, b in zip(on_ray.ranking, local.ranking):
        assert a.foreground_dice == pytest.approx(b.foreground_dice, abs=1e-9)
    ours = json.loads(runs["ray"].workspace.selection_json.read_text())["postprocessing"]
    theirs = json.loads(runs["local"].workspace.selection_json.read_text())["postprocessing"]
    assert ours == theirs
    for c in ("2d", "3d_fullres"):
        for f in (0, 1):
            fold_dir = runs["ray"].workspace.fold_dir(c, f)
            assert fold_state(fold_dir) == "done" and len(_attempts(fold_dir)) == 1


def test_a_second_ray_run_schedules_nothing_that_is_complete(runs, capsys):
    ws = runs["ray"].workspace
    stamps = {p: p.stat().st_mtime_ns for p in ws.root.glob("results/*/fold_*/checkpoint_final.pt")}
    again = api.run(
        runs["raw"], work=ws.work, configurations=["2d", "3d_fullres"], folds=[0, 1], workers=1, executor="ray", **TINY
    )
    assert again.trained == [] and len(again.skipped) == 4
    assert "queued" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_killed_worker_resumes_its_fold_from_the_latest_checkpoint(runs):
    ws = _fresh_copy(runs, "killed")
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = api.run(
                runs["raw"], work=ws.work, configurations=["2d"], folds=[0, 1], epochs=3, iterations_per_epoch=12,
                validation_iterations=1, workers=1, executor="ray", gpus_per_fold=0,
            )  # fmt: skip
        except BaseException as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    fold0 = ws.fold_dir("2d", 0)
    deadline = time.time() + 240
    while not (checkpoint_path(fold0, "latest").is_file() and _attempts(fold0)) and time.time() < deadline:
        time.sleep(0.02)
    assert checkpoint_path(fold0, "latest").is_file() and not checkpoint_path(fold0, "final").is_file()
    os.kill(_attempts(fold0)[0], signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    assert sorted(outcome["result"].trained) == ["2d fold 0", "2d fold 1"]
    first, second = _attempts(fold0)  # killed once, resumed once
    assert first != second
    assert re.search(r"2d fold 0: resuming after epoch [12];", fold_console_path(fold0).read_text())
    log = [json.loads(line) for line in training_log_path(fold0).read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert fold_state(fold0) == "done"
    assert len(_attempts(ws.fold_dir("2d", 1))) == 1  # nothing else redone


def test_a_fold_that_fails_on_its_own_is_not_retried_and_the_others_finish(runs, capsys):
    ws = _fresh_copy(runs, "bad")
    bad = checkpoint_path(ws.fold_dir("2d", 1), "latest")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    code = main(
        ["run", str(runs["raw"]), "--work", str(ws.work), "-c", "2d", "--folds", "0", "1", "--epochs", "1",
         "--iters-per-epoch", "2", "--val-iters", "1", "-j", "1", "--executor", "ray", "--gpus-per-fold", "0"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert "1 fold(s) failed" in captured.err and "2d fold 1:" in captured.err and str(bad) in captured.err
    assert "2d fold 1: FAILED on" in captured.out
    assert fold_state(ws.fold_dir("2d", 0)) == "done"
    assert len(_attempts(ws.fold_dir("2d", 1))) == 1  # not retried
    assert not ws.selection_json.exists()


def test_a_fold_with_several_gpus_trains_under_torchrun(runs):
    ws = _fresh_copy(runs, "ddp")
    result = api.run(
        runs["raw"], work=ws.work, configurations=["2d"], folds=[0], workers=1, device="cpu", executor="ray",
        gpus_per_fold=2, cpus_per_fold=2, **TINY,
    )  # fmt: skip
    assert result.trained == ["2d fold 0"]
    console = fold_console_path(ws.fold_dir("2d", 0)).read_text()
    assert " x 2 processes" in console  # DDP under torchrun
    assert fold_state(ws.fold_dir("2d", 0)) == "done"


def test_a_fold_too_big_for_every_node_is_refused(runs):
    with pytest.raises(AutounetError, match="no node of the Ray cluster has room for one fold"):
        api.run(runs["raw"], work=runs["root"] / "big", folds=[0], executor="ray", cpus_per_fold=64, **TINY)


def test_a_path_a_node_does_not_see_is_refused_naming_node_and_path(ray_instance, tmp_path):
    from autounet.cluster.shared_fs import check_shared

    missing = tmp_path / "elsewhere" / "raw"
    with pytest.raises(AutounetError, match=r"every node of the Ray cluster sees") as caught:
        check_shared(ray_instance, tmp_path / "W" / "tiny", [missing])
    assert f"does not see {missing}" in str(caught.value)
    assert not (tmp_path / "W").exists()  # the folders the check made are gone again


def test_predict_on_ray_writes_the_same_files_as_a_local_run(runs, tmp_path):
    model = runs["ray"].workspace.root
    images = runs["raw"] / "imagesTr"
    local = api.predict(images, tmp_path / "local", model=model)
    on_ray = api.predict(images, tmp_path / "ray", model=model, executor="ray")
    assert [t.case_id for t in on_ray.timings] == [t.case_id for t in local.timings]
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray").iterdir()) and len(names) == 8
    for name in names:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    again = api.predict(images, tmp_path / "ray", model=model, executor="ray", skip_complete=True)
    assert again.timings == [] and len(again.skipped) == 8
    with pytest.raises(AutounetError, match="already holds 8 file"):
        api.predict(images, tmp_path / "ray", model=model, executor="ray")
