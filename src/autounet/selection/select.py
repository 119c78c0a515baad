"""`autounet select`: choose the best model from cross-validation and decide post-processing.

Seed 001 §2.6: every trained configuration and every pair of them (their validation
probabilities averaged) is scored by the mean foreground Dice over the cross-validation cases;
the best is chosen. Only cases validated by every candidate are compared, so the scores are on
the same cases. Seed 001 §2.5 + DESIGN §4.6: for the winner, "keep the largest connected
component" is tried (all foreground, then each class that lies in one component in every
training label) and kept only where it does not lower the cross-validation Dice. Region models
(seed 004) instead get the ET rule, its threshold and voxel counts grid-searched on the
cross-validation predictions (§2.5).

Writes ``W/NAME/selection.json`` (:mod:`autounet.selection_document`, docs/formats.md); a pair
winner's cross-validation segmentations go to ``W/NAME/results/ensembles/A+B/``.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autounet.data.image_io import read_label, write_image
from autounet.errors import AutounetError
from autounet.evaluation.evaluate import EvaluationResult, load_evaluation, summarize
from autounet.evaluation.metrics import case_metrics
from autounet.planning.plans import CONFIGURATIONS, load_plans
from autounet.regions import RegionSet
from autounet.selection_document import (
    ComponentsPostprocessing,
    EtGridSearch,
    EtPostprocessing,
    RankedCandidate,
    Selection,
    Winner,
    load_selection,
    save_selection,
)
from autounet.utils.atomic import atomic_write, read_json
from autounet.utils.parallel import default_workers, map_cases
from autounet.utils.plain_data import from_plain
from autounet.validation.cross_validation import fold_summaries
from autounet.workspace import Workspace, checkpoint_path


@dataclass
class TrainedConfiguration:
    """A configuration's cross-validation results: which fold validated each case, and scores."""

    name: str
    case_dirs: dict[str, Path]  # case -> the validation folder holding CASE.nii.gz and CASE.npz
    folds: list[int]
    evaluation: EvaluationResult
    regions: RegionSet | None
    labels: list[int]
    complete: bool


@dataclass
class Candidate:
    name: str
    members: list[str]
    evaluation: EvaluationResult

    @property
    def dice(self) -> float:
        d = self.evaluation.foreground_mean.get("dice")
        return float(d) if d is not None and not math.isnan(d) else -1.0


def _expected_folds(ws: Workspace) -> int | None:
    try:
        return len(read_json(ws.splits_json, list))
    except AutounetError:
        return None


def trained_configurations(ws: Workspace, names: list[str] | None = None) -> list[TrainedConfiguration]:
    """Configurations with at least one validated fold, in the plan's order."""
    from autounet.training.checkpoint import load_checkpoint

    plans = load_plans(ws.plans_json)
    wanted = names or [c for c in CONFIGURATIONS if c in plans.configurations]
    unknown = [n for n in wanted if n not in plans.configurations]
    if unknown:
        raise AutounetError(f"configuration(s) {', '.join(unknown)} are not planned for {ws.name}")
    expected = _expected_folds(ws)
    found = []
    for name in wanted:
        results = ws.results_dir(name)
        summaries = fold_summaries(results)
        if not summaries:
            continue
        case_dirs, per_case, settings = {}, {}, None
        for _fold, path in summaries.items():
            result = load_evaluation(path)
            settings = settings or result.settings
            for case, metrics in result.per_case.items():
                case_dirs[case] = path.parent
                per_case[case] = metrics
        first = checkpoint_path(ws.fold_dir(name, min(summaries)), "final")
        content = load_checkpoint(first) if first.is_file() else {}
        labels = sorted(int(v) for v in (content.get("labels") or plans.labels))
        found.append(
            TrainedConfiguration(
                name=name,
                case_dirs=case_dirs,
                folds=sorted(summaries),
                evaluation=summarize(per_case, settings),
                regions=from_plain(RegionSet, content["regions"], f"{first}: regions")
                if content.get("regions")
                else None,
                labels=labels,
                complete=expected is not None and len(summaries) == expected,
            )
        )
    return found


def _ensemble_probabilities(case: str, dirs: list[Path]) -> tuple[np.ndarray, str]:
    from autounet.data.probabilities import load_probability_file

    total, kind = None, None
    for d in dirs:
        path = d / f"{case}.npz"
        if not path.is_file():
            raise AutounetError(
                f"{path}: validation probabilities missing (redo the fold with `autounet train --validate-only`)"
            )
        probs, _, kind = load_probability_file(path)
        total = probs if total is None else total + probs
    return total / len(dirs), kind


