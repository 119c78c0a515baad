"""Plans from a source: plan a new dataset with another dataset's networks (`autounet plan RAW --plans-from SOURCE`).

A pure function, :func:`plans_from_source`: the source's plans and the new dataset's fingerprint
in, plans out. It is how a network trained on one dataset is fine-tuned on another (`autounet
train ... --pretrained SOURCE`): the weights fit only when the networks are the same.

Taken from the source, per configuration: the configurations themselves, the axis order
(``transpose_forward``), the target spacing, the patch, the pooling and convolution kernels, the
features per stage and the recipe's network entry, Dice mode and in-plane augmentation, the
resampling orders, the training and augmentation presets, and the normalisation of each channel
(``ct``/``zscore``/..., whether it applies inside the nonzero mask, and a CT channel's clip window,
mean and std, as nnU-Net transfers them): the network sees inputs on the same grid and scale as
the ones it was trained on.

Taken from the new dataset: its name, channel names, labels (the networks' output count follows
them: one per class, or per region when the new dataset declares regions or the source is a
``brats`` plan, whose WT/TC/ET regions are re-derived from the new labels), its median shapes at
the source's spacing, the batch size by the planner's rule (nominal batch for the patch, capped at
5% of the new dataset's voxels, at least 2: a small dataset gets a small batch), the background
values of a ``brats`` plan, and the small-case warnings. A note says when the labels (or regions)
differ from the source's: the networks' output heads are then re-initialised by ``--pretrained``
(:mod:`autounet.training.pretrained`), which copies them only for the same labels.

Refused: a different number of image channels (the first convolution could not take the
inputs). A region-based dataset gets no cascade (as :mod:`autounet.planning.recipes`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from autounet.data.dataset import ignore_label_of, without_ignore
from autounet.errors import AutounetError
from autounet.planning.fingerprint import Fingerprint
from autounet.planning.planner import (
    PlannerOptions,
    _batch_size,
    _median_shape_at,
    _round_half_up,
    _validate,
    small_case_warnings,
)
from autounet.planning.plans import ChannelNormalization, ConfigurationPlan, Plans, load_plans
from autounet.planning.recipes import _background_cropped, default_brats_regions, detect_background
from autounet.regions import RegionSet
from autounet.utils.loaders import regular_file
from autounet.workspace import Workspace

TRANSFER_NOTE = "plans from "  # how the first note of transferred plans begins


def source_plans_path(source: str | Path) -> Path:
    """``plans.json`` of a source: a planned workspace folder ``W/NAME`` or a plans.json file."""
    source = Path(source)
    if source.is_dir():
        path = Workspace.of(source).plans_json
        if not path.is_file():
            raise AutounetError(
                f"--plans-from {source}: no plans.json there; give a planned workspace W/NAME, a model package .zip "
                "or a plans.json file"
            )
        return path
    if not source.exists():
        raise AutounetError(
            f"--plans-from {source}: not found; give a planned workspace W/NAME, a model package .zip or a plans.json file"
        )
    return regular_file(source, "plans", "cannot read the plans")  # a FIFO would block the read forever


def load_source_plans(source: str | Path) -> Plans:
    """The plans of ``source`` (see :func:`source_plans_path`), with one clear error when unusable."""
    return load_plans(source_plans_path(source))


def _labels(labels: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])))


def _normalization(source: list[ChannelNormalization], fp: Fingerprint) -> tuple[list[ChannelNormalization], list[str]]:
    """The source's normalisation per channel, a CT channel's statistics included (the pretrained
    network learnt on inputs scaled by them), under this dataset's channel names."""
    out, notes = [], []
    for src, name in zip(source, fp.channel_names):
        out.append(replace(src, name=name))
        if src.name != name:
            notes.append(
                f"channel {src.channel} is '{name}' here and '{src.name}' in the source: normalised as {src.scheme}."
            )
        if src.scheme == "ct":
            st = fp.foreground_intensity_per_channel[src.channel]
            notes.append(
                f"channel {src.channel} ({name}, CT): the source's normalisation is kept (clip {src.clip_low:.4g} to "
                f"{src.clip_high:.4g}, mean {src.mean:.4g}, std {src.std:.4g}); this dataset's own foreground would "
                f"give clip {st.percentile_00_5:.4g} to {st.percentile_99_5:.4g}, mean {st.mean:.4g}, std {st.std:.4g}."
            )
    return out, notes


def same_outputs(
    labels: dict[str, str], regions: RegionSet | None, other_labels: dict[str, str], other_regions: RegionSet | None
) -> bool:
    """Whether two networks' outputs mean the same: the same labels (value and name) and the same
    regions (name and labels). Only then does `train --pretrained` copy the output heads."""

    def outputs(r: RegionSet | None) -> list[tuple[str, list[int]]] | None:
        return None if r is None else [(x.name, list(x.labels)) for x in r.regions]

    return dict(labels) == dict(other_labels) and outputs(regions) == outputs(other_regions)


def _same_outputs(source: Plans, classes: dict[str, str], regions: RegionSet | None) -> bool:
    source_regions = next((c.regions for c in source.configurations.values() if c.regions), None)
    return same_outputs(source.labels, source_regions, classes, regions)


