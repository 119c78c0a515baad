"""``W/NAME/selection.json`` as typed data: what `autounet select` chose, read and written here only.

:class:`Selection` holds the ranking, the winner and the post-processing decided for it, either
:class:`ComponentsPostprocessing` (seed 001 §2.5) or :class:`EtPostprocessing` (seed 004 §2.5),
each with its cross-validation evidence. The JSON layout is described in docs/formats.md;
:func:`load_selection` reads it strictly (a missing, unknown or mistyped field is one
:class:`~autounet.errors.AutounetError` naming the file and the field) and
:func:`save_selection` writes it atomically.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from autounet.errors import AutounetError
from autounet.postprocessing.apply import Postprocessing
from autounet.postprocessing.brats_et import EtRule
from autounet.postprocessing.components import PostprocessingDecision
from autounet.regions import RegionSet
from autounet.utils.atomic import atomic_write_json
from autounet.utils.plain_data import from_plain, read_json_document, to_plain
from autounet.workspace import Workspace

SELECTION_SCHEMA_VERSION = 1

Scores = dict[str, float | None]  # class value or region name -> Dice (None: undefined)


@dataclass
class RankedCandidate:
    """One configuration (``CONFIG``) or pair (``A+B``) scored on the common cross-validation cases."""

    name: str
    members: list[str]
    foreground_dice: float | None
    per_class: Scores
    n_cases: int
    complete: bool  # every member has all the folds of splits.json


@dataclass
class Winner:
    """The chosen model: its configurations and the folds `predict -m W/NAME` ensembles."""

    name: str
    members: list[str]
    folds: list[int]


# ---------------------------------------------------------------------------------------------
# Post-processing of kind "components"
# ---------------------------------------------------------------------------------------------


@dataclass
class StepEvidence:
    """One component step tried on the cross-validation predictions: Dice without and with it."""

    dice_without: Scores
    dice_with: Scores
    mean_without: float | None
    mean_with: float | None
    gain: float | None
    cases_changed: int
    adopted: bool


@dataclass
class FinalDice:
    """The cross-validation Dice after every adopted step."""

    dice: Scores
    mean: float | None


@dataclass
class ComponentsEvidence:
    """``decision.evidence`` as :func:`~autounet.postprocessing.components.decide_postprocessing` writes it."""

    num_cases: int
    min_gain: float
    connectivity: int
    dice: str  # how the per-class means are taken
    foreground: StepEvidence
    classes: dict[str, StepEvidence]  # candidate class -> its step
    final: FinalDice
    ignore_label: int | None = None  # sparse annotations: reference voxels of this value counted in no Dice


@dataclass
class ComponentsPostprocessing:
    """Keep-the-largest-component steps, each adopted only where it did not lower the CV Dice."""

    kind: ClassVar[str] = "components"
    unused: ClassVar[tuple[str, ...]] = ("rule", "regions")  # written as null for this kind

    decision: PostprocessingDecision
    candidates_from_training_labels: list[int]
    dice_before: float | None
    dice_after: float | None
    per_class_before: Scores
    per_class_after: Scores

    @property
    def evidence(self) -> ComponentsEvidence:
        return from_plain(ComponentsEvidence, self.decision.evidence, "decision.evidence")

    def to_postprocessing(self) -> Postprocessing:
        return Postprocessing(self.kind, decision=self.decision)


# ---------------------------------------------------------------------------------------------
# Post-processing of kind "brats_et"
# ---------------------------------------------------------------------------------------------


@dataclass
class ThresholdScores:
    """The grid search's best score at one ET threshold, and the other regions' Dice there."""

    et_threshold: float
    best_score: float | None
    region_dice: Scores
    no_rule_score: float | None = None  # only when the grid holds "no rule" (0 and 0 voxels)

    def to_plain(self) -> dict[str, Any]:
        out: dict[str, Any] = {"et_threshold": self.et_threshold, "best_score": self.best_score}
        if self.no_rule_score is not None:
            out["no_rule_score"] = self.no_rule_score
        out["region_dice"] = dict(self.region_dice)
        return out


@dataclass
class EtGridSearch:
    """:meth:`~autounet.postprocessing.brats_et.EtGridTable.summary`: the grid search's results."""

    num_cases: int
    score: str  # what is maximised
    best: EtRule
    best_score: float | None
    no_rule_score: float | None
    paper_rule_score: float | None
    per_threshold: list[ThresholdScores]

    def to_plain(self) -> dict[str, Any]:
        out = {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["per_threshold"] = [t.to_plain() for t in self.per_threshold]
        return out


@dataclass
class EtPostprocessing:
    """Region probabilities -> labels with the chosen ET threshold, then small or uncertain ET -> necrosis."""

    kind: ClassVar[str] = "brats_et"
    unused: ClassVar[tuple[str, ...]] = ("decision",)  # written as null for this kind

    rule: EtRule
    regions: RegionSet
    grid_search: EtGridSearch
    dice_before: float | None  # the grid search's score without the rule
    dice_after: float | None  # ... with the chosen rule

    def to_postprocessing(self) -> Postprocessing:
        return Postprocessing(self.kind, rule=self.rule, regions=self.regions)


SelectedPostprocessing = ComponentsPostprocessing | EtPostprocessing
_KINDS: dict[str, type[ComponentsPostprocessing] | type[EtPostprocessing]] = {
    ComponentsPostprocessing.kind: ComponentsPostprocessing,
    EtPostprocessing.kind: EtPostprocessing,
}


def _postprocessing_to_plain(pp: SelectedPostprocessing) -> dict[str, Any]:
    # ``kind``, ``decision``, ``rule`` and ``regions`` as Postprocessing writes them, then the evidence.
    out = pp.to_postprocessing().to_plain()
    for f in dataclasses.fields(pp):
        if f.name not in out:
            value = getattr(pp, f.name)
            out[f.name] = value.to_plain() if hasattr(value, "to_plain") else to_plain(value)
    return out


def _postprocessing_from_plain(data: Any, where: str) -> SelectedPostprocessing | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise AutounetError(f"{where}: expected a mapping or null, got {type(data).__name__}")
    if "kind" not in data:
        raise AutounetError(f"{where}: missing field 'kind'")
    cls = _KINDS.get(data["kind"])
    if cls is None:
        raise AutounetError(f"{where}.kind: must be one of {sorted(_KINDS)}, got {data['kind']!r}")
    body = {k: v for k, v in data.items() if k != "kind"}
    for key in cls.unused:
        if key not in body:
            raise AutounetError(f"{where}: missing field '{key}'")
        if body.pop(key) is not None:
            raise AutounetError(f"{where}.{key}: must be null for kind {cls.kind!r}")
    pp = from_plain(cls, body, where)
    if isinstance(pp, ComponentsPostprocessing):  # the evidence is checked now, not when it is read
        from_plain(ComponentsEvidence, pp.decision.evidence, f"{where}.decision.evidence")
    return pp


# ---------------------------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """The content of ``selection.json``."""

    dataset: str
    metric: str
    n_cases: int  # cross-validation cases validated by every candidate
    ranking: list[RankedCandidate]  # best first
    winner: Winner
    postprocessing: SelectedPostprocessing | None  # None: no rule applies to the winner
    predict_command: str
    schema_version: int = SELECTION_SCHEMA_VERSION

    def chosen_postprocessing(self) -> Postprocessing | None:
        """The post-processing to apply to the winner's predictions (None: none)."""
        return self.postprocessing.to_postprocessing() if self.postprocessing is not None else None

    def to_plain(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "metric": self.metric,
            "n_cases": self.n_cases,
            "ranking": to_plain(self.ranking),
            "winner": to_plain(self.winner),
            "postprocessing": _postprocessing_to_plain(self.postprocessing) if self.postprocessing else None,
            "predict_command": self.predict_command,
        }

    @classmethod
    def from_plain(cls, data: Any, where: str = "selection") -> Selection:
        if not isinstance(data, dict):
            raise AutounetError(f"{where}: expected a mapping, got {type(data).__name__}")
        if "postprocessing" not in data:
            raise AutounetError(f"{where}: missing field 'postprocessing'")
        selection = from_plain(cls, {**data, "postprocessing": None}, where)
        selection.postprocessing = _postprocessing_from_plain(data["postprocessing"], f"{where}.postprocessing")
        return selection


def _json_safe(value: Any) -> Any:
    """NaN and infinity become null: JSON has neither (plain data from :func:`to_plain`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def load_selection(path: str | Path) -> Selection:
    """Read ``selection.json``; one error naming the file and the field if it is missing or malformed."""
    data = read_json_document(
        path, "selection", SELECTION_SCHEMA_VERSION, hint="run `autounet select` for this dataset first"
    )
    try:
        return Selection.from_plain(data, str(path))
    except AutounetError as exc:
        raise AutounetError(f"malformed selection: {exc}") from None


def save_selection(selection: Selection, path: str | Path) -> Path:
    """Write ``selection.json`` atomically (undefined scores as null)."""
    return atomic_write_json(path, _json_safe(selection.to_plain()))


def postprocessing_of(workspace_root: str | Path) -> Postprocessing | None:
    """The post-processing `autounet select` chose for the workspace ``W/NAME`` (None: none)."""
    return load_selection(Workspace.of(workspace_root).selection_json).chosen_postprocessing()