def _score_ensemble_case(
    item: tuple[str, list[Path], Path],
    labels: list[int],
    regions: RegionSet | None,
    settings: dict[str, Any],
    write_to: Path | None = None,
) -> tuple[str, dict]:
    """Metrics of one case's pair ensemble (and, with ``write_to``, its segmentation and probabilities)."""
    from autounet.inference.predictor import labels_from_probabilities

    case, dirs, reference = item
    probs, kind = _ensemble_probabilities(case, dirs)
    seg = labels_from_probabilities(probs, labels, regions)
    ref, geometry = read_label(reference)
    if ref.shape != seg.shape:
        raise AutounetError(f"{case}: ensemble prediction shape {seg.shape} differs from the reference {ref.shape}")
    if write_to is not None:
        from autounet.data.probabilities import save_probability_file

        _, member_geometry = read_label(dirs[0] / f"{case}.nii.gz")
        atomic_write(write_to / f"{case}.nii.gz", lambda p: write_image(p, seg, member_geometry))
        save_probability_file(write_to / f"{case}.npz", probs, labels, kind)
    metrics = case_metrics(
        seg,
        ref,
        geometry.spacing,
        settings.get("labels"),
        settings.get("regions"),
        settings.get("tolerance_mm", 1.0),
        settings.get("empty", "nan"),
        settings.get("ignore_label"),
    )
    return case, metrics


def _references(ws: Workspace) -> dict[str, Path]:
    from autounet.validation.fold import reference_labels

    return reference_labels(ws)


def _pair_candidate(
    a: TrainedConfiguration,
    b: TrainedConfiguration,
    cases: list[str],
    references: dict[str, Path],
    workers: int,
    write_to: Path | None = None,
) -> Candidate:
    items = [(c, [a.case_dirs[c], b.case_dirs[c]], references[c]) for c in cases]
    settings = a.evaluation.settings
    fn = functools.partial(
        _score_ensemble_case, labels=a.labels, regions=a.regions, settings=settings, write_to=write_to
    )
    if write_to is not None:
        write_to.mkdir(parents=True, exist_ok=True)
    results = map_cases(fn, items, workers, desc=f"ensemble {a.name}+{b.name}")
    return Candidate(f"{a.name}+{b.name}", [a.name, b.name], summarize(dict(results), settings))


def _compatible(a: TrainedConfiguration, b: TrainedConfiguration) -> bool:
    return (
        a.labels == b.labels and bool(a.regions) == bool(b.regions) and a.evaluation.settings == b.evaluation.settings
    )


def rank_candidates(
    configs: list[TrainedConfiguration], references: dict[str, Path], workers: int
) -> tuple[list[Candidate], list[str]]:
    """Every configuration and compatible pair, best mean foreground Dice first, on the common cases."""
    common = sorted(set.intersection(*[set(c.case_dirs) for c in configs]))
    if not common:
        raise AutounetError("the trained configurations have no validated case in common")
    candidates = []
    for c in configs:
        per_case = {k: c.evaluation.per_case[k] for k in common}
        candidates.append(Candidate(c.name, [c.name], summarize(per_case, c.evaluation.settings)))
    for a, b in itertools.combinations(configs, 2):
        if _compatible(a, b):
            candidates.append(_pair_candidate(a, b, common, references, workers))
    # Best Dice first; on a tie the simpler model (one configuration) wins.
    candidates.sort(key=lambda c: (-c.dice, len(c.members), c.name))
    return candidates, common


def _components_postprocessing(
    ws: Workspace, pairs: list[tuple[Path, Path]], labels: list[int], workers: int, ignore_label: int | None = None
) -> ComponentsPostprocessing:
    from autounet.planning.fingerprint import load_fingerprint
    from autounet.postprocessing.components import decide_postprocessing, single_component_classes

    fingerprint = load_fingerprint(ws.fingerprint_json)
    classes = [v for v in labels if v != 0]
    candidates = [
        c for c in single_component_classes([c.components_per_class for c in fingerprint.cases]) if c in classes
    ]
    decision = decide_postprocessing(pairs, classes, candidates, workers=workers, ignore_label=ignore_label)
    final = decision.evidence["final"]
    raw = decision.evidence["foreground"]
    return ComponentsPostprocessing(
        decision=decision,
        candidates_from_training_labels=candidates,
        dice_before=raw["mean_without"],
        dice_after=final["mean"],
        per_class_before=raw["dice_without"],
        per_class_after=final["dice"],
    )


