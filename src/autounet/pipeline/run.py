"""`autounet run`: check -> plan -> preprocess -> train every configuration and fold -> select -> report.

Resumable at every step: planning reuses an up-to-date fingerprint, preprocessing skips complete
cases, and each fold is in one of four states, read from its folder:

==========================================  ==============================================
state                                        action
==========================================  ==============================================
``checkpoint_final.pt`` + ``summary.json``   done: skipped
``checkpoint_final.pt`` only                 validation interrupted: redone (--validate-only)
``checkpoint_latest.pt``                     training interrupted: resumed exactly
nothing                                      trained from scratch
==========================================  ==============================================

A cascade's first stage (``3d_lowres``) is trained on every fold before its second stage. With a
subset of ``--folds``, the second stage is skipped (one line says so) unless the first stage's
predictions of every case are already there: only all five first-stage folds make them.
Selection is recomputed from the validation results (cheap), then the report.

The folds are trained by a :class:`FoldExecutor`, one wave at a time (the configurations without
a first stage, then the cascade's second stage); the folds of a wave are independent of each
other. :func:`train_locally` (the default) trains them one after the other in this process and
stops at the first error; a cluster executor (:mod:`autounet.cluster`) trains them at once on
several machines and reports the folds that failed, which end the run after the others finish.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from autounet.errors import AutounetError
from autounet.pipeline.fold import train_and_validate, validate_and_report
from autounet.planning.plans import CONFIGURATIONS, Plans
from autounet.planning.run import plan_dataset
from autounet.preprocessing.run import preprocess_dataset
from autounet.selection_document import Selection
from autounet.training.options import TrainOptions
from autounet.training.trackers import check_loggers
from autounet.utils import arguments
from autounet.utils.atomic import read_json
from autounet.workspace import Workspace, checkpoint_path, manifest_path, previous_stage_path

DEFAULT_FOLDS = (0, 1, 2, 3, 4)


@dataclass
class RunOptions:
    configurations: list[str] | None = None  # default: every planned configuration
    folds: list[int | str] = field(default_factory=lambda: list(DEFAULT_FOLDS))
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    validation_iterations: int | None = None
    max_minutes: float | None = None  # per fold
    recipe: str | None = None  # planning recipe (e.g. "brats")
    patch_size: list[int] | None = None  # planning override (a CPU convenience for the brats preset)
    gpu_memory_target_gb: float | None = None  # the nnU-Net v2 recipes' memory target (None: the preset's)
    device: str | None = None
    workers: int | None = None
    seed: int = 0
    width_multiplier: float | None = None  # narrower/wider networks (e.g. a CPU smoke run of the brats preset)
    validation_tta: bool = True  # mirroring in the end-of-training validation
    precision: str = "auto"  # training precision (see runtime.training_dtype)
    loader_threads: int | None = None  # batch-loading threads per fold (default: the trainer's)
    plans_from: str | None = None  # plan with this source's networks (planning/transfer.py)
    plans_from_label: str | None = None  # how the plans name it (e.g. the package .zip); None: plans_from
    pretrained: str | None = None  # start new folds from this run's weights (training/pretrained.py)
    pretrained_label: str | None = None  # how the fold's checkpoints name it; None: pretrained
    loggers: list[str] | None = None  # experiment trackers of every fold (training/trackers.py)

    def validate(self) -> RunOptions:
        """Refuse impossible numbers with one clear message each (before anything is written)."""
        _check_folds(self.folds)
        arguments.whole("--epochs", self.epochs, 1)
        arguments.whole("--iters-per-epoch", self.iterations_per_epoch, 1)
        arguments.whole("--val-iters", self.validation_iterations, 0)
        arguments.real("--max-minutes", self.max_minutes, above=0)
        arguments.workers(self.workers)
        arguments.whole("--threads", self.loader_threads, 1)
        arguments.whole("--seed", self.seed, 0)
        arguments.real("--width-multiplier", self.width_multiplier, above=0)
        check_loggers(self.loggers)
        return self


@dataclass
class RunResult:
    workspace: Workspace
    selection: Selection
    trained: list[str]  # "CONFIG fold K" trained or resumed in this run
    skipped: list[str]
    report: Path | None
    seconds: float


def fold_state(fold_dir: Path) -> str:
    """``done``, ``validate``, ``resume`` or ``new`` (see the module docstring)."""
    from autounet.validation.fold import is_validated

    if checkpoint_path(fold_dir, "final").is_file():
        return "done" if is_validated(fold_dir) else "validate"
    if checkpoint_path(fold_dir, "latest").is_file():
        return "resume"
    return "new"


def _order(names: Sequence[str], plans: Plans) -> list[str]:
    """Planned configurations in pipeline order (a cascade's first stage before its second)."""
    unknown = [n for n in names if n not in plans.configurations]
    if unknown:
        raise AutounetError(
            f"configuration(s) {', '.join(unknown)} are not planned for {plans.dataset_name}; planned: {', '.join(plans.configurations)}"
        )
    ordered = [c for c in CONFIGURATIONS if c in names]
    for name in ordered:
        previous = plans.configurations[name].previous_stage
        if previous and previous not in ordered:
            raise AutounetError(f"{name} needs its first stage {previous}: add it to --configs")
    return ordered


def _check_folds(folds: Sequence[int | str]) -> list[int | str]:
    if not folds:
        raise AutounetError("--folds needs at least one fold (0..4 or 'all')")
    out: list[int | str] = []
    for f in folds:
        if str(f) == "all":
            out.append("all")
            continue
        try:
            k = int(f)
        except (TypeError, ValueError):
            raise AutounetError(f"fold must be a number 0..4 or 'all', got {f!r}") from None
        if not 0 <= k < len(DEFAULT_FOLDS):
            raise AutounetError(f"fold {k} does not exist (folds are 0..{len(DEFAULT_FOLDS) - 1})")
        out.append(k)
    return list(dict.fromkeys(out))


def _missing_cascade_inputs(ws: Workspace, plans: Plans, configuration: str) -> list[str]:
    """The cases whose first-stage prediction a cascade's second stage lacks (none for other
    configurations). The first stage's validation writes them, so they are complete only after
    all five of its folds: a run with a subset of --folds skips the second stage instead of failing
    at it (training five first-stage folds nobody asked for would blow the run's budget)."""
    plan = plans.configurations[configuration]
    if not plan.previous_stage:
        return []
    manifest = manifest_path(ws.preprocessed_dir(plan.data_identifier))
    cases = list(read_json(manifest)["cases"]) if manifest.is_file() else []
    folder = ws.next_stage_dir(plan.previous_stage)
    return [c for c in cases if not previous_stage_path(folder, c).is_file()]


@dataclass(frozen=True)
class FoldJob:
    """One fold to bring to ``done``, with the state it was found in when the run scheduled it."""

    configuration: str
    fold: int | str
    state: str  # "new", "resume" or "validate"
    number: int  # its place among the run's folds (1-based), for "(3/10)"
    total: int

    @property
    def label(self) -> str:
        return f"{self.configuration} fold {self.fold}"

    def describe(self) -> str:
        """What bringing it to ``done`` means: training, resuming or validating."""
        return {"new": "training", "resume": "resuming", "validate": "validating"}[self.state]


@dataclass(frozen=True)
class FoldFailure:
    """A fold that failed for a reason of its own (bad data, a non-finite loss, ...)."""

    job: FoldJob
    error: str


class FoldExecutor(Protocol):
    def __call__(self, ws: Workspace, jobs: Sequence[FoldJob], options: RunOptions) -> list[FoldFailure]:
        """Bring every fold of ``jobs`` (independent of each other) to ``done`` with
        :func:`train_fold`; returns the folds that failed (an executor may also raise)."""
        ...


def train_locally(ws: Workspace, jobs: Sequence[FoldJob], options: RunOptions) -> list[FoldFailure]:
    """The default executor: one fold after the other in this process; the first error ends the run."""
    for job in jobs:
        print(f"  ({job.number}/{job.total}) {job.label}: {job.describe()}", flush=True)
        train_fold(ws, job.configuration, job.fold, options)
    return []


def train_fold(ws: Workspace, configuration: str, fold: int | str, options: RunOptions) -> str:
    """Bring one fold to ``done``; returns the state it was found in."""
    fold_dir = ws.fold_dir(configuration, fold)
    state = fold_state(fold_dir)
    if state == "done":
        return state
    if state == "validate":
        if fold != "all":
            validate_and_report(ws, configuration, fold, options.device, tta=options.validation_tta)
        return state
    train_and_validate(
        ws,
        TrainOptions(
            configuration=configuration,
            fold=fold,
            epochs=options.epochs,
            iterations_per_epoch=options.iterations_per_epoch,
            validation_iterations=options.validation_iterations,
            device=options.device,
            seed=options.seed,
            max_minutes=options.max_minutes,
            resume=state == "resume",
            width_multiplier=options.width_multiplier,
            precision=options.precision,
            loader_threads=options.loader_threads,
            pretrained=options.pretrained,
            pretrained_label=options.pretrained_label,
            loggers=options.loggers,
        ),
        validation_tta=options.validation_tta,
    )
    return state


def _waves(configurations: Sequence[str], plans: Plans) -> list[list[str]]:
    """The configurations in training order, grouped so that a cascade's second stage comes in a
    wave after its first stage (it trains on the first stage's predictions of every case)."""
    waves: list[list[str]] = []
    depth: dict[str, int] = {}
    for name in configurations:
        previous = plans.configurations[name].previous_stage
        depth[name] = depth[previous] + 1 if previous in depth else 0
        while len(waves) <= depth[name]:
            waves.append([])
        waves[depth[name]].append(name)
    return waves


def _train_waves(
    ws: Workspace,
    plans: Plans,
    configurations: Sequence[str],
    folds: Sequence[int | str],
    options: RunOptions,
    train_folds: FoldExecutor,
) -> tuple[list[str], list[str], set[str], list[FoldFailure]]:
    """Schedule every fold that is not done, wave by wave; returns the folds trained and skipped,
    the cascade stages left out, and the folds that failed."""
    trained: list[str] = []
    skipped: list[str] = []
    cascade_skipped: set[str] = set()
    failures: list[FoldFailure] = []
    total = len(configurations) * len(folds)
    number = 0
    every_fold = set(DEFAULT_FOLDS) <= set(folds)  # else a cascade's second stage may lack its inputs
    for wave in _waves(configurations, plans):
        jobs = []
        for configuration in wave:
            previous = plans.configurations[configuration].previous_stage
            failed_first = [f.job.label for f in failures if f.job.configuration == previous]
            missing = [] if every_fold else _missing_cascade_inputs(ws, plans, configuration)
            if failed_first or missing:
                number += len(folds)
                cascade_skipped.add(configuration)
                why = (
                    f"its first stage failed ({', '.join(failed_first)})"
                    if failed_first
                    else f"it trains on the {previous} predictions of every case, which only all five {previous} folds "
                    f"make ({len(missing)} missing, e.g. {missing[0]}); run with --folds 0 1 2 3 4 to train it"
                )
                print(f"  {configuration}: skipped: {why}", flush=True)
                continue
            for fold in folds:
                number += 1
                state = fold_state(ws.fold_dir(configuration, fold))
                job = FoldJob(configuration, fold, state, number, total)
                if state == "done":
                    skipped.append(job.label)
                    print(f"  ({number}/{total}) {job.label}: complete, skipped", flush=True)
                else:
                    jobs.append(job)
        if jobs:
            failed = train_folds(ws, jobs, options)
            failures += failed
            lost = {f.job for f in failed}
            trained += [j.label for j in jobs if j not in lost]
    return trained, skipped, cascade_skipped, failures


def run_pipeline(
    raw: str | Path, ws: Workspace, options: RunOptions | None = None, train_folds: FoldExecutor = train_locally
) -> RunResult:
    """The whole method on one raw dataset, resumably (see the module docstring); ``train_folds``
    trains the folds (default: :func:`train_locally`)."""
    from autounet.selection.select import format_selection, select

    options = (options or RunOptions()).validate()
    start = time.time()
    folds = _check_folds(options.folds)
    print(f"[1/5] check and plan {raw}", flush=True)
    planned = plan_dataset(
        raw,
        ws,
        options.workers,
        recipe=options.recipe,
        patch_size=options.patch_size,
        plans_from=options.plans_from,
        plans_from_label=options.plans_from_label,
        gpu_memory_target_gb=options.gpu_memory_target_gb,
    )
    plans = planned.plans
    if planned.report is not None:
        for w in planned.report.warnings:
            print(f"warning: {w}")
    configurations = _order(options.configurations or list(plans.configurations), plans)
    print(f"[2/5] preprocess {', '.join(configurations)}", flush=True)
    summary = preprocess_dataset(ws, configurations, options.workers)
    if summary.failures:
        raise AutounetError("preprocessing failed for:\n  " + "\n  ".join(summary.failures))

    total = len(configurations) * len(folds)
    print(f"[3/5] train {total} fold(s): {', '.join(configurations)} x folds {', '.join(map(str, folds))}", flush=True)
    trained, skipped, cascade_skipped, failures = _train_waves(ws, plans, configurations, folds, options, train_folds)
    if failures:
        raise AutounetError(
            f"{len(failures)} fold(s) failed ({len(trained)} trained, {len(skipped)} already complete; fix the cause "
            "and run the same command again to finish):\n  "
            + "\n  ".join(f"{f.job.label}: {f.error}" for f in failures)
        )

    print("[4/5] select the best model", flush=True)
    numbered = [f for f in folds if f != "all"]
    if not numbered:
        raise AutounetError("selection needs cross-validation folds (0..4), not only 'all'")
    configurations = [c for c in configurations if c not in cascade_skipped]
    selection = select(ws, configurations, workers=options.workers)
    print(format_selection(selection, plans.labels))
    print("[5/5] report", flush=True)
    from autounet.reporting import write_html_report, write_report

    report = write_report(ws)
    print(f"report: {report} and {write_html_report(ws)}")
    return RunResult(ws, selection, trained, skipped, report, time.time() - start)
