"""The cluster code without a Ray instance (tests/test_cluster.py starts one): the address probe,
the progress board's placement and loss, paths for workers, and how a prediction is shared."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from autounet.cli import main
from autounet.cluster import ray_predict
from autounet.cluster.progress import BOARD_RESTARTS, board_options, take_events
from autounet.cluster.ray_predict import engine_notes, predict_on_ray
from autounet.cluster.ray_run import for_workers
from autounet.cluster.session import PROBE_TIMEOUT_S, probe_address
from autounet.errors import AutounetError
from autounet.pipeline.run import RunOptions

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the address -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "predict"])
def test_an_address_where_nothing_listens_fails_within_the_deadline_naming_it(command, tiny_msd, tmp_path, capsys):
    address = f"127.0.0.1:{closed_port()}"
    if command == "run":
        args = ["run", str(tiny_msd), "--work", str(tmp_path / "W")]
    else:
        args = ["predict", "-i", str(tiny_msd / "imagesTr"), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "M")]
    started = time.monotonic()
    code = main([*args, "--executor", "ray", "--address", address])
    assert code == 2 and time.monotonic() - started < PROBE_TIMEOUT_S
    err = capsys.readouterr().err
    assert f"--address {address}: cannot reach a Ray cluster there" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "W").exists() and not (tmp_path / "out").exists()


def test_the_probe_passes_where_something_listens_and_refuses_malformed_addresses():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        probe_address(f"127.0.0.1:{server.getsockname()[1]}", timeout=2)
    for bad in ("127.0.0.1", "127.0.0.1:port", "127.0.0.1:70000", ":6379"):
        with pytest.raises(AutounetError, match=f"--address {bad}: expected 'auto' or HOST:PORT"):
            probe_address(bad)


def test_auto_probes_ray_address_when_it_is_set(monkeypatch):
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(AutounetError, match=rf"--address auto \(RAY_ADDRESS={address}\): cannot reach"):
        probe_address("auto")
    monkeypatch.delenv("RAY_ADDRESS")
    probe_address("auto")  # left to Ray, which finds a local cluster or fails at once


def test_a_local_instance_leaves_the_cpu_count_to_ray(monkeypatch):
    """Ray's own detection respects a container's CPU limit; os.cpu_count() does not."""
    from autounet.cluster import session

    calls: list[dict] = []
    fake = SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: calls.append(kw), shutdown=lambda: None)
    monkeypatch.setattr(session, "import_ray", lambda: fake)
    with session.ray_session(None) as ray_module:
        assert ray_module is fake
    (options,) = calls
    assert "num_cpus" not in options and "address" not in options


# --- the progress board ----------------------------------------------------------------------------


def test_the_board_is_pinned_to_the_drivers_node_and_restarted():
    fake = SimpleNamespace(get_runtime_context=lambda: SimpleNamespace(get_node_id=lambda: "ab" * 28))
    options = board_options(fake)
    strategy = options["scheduling_strategy"]
    assert type(strategy).__name__ == "NodeAffinitySchedulingStrategy"
    assert strategy.node_id == "ab" * 28 and strategy.soft is False
    assert options["max_restarts"] == BOARD_RESTARTS == -1 and options["max_task_retries"] == -1
    assert options["num_cpus"] == 0


@pytest.mark.parametrize(
    "lost", [ray.exceptions.RayActorError(), ray.exceptions.GetTimeoutError("slow"), ray.exceptions.ActorDiedError()]
)
def test_a_lost_board_gives_no_events_instead_of_ending_the_run(lost):
    def get(ref, timeout=None):
        raise lost

    fake = SimpleNamespace(get=get, exceptions=ray.exceptions)
    board = SimpleNamespace(take=SimpleNamespace(remote=lambda: "ref"))
    assert take_events(fake, board) == []
    fine = SimpleNamespace(get=lambda ref, timeout=None: [{"label": "2d fold 0"}], exceptions=ray.exceptions)
    assert take_events(fine, board) == [{"label": "2d fold 0"}]


# --- paths for workers -----------------------------------------------------------------------------


def test_the_workers_get_absolute_paths_and_the_notes_keep_the_users(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = for_workers(RunOptions(pretrained="W/source", plans_from="W/source"))
    assert options.pretrained == str(tmp_path / "W" / "source") and options.pretrained_label == "W/source"
    assert options.plans_from == str(tmp_path / "W" / "source") and options.plans_from_label == "W/source"
    given = RunOptions(pretrained="cache/x", pretrained_label="model.zip")
    assert for_workers(given).pretrained_label == "model.zip"
    assert for_workers(RunOptions()) == RunOptions()


# --- sharing a prediction --------------------------------------------------------------------------


class Ref:
    def __init__(self, value):
        self.value = value


class FakeRay:
    """Runs each "task" at once in this process, and records what each share was given and did."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict]] = []

    def remote(self, function):
        fake = self

        class Task:
            def options(self, **_):
                return self

            def remote(self, *args):
                result = function(*args)
                fake.calls.append((args, result))
                return Ref(result)

        return Task()

    def wait(self, pending, num_returns=1, timeout=None):
        return pending[:1], pending[1:]

    def get(self, ref):
        return ref.value

    def cancel(self, ref, force=False):
        pass


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """A 3d_fullres fold trained for one iteration, and the raw dataset (4 training images)."""
    from autounet.api import plan, preprocess, train
    from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset

    root = tmp_path_factory.mktemp("share")
    raw = make_synthetic_dataset(root / "raw", SyntheticSpec(cases=4, shape=(10, 12, 12), classes=2, seed=2))
    plan(raw, work=root / "W", workers=1)
    preprocess("raw", work=root / "W", configurations=["3d_fullres"], workers=1)
    options = dict(epochs=1, iterations_per_epoch=1, validation_iterations=1, validate=False, features=[4, 8])
    result = train("raw", "3d_fullres", 0, work=root / "W", device="cpu", **options)
    return result.training.fold_dir, raw