def _brats_postprocessing(
    pairs: list[tuple[Path, Path]], region_set: RegionSet, workers: int, ignore_label: int | None = None
) -> EtPostprocessing | None:
    from autounet.postprocessing.brats_et import et_labels, grid_search_et_rule

    try:
        et_labels(region_set)
    except AutounetError:
        return None  # not a nested tumour region set: the ET rule does not apply
    rule, table = grid_search_et_rule(pairs, region_set, workers=workers, ignore_label=ignore_label)
    grid_search = from_plain(EtGridSearch, table.summary(), "grid_search")
    return EtPostprocessing(
        rule=rule,
        regions=region_set,
        grid_search=grid_search,
        dice_before=grid_search.no_rule_score,
        dice_after=grid_search.best_score,
    )


def select(ws: Workspace, configurations: list[str] | None = None, workers: int | None = None) -> Selection:
    """Rank, choose, decide post-processing; write ``selection.json`` and return it as written."""
    workers = workers or default_workers()
    configs = trained_configurations(ws, configurations)
    if not configs:
        raise AutounetError(
            f"{ws.root}: no configuration has validated folds yet: run `autounet train {ws.name} -c CONFIG -f K` first"
        )
    references = _references(ws)
    ranking, common = rank_candidates(configs, references, workers)
    best = ranking[0]
    by_name = {c.name: c for c in configs}
    members = [by_name[m] for m in best.members]
    folds = sorted(set.intersection(*[set(m.folds) for m in members]))
    if len(members) == 1:
        pairs = [(members[0].case_dirs[c] / f"{c}.nii.gz", references[c]) for c in common]
        prob_pairs = [(members[0].case_dirs[c] / f"{c}.npz", references[c]) for c in common]
    else:
        out = ws.ensemble_dir(best.members)
        _pair_candidate(members[0], members[1], common, references, workers, write_to=out)
        pairs = [(out / f"{c}.nii.gz", references[c]) for c in common]
        prob_pairs = [(out / f"{c}.npz", references[c]) for c in common]
    ignore_label = members[0].evaluation.settings.get("ignore_label")  # sparse annotations: not scored
    if members[0].regions:
        postprocessing = _brats_postprocessing(prob_pairs, members[0].regions, workers, ignore_label)
    else:
        postprocessing = _components_postprocessing(ws, pairs, members[0].labels, workers, ignore_label)
    selection = Selection(
        dataset=ws.name,
        metric="mean foreground Dice over the cross-validation cases",
        n_cases=len(common),
        ranking=[
            RankedCandidate(
                name=c.name,
                members=c.members,
                foreground_dice=c.evaluation.foreground_mean.get("dice"),
                per_class={k: v.get("dice") for k, v in c.evaluation.mean.items()},
                n_cases=c.evaluation.n_cases,
                complete=all(by_name[m].complete for m in c.members),
            )
            for c in ranking
        ],
        winner=Winner(name=best.name, members=best.members, folds=folds),
        postprocessing=postprocessing,
        predict_command=f"autounet predict -i IMAGES -o OUT -m {ws.root}",
    )
    save_selection(selection, ws.selection_json)
    return load_selection(ws.selection_json)


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def format_selection(selection: Selection, label_names: dict[str, str] | None = None) -> str:
    """The ranking as a table, the winner and the post-processing decision."""
    label_names = label_names or {}
    keys = list(selection.ranking[0].per_class) if selection.ranking else []
    heads = [f"{k}: {label_names[k]}" if k in label_names else k for k in keys]
    rows = [["rank", "model", "Dice (CV)", *heads, "cases"]]
    for i, c in enumerate(selection.ranking, 1):
        rows.append(
            [str(i), c.name, _fmt(c.foreground_dice), *[_fmt(c.per_class.get(k)) for k in keys], str(c.n_cases)]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    w = selection.winner
    lines.append("")
    lines.append(f"selected: {w.name} (folds {', '.join(map(str, w.folds))})")
    pp = selection.postprocessing
    if pp is not None:
        described = pp.to_postprocessing().describe()
        lines.append(
            f"post-processing: {described} (CV Dice {_fmt(pp.dice_before)} without, {_fmt(pp.dice_after)} with)"
        )
    lines.append(f"predict new cases: {selection.predict_command}")
    return "\n".join(lines)
