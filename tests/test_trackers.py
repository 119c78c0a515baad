"""Experiment trackers (`train --logger`): TensorBoard, MLflow and W&B runs read back with each
tool's own reader; a missing package or a tracker failing mid-run never stops training."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import json
import struct
import sys
from pathlib import Path

import pytest

from autounet import api
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError
from autounet.training import trackers as trackers_module
from autounet.training.options import TrainOptions
from autounet.training.trackers import Trackers, epoch_metrics
from autounet.workspace import Workspace

EPOCHS = 2


def has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread) -> dict:
    """One fold of a tiny dataset trained for two epochs with every installed tracker, then validated."""
    root = tmp_path_factory.mktemp("trackers")
    raw = make_synthetic_dataset(root / "raw", SyntheticSpec(cases=4, shape=(12, 16, 16), classes=3, seed=5))
    api.plan(raw, work=root / "W", workers=1)
    api.preprocess("raw", work=root / "W", workers=1, configurations=["3d_fullres"])
    loggers = [name for name in ("tensorboard", "mlflow", "wandb") if has(name)]
    if not loggers:
        pytest.skip("no tracker package installed (pip install 'autounet[tensorboard,mlflow,wandb]')")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = api.train(
            "raw",
            "3d_fullres",
            0,
            work=root / "W",
            epochs=EPOCHS,
            iterations_per_epoch=2,
            validation_iterations=1,
            device="cpu",
            precision="fp32",  # what the start line says everywhere (auto is bf16 on CPUs with native bf16)
            validation_tta=False,
            loggers=loggers,
        )
    return {"ws": Workspace.at(root / "W", "raw"), "result": result, "loggers": loggers, "out": printed.getvalue()}


def test_tensorboard_holds_every_epoch_and_the_validation_scores(trained):
    if "tensorboard" not in trained["loggers"]:
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ws, log = trained["ws"], trained["result"].training.log
    folder = ws.tensorboard_dir("3d_fullres", 0)
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss/train", "loss/validation", "pseudo_dice/1", "pseudo_dice/2", "pseudo_dice/ema", "lr"):
        assert tag in tags
    for tag in ("time/epoch_seconds", "time/iterations_per_s", "time/data_wait_fraction"):
        assert tag in tags
    train_loss = events.Scalars("loss/train")
    assert [s.step for s in train_loss] == list(range(1, EPOCHS + 1))
    assert [s.value for s in train_loss] == pytest.approx([e["train_loss"] for e in log], rel=1e-6)
    assert [s.value for s in events.Scalars("lr")] == pytest.approx([e["lr"] for e in log], rel=1e-6)
    dice = trained["result"].validation.evaluation.foreground_mean["dice"]
    final = events.Scalars("validation/dice/mean")
    assert len(final) == 1 and final[0].step == EPOCHS and final[0].value == pytest.approx(dice, rel=1e-6)
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_file_store_holds_the_run_with_its_config(trained):
    if "mlflow" not in trained["loggers"]:
        pytest.skip("mlflow is not installed")
    from mlflow.tracking import MlflowClient

    ws, log = trained["ws"], trained["result"].training.log
    store = ws.trackers_dir / "mlflow"
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("raw")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "3d_fullres fold 0" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss/train")
    assert sorted((m.step, m.value) for m in history) == [(e["epoch"], pytest.approx(e["train_loss"])) for e in log]
    assert len(client.get_metric_history(run.info.run_id, "pseudo_dice/1")) == EPOCHS
    assert "validation/dice/mean" in run.data.metrics
    params = run.data.params
    assert params["configuration"] == "3d_fullres" and params["options.epochs"] == str(EPOCHS)
    patch = json.loads(params["plan.patch_size"])
    assert isinstance(patch, list) and len(patch) == 3


def _wandb_records(path: Path) -> list:
    """The records of an offline ``run-ID.wandb`` file: LevelDB-log blocks of CRC, length and type
    framing protobuf ``Record`` messages (W&B has no public reader for offline runs)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_runs_offline_and_its_history_holds_every_epoch(trained):
    if "wandb" not in trained["loggers"]:
        pytest.skip("wandb is not installed")
    ws, log = trained["ws"], trained["result"].training.log
    files = glob.glob(str(ws.trackers_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1  # offline: nothing was sent anywhere
    history, config = [], {}
    for record in _wandb_records(Path(files[0])):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "run":  # the run's start record carries its config
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    epochs = [h for h in history if "loss/train" in h]
    assert [h["_step"] for h in epochs] == list(range(1, EPOCHS + 1))
    assert [h["loss/train"] for h in epochs] == pytest.approx([e["train_loss"] for e in log])
    assert any("validation/dice/mean" in h for h in history)
    assert config["configuration"] == "3d_fullres" and config["plan"]["patch_size"]


class _Broken:
    name = "tensorboard"

    def __init__(self):
        self.calls = 0

    def log(self, metrics, step):
        self.calls += 1
        raise OSError(28, "No space left on device")

    def close(self):
        pass


class _Recorder:
    name = "mlflow"

    def __init__(self):
        self.steps = []

    def log(self, metrics, step):
        self.steps.append(step)

    def close(self):
        pass


def test_a_failing_tracker_warns_once_and_the_others_go_on(capsys):
    broken, good = _Broken(), _Recorder()
    group = Trackers([broken, good])
    entry = {"epoch": 1, "train_loss": 0.5, "val_dice": {"1": 0.2}, "lr": 0.01, "seconds": 2.0}
    for epoch in (1, 2, 3):
        group.log_epoch({**entry, "epoch": epoch})
    group.close()
    err = capsys.readouterr().err
    assert err.count("warning: --logger tensorboard failed") == 1 and "No space left on device" in err
    assert "training continues without it" in err
    assert broken.calls == 1 and good.steps == [1, 2, 3]


def test_a_missing_tracker_package_is_one_line_with_the_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    monkeypatch.setattr(trackers_module, "_MISSING_SAID", set())
    ws = Workspace.at(tmp_path, "x")
    group = trackers_module.open_trackers(["wandb"], ws, "2d", 0, {})
    assert group.names == []
    assert trackers_module.open_trackers(["wandb"], ws, "2d", 1, {}).names == []  # the next fold says nothing
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: --logger wandb: the wandb package is not installed (pip install 'autounet[wandb]'); training without it"
    ]


def test_epoch_metrics_keep_only_finite_numbers():
    metrics = epoch_metrics(
        {"epoch": 3, "train_loss": 0.4, "val_loss": None, "val_dice": {"1": 0.5, "2": None}, "ema_dice": float("nan")}
    )
    assert metrics == {"loss/train": 0.4, "pseudo_dice/1": 0.5}


def test_an_unknown_logger_is_refused_before_training():
    with pytest.raises(AutounetError, match="--logger must be one of tensorboard, wandb, mlflow, got 'neptune'"):
        TrainOptions("3d_fullres", 0, loggers=["neptune"]).validate()


def test_the_start_line_names_device_and_precision(trained):
    start = trained["out"].splitlines()[0]
    assert start.startswith("3d_fullres fold 0: starting;") and " on cpu in fp32," in start


def test_precision_names():
    from types import SimpleNamespace

    import torch

    from autounet.training.trainer import describe_device, precision_name

    assert precision_name(SimpleNamespace(scaler=object(), amp_dtype=torch.float16)) == "fp16 with gradient scaler"
    assert precision_name(SimpleNamespace(scaler=None, amp_dtype=torch.bfloat16)) == "bf16"
    assert precision_name(SimpleNamespace(scaler=None, amp_dtype=None)) == "fp32"
    assert describe_device(torch.device("cpu")) == "cpu"


def test_a_resumed_fold_continues_its_tracker_runs(trained):
    """Runs last in this module: it extends the fixture's fold by one epoch with --resume."""
    ws = trained["ws"]
    api.train(
        "raw",
        "3d_fullres",
        0,
        work=ws.work,
        epochs=EPOCHS + 1,
        iterations_per_epoch=2,
        validation_iterations=1,
        device="cpu",
        resume=True,
        validate=False,
        loggers=trained["loggers"],
    )
    if "tensorboard" in trained["loggers"]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(ws.tensorboard_dir("3d_fullres", 0)))
        events.Reload()
        assert [s.step for s in events.Scalars("loss/train")] == list(range(1, EPOCHS + 2))
    if "mlflow" in trained["loggers"]:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(ws.trackers_dir / "mlflow").resolve().as_uri())
        runs = client.search_runs([client.get_experiment_by_name("raw").experiment_id])
        assert len(runs) == 1  # the same run, continued
        steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/train"))
        assert steps == list(range(1, EPOCHS + 2))
