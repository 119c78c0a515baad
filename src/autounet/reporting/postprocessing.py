"""Report section 4, continued: the post-processing chosen for the winner, in words, with the
cross-validation evidence ``selection.json`` holds for it (component steps or the ET rule)."""

from __future__ import annotations

from collections.abc import Mapping

from autounet.postprocessing.brats_et import EtRule
from autounet.reporting.common import class_key, class_label, count, is_number, note, num, short, signed, table
from autounet.selection_document import (
    ComponentsPostprocessing,
    EtPostprocessing,
    SelectedPostprocessing,
    StepEvidence,
)


def _step_line(title: str, step: StepEvidence, value_key: str | None) -> str:
    """One post-processing step in words: the Dice without and with it, and whether it was kept."""
    if value_key is None:
        what = "mean Dice over classes"
        without, with_ = step.mean_without, step.mean_with
    else:
        what = "its Dice"
        without, with_ = step.dice_without.get(value_key), step.dice_with.get(value_key)
    details = [f"gain {signed(step.gain)}"]
    if value_key is not None and is_number(step.mean_without):
        details.append(f"mean over classes {num(step.mean_without)} → {num(step.mean_with)}")
    details.append(f"{count(step.cases_changed, 'case')} changed")
    verdict = "**adopted**" if step.adopted else "**not adopted**"
    return f"- {title}: {what} {num(without)} without, {num(with_)} with ({'; '.join(details)}) → {verdict}."


def _components_text(pp: ComponentsPostprocessing, names: Mapping[str, str]) -> list[str]:
    decision, evidence = pp.decision, pp.evidence
    out = [
        "Connected-component post-processing (nnU-Net): each step was tried on the cross-validation predictions"
        f" of {evidence.num_cases} cases and kept only if it did not lower the Dice (gain ≥ {num(evidence.min_gain)})."
        " Removing components of one class changes no other class's Dice.",
        "",
    ]
    if decision.candidates:
        out.append(
            "Candidates for a per-class step (one connected component in every training label): "
            + ", ".join(class_label(c, names) for c in decision.candidates)
            + "."
        )
    else:
        out.append(
            "No class forms a single connected component in every training label, so no per-class step was tried."
        )
    out.append("")
    out.append(
        _step_line("Keep only the largest foreground component (all classes as one object)", evidence.foreground, None)
    )
    base = "after the foreground step" if decision.keep_largest_foreground else "on the raw predictions"
    for key in sorted(evidence.classes, key=class_key):
        title = f"Keep only the largest component of class {class_label(key, names)}, {base}"
        out.append(_step_line(title, evidence.classes[key], key))
    out.append("")
    kept_steps = []
    if decision.keep_largest_foreground:
        kept_steps.append("keep the largest foreground component")
    if decision.keep_largest_classes:
        kept_steps.append(
            "keep the largest component of class "
            + ", ".join(class_label(c, names) for c in decision.keep_largest_classes)
        )
    out.append("Applied to predictions: " + ("; then ".join(kept_steps) if kept_steps else "nothing") + ".")
    out.append("")
    return out


def _brats_text(pp: EtPostprocessing) -> list[str]:
    rule, search = pp.rule, pp.grid_search
    paper = EtRule()
    out = [
        "Enhancing-tumour rule (seed 004 §2.5), chosen by grid search on the cross-validation predictions"
        f" of {search.num_cases} cases:",
        "",
        f"- ET components smaller than {rule.component_voxels} voxels whose mean ET probability is "
        f"below {short(rule.min_mean_probability)} become necrosis;",
        f"- then, if fewer than {rule.total_voxels} ET voxels remain with mean probability below that "
        "value, all ET becomes necrosis;",
        f"- ET threshold on the region probability: {short(rule.et_threshold)}.",
        f"- components with {rule.connectivity}-connectivity.",
        "",
    ]
    scores = [
        ("chosen rule", search.best_score),
        ("no rule", search.no_rule_score),
        (
            f"the paper's rule ({paper.component_voxels} / {paper.total_voxels} voxels, "
            f"{short(paper.min_mean_probability)})",
            search.paper_rule_score,
        ),
    ]
    scores = [(n, s) for n, s in scores if is_number(s)]
    if scores:
        out.append(
            "Score (mean over cases of the mean region Dice, both empty = 1): "
            + "; ".join(f"{n} {num(s)}" for n, s in scores)
            + "."
        )
        out.append("")
    if search.per_threshold:
        regions = sorted({k for t in search.per_threshold for k in t.region_dice})
        rows = [
            [
                short(t.et_threshold),
                num(t.best_score),
                num(t.no_rule_score),
                *[num(t.region_dice.get(r)) for r in regions],
            ]
            for t in search.per_threshold
        ]
        out += table(["ET threshold", "best score", "score without rule", *[f"{r} Dice" for r in regions]], rows)
        out.append("")
    return out


def postprocessing_text(pp: SelectedPostprocessing | None, names: Mapping[str, str]) -> list[str]:
    """The decision, then the cross-validation Dice before and after it (per class for components)."""
    if pp is None:
        return note("No post-processing was chosen: predictions are used as the network makes them.")
    out = _components_text(pp, names) if isinstance(pp, ComponentsPostprocessing) else _brats_text(pp)
    before, after = pp.dice_before, pp.dice_after
    if is_number(before) or is_number(after):
        out.append(
            f"Cross-validation foreground Dice: {num(before)} before post-processing, {num(after)} after "
            f"(change {signed(after - before) if is_number(before) and is_number(after) else '-'})."
        )
        out.append("")
    if isinstance(pp, ComponentsPostprocessing):
        keys = sorted({*pp.per_class_before, *pp.per_class_after}, key=class_key)
        rows = []
        for k in keys:
            b, a = pp.per_class_before.get(k), pp.per_class_after.get(k)
            rows.append(
                [class_label(k, names), num(b), num(a), signed(a - b) if is_number(a) and is_number(b) else "-"]
            )
        if rows:
            out += table(["class", "Dice before", "Dice after", "change"], rows)
            out.append("")
    return out
