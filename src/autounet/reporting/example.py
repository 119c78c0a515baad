"""Report section 5: an example validation case of the best model with its predicted segmentation
(``report/example_CASE.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from autounet.reporting.common import is_number, note, num, safe_name
from autounet.reporting.context import FoldSummary, ReportContext
from autounet.utils.atomic import read_json
from autounet.workspace import validation_dir


def best_configurations(ctx: ReportContext) -> list[str]:
    """The winner's member configurations, else the trained ones by CV (or validation) Dice, best first."""
    members = [m for m in ctx.selection.winner.members if m in ctx.folds] if ctx.selection else []
    if members:
        return members

    def score(config: str) -> float:
        cv = ctx.cv.get(config)
        if cv and is_number(cv.result.foreground_mean.get("dice")):
            return float(cv.result.foreground_mean["dice"])
        values = [f.validation_dice for f in ctx.folds[config] if is_number(f.validation_dice)]
        return sum(values) / len(values) if values else -1.0

    return sorted(ctx.folds, key=score, reverse=True)


def prediction_files(folder: Path) -> dict[str, Path]:
    from autounet.data.image_io import IMAGE_SUFFIXES, image_suffix

    found = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            suffix = image_suffix(p.name)
            if p.is_file() and not p.name.startswith(".") and suffix in IMAGE_SUFFIXES:
                found[p.name[: -len(suffix)]] = p
    return found


def _typical_case(fold: FoldSummary, cases: Sequence[str]) -> str:
    """The case with the median validation Dice of the fold (the first one without scores)."""
    scored = sorted((fold.validation_per_case[c], c) for c in cases if c in fold.validation_per_case)
    return scored[len(scored) // 2][1] if scored else sorted(cases)[0]


def example_section(ctx: ReportContext) -> list[str]:
    from autounet.data.dataset import load_raw_dataset
    from autounet.data.image_io import read_image, read_label
    from autounet.visualization import render_overlay

    if not ctx.folds:
        return note("Skipped: no trained fold, so no validation prediction to show.")
    choice = None
    for config in best_configurations(ctx):
        for fold in ctx.folds[config]:
            preds = prediction_files(validation_dir(fold.folder))
            if preds:
                choice = (config, fold, preds)
                break
        if choice:
            break
    if choice is None:
        return note("Skipped: no fold holds validation predictions (fold_K/validation/CASE.nii.gz).")
    config, fold, preds = choice
    if not ctx.ws.dataset_json.is_file():
        return note(f"Skipped: {ctx.ws.dataset_json.name} not found, so the raw images cannot be located.")
    raw_path = read_json(ctx.ws.dataset_json, dict).get("raw_path")
    if not raw_path:
        return note(f"Skipped: {ctx.ws.dataset_json.name} does not name the raw dataset (raw_path).")
    dataset = load_raw_dataset(raw_path)
    images = {c.case_id: c.images for c in dataset.cases}
    usable = [c for c in preds if c in images]
    if not usable:
        return note(f"Skipped: none of the validation cases of `{config}` fold {fold.fold} is in the raw dataset.")
    case = _typical_case(fold, usable)
    image, geometry = read_image(images[case])
    seg, _ = read_label(preds[case])
    if seg.shape != image.shape[1:]:
        return note(f"Skipped: the prediction of {case} has shape {seg.shape}, the image {image.shape[1:]}.")
    out_path = ctx.figures / f"example_{safe_name(case)}.png"
    label_names = {int(k): v for k, v in ctx.label_names.items() if k.lstrip("-").isdigit()}
    render_overlay(
        image,
        geometry.spacing,
        seg,
        out_path,
        title=f"{case}: prediction of {config} fold {fold.fold}",
        label_names=label_names,
    )
    ctx.written.append(out_path)
    dice = fold.validation_per_case.get(case)
    score = f", foreground Dice {num(dice)}" if dice is not None else ""
    why = "median Dice of the fold's validation cases" if fold.validation_per_case else "first validation case"
    return [
        f"Validation case `{case}` ({why}{score}) with the segmentation predicted by `{config}` fold {fold.fold} "
        f"(channel 0: {dataset.channel_names[0] if dataset.channel_names else '?'}; rows: axial, coronal, sagittal):",
        "",
        f"![{case}]({ctx.rel(out_path)})",
        "",
    ]
