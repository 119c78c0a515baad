"""Experiment trackers of ``train``/``run --logger``: TensorBoard, Weights & Biases and MLflow.

Per epoch each gets the losses, the pseudo-Dice per class and its mean, the EMA, the learning
rate, the epoch's seconds, iterations per second and data-wait fraction (step = epoch); at the
start the run's hyperparameters and plan as its config; after validation the full-case scores.
Everything stays on this machine unless the user says otherwise: TensorBoard event files and an
MLflow file store under ``W/NAME/trackers/``, W&B in offline mode there (``MLFLOW_TRACKING_URI``
and ``WANDB_MODE`` choose another place). A tracker is optional twice over: a missing package is
one warning line with the install hint, and a tracker that fails mid-run (disk full, server gone)
warns once and is dropped; training goes on in both cases.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autounet.errors import AutounetError
from autounet.workspace import Workspace

LOGGERS = ("tensorboard", "wandb", "mlflow")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_MISSING_SAID: set[str] = set()  # packages already reported missing (once per process, not per fold)
_MAX_PARAM = 500  # characters of one MLflow parameter value (its oldest stores' limit)


def check_loggers(names: Sequence[str] | None) -> list[str]:
    """The ``--logger`` names, each once, in the given order; an unknown one is refused."""
    out: list[str] = []
    for name in names or []:
        if name not in LOGGERS:
            raise AutounetError(f"--logger must be one of {', '.join(LOGGERS)}, got {name!r}")
        if name not in out:
            out.append(name)
    return out


def epoch_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one ``log.jsonl`` entry that a tracker records (finite values only)."""
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)

    put("loss/train", entry.get("train_loss"))
    put("loss/validation", entry.get("val_loss"))
    for key, value in (entry.get("val_dice") or {}).items():
        put(f"pseudo_dice/{key}", value)
    put("pseudo_dice/mean", entry.get("val_dice_mean"))
    put("pseudo_dice/ema", entry.get("ema_dice"))
    put("lr", entry.get("lr"))
    put("time/epoch_seconds", entry.get("seconds"))
    put("time/iterations_per_s", entry.get("iterations_per_s"))
    put("time/data_wait_fraction", entry.get("data_wait_fraction"))
    return out


def validation_metrics(per_class: Mapping[str, Mapping[str, Any]], foreground: Mapping[str, Any]) -> dict[str, float]:
    """Full-case validation scores: ``validation/METRIC/CLASS`` and ``validation/METRIC/mean``."""
    out: dict[str, float] = {}
    for key, metrics in per_class.items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"validation/{metric}/{key}"] = float(value)
    for metric, value in foreground.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"validation/{metric}/mean"] = float(value)
    return out


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


