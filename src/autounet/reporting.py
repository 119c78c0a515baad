"""A readable summary of a dataset's workspace: ``W/NAME/report.md`` (with pictures in ``W/NAME/report/``).

:func:`write_report` reads what the other stages left in ``W/NAME/`` and writes one Markdown file:

1. the dataset fingerprint (cases, channels, labels, spacing and shape, CT intensities, per-class
   voxel share and connected components);
2. the plans (the ``autounet plan`` table and the planner's notes);
3. per trained configuration, a table of its folds from ``log.jsonl`` and the full-case validation
   summaries, the pooled cross-validation Dice from ``cv_summary.json``, and one picture of every
   fold's validation Dice curve (``report/training_curves.png``);
4. the model selection from ``selection.json``: ranking, winner and the post-processing decision
   with its cross-validation evidence;
5. an example validation case with its predicted segmentation (``report/example_CASE.png``).

Every number comes from those files. A section whose inputs are missing or unreadable is replaced
by a one-line note, so a workspace with plans only still gives a report.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write, atomic_write_text, read_json
from autounet.workspace import Workspace

REPORT_NAME = "report.md"
FIGURES_DIR = "report"
CURVES_NAME = "training_curves.png"

_FOLD = re.compile(r"^fold_(\d+|all)$")
# What a section may run into when its input files are missing, partial or from another version.
_SKIPPABLE = (AutounetError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any, digits: int = 4) -> str:
    """A number with ``digits`` decimals, or '-' when it is missing or not finite."""
    return f"{float(x):.{digits}f}" if _is_number(x) else "-"


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _signed(x: Any, digits: int = 4) -> str:
    return f"{float(x):+.{digits}f}" if _is_number(x) else "-"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def _short(x: float) -> str:
    """Up to 4 decimals without trailing zeros (spacings, shapes)."""
    text = f"{float(x):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _x(values: Iterable[float]) -> str:
    return " x ".join(_short(v) for v in values)


def _cell(text: Any) -> str:
    """Text that is safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """A Markdown table; ``align`` has one letter per column (``l`` or ``r``), default: first left."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _note(text: str) -> list[str]:
    return [f"*{text}*", ""]


def _class_key(key: str) -> tuple[int, int, str]:
    try:
        return (0, int(key), "")
    except ValueError:
        return (1, 0, str(key))


def _label(key: Any, names: Mapping[str, str]) -> str:
    """``1 (liver)`` for a named class, the key alone otherwise (regions, unnamed values)."""
    name = names.get(str(key))
    return f"{key} ({name})" if name and name != str(key) else str(key)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "case"


# ---------------------------------------------------------------------------------------------
# Reading the workspace
# ---------------------------------------------------------------------------------------------


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
        values = [e.get("ema_dice") for e in self.log if _is_number(e.get("ema_dice"))]
        return max(values) if values else None

    def last(self, key: str) -> Any:
        return self.log[-1].get(key) if self.log else None


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a ``log.jsonl`` (blank lines skipped; NaN allowed, as the trainer writes it)."""
    entries = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise AutounetError(f"{path}: line {n} is not JSON ({exc})") from None
            if not isinstance(entry, dict):
                raise AutounetError(f"{path}: line {n} is not a JSON object")
            entries.append(entry)
    return entries


def _fold_order(name: str) -> tuple[int, int]:
    return (1, 0) if name == "all" else (0, int(name))


def _stop_reason(folder: Path, log: list[dict[str, Any]]) -> str:
    """From the files alone: the trainer cuts the last epoch only at its time limit, and writes
    ``checkpoint_final.pt`` only when training has ended (its reason is kept in that checkpoint)."""
    if log and log[-1].get("partial"):
        return "time limit"
    if (folder / "checkpoint_final.pt").is_file():
        return "finished"
    return "running or interrupted"


def _case_dice(metrics: Mapping[str, Mapping[str, float]]) -> float | None:
    values = [m.get("dice") for m in metrics.values() if _is_number(m.get("dice"))]
    return sum(values) / len(values) if values else None


