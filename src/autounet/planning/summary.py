"""A readable table of plans, printed by `autounet plan`."""

from __future__ import annotations

from autounet.planning.plans import Plans


def _x(values) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def format_plans(plans: Plans) -> str:
    """One row per configuration, then normalisation and the planner's notes."""
    header = ("configuration", "spacing mm", "median shape", "patch", "batch", "pools", "features", "dice")
    rows = [header]
    for c in plans.configurations.values():
        features = (c.network or {}).get("features_per_stage") or c.features_per_stage
        spacing = c.spacing[1:] if c.network_dims == 2 else c.spacing
        median = c.median_shape[1:] if c.network_dims == 2 else c.median_shape
        rows.append(
            (
                c.name + (f" (after {c.previous_stage})" if c.previous_stage else ""),
                _x([round(s, 4) for s in spacing]),
                _x(median),
                _x(c.patch_size),
                str(c.batch_size),
                ",".join(map(str, c.num_pool_per_axis)),
                f"{features[0]}..{features[-1]}"
                + (f" ({len(features)} stages)" if features != c.features_per_stage else ""),
                "batch" if c.batch_dice else "sample",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    first = next(iter(plans.configurations.values()))
    norm = ", ".join(
        f"{n.name}: {n.scheme}" + (" in nonzero mask" if n.use_nonzero_mask else "") for n in first.normalization
    )
    lines.append(f"normalisation: {norm}" + ("; plus a one-hot foreground channel" if first.foreground_channel else ""))
    if first.regions:
        regions = ", ".join(f"{r.name} {{{', '.join(map(str, r.labels))}}}" for r in first.regions.regions)
        lines.append(f"regions (sigmoid outputs): {regions}")
    if plans.recipe != "nnunet":
        lines.append(f"recipe: {plans.recipe} (training preset {first.training_preset})")
    lines.append("axes (network order) = raw (z, y, x) permuted by " + str(first.transpose_forward))
    lines.extend(n if n.startswith("warning:") else f"note: {n}" for n in plans.notes)
    return "\n".join(lines)