class _TensorBoard:
    """TensorBoard event files, written in the caller's thread (TensorBoard's own writer fails in a
    background thread, which prints a traceback and drops events silently; here a failure raises
    where the trackers can report it once)."""

    name = "tensorboard"

    def __init__(self, folder: Path, config: Mapping[str, Any], first_epoch: int):
        import socket

        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.Event = Event
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"
        self.writer = RecordWriter(open(path, "ab"))  # noqa: SIM115 - closed in close()
        try:
            self._start(config, first_epoch)
        except BaseException:
            with contextlib.suppress(OSError):
                self.writer.close()
            raise

    def _start(self, config: Mapping[str, Any], first_epoch: int) -> None:
        from tensorboard.compat.proto.event_pb2 import SessionLog
        from torch.utils.tensorboard.summary import text

        Event = self.Event
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if first_epoch:  # a resumed run: TensorBoard drops what a killed run logged after its checkpoint
            self._write(
                Event(wall_time=time.time(), step=first_epoch + 1, session_log=SessionLog(status=SessionLog.START))
            )
        else:
            body = "    " + json.dumps(config, indent=1, default=str).replace("\n", "\n    ")
            self._write(Event(wall_time=time.time(), step=0, summary=text("config", body)))

    def _write(self, event: Any) -> None:
        self.writer.write(event.SerializeToString())
        self.writer.flush()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        self._write(self.Event(wall_time=time.time(), step=step, summary=Summary(value=values)))

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, folder: Path, experiment: str, run_name: str, run_key: str, config: Mapping[str, Any]):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri:  # a server: a gone one costs seconds, not MLflow's default minutes of retries, before it is dropped
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            uri = folder.resolve().as_uri()
            # MLflow 3 keeps its file store only on request; it is the local store asked for here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        # a resumed fold continues its own run (tagged with the fold's folder)
        runs = self.client.search_runs([exp_id], filter_string=f"tags.`autounet.fold` = '{run_key}'", max_results=1)
        if runs:
            self.run_id = runs[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(exp_id, run_name=run_name, tags={"autounet.fold": run_key})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, v[:_MAX_PARAM]) for k, v in sorted(_flat(config).items())]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 parameters
                self.client.log_batch(self.run_id, params=params[i : i + 100])
            self.client.log_dict(self.run_id, dict(config), "config.json")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    name = "wandb"

    def __init__(self, folder: Path, project: str, run_name: str, config: Mapping[str, Any]):
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(
            project=project,
            name=run_name,
            dir=str(folder),
            mode=mode,
            config=dict(config),
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers of one run; each call goes to every tracker still working."""

    def __init__(self, trackers: list[Any]):
        self.trackers = trackers
        self.last_step = 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def _each(self, action: str, call) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training, whatever it raises
                self.trackers.remove(tracker)
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                print(
                    f"warning: --logger {tracker.name} failed while {action} ({reason}); training continues without it",
                    file=sys.stderr,
                )
                if action != "closing":
                    try:
                        tracker.close()
                    except Exception:  # noqa: BLE001, S110 - already reported once
                        pass

    def log_epoch(self, entry: Mapping[str, Any]) -> None:
        step = int(entry["epoch"])
        self.last_step = step
        metrics = epoch_metrics(entry)
        self._each("logging an epoch", lambda t: t.log(metrics, step))

    def log_validation(self, per_class: Mapping[str, Mapping[str, Any]], foreground: Mapping[str, Any]) -> None:
        metrics = validation_metrics(per_class, foreground)
        if metrics:
            self._each("logging the validation scores", lambda t: t.log(metrics, self.last_step))

    def close(self) -> None:
        self._each("closing", lambda t: t.close())
        self.trackers = []


def open_trackers(
    names: Sequence[str],
    ws: Workspace,
    configuration: str,
    fold: int | str,
    config: Mapping[str, Any],
    first_epoch: int = 0,
) -> Trackers:
    """Start the named trackers for one fold (``config``: its hyperparameters and plan;
    ``first_epoch``: epochs already done, when resuming). One that cannot start is left out with
    one warning line."""
    import importlib

    run_name = f"{configuration} fold {fold}"
    started = []
    for name in check_loggers(names):
        try:
            importlib.import_module(_PACKAGE[name])
        except ImportError:
            if name in _MISSING_SAID:
                continue
            _MISSING_SAID.add(name)
            print(
                f"warning: --logger {name}: the {_PACKAGE[name]} package is not installed "
                f"(pip install 'autounet[{name}]'); training without it",
                file=sys.stderr,
            )
            continue
        try:
            if name == "tensorboard":
                started.append(_TensorBoard(ws.tensorboard_dir(configuration, fold), config, first_epoch))
            elif name == "mlflow":
                key = ws.fold_dir(configuration, fold).relative_to(ws.root).as_posix()
                started.append(_MLflow(ws.trackers_dir / "mlflow", ws.name, run_name, key, config))
            else:
                started.append(_WandB(ws.trackers_dir, ws.name, run_name, config))
        except Exception as exc:  # noqa: BLE001 - a tracker never stops training
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"warning: --logger {name} could not start ({reason}); training without it", file=sys.stderr)
    return Trackers(started)
