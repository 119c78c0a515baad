"""What the report reads from ``W/NAME/``: the typed documents (fingerprint, plans, selection),
every trained fold's log and validation scores, and each configuration's cross-validation summary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autounet.errors import AutounetError
from autounet.evaluation.evaluate import EvaluationResult, load_evaluation
from autounet.planning.fingerprint import Fingerprint, load_fingerprint
from autounet.planning.plans import Plans, load_plans
from autounet.reporting.common import SKIPPABLE, class_key, is_number
from autounet.selection_document import Selection, load_selection
from autounet.utils.atomic import read_json
from autounet.utils.loaders import read_json_lines
from autounet.workspace import (
    Workspace,
    checkpoint_path,
    cv_summary_path,
    fold_folders,
    training_log_path,
    validation_summary_path,
)


@dataclass
class FoldSummary:
    """What the report says about one trained fold (read from its folder, no checkpoint loaded)."""

    configuration: str
    fold: str
    folder: Path
    log: list[dict[str, Any]]
    stopped: str
    validation_dice: float | None = None
    validation_cases: int | None = None
    validation_per_case: dict[str, float] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.log)

    @property
    def minutes(self) -> float:
        return sum(float(e.get("seconds") or 0.0) for e in self.log) / 60.0

    @property
    def best_ema_dice(self) -> float | None:
        values = [e.get("ema_dice") for e in self.log if is_number(e.get("ema_dice"))]
        return max(values) if values else None

    def last(self, key: str) -> Any:
        return self.log[-1].get(key) if self.log else None


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a ``log.jsonl`` (blank lines skipped; NaN allowed, as the trainer writes it)."""
    return read_json_lines(path)


def _stop_reason(folder: Path, log: list[dict[str, Any]]) -> str:
    """From the files alone: the trainer cuts the last epoch only at its time limit, and writes
    ``checkpoint_final.pt`` only when training has ended (its reason is kept in that checkpoint)."""
    if log and log[-1].get("partial"):
        return "time limit"
    if checkpoint_path(folder, "final").is_file():
        return "finished"
    return "running or interrupted"


def _case_dice(metrics: Mapping[str, Mapping[str, float]]) -> float | None:
    values = [m.get("dice") for m in metrics.values() if is_number(m.get("dice"))]
    return sum(values) / len(values) if values else None


def read_fold(configuration: str, folder: Path) -> FoldSummary:
    """A fold's log, its stop reason and, when validated, its full-case validation Dice."""
    log = read_log(training_log_path(folder))
    summary = FoldSummary(configuration, folder.name[len("fold_") :], folder, log, _stop_reason(folder, log))
    path = validation_summary_path(folder)
    if path.is_file():
        try:
            result = load_evaluation(path)
        except AutounetError:
            return summary
        summary.validation_dice = result.foreground_mean.get("dice")
        summary.validation_cases = result.n_cases
        for case, metrics in result.per_case.items():
            dice = _case_dice(metrics)
            if dice is not None:
                summary.validation_per_case[case] = dice
    return summary


def trained_folds(ws: Workspace, configurations: Iterable[str]) -> dict[str, list[FoldSummary]]:
    """Per configuration (in the given order) its folds with a ``log.jsonl``, fold 0, 1, ..., then ``all``."""
    found: dict[str, list[FoldSummary]] = {}
    for config in configurations:
        folds = [p for p in fold_folders(ws.results_dir(config)).values() if training_log_path(p).is_file()]
        if folds:
            found[config] = [read_fold(config, p) for p in folds]
    return found


@dataclass
class CvSummary:
    """``results/CONFIG/cv_summary.json``: the folds' validation cases pooled."""

    result: EvaluationResult
    folds: list[str]  # the folds pooled, in order
    complete: bool  # every fold of splits.json is in


def read_cv_summary(ws: Workspace, configuration: str) -> CvSummary | None:
    """A configuration's cross-validation summary, or None when it has none yet."""
    path = cv_summary_path(ws.results_dir(configuration))
    if not path.is_file():
        return None
    raw = read_json(path, dict)
    return CvSummary(
        load_evaluation(path), sorted(map(str, raw.get("folds", {})), key=class_key), bool(raw.get("complete"))
    )


@dataclass
class ReportContext:
    """Everything the sections read, and the pictures they wrote."""

    ws: Workspace
    fingerprint: Fingerprint | None = None
    plans: Plans | None = None
    selection: Selection | None = None
    folds: dict[str, list[FoldSummary]] = field(default_factory=dict)
    cv: dict[str, CvSummary] = field(default_factory=dict)
    label_names: dict[str, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)

    @property
    def figures(self) -> Path:
        return self.ws.report_figures_dir

    def rel(self, path: Path) -> str:
        """A link target relative to ``report.md``."""
        return Path(path).relative_to(self.ws.root).as_posix()


def load_context(ws: Workspace) -> tuple[ReportContext, list[str]]:
    """Read the workspace's files; returns the context and a note per file that could not be read."""
    ctx = ReportContext(ws)
    problems = []
    if ws.fingerprint_json.is_file():
        try:
            ctx.fingerprint = load_fingerprint(ws.fingerprint_json)
        except AutounetError as exc:
            problems.append(str(exc))
    if ws.plans_json.is_file():
        try:
            ctx.plans = load_plans(ws.plans_json)
        except AutounetError as exc:
            problems.append(str(exc))
    if ws.selection_json.is_file():
        try:
            ctx.selection = load_selection(ws.selection_json)
        except (AutounetError, OSError) as exc:
            problems.append(str(exc))
    source = ctx.plans or ctx.fingerprint
    if source is not None:
        ctx.label_names = {str(k): str(v) for k, v in source.labels.items()}
    if ctx.plans is not None:
        try:
            ctx.folds = trained_folds(ws, ctx.plans.configurations)
        except SKIPPABLE as exc:
            problems.append(f"trained folds: {exc}")
        for config in ctx.folds:
            try:
                cv = read_cv_summary(ws, config)
            except SKIPPABLE as exc:
                problems.append(f"{config}: cross-validation summary unreadable ({exc})")
                continue
            if cv is not None:
                ctx.cv[config] = cv
    return ctx, problems
