"""Report section 2: the plans (the ``autounet plan`` table and the planner's notes), read from the
typed ``plans.json``."""

from __future__ import annotations

from autounet.planning.summary import format_plans
from autounet.reporting.common import dims, note
from autounet.reporting.context import ReportContext


def plans_section(ctx: ReportContext) -> list[str]:
    plans = ctx.plans
    if plans is None:
        return note(f"Skipped: no readable {ctx.ws.plans_json.name} (run `autounet plan`).")
    out = [
        f"Planner `{plans.planner}`; median spacing {dims(plans.original_median_spacing)} mm and median shape "
        f"{dims(plans.original_median_shape)} voxels (raw z, y, x order); configurations: "
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