def _nominal_batch(dims: int, patch: list[int], opts: PlannerOptions) -> int:
    """The batch that processes as many voxels per step as the planner's starting point (seed 001 §2.1)."""
    per_step = opts.batch_size_2d * opts.patch_edge_2d**2 if dims == 2 else opts.batch_size_3d * opts.patch_edge_3d**3
    return max(1, int(per_step // math.prod(patch)))


def _configuration(
    src: ConfigurationPlan,
    fp: Fingerprint,
    regions: RegionSet | None,
    num_classes: int,
    opts: PlannerOptions,
) -> ConfigurationPlan:
    forward, backward = list(src.transpose_forward), list(src.transpose_backward)
    spacing_net = np.asarray(src.spacing, dtype=float)
    background = detect_background(fp) if src.background is not None else None
    shapes_from = _background_cropped(fp) if background is not None and any(v != 0 for v in background) else fp
    median_net = _median_shape_at(shapes_from, spacing_net[backward])[forward]
    normalization, _ = _normalization(src.normalization, fp)
    patch_voxels = math.prod(src.patch_size)
    batch = _batch_size(
        _nominal_batch(src.network_dims, src.patch_size, opts),
        patch_voxels,
        float(np.prod(median_net)) * fp.num_cases,
        opts,
    )
    inputs = fp.num_channels + (1 if src.foreground_channel else 0) + (num_classes - 1 if src.previous_stage else 0)
    return replace(
        copy.deepcopy(src),
        median_shape=[int(s) for s in median_net],
        batch_size=batch,
        normalization=normalization,
        num_input_channels=inputs,
        num_classes=num_classes,
        regions=copy.deepcopy(regions),
        background=background,
        ignore_label=ignore_label_of(fp.labels),
    )


def plans_from_source(
    source: Plans,
    fp: Fingerprint,
    source_label: str,
    regions: RegionSet | None = None,
    options: PlannerOptions | None = None,
) -> Plans:
    """Plans for the dataset of ``fp`` with the networks of ``source`` (see the module docstring).

    ``regions``: the new dataset's declared regions (None: none declared); ``source_label``: how
    the plans' first note names the source (its path).
    """
    opts = options or PlannerOptions()
    _validate(fp)
    if len(source.channel_names) != fp.num_channels:
        raise AutounetError(
            f"cannot plan from {source_label}: its networks take {len(source.channel_names)} image channel(s) "
            f"({', '.join(source.channel_names)}) and this dataset has {fp.num_channels} "
            f"({', '.join(fp.channel_names)})"
        )
    if not source.configurations:
        raise AutounetError(f"cannot plan from {source_label}: its plans hold no configuration")
    source_regions = next((c.regions for c in source.configurations.values() if c.regions), None)
    if regions is None and source_regions is not None and source.recipe == "brats":
        regions = default_brats_regions(fp)
    classes = without_ignore(fp.labels)
    num_classes = len(classes)
    configs: dict[str, ConfigurationPlan] = {}
    for name, src in source.configurations.items():
        if regions is not None and (src.previous_stage or src.next_stage):
            continue  # a cascade's next stage would need class maps
        configs[name] = _configuration(src, fp, regions, num_classes, opts)
    if not configs:
        raise AutounetError(
            f"cannot plan from {source_label}: its only configurations are a cascade, which a region-based dataset cannot use"
        )

    names = ", ".join(configs)
    notes = [
        f"{TRANSFER_NOTE}{source_label} ({source.dataset_name}, planner {source.planner}): {names} keep its target "
        "spacing, patch, network topology and normalisation (a CT channel's statistics too); batch size and labels "
        "are this dataset's."
    ]
    notes.extend(_normalization(next(iter(source.configurations.values())).normalization, fp)[1])
    for name, plan in configs.items():
        before = source.configurations[name].batch_size
        if plan.batch_size != before:
            notes.append(
                f"{name}: batch {plan.batch_size} here, {before} in the source (the planner's rule: at most 5% of this "
                f"dataset's {fp.num_cases} cases' voxels, at least {opts.min_batch_size})."
            )
    median_spacing = np.median(fp.spacings(), axis=0)
    first = next(iter(configs.values()))
    target = np.asarray(first.spacing, dtype=float)[list(first.transpose_backward)]
    if not np.allclose(median_spacing, target, rtol=0.05):
        notes.append(
            f"this dataset's median spacing is {'x'.join(f'{s:.4g}' for s in median_spacing)} mm (z, y, x); its images "
            f"are resampled to the source's {'x'.join(f'{s:.4g}' for s in target)} mm."
        )
    if not _same_outputs(source, classes, regions):
        outputs = f"{len(regions.regions)} region(s)" if regions is not None else f"{num_classes} classes"
        what = "labels" if dict(source.labels) != classes else "regions"
        notes.append(
            f"{what} differ from the source's ({_labels(source.labels)}; here {_labels(classes)}): the networks "
            f"have {outputs} as outputs, and `train --pretrained` re-initialises their output heads."
        )
    if len(configs) < len(source.configurations):
        notes.append("no cascade for a region-based dataset: its next stage would need class maps.")
    plans = Plans(
        dataset_name=fp.dataset_name,
        planner=f"transfer:{source.planner}",
        channel_names=list(fp.channel_names),
        labels=classes,
        original_median_spacing=[float(s) for s in median_spacing],
        original_median_shape=[int(s) for s in _round_half_up(np.median(fp.shapes_after_crop(), axis=0))],
        configurations=configs,
        notes=notes,
        recipe=source.recipe,
    )
    return replace(plans, notes=[*plans.notes, *small_case_warnings(fp, plans)])
