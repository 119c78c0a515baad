"""``W/NAME/report.html``: the report as one self-contained page that opens from disk.

The summary (dataset, plans, selection, cross-validation Dice) is the Markdown report's sections
as HTML; the training curves, the case table and the case viewer are drawn by the page's own
script (``page.js``, no library) from one JSON block. Nothing is fetched: the styles, the script
and every picture (PNG data URIs) are inline, and the page's Content-Security-Policy forbids any
other source. Every text from the data is escaped (HTML text, and the JSON block for ``<script>``).
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from autounet.errors import AutounetError
from autounet.reporting.common import SKIPPABLE, class_key, is_number, note, require_workspace
from autounet.reporting.context import ReportContext, load_context
from autounet.reporting.fingerprint import fingerprint_section
from autounet.reporting.html_cases import DEFAULT_WORST, CaseTable, case_table, embed_cases
from autounet.reporting.markup import markdown_html
from autounet.reporting.plans import plans_section
from autounet.reporting.selection import selection_section
from autounet.reporting.training import metrics_table
from autounet.utils.atomic import atomic_write_text
from autounet.workspace import Workspace

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def script_json(data: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&``
    (so no ``</script>`` or ``<!--``), and no raw U+2028/U+2029."""
    text = json.dumps(data, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _asset(name: str) -> str:
    return resources.files("autounet.reporting").joinpath(name).read_text(encoding="utf-8")


def _finite(x: Any) -> float | None:
    return float(x) if is_number(x) else None


def _guarded(section, ctx: ReportContext) -> list[str]:
    try:
        return section(ctx)
    except SKIPPABLE as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return note(f"Skipped: {reason}")


def curves(ctx: ReportContext) -> list[dict[str, Any]]:
    """Per trained fold of every configuration: epoch, losses, pseudo-Dice, EMA and learning rate."""
    out = []
    for config, folds in ctx.folds.items():
        for f in folds:
            rows = [e for e in f.log if is_number(e.get("epoch"))]
            if not rows:
                continue
            out.append(
                {
                    "label": f"{config} fold {f.fold}",
                    "epochs": [int(e["epoch"]) for e in rows],
                    "train_loss": [_finite(e.get("train_loss")) for e in rows],
                    "val_loss": [_finite(e.get("val_loss")) for e in rows],
                    "dice": [_finite(e.get("val_dice_mean")) for e in rows],
                    "ema": [_finite(e.get("ema_dice")) for e in rows],
                    "lr": [_finite(e.get("lr")) for e in rows],
                }
            )
    return out


def _cv_html(ctx: ReportContext) -> str:
    """Each configuration's pooled cross-validation metrics per class."""
    parts = []
    for config in ctx.folds:
        cv = ctx.cv.get(config)
        if cv is None:
            parts.append(markdown_html(note(f"{config}: no cross-validation summary yet (folds not validated).")))
            continue
        text = f"`{config}`: {cv.result.n_cases} cases pooled from folds {', '.join(cv.folds) or '-'}" + (
            "" if cv.complete else " (not every fold yet)"
        )
        parts.append(markdown_html([text, "", *metrics_table(cv.result, ctx.label_names)]))
    return "\n".join(parts) or markdown_html(note("No trained configuration yet."))


def _classes(ctx: ReportContext) -> list[dict[str, Any]]:
    from autounet.visualization import label_colour

    out = []
    for key in sorted({k for k in ctx.label_names if k != "0"}, key=class_key):
        if not key.lstrip("-").isdigit():
            continue
        r, g, b = label_colour(int(key))
        out.append(
            {
                "value": int(key),
                "name": ctx.label_names[key],
                "colour": f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}",
            }
        )
    return out


def _table_data(ctx: ReportContext, table: CaseTable) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    volumes = []
    rows = []
    for rank, r in enumerate(table.rows, 1):
        view = -1
        if r.volume is not None:
            view = len(volumes)
            volumes.append(r.volume)
        rows.append(
            {
                "rank": rank,
                "case": r.case,
                "fold": r.fold,
                "mean": r.mean_dice,
                "scores": r.scores,
                "view": view,
                "note": r.note,
            }
        )
    classes = []
    for key in table.classes:
        name = ctx.label_names.get(key)
        classes.append({"key": key, "label": f"{key} ({name})" if name and name != key else key})
    return {"model": table.model, "classes": classes, "rows": rows}, volumes


