"""`autounet plan` as a workspace operation: check and fingerprint a raw dataset (reusing an
up-to-date fingerprint), claim the workspace for it, and write ``dataset.json``,
``fingerprint.json`` and ``plans.json``. Validates everything before it writes anything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autounet.data.check import CheckReport, check_dataset
from autounet.data.dataset import parse_raw_dataset
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
from autounet.planning.recipes import (
    check_memory_target,
    check_recipe,
    has_background_info,
    plan_with_recipe,
    regions_from_fingerprint,
)
from autounet.planning.transfer import load_source_plans, plans_from_source
from autounet.regions import region_set_for_dataset
from autounet.utils.atomic import atomic_write_json, read_json
from autounet.workspace import Workspace


@dataclass
class PlanResult:
    workspace: Workspace
    fingerprint: Fingerprint
    plans: Plans
    report: CheckReport | None  # None when a stored, up-to-date fingerprint was reused


def claim_workspace(ws: Workspace, raw_root: Path) -> None:
    """Refuse to plan into a workspace that belongs to another raw dataset."""
    if ws.dataset_json.is_file():
        try:
            owner = read_json(ws.dataset_json, dict).get("raw_path")
        except AutounetError:  # a damaged dataset.json of ours: plan writes it anew
            owner = None
        if owner and Path(owner) != raw_root:
            raise AutounetError(f"{ws.root} already holds the dataset from {owner}; choose another --name or --work")


def _source_plans(
    plans_from: str | Path | None,
    recipe: str | None,
    patch_size: list[int] | None,
    gpu_memory_target_gb: float | None = None,
) -> Plans | None:
    """The plans of ``--plans-from`` (None without it); they decide what a recipe would."""
    if plans_from is None:
        return None
    if recipe is not None or patch_size is not None or gpu_memory_target_gb is not None:
        raise AutounetError(
            "--plans-from takes the source's recipe and patch: give it without --recipe, --patch-size or "
            "--gpu-memory-target"
        )
    return load_source_plans(plans_from)


def fingerprint_dataset(raw: str | Path, workers: int | None = None) -> tuple[CheckReport, Fingerprint]:
    """Check the dataset and, if it is valid, compute its fingerprint (one read per case)."""
    report = check_dataset(raw, workers=workers, compute_stats=True)
    if not report.ok:
        raise DatasetInvalid([str(e) for e in report.errors])
    assert report.dataset is not None
    fp = build_fingerprint(report.dataset, report.inspections, signature=dataset_signature(report.dataset))
    return report, fp


def plan_dataset(
    raw: str | Path,
    ws: Workspace,
    workers: int | None = None,
    force: bool = False,
    options: PlannerOptions | None = None,
    recipe: str | None = None,
    patch_size: list[int] | None = None,
    plans_from: str | Path | None = None,
    plans_from_label: str | None = None,
    gpu_memory_target_gb: float | None = None,
) -> PlanResult:
    """Check, fingerprint and plan a raw dataset into ``W/NAME/``.

    The fingerprint is reused when ``W/NAME/fingerprint.json`` was made from the same files
    (same dataset.json, names, sizes and modification times) unless ``force``. ``recipe``:
    ``nnunet`` (default, seed 001), ``brats`` (seed 004's recipe, see
    :mod:`autounet.planning.recipes`) or nnU-Net v2's ``nnunetv2`` / ``resenc-m|l|xl``
    (``gpu_memory_target_gb``: their memory target); ``patch_size`` overrides the brats recipe's 128³ patch
    (a CPU convenience). ``plans_from``: a planned workspace folder or a plans.json whose
    networks the plans keep (:mod:`autounet.planning.transfer`; instead of ``recipe``), named in
    the plans' notes as ``plans_from_label`` (default: its path).
    """
    source = _source_plans(plans_from, recipe, patch_size, gpu_memory_target_gb)
    recipe = check_recipe(source.recipe if source is not None else recipe)
    check_memory_target(recipe, gpu_memory_target_gb)
    raw = Path(raw)
    dataset, findings = parse_raw_dataset(raw)
    errors = [str(f) for f in findings if f.severity == "error"]
    if errors or dataset is None:
        raise DatasetInvalid(errors or [f"{raw}: cannot parse the dataset"])
    claim_workspace(ws, dataset.root)

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
    if source is not None:
        plans = plans_from_source(
            source, fp, plans_from_label or str(plans_from), region_set_for_dataset(dataset), options
        )
    else:
        plans = plan_with_recipe(fp, recipe, region_set_for_dataset(dataset), options, patch_size, gpu_memory_target_gb)

    atomic_write_json(ws.dataset_json, {**dataset.descriptor, "raw_path": str(dataset.root), "layout": dataset.layout})
    if report is not None:
        save_fingerprint(fp, ws.fingerprint_json)
    save_plans(plans, ws.plans_json)
    return PlanResult(ws, fp, plans, report)


def plan_from_fingerprint(
    fingerprint: str | Path,
    ws: Workspace,
    options: PlannerOptions | None = None,
    recipe: str | None = None,
    patch_size: list[int] | None = None,
    plans_from: str | Path | None = None,
    plans_from_label: str | None = None,
    gpu_memory_target_gb: float | None = None,
) -> PlanResult:
    """Plan from a fingerprint.json alone (no images needed); writes ``W/NAME/plans.json``.
    ``plans_from``: as :func:`plan_dataset`."""
    source = _source_plans(plans_from, recipe, patch_size, gpu_memory_target_gb)
    fp = load_fingerprint(fingerprint)
    if source is not None:
        plans = plans_from_source(
            source, fp, plans_from_label or str(plans_from), regions_from_fingerprint(fp), options
        )
    else:
        plans = plan_with_recipe(fp, recipe, regions_from_fingerprint(fp), options, patch_size, gpu_memory_target_gb)
    if Path(fingerprint).resolve() != ws.fingerprint_json.resolve():
        save_fingerprint(fp, ws.fingerprint_json)
    save_plans(plans, ws.plans_json)
    return PlanResult(ws, fp, plans, None)
