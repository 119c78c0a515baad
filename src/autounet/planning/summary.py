"""A readable table of plans, printed by `autounet plan`."""

from __future__ import annotations

from autounet.planning.plans import ConfigurationPlan, Plans


def _x(values) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def network_description(plan: ConfigurationPlan) -> str:
    """The network in words: its encoder's blocks per stage, and the nnU-Net v2 recipes' memory estimate."""
    network = plan.network or {}
    blocks = network.get("encoder_blocks_per_stage")
    stages = len(network.get("features_per_stage") or plan.features_per_stage)
    decoder = network.get("decoder_convs_per_stage", 2)
    if blocks:
        text = f"residual encoder, blocks per stage {','.join(map(str, blocks))}, {decoder} conv(s) per decoder stage"
    else:
        text = f"{stages} stages of two convolutions, {decoder} per decoder stage"
    if plan.estimated_memory_gb is not None:
        text += f"; ~{plan.estimated_memory_gb:g} GB estimated at batch {plan.batch_size}"
    return text


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
        memory = f", GPU memory target {plans.gpu_memory_target_gb:g} GB" if plans.gpu_memory_target_gb else ""
        lines.append(f"recipe: {plans.recipe} (training preset {first.training_preset}){memory}")
    if plans.gpu_memory_target_gb is not None:
        lines.extend(f"network {c.name}: {network_description(c)}" for c in plans.configurations.values())
    lines.append("axes (network order) = raw (z, y, x) permuted by " + str(first.transpose_forward))
    lines.extend(n if n.startswith("warning:") else f"note: {n}" for n in plans.notes)
    return "\n".join(lines)