def render_html(ws: Workspace, worst: int = DEFAULT_WORST) -> str:
    """The page's text (see the module docstring); ``worst``: cases embedded worst first (plus a sample)."""
    require_workspace(ws.root, ws.dataset_json, ws.plans_json)
    if isinstance(worst, bool) or not isinstance(worst, int) or worst < 0:
        raise AutounetError(f"--cases must be a whole number >= 0, got {worst!r}")
    ctx, problems = load_context(ws)
    try:
        table, predictions = case_table(ctx)
    except SKIPPABLE as exc:
        table, predictions = CaseTable("", [], missing=f"the cases cannot be listed: {exc}"), {}
    if table.rows:
        embed_cases(ctx, table, predictions, worst)
    table_data, volumes = _table_data(ctx, table)
    channels = list(ctx.plans.channel_names if ctx.plans else ctx.fingerprint.channel_names if ctx.fingerprint else [])
    data = {
        "curves": curves(ctx),
        "table": table_data,
        "volumes": volumes,
        "classes": _classes(ctx),
        "channels": [str(c) for c in channels],
    }
    e = html.escape
    title = ws.name
    if ctx.fingerprint is not None and ctx.fingerprint.dataset_name != ws.name:
        title += f" (dataset {ctx.fingerprint.dataset_name})"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    missing = []
    if not data["curves"]:
        missing.append("no training log yet (results/CONFIG/fold_K/log.jsonl), so no training curves")
    if table.missing:
        missing.append(table.missing)
    embedded = len(volumes)
    shown = sum(1 for r in table.rows if r.volume is not None)
    if shown == len(table.rows):
        which = "Click a row to open its case in the viewer. "
    else:
        which = (
            f"The {shown} cases marked <em>show</em> (the {min(worst, len(table.rows))} worst and a sample of the "
            "rest) open in the viewer; the others are listed with their scores. "
        )
    case_intro = (
        f"Every cross-validation case of <code>{e(table.model)}</code> ({len(table.rows)} cases), worst mean Dice "
        f"first; click a column title to sort. {which}Predictions are the folds' validation predictions before "
        "post-processing; NSD is the surface Dice at the tolerance of the validation summary."
        if table.rows
        else ""
    )
    body = f"""<header>
<h1>autounet report: {e(title)}</h1>
<p>Workspace <code>{e(str(ws.root))}</code>, written {e(stamp)}. Every number is read from the files in this folder.</p>
<nav><a href="#summary">Summary</a><a href="#curves">Training curves</a><a href="#cases">Cases</a></nav>
</header>
<main>
{"".join(f'<p class="problem">Could not be read: {e(p)}</p>' for p in problems)}
{"".join(f'<p class="problem" data-missing="1">Missing: {e(m)}.</p>' for m in missing)}
<section id="summary"><h2>Summary</h2>
<h3>Dataset</h3>{markdown_html(_guarded(fingerprint_section, ctx))}
<h3>Plans</h3>{markdown_html(_guarded(plans_section, ctx))}
<h3>Cross-validation</h3>{_cv_html(ctx)}
<h3>Selection and post-processing</h3>{markdown_html(_guarded(selection_section, ctx))}
</section>
<section id="curves"><h2>Training curves</h2>
<p class="note">Every fold of every configuration on shared axes; click a legend entry to hide or show it.</p>
<div id="curve-legend" class="legend"></div><div id="curve-panels" class="panels"></div>
</section>
<section id="cases"><h2>Cases</h2>
<p>{case_intro}</p>
{"".join(f'<p class="note">{e(n)}</p>' for n in table.notes)}
<div class="cases-layout">
<div id="case-table-wrap"><table id="case-table"></table></div>
<div id="viewer" hidden>
<h3 id="viewer-title"></h3>
<div class="controls">
<label>axis <select id="axis"><option value="0">axial</option><option value="1">coronal</option><option value="2">sagittal</option></select></label>
<label>channel <select id="channel"></select></label>
<label>ground truth <select id="truth-mode"><option value="outline">outline</option><option value="filled">filled</option><option value="off">off</option></select></label>
<label>prediction <select id="pred-mode"><option value="filled">filled</option><option value="outline">outline</option><option value="off">off</option></select></label>
<label><input type="checkbox" id="errors"> errors</label>
</div>
<div class="controls"><input type="range" id="slice" min="0" max="0" value="0"> <span id="slice-label"></span></div>
<canvas id="view" width="1" height="1"></canvas>
<div class="note" id="window-label"></div>
<div class="note" id="viewer-status"></div>
<div id="viewer-legend" class="viewer-legend"></div>
<p class="note">Mouse wheel or arrow keys: next / previous slice. Ground truth lighter, prediction in the class colour.</p>
</div>
</div>
</section>
</main>"""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>autounet report: {e(title)}</title>
<style>{_asset("page.css")}</style>
</head><body data-embedded="{embedded}">
{body}
<script type="application/json" id="report-data">{script_json(data)}</script>
<script>{_asset("page.js")}</script>
</body></html>
"""


def write_html_report(ws: Workspace, worst: int = DEFAULT_WORST) -> Path:
    """Write ``W/NAME/report.html`` atomically; returns its path."""
    return atomic_write_text(ws.report_html, render_html(ws, worst))
