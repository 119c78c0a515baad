"""Python API mirroring the commands: ``autounet.check``, ``autounet.plan``, ...

Each function validates everything before it writes anything, so a failure leaves the
workspace as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autounet.data.check import CheckReport, check_dataset
from autounet.data.dataset import parse_raw_dataset
from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from autounet.errors import AutounetError, DatasetInvalid
from autounet.planning.fingerprint import (
    Fingerprint,
    build_fingerprint,
    dataset_signature,
    load_fingerprint,
    save_fingerprint,
)
from autounet.planning.planner import PlannerOptions
from autounet.planning.plans import Plans, save_plans
from autounet.planning.recipes import check_recipe, has_background_info, plan_with_recipe, regions_from_fingerprint
from autounet.preprocessing.case import PreprocessOptions
from autounet.preprocessing.run import PreprocessSummary, preprocess_dataset
from autounet.utils.atomic import atomic_write_json, read_json
from autounet.workspace import Workspace


@dataclass
class PlanResult:
    workspace: Workspace
    fingerprint: Fingerprint
    plans: Plans
    report: CheckReport | None  # None when a stored, up-to-date fingerprint was reused


def check(raw: str | Path, workers: int | None = None) -> CheckReport:
    """Validate a raw dataset (MSD or nnU-Net v2 layout); writes nothing."""
    return check_dataset(raw, workers=workers)


def _claim_workspace(ws: Workspace, raw_root: Path) -> None:
    """Refuse to plan into a workspace that belongs to another raw dataset."""
    if ws.dataset_json.is_file():
        try:
            owner = read_json(ws.dataset_json).get("raw_path")
        except (ValueError, OSError, AttributeError):
            owner = None
        if owner and Path(owner) != raw_root:
            raise AutounetError(f"{ws.root} already holds the dataset from {owner}; choose another --name or --work")


def fingerprint_dataset(raw: str | Path, workers: int | None = None) -> tuple[CheckReport, Fingerprint]:
    """Check the dataset and, if it is valid, compute its fingerprint (one read per case)."""
    report = check_dataset(raw, workers=workers, compute_stats=True)
    if not report.ok:
        raise DatasetInvalid([str(e) for e in report.errors])
    assert report.dataset is not None
    fp = build_fingerprint(report.dataset, report.inspections, signature=dataset_signature(report.dataset))
    return report, fp


def plan(
    raw: str | Path,
    work: str | Path | None = None,
    name: str | None = None,
    workers: int | None = None,
    force: bool = False,
    options: PlannerOptions | None = None,
    preset: str | None = None,
    patch_size: list[int] | None = None,
) -> PlanResult:
    """Check, fingerprint and plan a raw dataset into ``W/NAME/``.

    The fingerprint is reused when ``W/NAME/fingerprint.json`` was made from the same files
    (same dataset.json, names, sizes and modification times) unless ``force``. ``preset``:
    ``nnunet`` (default, seed 001) or ``brats`` (seed 004's recipe, see
    :mod:`autounet.planning.recipes`); ``patch_size`` overrides the brats preset's patch (a CPU
    convenience).
    """
    from autounet.regions import region_set_for_dataset

    recipe = check_recipe(preset)
    raw = Path(raw)
    ws = Workspace.at(work, name or raw.resolve().name)
    dataset, findings = parse_raw_dataset(raw)
    errors = [str(f) for f in findings if f.severity == "error"]
    if errors or dataset is None:
        raise DatasetInvalid(errors or [f"{raw}: cannot parse the dataset"])
    _claim_workspace(ws, dataset.root)

    report, fp = None, None
    if not force and ws.fingerprint_json.is_file():
        try:
            stored = load_fingerprint(ws.fingerprint_json)
        except AutounetError:
            stored = None
        if stored is not None and stored.source_signature == dataset_signature(dataset):
            fp = stored
        if fp is not None and recipe == "brats" and not has_background_info(fp):
            fp = None  # an older fingerprint without the corner values the brats preset needs
    if fp is None:
        report, fp = fingerprint_dataset(raw, workers)
    plans = plan_with_recipe(fp, recipe, region_set_for_dataset(dataset), options, patch_size)

    atomic_write_json(ws.dataset_json, {**dataset.descriptor, "raw_path": str(dataset.root), "layout": dataset.layout})
    if report is not None:
        save_fingerprint(fp, ws.fingerprint_json)
    save_plans(plans, ws.plans_json)
    return PlanResult(ws, fp, plans, report)


def plan_from_fingerprint(
    fingerprint: str | Path,
    work: str | Path | None,
    name: str,
    options: PlannerOptions | None = None,
    preset: str | None = None,
    patch_size: list[int] | None = None,
) -> PlanResult:
    """Plan from a fingerprint.json alone (no images needed); writes ``W/NAME/plans.json``."""
    ws = Workspace.at(work, name)
    fp = load_fingerprint(fingerprint)
    plans = plan_with_recipe(fp, preset, regions_from_fingerprint(fp), options, patch_size)
    if Path(fingerprint).resolve() != ws.fingerprint_json.resolve():
        save_fingerprint(fp, ws.fingerprint_json)
    save_plans(plans, ws.plans_json)
    return PlanResult(ws, fp, plans, None)


def preprocess(
    name: str,
    work: str | Path | None = None,
    configurations: list[str] | None = None,
    workers: int | None = None,
    float16: bool = False,
    label_interpolation: str = "nearest",
    force: bool = False,
) -> PreprocessSummary:
    """Preprocess the planned dataset ``W/NAME`` (see :func:`preprocessing.run.preprocess_dataset`)."""
    options = PreprocessOptions(
        image_dtype="float16" if float16 else "float32", label_interpolation=label_interpolation
    )
    return preprocess_dataset(work, name, configurations, workers, options, force)


def train(name: str, configuration: str, fold: int | str, work: str | Path | None = None, **options: object):
    """Train one fold; keyword arguments are :class:`autounet.training.trainer.TrainOptions` fields."""
    from autounet.training.trainer import TrainOptions
    from autounet.training.trainer import train as train_fold

    return train_fold(work, name, TrainOptions(configuration=configuration, fold=fold, **options))


def make_synthetic(out: str | Path, **spec: object) -> Path:
    """Write a synthetic MSD-layout dataset; keyword arguments are :class:`SyntheticSpec` fields."""
    return make_synthetic_dataset(out, SyntheticSpec(**spec))


def evaluate(pred: str | Path, gt: str | Path, **options: object):
    """Compare label maps (folders or files); keyword arguments as
    :func:`autounet.evaluation.evaluate.evaluate_folders` (``labels``, ``regions``, ``empty``, ...)."""
    from autounet.evaluation.evaluate import evaluate_folders

    return evaluate_folders(pred, gt, **options)


def select(name: str, work: str | Path | None = None, configurations: list[str] | None = None) -> dict:
    """Rank configurations and pair ensembles by cross-validation Dice, decide post-processing;
    writes and returns ``W/NAME/selection.json``'s content."""
    from autounet.evaluation.selection import select as select_model

    return select_model(work, name, configurations)


def run(raw: str | Path, work: str | Path | None = None, name: str | None = None, **options: object):
    """The whole pipeline, resumable; keyword arguments are :class:`autounet.pipeline.run.RunOptions` fields."""
    from autounet.pipeline.run import RunOptions, run_pipeline

    return run_pipeline(raw, work, name, RunOptions(**options))
