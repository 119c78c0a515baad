"""`autounet run --executor ray`: every configuration x fold as a Ray task.

The driver (this process) checks, plans and preprocesses as the local run does, then hands the
folds of each wave (:func:`autounet.pipeline.run.run_pipeline`) to Ray: one task per fold with
``--cpus-per-fold`` CPUs and ``--gpus-per-fold`` GPUs, so as many folds train at once as the
cluster has room for. Inside its task a fold is brought to ``done`` exactly as the local run does
(:func:`~autounet.pipeline.run.train_fold`: trained, resumed from ``checkpoint_latest.pt``, or
validated); with more than one GPU it trains under ``torchrun`` (DDP) in a child process.

Faults: a task whose worker process or node dies is run again by Ray (``--max-retries``) and
resumes from the fold's latest checkpoint, losing at most the epoch in flight (the fold's lock
is an OS lock, released when its process dies). A fold that fails for a reason of its own (an
exception: bad data, a non-finite loss) is not retried; the others finish and the run ends with
one error naming it. What a fold prints goes to its ``console.log`` (every attempt appended).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from autounet.cluster.progress import TaskProgress, start_board, stop_board, take_events
from autounet.cluster.session import alive_nodes, check_room, cluster_gpus, ray_session, this_node
from autounet.cluster.shared_fs import check_shared
from autounet.errors import AutounetError
from autounet.pipeline.run import FoldFailure, FoldJob, RunOptions, RunResult, fold_state, run_pipeline, train_fold
from autounet.utils import arguments
from autounet.utils.atomic import make_folder
from autounet.workspace import Workspace, fold_console_path

DEFAULT_MAX_RETRIES = 3
LOCK_WAIT_S = 180.0  # a dead node's lock on a network file system lasts until its lease ends (NFSv4: ~90 s)
EVENT_POLL_S = 1.0


@dataclass
class ClusterOptions:
    """Where and with what each fold runs (``autounet run --executor ray``)."""

    address: str | None = None  # None: a local Ray instance; "auto" or HOST:PORT: a running cluster
    gpus_per_fold: int | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_fold: int | None = None  # None: 1
    max_retries: int | None = None  # None: DEFAULT_MAX_RETRIES

    def validate(self) -> ClusterOptions:
        """Refuse impossible numbers; fill in the defaults."""
        if self.address is not None and not str(self.address).strip():
            raise AutounetError("--address must be 'auto' or HOST:PORT of a running Ray cluster")
        arguments.whole("--gpus-per-fold", self.gpus_per_fold, 0)
        arguments.whole("--cpus-per-fold", self.cpus_per_fold, 1)
        arguments.whole("--max-retries", self.max_retries, 0)
        if self.cpus_per_fold is None:
            self.cpus_per_fold = 1
        if self.max_retries is None:
            self.max_retries = DEFAULT_MAX_RETRIES
        return self


def run_on_ray(raw: str | Path, ws: Workspace, options: RunOptions, cluster: ClusterOptions) -> RunResult:
    """`autounet run` with the folds trained as Ray tasks (see the module docstring)."""
    cluster = cluster.validate()
    options = options.validate()
    raw = Path(raw).resolve()
    ws = Workspace(ws.work.resolve(), ws.name)  # the workers' working folders differ from ours
    options = for_workers(options)
    with ray_session(cluster.address) as ray:
        gpus = cluster.gpus_per_fold if cluster.gpus_per_fold is not None else min(1, cluster_gpus(ray))
        cpus = cluster.cpus_per_fold
        slots = check_room(ray, cpus, gpus, "one fold")
        nodes = alive_nodes(ray)
        print(
            f"Ray: {len(nodes)} node(s); each fold gets {cpus} CPU(s) and {gpus} GPU(s), so up to {slots} train at "
            f"once; a fold whose worker is lost is resumed up to {cluster.max_retries} time(s)",
            flush=True,
        )
        # the folds read the raw data's workspace copy and, with --pretrained, the source weights
        # (a package's unpacked copy lies in this machine's cache: set AUTOUNET_CACHE to a shared folder)
        readable = [raw] + ([Path(options.pretrained)] if options.pretrained else [])
        check_shared(ray, ws.root, readable, what=f"the workspace {ws.name}")
        return run_pipeline(raw, ws, options, RayFolds(ray, cpus, gpus, cluster.max_retries))


def for_workers(options: RunOptions) -> RunOptions:
    """``options`` with every path absolute (a worker's working folder is not ours); the labels
    that name them in notes and checkpoints stay as the user gave them."""
    out = options
    if options.pretrained:
        out = replace(
            out,
            pretrained=str(Path(options.pretrained).resolve()),
            pretrained_label=options.pretrained_label or str(options.pretrained),
        )
    if options.plans_from:
        out = replace(
            out,
            plans_from=str(Path(options.plans_from).resolve()),
            plans_from_label=options.plans_from_label or str(options.plans_from),
        )
    return out


class RayFolds:
    """A :class:`~autounet.pipeline.run.FoldExecutor` that trains the folds of a wave as Ray tasks."""

    def __init__(self, ray: ModuleType, cpus: int, gpus: int, max_retries: int):
        self.ray, self.cpus, self.gpus, self.max_retries = ray, cpus, gpus, max_retries

    def __call__(self, ws: Workspace, jobs: list[FoldJob], options: RunOptions) -> list[FoldFailure]:
        ray = self.ray
        board = start_board(ray)
        task = ray.remote(fold_task).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.max_retries, retry_exceptions=False
        )
        refs = {task.remote(str(ws.work), ws.name, job, options, self.cpus, self.gpus, board): job for job in jobs}
        shown = TaskProgress(len(jobs), "folds", "fold")
        for job in jobs:
            shown.line(f"  ({job.number}/{job.total}) {job.label}: queued ({job.describe()})")
        attempts: dict[str, int] = {}
        finished: set[str] = set()
        failures: list[FoldFailure] = []
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=EVENT_POLL_S)
                self._show_events(take_events(ray, board), attempts, finished, shown)
                for ref in done:
                    job = refs[ref]
                    finished.add(job.label)
                    error, where, seconds = self._outcome(ref)
                    if error is None:
                        shown.line(f"  {job.label}: finished on {where} in {_duration(seconds)}")
                    else:
                        shown.line(f"  {job.label}: FAILED on {where}: {error}")
                        failures.append(FoldFailure(job, error))
                    shown.advance()
        finally:
            shown.close()
            for ref in pending:  # an interrupted driver: the folds it was waiting for stop too
                ray.cancel(ref, force=True)
            stop_board(ray, board)
        return failures

    @staticmethod
    def _show_events(events: list[dict[str, Any]], attempts: dict[str, int], finished: set[str], shown) -> None:
        for event in events:
            label = event["label"]
            attempts[label] = attempts.get(label, 0) + 1
            if label in finished:
                continue
            if attempts[label] == 1:
                shown.line(f"  {label}: {event['doing']} on {event['node']}")
            else:
                shown.line(
                    f"  {label}: its worker was lost; {event['doing']} on {event['node']} (attempt {attempts[label]})"
                )

    def _outcome(self, ref: Any) -> tuple[str | None, str, float]:
        """(error or None, node, seconds) of a finished task."""
        ray = self.ray
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            detail = lines[0] if lines else type(exc).__name__
            if isinstance(exc, ray.exceptions.RayTaskError):
                return f"{type(exc).__name__}: {detail}", "?", 0.0
            return (
                f"its worker or node was lost {self.max_retries + 1} time(s), more than --max-retries "
                f"{self.max_retries} allows ({type(exc).__name__}: {detail})",
                "?",
                0.0,
            )
        return result["error"], result["node"], result["seconds"]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def fold_task(
    work: str, name: str, job: FoldJob, options: RunOptions, cpus: int, gpus: int, board: Any
) -> dict[str, Any]:
    """One fold brought to ``done`` inside a Ray task; returns ``{"error", "node", "seconds"}``
    (an error of the fold's own is returned, not raised, so that Ray does not retry it)."""
    import torch

    started = time.time()
    ws = Workspace(Path(work), name)
    node = this_node()
    torch.set_num_threads(cpus)
    if gpus == 0 and options.device is None:
        options = replace(options, device="cpu")  # the task was given no GPU, even where the node has one
    if gpus > 0 and options.loader_threads is None:
        options = replace(options, loader_threads=max(1, cpus - 1))
    fold_dir = ws.fold_dir(job.configuration, job.fold)
    make_folder(fold_dir)
    with open(fold_console_path(fold_dir), "a", encoding="utf-8", buffering=1) as console:
        with redirect_stdout(console), redirect_stderr(console):
            print(
                f"=== {datetime.now().isoformat(timespec='seconds')} {job.label} on {node}, pid {os.getpid()}, "
                f"{cpus} CPU(s), {gpus} GPU(s)",
                flush=True,
            )
            try:
                _wait_for_lock(ws.fold_lock(job.configuration, job.fold))
                state = fold_state(fold_dir)  # a retried task finds "resume"
                doing = {"new": "training", "resume": "resuming", "validate": "validating", "done": "complete"}[state]
                board.post.remote({"label": job.label, "doing": doing, "node": node, "pid": os.getpid()})
                if gpus > 1 and state in ("new", "resume"):
                    _torchrun(ws, job, options, cpus, gpus, console)
                else:
                    train_fold(ws, job.configuration, job.fold, options)
            except Exception as exc:  # the fold's own failure: reported, not retried
                traceback.print_exc()
                message = str(exc) if isinstance(exc, AutounetError) else f"{type(exc).__name__}: {exc}"
                return {"error": message, "node": node, "seconds": time.time() - started}
    return {"error": None, "node": node, "seconds": time.time() - started}


def _wait_for_lock(path: Path) -> None:
    """Wait (up to :data:`LOCK_WAIT_S`) for a fold's lock to be free: a worker killed on another
    node may hold it on a network file system until the server notices; a live holder (another
    `autounet train`) still makes the fold fail with its usual message afterwards."""
    from filelock import FileLock, Timeout

    if not path.exists():
        return
    lock = FileLock(str(path), timeout=LOCK_WAIT_S)
    try:
        lock.acquire()
    except Timeout:
        return
    lock.release()


def _torchrun(ws: Workspace, job: FoldJob, options: RunOptions, cpus: int, gpus: int, console: TextIO) -> None:
    """Train (and validate) the fold with ``gpus`` DDP processes under torchrun, in a child
    process that dies with this worker (a lost worker must not leave ranks holding the lock)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
        "-m", "autounet.cluster.torchrun_fold", str(ws.work), ws.name, job.configuration, str(job.fold),
        json.dumps(asdict(options)),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cpus // gpus))}
    console.flush()
    done = subprocess.run(
        command, stdout=console, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent, check=False
    )
    if done.returncode != 0:
        raise AutounetError(
            f"torchrun with {gpus} processes ended with exit code {done.returncode}; see "
            f"{fold_console_path(ws.fold_dir(job.configuration, job.fold))}"
        )


def _die_with_parent() -> None:
    """In the child, before it runs: SIGTERM when the worker that started it dies (Linux), which
    torchrun passes on to its ranks."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
