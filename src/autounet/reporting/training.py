"""Report section 3: per trained configuration, its folds (from ``log.jsonl`` and the full-case
validation summaries), its pooled cross-validation metrics and one picture of every fold's
validation Dice curve (``report/training_curves.png``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from autounet.evaluation.evaluate import EvaluationResult
from autounet.reporting.common import (
    SKIPPABLE,
    class_key,
    class_label,
    count,
    is_number,
    minutes,
    note,
    num,
    short,
    table,
)
from autounet.reporting.context import ReportContext
from autounet.utils.atomic import atomic_write
from autounet.workspace import cv_summary_path, progress_plot_path

CURVES_NAME = "training_curves.png"


def metrics_table(result: EvaluationResult, names: Mapping[str, str]) -> list[str]:
    rows = []
    for key in sorted(result.mean, key=class_key):
        m = result.mean[key]
        rows.append(
            [
                class_label(key, names),
                num(m.get("dice")),
                num(m.get("iou")),
                num(m.get("hd95"), 3),
                num(m.get("surface_dice")),
            ]
        )
    fg = result.foreground_mean
    rows.append(
        [
            "**foreground mean**",
            f"**{num(fg.get('dice'))}**",
            num(fg.get("iou")),
            num(fg.get("hd95"), 3),
            num(fg.get("surface_dice")),
        ]
    )
    tol = result.settings.get("tolerance_mm", 1.0)
    return table(["class", "Dice", "IoU", "HD95 mm", f"surface Dice ({short(tol)} mm)"], rows)


def curves_figure(ctx: ReportContext) -> Path | None:
    """Mean validation Dice per epoch of every fold of every configuration, in one picture."""
    series = []
    for config, folds in ctx.folds.items():
        for f in folds:
            points = [(e.get("epoch"), e.get("val_dice_mean")) for e in f.log]
            points = [(x, y) for x, y in points if is_number(x) and is_number(y)]
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


def training_section(ctx: ReportContext) -> list[str]:
    if ctx.plans is None:
        return note("Skipped: without plans.json the trained configurations cannot be told apart.")
    if not ctx.folds:
        return note(f"Skipped: no trained fold yet (no {ctx.rel(ctx.ws.root / 'results')}/CONFIG/fold_K/log.jsonl).")
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
                minutes(sum(f.minutes for f in folds) * 60),
                num(cv.result.foreground_mean.get("dice")) if cv else "-",
            ]
        )
    out += table(
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
        curves = curves_figure(ctx)
    except SKIPPABLE as exc:
        out += note(f"No training-curve picture: {exc}")
    else:
        if curves is not None:
            out += [f"![Validation Dice per epoch]({ctx.rel(curves)})", ""]

    for config, folds in ctx.folds.items():
        out += [f"### `{config}`", ""]
        rows = []
        for f in folds:
            progress = progress_plot_path(f.folder)
            link = f"[{progress.name}]({ctx.rel(progress)})" if progress.is_file() else "-"
            val = "-"
            if f.validation_dice is not None or f.validation_cases is not None:
                val = f"{num(f.validation_dice)} ({count(f.validation_cases, 'case')})"
            rows.append(
                [
                    f.fold,
                    f.epochs,
                    f.stopped,
                    num(f.last("train_loss")),
                    num(f.last("val_loss")),
                    num(f.best_ema_dice),
                    minutes(f.minutes * 60),
                    val,
                    link,
                ]
            )
        out += table(
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
            out += note(f"No cross-validation summary yet ({ctx.rel(cv_summary_path(ctx.ws.results_dir(config)))}).")
            continue
        result = cv.result
        folds_in = ", ".join(cv.folds) or "-"
        state = "all folds of splits.json" if cv.complete else "not every fold yet"
        which = f"fold {folds_in}" if len(cv.folds) == 1 else f"folds {folds_in}"
        out.append(f"Cross-validation ({count(result.n_cases, 'case')} pooled from {which}; {state}), mean over cases:")
        out.append("")
        out += metrics_table(result, names)
        out.append("")
    return out
