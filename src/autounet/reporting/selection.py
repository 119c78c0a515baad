"""Report section 4: the model selection from the typed ``selection.json``: the ranking, the winner,
the post-processing decision (:mod:`autounet.reporting.postprocessing`) and how to predict with it."""

from __future__ import annotations

from collections.abc import Sequence

from autounet.reporting.common import class_key, class_label, count, note, num, table
from autounet.reporting.context import ReportContext
from autounet.reporting.postprocessing import postprocessing_text


def _members_text(members: Sequence[str]) -> str:
    return " + ".join(f"`{m}`" for m in members) if members else "-"


def selection_section(ctx: ReportContext) -> list[str]:
    sel = ctx.selection
    path = ctx.ws.selection_json
    if sel is None:
        if path.is_file():
            return note(f"Skipped: {path.name} could not be read (see above).")
        return note(f"Skipped: no {path.name} yet (run `autounet select`).")
    names = ctx.label_names
    out: list[str] = []
    if sel.ranking:
        classes = sorted({k for r in sel.ranking for k in r.per_class}, key=class_key)
        rows = [
            [
                i,
                f"`{r.name}`",
                _members_text(r.members),
                num(r.foreground_dice),
                *[num(r.per_class.get(c)) for c in classes],
                r.n_cases,
                "yes" if r.complete else "no",
            ]
            for i, r in enumerate(sel.ranking, 1)
        ]
        out.append(
            f"Models ranked by {sel.metric} ({count(sel.n_cases, 'case')} validated by every model), best first:"
        )
        out.append("")
        out += table(
            [
                "rank",
                "model",
                "members",
                "foreground Dice",
                *[f"Dice {class_label(c, names)}" for c in classes],
                "cases",
                "all folds",
            ],
            rows,
            "rll" + "r" * (len(classes) + 2) + "l",
        )
        out.append("")
    else:
        out += note(f"{path.name} lists no ranking.")

    winner = sel.winner
    parts = [f"members {_members_text(winner.members)}", "folds " + ", ".join(map(str, winner.folds))]
    score = next((r.foreground_dice for r in sel.ranking if r.name == winner.name), None)
    if score is not None:
        parts.append(f"cross-validation foreground Dice {num(score)}")
    out.append(f"**Winner: `{winner.name}`** ({'; '.join(parts)}).")
    out.append("")

    out += ["### Post-processing", ""]
    out += postprocessing_text(sel.postprocessing, names)
    out += ["To segment new images with the winner:", "", "```bash", sel.predict_command, "```", ""]
    return out
