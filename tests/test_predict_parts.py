"""`autounet predict --part I N` (shares of the cases for any scheduler), `--continue` after a
killed prediction, and the cluster options' checks (no Ray needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from autounet import api
from autounet.cli import main
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_torch_thread) -> dict:
    """A 3d_fullres fold trained for one tiny epoch, and the six images to predict."""
    root = tmp_path_factory.mktemp("parts")
    raw = make_synthetic_dataset(root / "raw" / "parts", SyntheticSpec(cases=6, shape=(14, 16, 16), classes=3, seed=4))
    work = root / "W"
    api.plan(raw, work=work, workers=1)
    api.preprocess("parts", work=work, configurations=["3d_fullres"], workers=1)
    api.train(
        "parts", "3d_fullres", 0, work=work, epochs=1, iterations_per_epoch=2, validation_iterations=1, validate=False
    )
    return {"model": work / "parts" / "results" / "3d_fullres", "images": raw / "imagesTr", "raw": raw}


def _outputs(folder) -> list:
    """The segmentations in ``folder`` (not the temporaries of a write in progress)."""
    return [p for p in folder.glob("*.nii.gz") if not p.name.startswith(".")]


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_parts_together_write_the_files_of_one_run(model, tmp_path):
    one = api.predict(model["images"], tmp_path / "one", model=model["model"])
    first = api.predict(model["images"], tmp_path / "parts", model=model["model"], part=(0, 2))
    second = api.predict(model["images"], tmp_path / "parts", model=model["model"], part=(1, 2))
    cases = [t.case_id for t in one.timings]
    assert [t.case_id for t in first.timings] == cases[0::2]  # interleaved shares of the sorted cases
    assert [t.case_id for t in second.timings] == cases[1::2]
    assert _files(tmp_path / "parts") == _files(tmp_path / "one") and len(cases) == 6


@pytest.mark.parametrize(
    "part, message",
    [(["2", "2"], "--part I must be in 0..1, got 2"), (["0", "0"], "--part N must be >= 1, got 0")],
)
def test_a_part_outside_its_range_is_refused(model, tmp_path, capsys, part, message):
    code = main(
        ["predict", "-i", str(model["images"]), "-o", str(tmp_path / "out"), "-m", str(model["model"]), "--part", *part]
    )
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_continue_after_a_killed_prediction_writes_only_the_missing_cases(model, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "autounet",
        "predict",
        "-i",
        str(model["images"]),
        "-o",
        str(out),
        "-m",
        str(model["model"]),
    ]
    env = {**os.environ, "AUTOUNET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not _outputs(out):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in _outputs(out)}
    assert 1 <= len(before) <= 6
    done = subprocess.run([*command, "--continue"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in _outputs(out) if p.name in before} == before
    written = 6 - len(before)
    assert f"{written} segmentation(s) -> {out}" in done.stdout
    if before and written:
        assert f"({len(before)} case(s) already complete, skipped)" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(f"synth_{i:03d}.nii.gz" for i in range(6))  # no temporaries
    reference = api.predict(model["images"], tmp_path / "reference", model=model["model"])
    assert len(reference.timings) == 6 and _files(out) == _files(tmp_path / "reference")


def test_the_ray_executor_without_ray_says_how_to_install_it(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    code = main(["run", str(model["raw"]), "--work", str(tmp_path / "W"), "--executor", "ray"])
    assert code == 2 and "pip install autounet[ray]" in capsys.readouterr().err
    assert not (tmp_path / "W").exists()
    code = main(
        [
            "predict",
            "-i",
            str(model["images"]),
            "-o",
            str(tmp_path / "out"),
            "-m",
            str(model["model"]),
            "--executor",
            "ray",
        ]
    )
    assert code == 2 and "pip install autounet[ray]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["run", "RAW", "--address", "auto"], "--address needs --executor ray"),
        (["run", "RAW", "--cpus-per-fold", "2"], "--cpus-per-fold and --max-retries need --executor ray"),
        (["run", "RAW", "--executor", "ray", "--cpus-per-fold", "0"], "--cpus-per-fold must be >= 1, got 0"),
        (["run", "RAW", "--executor", "ray", "--max-retries", "-1"], "--max-retries must be >= 0, got -1"),
        (["predict", "-i", "IN", "-o", "OUT", "-m", "MODEL", "--part", "0", "2", "--executor", "ray"], "not both"),
    ],
)
def test_cluster_options_are_checked_before_anything_runs(model, tmp_path, capsys, arguments, message):
    arguments = [str(model["raw"]) if a == "RAW" else a for a in arguments]
    arguments = [str(model["images"]) if a == "IN" else str(model["model"]) if a == "MODEL" else a for a in arguments]
    arguments = [str(tmp_path / "out") if a == "OUT" else a for a in arguments]
    if arguments[0] == "run":
        arguments += ["--work", str(tmp_path / "W")]
    assert main(arguments) == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "W").exists() and not (tmp_path / "out").exists()