def test_ray_shares_split_only_the_cases_left_to_predict_and_show_each_shares_engines(
    model, tmp_path, monkeypatch, capsys
):
    from autounet.api import predict

    fold, raw = model
    images = sorted((raw / "imagesTr").iterdir())
    out = tmp_path / "out"
    predict([images[1], images[3]], out, model=fold, device="cpu", tta=False)  # 2 of 4 cases complete
    fake = FakeRay()

    @contextmanager
    def session(address):
        yield fake

    monkeypatch.setattr(ray_predict, "ray_session", session)
    monkeypatch.setattr(ray_predict, "cluster_gpus", lambda ray: 0)
    monkeypatch.setattr(ray_predict, "check_room", lambda ray, cpus, gpus, what: 2)  # room for 2 shares
    monkeypatch.setattr(ray_predict, "check_shared", lambda *a, **k: None)
    board = SimpleNamespace(post=SimpleNamespace(remote=lambda event: None))
    monkeypatch.setattr(ray_predict, "start_board", lambda ray: board)
    monkeypatch.setattr(ray_predict, "take_events", lambda ray, board: [])
    monkeypatch.setattr(ray_predict, "stop_board", lambda ray, board: None)
    # fp32: precision auto would be bf16 on a CPU with native bf16 (and give it up for this untrained model)
    options = dict(
        folds=None,
        checkpoints=None,
        device="cpu",
        tta=False,
        step=0.5,
        postprocess=True,
        engine="torch",
        precision="fp32",
    )
    predict_options = dict(skip_complete=True)
    timings, _, skipped = predict_on_ray([raw / "imagesTr"], out, fold, options, predict_options, None)
    cases = [p.name.split(".")[0] for p in images]
    assert sorted(skipped) == [cases[1], cases[3]]
    assert [t.case_id for t in timings] == [cases[0], cases[2]]
    given = [args[5] for args, _ in fake.calls]
    assert given == [[cases[0]], [cases[2]]]  # one remaining case per share, not [0, 2] and []
    assert [[t.case_id for t in result["timings"]] for _, result in fake.calls] == [[cases[0]], [cases[2]]]
    shown = capsys.readouterr().out
    assert "share 1/2: networks run on cpu with torch fp32" in shown
    assert "share 2/2: networks run on cpu with torch fp32" in shown


def test_a_shares_engine_notes_are_picked_out_of_what_it_printed():
    printed = (
        "predict:   0%|     | 0/2\rpredict:  50%|##   | 1/2\n"
        "note: engine openvino is not installed; using torch fp32\n"
        "networks run on cpu with torch fp32\n"
        "note: onnxruntime failed at run time (RuntimeError: x); PyTorch fp32 predicts from here on\n"
        "note: engine openvino is not installed; using torch fp32\n"
    )
    assert engine_notes(printed) == [
        "note: engine openvino is not installed; using torch fp32",
        "networks run on cpu with torch fp32",
        "note: onnxruntime failed at run time (RuntimeError: x); PyTorch fp32 predicts from here on",
    ]
