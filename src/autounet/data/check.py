"""`autounet check`: validate a whole raw dataset and describe it.

Every case is read once (in parallel); each problem found is a
:class:`~autounet.data.findings.Finding` naming its case. Nothing is written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autounet.data.dataset import RawDataset, parse_raw_dataset
from autounet.data.findings import ERROR, WARNING, Finding, warning
from autounet.data.geometry import SPACING_2D_IMAGES, GeometryTolerance
from autounet.data.inspect import CaseInspection, InspectTask, inspect_case
from autounet.utils.parallel import default_workers, map_cases

# A spacing outside this range (mm) is implausible for a medical image and most likely a header error.
PLAUSIBLE_SPACING_MM = (0.01, 50.0)
# A case whose spacing differs from the dataset median by more than this factor on an axis is flagged.
SPACING_OUTLIER_FACTOR = 2.0
# A case shorter than this fraction of the dataset's median shape along an axis is flagged.
SMALL_CASE_FRACTION = 0.25


@dataclass
class CheckReport:
    """The result of checking a raw dataset."""

    root: Path
    dataset: RawDataset | None
    inspections: list[CaseInspection] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        return format_report(self)


def _small_cases(inspections: list[CaseInspection]) -> list[Finding]:
    """A warning per case shorter than :data:`SMALL_CASE_FRACTION` of the median shape along an axis."""
    shaped = [(i.case_id, i.shape) for i in inspections if i.shape is not None]
    if len(shaped) < 2:
        return []
    median = np.median(np.array([s for _, s in shaped], dtype=float), axis=0)
    out = []
    for cid, shape in shaped:
        axes = [a for a in range(3) if shape[a] < SMALL_CASE_FRACTION * median[a]]
        if axes:
            out.append(
                warning(
                    "small_case",
                    cid,
                    f"shape {'x'.join(map(str, shape))} (Z, Y, X) is below {SMALL_CASE_FRACTION:.0%} of the dataset's "
                    f"median {'x'.join(f'{m:g}' for m in median)} along {', '.join('zyx'[a] for a in axes)}; "
                    "check that the image is complete",
                )
            )
    return out


def _dataset_findings(dataset: RawDataset, inspections: list[CaseInspection]) -> list[Finding]:
    out: list[Finding] = []
    for attr, what in (("image_dtype", "images"), ("label_dtype", "labels")):
        kinds = Counter(getattr(i, attr) for i in inspections if getattr(i, attr))
        if len(kinds) > 1:
            summary = ", ".join(f"{k}: {n}" for k, n in kinds.most_common())
            out.append(
                warning(
                    "mixed_dtypes",
                    None,
                    f"{what} are stored in different data types ({summary} cases); all are read as numbers alike",
                )
            )

    geos = [(i.case_id, i.geometry) for i in inspections if i.geometry is not None]
    if geos:
        spacings = np.array([g.spacing for _, g in geos])
        median = np.median(spacings, axis=0)
        lo, hi = PLAUSIBLE_SPACING_MM
        for (cid, _), sp in zip(geos, spacings):
            real = [s for s in sp if s != SPACING_2D_IMAGES]
            if any(s < lo or s > hi for s in real):
                out.append(
                    warning(
                        "unusual_spacing",
                        cid,
                        f"spacing {tuple(round(float(s), 4) for s in sp)} mm is outside the plausible range [{lo}, {hi}] mm; check the header",
                    )
                )
            elif np.any(np.maximum(sp / median, median / sp) > SPACING_OUTLIER_FACTOR):
                out.append(
                    warning(
                        "unusual_spacing",
                        cid,
                        f"spacing {tuple(round(float(s), 4) for s in sp)} mm is more than {SPACING_OUTLIER_FACTOR:g}x away from the dataset median {tuple(round(float(s), 4) for s in median)} mm",
                    )
                )
        orientations = Counter(g.orientation() for _, g in geos)
        if len(orientations) > 1:
            common = orientations.most_common(1)[0][0]
            odd = [cid for cid, g in geos if g.orientation() != common]
            listed = ", ".join(odd[:20]) + (f" and {len(odd) - 20} more" if len(odd) > 20 else "")
            summary = ", ".join(f"{k}: {n}" for k, n in orientations.most_common())
            out.append(
                warning(
                    "mixed_orientation",
                    None,
                    f"cases have different orientations ({summary}); not {common}: {listed}. Arrays are used as stored, so anatomy may appear mirrored between cases",
                )
            )

    out.extend(_small_cases(inspections))

    present = set()
    for i in inspections:
        present.update(i.labels_present)
    if inspections and all(i.label_dtype for i in inspections):
        for value, name in dataset.labels.items():
            if value != 0 and value not in present:
                out.append(
                    warning("class_never_present", None, f"label {value} ({name}) is declared but occurs in no case")
                )
    return out


def check_dataset(
    root: str | Path,
    workers: int | None = None,
    compute_stats: bool = False,
    tolerance: GeometryTolerance = GeometryTolerance(),
) -> CheckReport:
    """Validate the raw dataset at ``root``; with ``compute_stats`` also measure fingerprint statistics."""
    root = Path(root)
    dataset, findings = parse_raw_dataset(root)
    report = CheckReport(root=root, dataset=dataset, findings=list(findings))
    if dataset is None:
        return report
    # the folder as given (case paths are built on it, also through a symbolic link), for messages
    tasks = [
        InspectTask(
            c, dataset.num_channels, frozenset(dataset.labels), tolerance, compute_stats, root, dataset.ignore_label
        )
        for c in dataset.cases
    ]
    workers = default_workers() if workers is None else workers
    report.inspections = map_cases(inspect_case, tasks, workers, desc="reading cases")
    for ins in report.inspections:
        report.findings.extend(ins.findings)
    report.findings.extend(_dataset_findings(dataset, report.inspections))
    return report


def _range_line(label: str, rows: np.ndarray, fmt: str) -> str:
    def t(v):
        return "(" + ", ".join(format(float(x), fmt) for x in v) + ")"

    return f"{label:<12} min {t(rows.min(0))}  median {t(np.median(rows, 0))}  max {t(rows.max(0))}"


# Width of the per-case listing of annotated fractions.
LISTING_WIDTH = 100


def _annotation_lines(dataset: RawDataset, inspections: list[CaseInspection]) -> list[str]:
    """The share of annotated (not `ignore`) voxels: min / median / max over cases, then per case."""
    if dataset.ignore_label is None:
        return []
    measured = [(i.case_id, i.annotated_fraction) for i in inspections if i.annotated_fraction is not None]
    head = f"Annotated    voxels not 'ignore' ({dataset.ignore_label})"
    if not measured:
        return [head + ": no readable label"]
    values = np.array([f for _, f in measured])
    lines = [
        f"{head}: min {values.min():.1%}  median {np.median(values):.1%}  max {values.max():.1%} "
        f"over {len(measured)} case(s)"
    ]
    indent, line = " " * 13, ""
    for cell in (f"{cid} {f:.1%}" for cid, f in measured):
        if line and len(indent) + len(line) + len(cell) + 2 > LISTING_WIDTH:
            lines.append(indent + line + ",")
            line = ""
        line = f"{line}, {cell}" if line else cell
    lines.append(indent + line)
    return lines


def format_report(report: CheckReport) -> str:
    """Human-readable report: the dataset's description, then warnings, then errors."""
    lines = []
    ds = report.dataset
    if ds is not None:
        lines.append(f"Dataset      {ds.name}  ({ds.layout} layout, {ds.root})")
        lines.append(f"Cases        {len(ds.cases)}")
        lines.append(
            f"Channels     {ds.num_channels}: " + ", ".join(f"{i} {n}" for i, n in enumerate(ds.channel_names))
        )
        found = sorted({v for i in report.inspections for v in i.labels_present})
        declared = ", ".join(f"{v} {n}" for v, n in ds.labels.items())
        lines.append(f"Labels       declared {{{declared}}}; found {{{', '.join(map(str, found))}}}")
        if ds.regions:
            lines.append("Regions      " + ", ".join(f"{k} = {list(v)}" for k, v in ds.regions.items()))
        lines.extend(_annotation_lines(ds, report.inspections))
        geos = [i for i in report.inspections if i.geometry is not None]
        if geos:
            lines.append(
                _range_line("Spacing mm", np.array([i.geometry.spacing for i in geos]), ".4g") + "   (z, y, x)"
            )
            lines.append(_range_line("Shape", np.array([i.shape for i in geos]), ".0f") + "   (Z, Y, X) voxels")
            orient = Counter(i.geometry.orientation() for i in geos)
            lines.append("Orientation  " + ", ".join(f"{k}: {n}" for k, n in orient.most_common()))
            dtypes = Counter(i.image_dtype for i in geos)
            ldtypes = Counter(i.label_dtype for i in report.inspections if i.label_dtype)
            lines.append(
                "Data types   images "
                + ", ".join(f"{k}: {n}" for k, n in dtypes.most_common())
                + "; labels "
                + ", ".join(f"{k}: {n}" for k, n in ldtypes.most_common())
            )
    else:
        lines.append(f"Dataset      {report.root}")
    if report.warnings:
        lines.append(f"\nWarnings ({len(report.warnings)}):")
        lines.extend(f"  - {w}" for w in report.warnings)
    if report.errors:
        lines.append(f"\nProblems ({len(report.errors)}):")
        lines.extend(f"  - {e}" for e in report.errors)
        lines.append(f"\nFAILED: {len(report.errors)} problem(s); fix them and run `autounet check` again.")
    else:
        lines.append(
            "\nOK: the dataset is valid" + (f" ({len(report.warnings)} warning(s))." if report.warnings else ".")
        )
    return "\n".join(lines)
