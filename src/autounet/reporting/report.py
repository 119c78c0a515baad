"""The report's assembly: ``W/NAME/report.md`` from its five sections, each replaced by a one-line
note when its inputs are missing or unreadable, and the pictures it links in ``W/NAME/report/``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from autounet.reporting.common import SKIPPABLE, note, require_workspace
from autounet.reporting.context import ReportContext, load_context
from autounet.reporting.example import example_section
from autounet.reporting.fingerprint import fingerprint_section
from autounet.reporting.plans import plans_section
from autounet.reporting.selection import selection_section
from autounet.reporting.training import training_section
from autounet.utils.atomic import atomic_write_text
from autounet.workspace import Workspace

SECTIONS: tuple[tuple[str, Callable[[ReportContext], list[str]]], ...] = (
    ("1. Dataset", fingerprint_section),
    ("2. Plans", plans_section),
    ("3. Training and cross-validation", training_section),
    ("4. Model selection", selection_section),
    ("5. Example prediction", example_section),
)


def _guarded(section: Callable[[ReportContext], list[str]], ctx: ReportContext) -> list[str]:
    """A section's lines, or a one-line note saying why it was skipped."""
    try:
        return section(ctx)
    except SKIPPABLE as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return note(f"Skipped: {reason}")


def render_report(ws: Workspace) -> str:
    """The report's Markdown text; writes the pictures it links into ``W/NAME/report/``."""
    require_workspace(ws.root, ws.dataset_json, ws.plans_json)
    ctx, problems = load_context(ws)
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
    for heading, section in SECTIONS:
        lines += [f"## {heading}", ""]
        lines += _guarded(section, ctx)
    _remove_stale_examples(ctx)
    return "\n".join(lines).rstrip() + "\n"


def _remove_stale_examples(ctx: ReportContext) -> None:
    """Example pictures of earlier reports that this one no longer links."""
    if not ctx.figures.is_dir():
        return
    keep = {p.name for p in ctx.written}
    for p in ctx.figures.glob("example_*.png"):
        if p.name not in keep:
            p.unlink(missing_ok=True)


def write_report(ws: Workspace) -> Path:
    """Write ``W/NAME/report.md`` (atomically) and the pictures it links; returns the report's path."""
    return atomic_write_text(ws.report_md, render_report(ws))