def read_fold(configuration: str, folder: Path) -> FoldSummary:
    """A fold's log, its stop reason and, when validated, its full-case validation Dice."""
    from autounet.evaluation.evaluate import load_evaluation

    log = read_log(folder / "log.jsonl")
    summary = FoldSummary(configuration, folder.name[len("fold_") :], folder, log, _stop_reason(folder, log))
    path = folder / "validation" / "summary.json"
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
        results = ws.results_dir(config)
        if not results.is_dir():
            continue
        folds = []
        for p in results.iterdir():
            m = _FOLD.match(p.name)
            if m and (p / "log.jsonl").is_file():
                folds.append((_fold_order(m.group(1)), p))
        if folds:
            found[config] = [read_fold(config, p) for _, p in sorted(folds)]
    return found


def _cv_summary(ws: Workspace, configuration: str) -> tuple[Any, dict[str, Any]] | None:
    """``(EvaluationResult, raw JSON)`` of ``results/CONFIG/cv_summary.json``, or None."""
    from autounet.evaluation.cross_validation import CV_SUMMARY
    from autounet.evaluation.evaluate import load_evaluation

    path = ws.results_dir(configuration) / CV_SUMMARY
    if not path.is_file():
        return None
    return load_evaluation(path), read_json(path)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class _Context:
    ws: Workspace
    figures: Path
    fingerprint: Any = None
    plans: Any = None
    selection: dict[str, Any] | None = None
    folds: dict[str, list[FoldSummary]] = field(default_factory=dict)
    cv: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    label_names: dict[str, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        """A link target relative to ``report.md``."""
        return Path(path).relative_to(self.ws.root).as_posix()


def _fingerprint_section(ctx: _Context) -> list[str]:
    fp = ctx.fingerprint
    if fp is None:
        return _note(f"Skipped: no readable {ctx.ws.fingerprint_json.name} (run `autounet plan`).")
    names = {str(k): str(v) for k, v in fp.labels.items()}
    out = [
        f"Dataset `{fp.dataset_name}` ({fp.layout} layout): **{fp.num_cases} training cases**, "
        f"{fp.num_channels} channel(s), {len(names)} label values.",
        "",
    ]
    # Channels, with the normalisation the plans chose for each.
    norm: dict[int, str] = {}
    if ctx.plans is not None and ctx.plans.configurations:
        first = next(iter(ctx.plans.configurations.values()))
        norm = {n.channel: n.scheme + (" in nonzero mask" if n.use_nonzero_mask else "") for n in first.normalization}
    out += _table(
        ["channel", "modality", "normalisation"],
        [[i, name, norm.get(i, "-")] for i, name in enumerate(fp.channel_names)],
        "lll",
    )
    out.append("")

    # Labels: how often, how large, how many components.
    total = [sum(int(v) for v in c.label_voxel_counts.values()) for c in fp.cases]
    rows = []
    for key in sorted(names, key=_class_key):
        counts = [int(c.label_voxel_counts.get(key, 0)) for c in fp.cases]
        present = [n for n in counts if n > 0]
        all_voxels = sum(total)
        share = f"{100 * sum(counts) / all_voxels:.3f} %" if all_voxels else "-"
        if key == "0":
            rows.append([key, names[key], f"{len(present)}/{fp.num_cases}", share, "-", "-", "-"])
            continue
        fg_voxels = sum(sum(int(v) for k, v in c.label_voxel_counts.items() if k != "0") for c in fp.cases)
        fg_share = f"{100 * sum(counts) / fg_voxels:.2f} %" if fg_voxels else "-"
        comps = [int(c.components_per_class.get(key, 0)) for c in fp.cases if c.components_per_class.get(key, 0)]
        comp_text = f"{statistics.median(comps):g} ({min(comps)}-{max(comps)})" if comps else "-"
        single = ("yes" if all(n == 1 for n in comps) else "no") if comps else "-"
        rows.append([key, names[key], f"{len(present)}/{fp.num_cases}", share, fg_share, comp_text, single])
    out += _table(
        [
            "value",
            "name",
            "cases with it",
            "share of all voxels",
            "share of foreground",
            "components per case: median (min-max)",
            "one component in every case",
        ],
        rows,
        "llrrrrl",
    )
    out.append("")
    out.append(
        f"Components are counted with {fp.component_connectivity}-connectivity in the cases where the class occurs; "
        "a class with one component in every case is a candidate for 'keep the largest component' post-processing."
    )
    if fp.regions:
        out.append("")
        out.append(
            "Regions declared: "
            + "; ".join(f"{name} = {', '.join(map(str, labels))}" for name, labels in fp.regions.items())
            + "."
        )
    out.append("")

    # Geometry.
    spacings = [c.spacing for c in fp.cases]
    before = [c.shape_before_crop for c in fp.cases]
    after = [c.shape_after_crop for c in fp.cases]

    def stats(values: list[list[float]]) -> list[str]:
        axes = list(zip(*values))
        return [_x(statistics.median(a) for a in axes), _x(min(a) for a in axes), _x(max(a) for a in axes)]

    fractions = [c.crop_voxel_fraction for c in fp.cases]
    out += _table(
        ["(z, y, x)", "median", "min", "max"],
        [
            ["spacing (mm)", *stats(spacings)],
            ["shape before cropping (voxels)", *stats(before)],
            ["shape after cropping (voxels)", *stats(after)],
            [
                "voxels kept by cropping",
                _num(statistics.median(fractions), 3),
                _num(min(fractions), 3),
                _num(max(fractions), 3),
            ],
        ],
    )
    out.append("")
    orientations: dict[str, int] = {}
    for c in fp.cases:
        orientations[c.orientation] = orientations.get(c.orientation, 0) + 1
    out.append(
        "Orientations: " + ", ".join(f"{o} ({_count(n, 'case')})" for o, n in sorted(orientations.items())) + "."
    )
    out.append("")

    # Intensities of CT channels (the only ones normalised with dataset-wide statistics).
    ct = [i for i, name in enumerate(fp.channel_names) if str(name).strip().upper() == "CT"]
    if ct:
        rows = []
        for i in ct:
            s = fp.foreground_intensity_per_channel[i]
            rows.append(
                [
                    f"{i} ({fp.channel_names[i]})",
                    _num(s.mean, 3),
                    _num(s.std, 3),
                    _num(s.median, 3),
                    _num(s.percentile_00_5, 3),
                    _num(s.percentile_99_5, 3),
                    _num(s.min, 3),
                    _num(s.max, 3),
                    s.num_samples,
                ]
            )
        out.append("Foreground intensities of the CT channels (pooled sample of labelled voxels):")
        out.append("")
        out += _table(["channel", "mean", "std", "median", "0.5 %", "99.5 %", "min", "max", "samples"], rows)
    else:
        out.append(
            "No CT channel: every channel is normalised per case, so no dataset-wide intensity statistics apply."
        )
    out.append("")
    return out


def _plans_section(ctx: _Context) -> list[str]:
    from autounet.planning.summary import format_plans

    plans = ctx.plans
    if plans is None:
        return _note(f"Skipped: no readable {ctx.ws.plans_json.name} (run `autounet plan`).")
    out = [
        f"Planner `{plans.planner}`; median spacing {_x(plans.original_median_spacing)} mm and median shape "
        f"{_x(plans.original_median_shape)} voxels (raw z, y, x order); configurations: "
        + ", ".join(f"`{name}`" for name in plans.configurations)
        + ".",
        "",
        "```text",
    ]
    out += [line for line in format_plans(plans).splitlines() if not line.startswith("note: ")]
    out += ["```", ""]
    if plans.notes:
        out.append("Planner notes:")
        out.append("")
        out += [f"- {n}" for n in plans.notes]
        out.append("")
    return out


def _metrics_table(result: Any, names: Mapping[str, str]) -> list[str]:
    rows = []
    for key in sorted(result.mean, key=_class_key):
        m = result.mean[key]
        rows.append(
            [
                _label(key, names),
                _num(m.get("dice")),
                _num(m.get("iou")),
                _num(m.get("hd95"), 3),
                _num(m.get("surface_dice")),
            ]
        )
    fg = result.foreground_mean
    rows.append(
        [
            "**foreground mean**",
            f"**{_num(fg.get('dice'))}**",
            _num(fg.get("iou")),
            _num(fg.get("hd95"), 3),
            _num(fg.get("surface_dice")),
        ]
    )
    tol = result.settings.get("tolerance_mm", 1.0)
    return _table(["class", "Dice", "IoU", "HD95 mm", f"surface Dice ({_short(tol)} mm)"], rows)


def _curves_figure(ctx: _Context) -> Path | None:
    """Mean validation Dice per epoch of every fold of every configuration, in one picture."""
    series = []
    for config, folds in ctx.folds.items():
        for f in folds:
            points = [(e.get("epoch"), e.get("val_dice_mean")) for e in f.log]
            points = [(x, y) for x, y in points if _is_number(x) and _is_number(y)]
            if points:
                series.append((config, f.fold, points))
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {config: f"C{i % 10}" for i, config in enumerate(ctx.folds)}
    styles = ["-", "--", ":", "-."]
    for config, fold, points in series:
        order = list(ctx.folds[config])
        style = styles[[f.fold for f in order].index(fold) % len(styles)]
        xs, ys = zip(*points)
        marker = "." if len(points) <= 30 else None
        ax.plot(xs, ys, style, color=colours[config], marker=marker, linewidth=1.2, label=f"{config} fold {fold}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean validation Dice (patches)")
    ax.set_title("Validation Dice per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1, loc="lower right")
    fig.tight_layout()
    path = ctx.figures / CURVES_NAME
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    ctx.written.append(path)
    return path


def _training_section(ctx: _Context) -> list[str]:
    if ctx.plans is None:
        return _note("Skipped: without plans.json the trained configurations cannot be told apart.")
    if not ctx.folds:
        return _note(f"Skipped: no trained fold yet (no {ctx.rel(ctx.ws.root / 'results')}/CONFIG/fold_K/log.jsonl).")
    names = ctx.label_names
    out: list[str] = []
    rows = []
    for config, folds in ctx.folds.items():
        cv = ctx.cv.get(config)
        rows.append(
            [
                f"`{config}`",
                ", ".join(f.fold for f in folds),
                sum(f.epochs for f in folds),
                _minutes(sum(f.minutes for f in folds) * 60),
                _num(cv[0].foreground_mean.get("dice")) if cv else "-",
            ]
        )
    out += _table(
        ["configuration", "folds", "epochs (all folds)", "training minutes", "CV foreground Dice"], rows, "llrrr"
    )
    out.append("")
    out.append(
        "Per fold below: epochs and minutes are summed from `log.jsonl`; 'best EMA Dice' is the best moving average "
        "of the patch validation Dice (it picks `checkpoint_best.pt`); the full-case Dice is the foreground mean over "
        "the fold's validation cases predicted in full (`fold_K/validation/summary.json`); 'stopped' is 'time limit' "
        "when the last epoch was cut, 'finished' when `checkpoint_final.pt` exists."
    )
    out.append("")
    try:
        curves = _curves_figure(ctx)
    except _SKIPPABLE as exc:
        out += _note(f"No training-curve picture: {exc}")
    else:
        if curves is not None:
            out += [f"![Validation Dice per epoch]({ctx.rel(curves)})", ""]

    for config, folds in ctx.folds.items():
        out += [f"### `{config}`", ""]
        rows = []
        for f in folds:
            progress = f.folder / "progress.png"
            link = f"[progress.png]({ctx.rel(progress)})" if progress.is_file() else "-"
            val = "-"
            if f.validation_dice is not None or f.validation_cases is not None:
                val = f"{_num(f.validation_dice)} ({_count(f.validation_cases, 'case')})"
            rows.append(
                [
                    f.fold,
                    f.epochs,
                    f.stopped,
                    _num(f.last("train_loss")),
                    _num(f.last("val_loss")),
                    _num(f.best_ema_dice),
                    _minutes(f.minutes * 60),
                    val,
                    link,
                ]
            )
        out += _table(
            [
                "fold",
                "epochs",
                "stopped",
                "final train loss",
                "final val loss",
                "best EMA Dice",
                "minutes",
                "full-case validation Dice",
                "curves",
            ],
            rows,
            "lrlrrrrrl",
        )
        out.append("")
        cv = ctx.cv.get(config)
        if cv is None:
            out += _note(
                f"No cross-validation summary yet ({ctx.rel(ctx.ws.results_dir(config) / 'cv_summary.json')})."
            )
            continue
        result, raw = cv
        folds_in = ", ".join(sorted(raw.get("folds", {}), key=_class_key)) or "-"
        complete = raw.get("complete")
        state = "all folds of splits.json" if complete else "not every fold yet"
        which = f"fold {folds_in}" if len(raw.get("folds", {})) == 1 else f"folds {folds_in}"
        out.append(
            f"Cross-validation ({_count(result.n_cases, 'case')} pooled from {which}; {state}), mean over cases:"
        )
        out.append("")
        out += _metrics_table(result, names)
        out.append("")
    return out


def _members_text(members: Any) -> str:
    if isinstance(members, (list, tuple)) and members:
        return " + ".join(f"`{m}`" for m in members)
    return "-"


def _selection_section(ctx: _Context) -> list[str]:
    sel = ctx.selection
    if sel is None:
        return _note(f"Skipped: no {ctx.ws.selection_json.name} yet (run `autounet select`).")
    names = ctx.label_names
    out: list[str] = []
    metric = sel.get("metric")
    metric_text = "cross-validation Dice" if metric in (None, "dice") else str(metric)
    ranking = [r for r in sel.get("ranking") or [] if isinstance(r, dict)]
    if ranking:
        classes = sorted({str(k) for r in ranking for k in (r.get("per_class") or {})}, key=_class_key)
        rows = []
        for i, r in enumerate(ranking, 1):
            per_class = {str(k): v for k, v in (r.get("per_class") or {}).items()}
            complete = r.get("complete")
            rows.append(
                [
                    i,
                    f"`{r.get('name', '?')}`",
                    _members_text(r.get("members")),
                    _num(r.get("foreground_dice")),
                    *[_num(per_class.get(c)) for c in classes],
                    r.get("n_cases", "-"),
                    "-" if complete is None else ("yes" if complete else "no"),
                ]
            )
        pooled = (
            f" ({_count(sel['n_cases'], 'case')} validated by every model)" if _is_number(sel.get("n_cases")) else ""
        )
        out.append(f"Models ranked by {metric_text}{pooled}, best first:")
        out.append("")
        out += _table(
            [
                "rank",
                "model",
                "members",
                "foreground Dice",
                *[f"Dice {_label(c, names)}" for c in classes],
                "cases",
                "all folds",
            ],
            rows,
            "rll" + "r" * (len(classes) + 2) + "l",
        )
        out.append("")
    else:
        out += _note("selection.json lists no ranking.")

    winner = sel.get("winner") if isinstance(sel.get("winner"), dict) else {}
    if winner:
        folds = winner.get("folds")
        checkpoints = winner.get("checkpoints")
        parts = [f"members {_members_text(winner.get('members'))}"]
        if isinstance(folds, list):
            parts.append("folds " + ", ".join(map(str, folds)))
        if isinstance(checkpoints, list):
            parts.append("checkpoints " + ", ".join(map(str, checkpoints)))
        score = next((r.get("foreground_dice") for r in ranking if r.get("name") == winner.get("name")), None)
        if score is not None:
            parts.append(f"cross-validation foreground Dice {_num(score)}")
        out.append(f"**Winner: `{winner.get('name', '?')}`** ({'; '.join(parts)}).")
        out.append("")
    else:
        out += _note("selection.json names no winner.")

    out += ["### Post-processing", ""]
    out += _postprocessing_text(sel.get("postprocessing"), names)
    command = sel.get("predict_command")
    if command:
        out += ["To segment new images with the winner:", "", "```bash", str(command), "```", ""]
    return out


def _step_line(title: str, step: Mapping[str, Any], value_key: str | None, names: Mapping[str, str]) -> str:
    """One post-processing step in words: the Dice without and with it, and whether it was kept."""
    if value_key is None:
        what = "mean Dice over classes"
        without, with_ = step.get("mean_without"), step.get("mean_with")
    else:
        what = "its Dice"
        without = (step.get("dice_without") or {}).get(value_key)
        with_ = (step.get("dice_with") or {}).get(value_key)
    details = [f"gain {_signed(step.get('gain'))}"]
    if value_key is not None and _is_number(step.get("mean_without")):
        details.append(f"mean over classes {_num(step.get('mean_without'))} → {_num(step.get('mean_with'))}")
    if _is_number(step.get("cases_changed")):
        details.append(f"{_count(step['cases_changed'], 'case')} changed")
    verdict = "**adopted**" if step.get("adopted") else "**not adopted**"
    return f"- {title}: {what} {_num(without)} without, {_num(with_)} with ({'; '.join(details)}) → {verdict}."


def _components_text(pp: Mapping[str, Any], names: Mapping[str, str]) -> list[str]:
    decision = pp.get("decision") if isinstance(pp.get("decision"), dict) else {}
    evidence = decision.get("evidence") if isinstance(decision.get("evidence"), dict) else {}
    candidates = [str(c) for c in decision.get("candidates") or []]
    out = [
        "Connected-component post-processing (nnU-Net): each step was tried on the cross-validation predictions"
        + (f" of {evidence['num_cases']} cases" if _is_number(evidence.get("num_cases")) else "")
        + " and kept only if it did not lower the Dice"
        + (f" (gain ≥ {_num(evidence['min_gain'])})" if _is_number(evidence.get("min_gain")) else "")
        + ". Removing components of one class changes no other class's Dice.",
        "",
    ]
    if candidates:
        out.append(
            "Candidates for a per-class step (one connected component in every training label): "
            + ", ".join(_label(c, names) for c in candidates)
            + "."
        )
    else:
        out.append(
            "No class forms a single connected component in every training label, so no per-class step was tried."
        )
    out.append("")
    fg = evidence.get("foreground")
    if isinstance(fg, dict):
        out.append(
            _step_line("Keep only the largest foreground component (all classes as one object)", fg, None, names)
        )
    elif "keep_largest_foreground" in decision:
        verdict = "adopted" if decision["keep_largest_foreground"] else "not adopted"
        out.append(f"- Keep only the largest foreground component: **{verdict}** (no evidence stored).")
    per_class = evidence.get("classes") if isinstance(evidence.get("classes"), dict) else {}
    base = "after the foreground step" if decision.get("keep_largest_foreground") else "on the raw predictions"
    for key in sorted(per_class, key=_class_key):
        step = per_class[key]
        if isinstance(step, dict):
            title = f"Keep only the largest component of class {_label(key, names)}, {base}"
            out.append(_step_line(title, step, str(key), names))
    if not per_class and candidates:
        kept = {str(c) for c in decision.get("keep_largest_classes") or []}
        for c in candidates:
            verdict = "adopted" if c in kept else "not adopted"
            out.append(
                f"- Keep only the largest component of class {_label(c, names)}: **{verdict}** (no evidence stored)."
            )
    out.append("")
    kept_steps = []
    if decision.get("keep_largest_foreground"):
        kept_steps.append("keep the largest foreground component")
    if decision.get("keep_largest_classes"):
        kept_steps.append(
            "keep the largest component of class "
            + ", ".join(_label(c, names) for c in decision["keep_largest_classes"])
        )
    out.append("Applied to predictions: " + ("; then ".join(kept_steps) if kept_steps else "nothing") + ".")
    out.append("")
    return out


def _find_dict(candidates: Iterable[Any], keys: Sequence[str]) -> dict[str, Any] | None:
    for c in candidates:
        if isinstance(c, dict) and any(k in c for k in keys):
            return c
    return None


def _brats_text(pp: Mapping[str, Any], names: Mapping[str, str]) -> list[str]:
    decision = pp.get("decision") if isinstance(pp.get("decision"), dict) else {}
    summary = (
        _find_dict(
            [
                pp.get("grid_search"),
                pp.get("summary"),
                pp.get("table"),
                pp.get("grid"),
                pp.get("evidence"),
                decision.get("summary"),
                decision.get("evidence"),
                decision.get("table"),
            ],
            ("best_score", "per_threshold", "best"),
        )
        or {}
    )
    rule = _find_dict(
        [pp.get("rule"), decision.get("rule"), decision, summary.get("best")],
        ("component_voxels", "total_voxels", "et_threshold"),
    )
    out = [
        "Enhancing-tumour rule (seed 004 §2.5), chosen by grid search on the cross-validation predictions"
        + (f" of {summary['num_cases']} cases" if _is_number(summary.get("num_cases")) else "")
        + ":",
        "",
    ]
    if rule:
        p = rule.get("min_mean_probability")
        out.append(
            f"- ET components smaller than {rule.get('component_voxels', '?')} voxels whose mean ET probability is "
            f"below {_short(p) if _is_number(p) else '?'} become necrosis;"
        )
        out.append(
            f"- then, if fewer than {rule.get('total_voxels', '?')} ET voxels remain with mean probability below that "
            "value, all ET becomes necrosis;"
        )
        if _is_number(rule.get("et_threshold")):
            out.append(f"- ET threshold on the region probability: {_short(rule['et_threshold'])}.")
        if _is_number(rule.get("connectivity")):
            out.append(f"- components with {rule['connectivity']}-connectivity.")
        out.append("")
    else:
        out += _note("The chosen rule is not in selection.json.")
    scores = [
        ("chosen rule", summary.get("best_score")),
        ("no rule", summary.get("no_rule_score")),
        ("the paper's rule (16 / 73 voxels, 0.9)", summary.get("paper_rule_score")),
    ]
    scores = [(n, s) for n, s in scores if _is_number(s)]
    if scores:
        out.append(
            "Score (mean over cases of the mean region Dice, both empty = 1): "
            + "; ".join(f"{n} {_num(s)}" for n, s in scores)
            + "."
        )
        out.append("")
    per_threshold = [t for t in summary.get("per_threshold") or [] if isinstance(t, dict)]
    if per_threshold:
        regions = sorted({k for t in per_threshold for k in (t.get("region_dice") or {})})
        rows = [
            [
                _short(t["et_threshold"]) if _is_number(t.get("et_threshold")) else "-",
                _num(t.get("best_score")),
                _num(t.get("no_rule_score")),
                *[_num((t.get("region_dice") or {}).get(r)) for r in regions],
            ]
            for t in per_threshold
        ]
        out += _table(["ET threshold", "best score", "score without rule", *[f"{r} Dice" for r in regions]], rows)
        out.append("")
    return out


def _postprocessing_text(pp: Any, names: Mapping[str, str]) -> list[str]:
    if not isinstance(pp, dict) or not pp:
        return _note("No post-processing in selection.json: predictions are used as the network makes them.")
    kind = pp.get("kind")
    if kind == "components":
        out = _components_text(pp, names)
    elif kind == "brats_et":
        out = _brats_text(pp, names)
    else:
        out = [f"Post-processing of kind `{kind}`:", "", "```json", json.dumps(pp, indent=2, default=str), "```", ""]
    before, after = pp.get("dice_before"), pp.get("dice_after")
    if _is_number(before) or _is_number(after):
        out.append(
            f"Cross-validation foreground Dice: {_num(before)} before post-processing, {_num(after)} after "
            f"(change {_signed(after - before) if _is_number(before) and _is_number(after) else '-'})."
        )
        out.append("")
    pcb = pp.get("per_class_before") if isinstance(pp.get("per_class_before"), dict) else {}
    pca = pp.get("per_class_after") if isinstance(pp.get("per_class_after"), dict) else {}
    keys = sorted({str(k) for k in (*pcb, *pca)}, key=_class_key)
    if keys:
        rows = []
        for k in keys:
            b, a = pcb.get(k), pca.get(k)
            rows.append(
                [_label(k, names), _num(b), _num(a), _signed(a - b) if _is_number(a) and _is_number(b) else "-"]
            )
        out += _table(["class", "Dice before", "Dice after", "change"], rows)
        out.append("")
    return out


def _best_configurations(ctx: _Context) -> list[str]:
    """The winner's member configurations, else the trained ones by CV (or validation) Dice, best first."""
    members: list[str] = []
    if ctx.selection:
        winner = ctx.selection.get("winner") or {}
        names = winner.get("members") or ([winner["name"]] if winner.get("name") else [])
        members = [str(m) for m in names if str(m) in ctx.folds]
    if members:
        return members

    def score(config: str) -> float:
        cv = ctx.cv.get(config)
        if cv and _is_number(cv[0].foreground_mean.get("dice")):
            return float(cv[0].foreground_mean["dice"])
        values = [f.validation_dice for f in ctx.folds[config] if _is_number(f.validation_dice)]
        return sum(values) / len(values) if values else -1.0

    return sorted(ctx.folds, key=score, reverse=True)


def _predictions(folder: Path) -> dict[str, Path]:
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


def _example_section(ctx: _Context) -> list[str]:
    from autounet.data.dataset import load_raw_dataset
    from autounet.data.image_io import read_image, read_label
    from autounet.visualization import render_overlay

    if not ctx.folds:
        return _note("Skipped: no trained fold, so no validation prediction to show.")
    choice = None
    for config in _best_configurations(ctx):
        for fold in ctx.folds[config]:
            preds = _predictions(fold.folder / "validation")
            if preds:
                choice = (config, fold, preds)
                break
        if choice:
            break
    if choice is None:
        return _note("Skipped: no fold holds validation predictions (fold_K/validation/CASE.nii.gz).")
    config, fold, preds = choice
    if not ctx.ws.dataset_json.is_file():
        return _note(f"Skipped: {ctx.ws.dataset_json.name} not found, so the raw images cannot be located.")
    raw_path = read_json(ctx.ws.dataset_json).get("raw_path")
    if not raw_path:
        return _note(f"Skipped: {ctx.ws.dataset_json.name} does not name the raw dataset (raw_path).")
    dataset = load_raw_dataset(raw_path)
    images = {c.case_id: c.images for c in dataset.cases}
    usable = [c for c in preds if c in images]
    if not usable:
        return _note(f"Skipped: none of the validation cases of `{config}` fold {fold.fold} is in the raw dataset.")
    case = _typical_case(fold, usable)
    image, geometry = read_image(images[case])
    seg, _ = read_label(preds[case])
    if seg.shape != image.shape[1:]:
        return _note(f"Skipped: the prediction of {case} has shape {seg.shape}, the image {image.shape[1:]}.")
    out_path = ctx.figures / f"example_{_safe_name(case)}.png"
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
    score = f", foreground Dice {_num(dice)}" if dice is not None else ""
    why = "median Dice of the fold's validation cases" if fold.validation_per_case else "first validation case"
    return [
        f"Validation case `{case}` ({why}{score}) with the segmentation predicted by `{config}` fold {fold.fold} "
        f"(channel 0: {dataset.channel_names[0] if dataset.channel_names else '?'}; rows: axial, coronal, sagittal):",
        "",
        f"![{case}]({ctx.rel(out_path)})",
        "",
    ]


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------


def _guarded(section: Callable[[_Context], list[str]], ctx: _Context) -> list[str]:
    """A section's lines, or a one-line note saying why it was skipped."""
    try:
        return section(ctx)
    except _SKIPPABLE as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _note(f"Skipped: {reason}")


def _load_context(ws: Workspace) -> tuple[_Context, list[str]]:
    """Read the workspace's files; returns the context and a note per file that could not be read."""
    from autounet.planning.fingerprint import load_fingerprint
    from autounet.planning.plans import load_plans

    ctx = _Context(ws, ws.root / FIGURES_DIR)
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
            data = read_json(ws.selection_json)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            ctx.selection = data
        except (OSError, ValueError) as exc:
            problems.append(f"{ws.selection_json}: unreadable ({exc})")
    source = ctx.plans or ctx.fingerprint
    if source is not None:
        ctx.label_names = {str(k): str(v) for k, v in source.labels.items()}
    if ctx.plans is not None:
        try:
            ctx.folds = trained_folds(ws, ctx.plans.configurations)
        except _SKIPPABLE as exc:
            problems.append(f"trained folds: {exc}")
        for config in ctx.folds:
            try:
                cv = _cv_summary(ws, config)
            except _SKIPPABLE as exc:
                problems.append(f"{config}: cross-validation summary unreadable ({exc})")
                continue
            if cv is not None:
                ctx.cv[config] = cv
    return ctx, problems


def render_report(ws: Workspace) -> str:
    """The report's Markdown text; writes the pictures it links into ``W/NAME/report/``."""
    if not ws.root.is_dir():
        raise AutounetError(f"{ws.root}: workspace not found (run `autounet plan` first)")
    ctx, problems = _load_context(ws)
    title = ws.name
    if ctx.fingerprint is not None and ctx.fingerprint.dataset_name != ws.name:
        title += f" (dataset {ctx.fingerprint.dataset_name})"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# autounet report: {title}",
        "",
        f"Workspace `{ws.root}`, written {stamp}. Every number below is read from the files in this folder.",
        "",
    ]
    if problems:
        lines += ["Files that could not be read:", ""] + [f"- {p}" for p in problems] + [""]
    sections = (
        ("1. Dataset", _fingerprint_section),
        ("2. Plans", _plans_section),
        ("3. Training and cross-validation", _training_section),
        ("4. Model selection", _selection_section),
        ("5. Example prediction", _example_section),
    )
    for heading, section in sections:
        lines += [f"## {heading}", ""]
        lines += _guarded(section, ctx)
    _remove_stale_examples(ctx)
    return "\n".join(lines).rstrip() + "\n"


def _remove_stale_examples(ctx: _Context) -> None:
    """Example pictures of earlier reports that this one no longer links."""
    if not ctx.figures.is_dir():
        return
    keep = {p.name for p in ctx.written}
    for p in ctx.figures.glob("example_*.png"):
        if p.name not in keep:
            p.unlink(missing_ok=True)


def write_report(ws: Workspace) -> Path:
    """Write ``W/NAME/report.md`` (atomically) and the pictures it links; returns the report's path."""
    text = render_report(ws)
    return atomic_write_text(ws.root / REPORT_NAME, text)
