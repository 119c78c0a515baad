"""Planning presets ("recipes"): the nnU-Net paper's planner (seed 001), NVIDIA's BraTS recipe
(seed 004), and nnU-Net v2's planner with its residual-encoder presets
(``nnunetv2``, ``resenc-m``, ``resenc-l``, ``resenc-xl``: :mod:`autounet.planning.planner_v2`).

``nnunet`` (default): :func:`planner.plan_experiment`. When the dataset declares overlapping
regions (nnU-Net v2 ``dataset.json``), every configuration trains one sigmoid output per region
and no cascade is planned (its next-stage inputs are class maps).

``brats`` (seed 004, DESIGN §4.7): one configuration, ``3d_fullres``:

* regions WT / TC / ET (the dataset's declared regions, else :func:`regions.brats_regions_for`
  from its label values), with seed 004 §2.5's thresholds 0.45 / 0.4 / 0.45 stored in the plan;
* per-channel z-score inside the nonzero region for every channel (§2.2), the background set to
  0, and an extra one-hot foreground input channel;
* a constant non-zero background is detected per channel (:func:`detect_background`) and treated
  as zero for cropping and the nonzero mask;
* patch 128³, or per axis the median shape where it is smaller (rounded up to a multiple of
  2^pools), or ``patch_size``; the batch by the planner's rules (2 at 128³);
* network: seed 004's depth-7 encoder with 64, 96, 128, 192, 256, 384, 512 features (fewer
  stages when the patch cannot be halved six times), strided-convolution down-sampling, deep
  supervision with two extra heads;
* training preset ``nvidia`` and augmentation preset ``nvidia``.

Where seed 004 is silent: target spacing is the median spacing (BraTS is already 1 mm
isotropic); the median shape that limits the patch is that of the cases cropped with the detected
background removed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np

from autounet.data.dataset import without_ignore
from autounet.errors import AutounetError
from autounet.planning.fingerprint import Fingerprint
from autounet.planning.planner import PlannerOptions, _configuration, plan_experiment, small_case_warnings
from autounet.planning.planner_v2 import PRESETS as V2_PRESETS
from autounet.planning.planner_v2 import plan_v2
from autounet.planning.plans import ChannelNormalization, ConfigurationPlan, Plans
from autounet.planning.topology import NVIDIA_FEATURES, max_stages, pools_for_size, round_up_to_pools
from autounet.regions import RegionSet, brats_regions_for, regions_from_v2

RECIPES = ("nnunet", "brats", *V2_PRESETS)
BRATS_PATCH_EDGE = 128
BRATS_DEEP_SUPERVISION_HEADS = 2
BRATS_REGION_NAMES = ("WT", "TC", "ET")
# Corner values of different cases closer than this are "the same" background.
BACKGROUND_AGREEMENT = 1e-6


def check_recipe(recipe: str | None) -> str:
    recipe = recipe or "nnunet"
    if recipe not in RECIPES:
        raise AutounetError(f"unknown planning recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return recipe


def check_patch_size(recipe: str, patch_size: list[int] | None) -> None:
    """A ``--patch-size`` override has the dimensionality of the recipe's patch: three edges
    (Z Y X) for ``brats``, whose one configuration is 3D; ``nnunet`` plans its patches itself."""
    if patch_size is None:
        return
    if recipe != "brats":
        raise AutounetError("--patch-size applies to --recipe brats only")
    if len(patch_size) != 3:
        raise AutounetError(
            f"--patch-size needs 3 values (Z Y X) for the 3D patch of --recipe brats, got {len(patch_size)}: "
            + " ".join(map(str, patch_size))
        )
    if any(int(p) < 1 for p in patch_size):
        raise AutounetError(f"--patch-size needs positive edges, got {' '.join(map(str, patch_size))}")


def check_memory_target(recipe: str, gpu_memory_target_gb: float | None) -> None:
    """``--gpu-memory-target`` applies to the nnU-Net v2 recipes, which size patches by memory."""
    if gpu_memory_target_gb is None:
        return
    if recipe not in V2_PRESETS:
        raise AutounetError(f"--gpu-memory-target applies to --recipe {', '.join(V2_PRESETS)} only, not {recipe}")
    if not (isinstance(gpu_memory_target_gb, (int, float)) and math.isfinite(gpu_memory_target_gb)) or not (
        0 < gpu_memory_target_gb <= 10_000
    ):
        raise AutounetError(f"--gpu-memory-target must be a number of GB in (0, 10000], got {gpu_memory_target_gb}")


def has_background_info(fp: Fingerprint) -> bool:
    """Whether the fingerprint recorded the corner values the brats preset needs (newer fingerprints)."""
    return all(c.corner_values is not None and len(c.corner_values) == fp.num_channels for c in fp.cases)


def detect_background(fp: Fingerprint) -> list[float | None]:
    """Per channel: the value every case's 8 corners hold (0.0 when it is 0 or when no case has
    constant corners), or None when the cases' constant corner values differ, so each case's own
    is used (data z-scored per case before release, such as brats2015-mini)."""
    out: list[float | None] = []
    if not has_background_info(fp):
        return [None] * fp.num_channels
    for c in range(fp.num_channels):
        values = [case.corner_values[c] for case in fp.cases]
        constant = [v for v in values if v is not None]
        if len(constant) == len(values) and max(constant) - min(constant) <= BACKGROUND_AGREEMENT:
            out.append(float(constant[0]))
        elif any(v != 0 for v in constant):
            out.append(None)
        else:
            out.append(0.0)
    return out


def _background_cropped(fp: Fingerprint) -> Fingerprint:
    """The fingerprint with each case's crop box taken with its background removed."""
    cases = []
    for c in fp.cases:
        box = c.background_crop_bbox
        if box is None or box == c.crop_bbox:
            cases.append(c)
            continue
        shape = [int(b - a) for a, b in box]
        fraction = float(np.prod(shape) / np.prod(c.shape_before_crop))
        cases.append(replace(c, crop_bbox=[list(b) for b in box], shape_after_crop=shape, crop_voxel_fraction=fraction))
    return replace(fp, cases=cases)


def regions_from_fingerprint(fp: Fingerprint) -> RegionSet | None:
    """Regions of the dataset.json a fingerprint came from, or None.

    As in nnU-Net v2, once one label is a list every foreground label is a region; the fingerprint
    keeps the list-valued ones and the label names (auto-named ``"REGION:value"`` for values only
    regions declare), not their order in the file, so regions are ordered outermost first (larger
    unions before the ones they contain), which is what the file must have said.
    """
    if not fp.regions:
        return None
    labels = {int(k): v for k, v in without_ignore(fp.labels).items()}
    items = {name: [int(v) for v in values] for name, values in fp.regions.items()}
    auto = {f"{name}:{v}" for name, values in items.items() for v in values}
    for value, name in sorted(labels.items()):
        if value != 0 and name not in auto and name not in items:
            items[name] = [value]
    ordered = sorted(items.items(), key=lambda kv: -len(set(kv[1])))  # stable: file order among equals
    return regions_from_v2(dict(ordered), labels)


def _with_regions(plans: Plans, regions: RegionSet) -> Plans:
    """Every configuration trains the declared regions; the cascade is dropped."""
    configs = {}
    for name, c in plans.configurations.items():
        if c.previous_stage or c.next_stage:
            continue
        configs[name] = replace(c, regions=regions)
    notes = list(plans.notes)
    if len(configs) < len(plans.configurations):
        notes = [n for n in notes if not n.startswith("cascade planned")]
        notes.append("no cascade for a region-based dataset: its next stage would need class maps.")
    notes.append(f"region-based training: {', '.join(regions.names)} (one sigmoid output each).")
    return replace(plans, configurations=configs, notes=notes)


def _brats_patch(median: list[int], opts: PlannerOptions, patch_size: list[int] | None) -> tuple[list[int], str]:
    if patch_size is not None:
        check_patch_size("brats", patch_size)
        wanted = [int(p) for p in patch_size]
        patch = [round_up_to_pools(p, opts.max_pools_3d, opts.min_feature_map) for p in wanted]
        how = "given" + (f" ({'x'.join(map(str, wanted))} rounded to multiples of 2^pools)" if patch != wanted else "")
        return patch, how
    target = [min(BRATS_PATCH_EDGE, int(m)) for m in median]
    patch = [round_up_to_pools(t, opts.max_pools_3d, opts.min_feature_map) for t in target]
    return patch, f"min({BRATS_PATCH_EDGE}, median shape) per axis"


def default_brats_regions(fp: Fingerprint) -> RegionSet:
    """WT / TC / ET from the dataset's label values, named as BraTS reports them (and
    `autounet evaluate --regions WT=...`)."""
    regions = brats_regions_for(int(v) for v in without_ignore(fp.labels))
    return replace(regions, regions=[replace(r, name=n) for r, n in zip(regions.regions, BRATS_REGION_NAMES)])


def plan_brats(
    fp: Fingerprint,
    regions: RegionSet | None = None,
    options: PlannerOptions | None = None,
    patch_size: list[int] | None = None,
) -> Plans:
    """Seed 004's BraTS recipe from a fingerprint (see the module docstring)."""
    opts = options or PlannerOptions()
    if regions is None:
        regions = default_brats_regions(fp)
    background = detect_background(fp)
    cropped = _background_cropped(fp) if any(v != 0 for v in background) else fp
    base = plan_experiment(cropped, opts)
    if "3d_fullres" not in base.configurations:
        raise AutounetError("the brats recipe needs 3D images; the median case of this dataset has a single slice")
    full = base.configurations["3d_fullres"]
    patch, how = _brats_patch(full.median_shape, opts, patch_size)
    common = {
        "transpose_forward": list(full.transpose_forward),
        "transpose_backward": list(full.transpose_backward),
        "normalization": [
            ChannelNormalization(channel=n.channel, name=n.name, scheme="zscore", use_nonzero_mask=True)
            for n in full.normalization
        ],
        "resampling": copy.deepcopy(full.resampling),
        "num_input_channels": fp.num_channels + 1,
        "num_classes": full.num_classes,
        "ignore_label": full.ignore_label,
    }
    nominal = int(opts.batch_size_3d * opts.patch_edge_3d**3 // math.prod(patch))
    dataset_voxels = float(np.prod(full.median_shape)) * fp.num_cases
    plan: ConfigurationPlan = _configuration(
        "3d_fullres",
        3,
        np.asarray(full.spacing),
        np.asarray(full.median_shape),
        patch,
        nominal,
        dataset_voxels,
        common,
        opts,
    )
    stages = min(len(NVIDIA_FEATURES), max_stages(plan))
    heads = min(BRATS_DEEP_SUPERVISION_HEADS, max(0, stages - 2))
    plan = replace(
        plan,
        batch_dice=True,
        regions=regions,
        foreground_channel=True,
        background=background,
        network={
            "features_per_stage": list(NVIDIA_FEATURES[:stages]),
            "downsampling": "strided_conv",
            "deep_supervision_heads": heads,
        },
        training_preset="nvidia",
        augmentation_preset="nvidia",
    )
    notes = [
        f"brats preset (seed 004): one configuration, 3d_fullres; patch {'x'.join(map(str, patch))} ({how}); "
        f"batch {plan.batch_size}; pools {','.join(map(str, pools_for_size_list(patch, opts)))}.",
        f"regions {', '.join(f'{r.name} {set(r.labels)}' for r in regions.regions)}, thresholds "
        f"{', '.join(f'{t:g}' for t in regions.thresholds)}.",
        f"network: {stages} stages with {', '.join(map(str, NVIDIA_FEATURES[:stages]))} features, strided "
        f"convolutions, {heads} deep-supervision heads; a one-hot foreground input channel.",
        "background per channel: "
        + ", ".join(
            f"{n.name}: " + ("each case's corner value" if v is None else f"{v:.6g}")
            for n, v in zip(full.normalization, background)
        )
        + (" (treated as zero for cropping and the nonzero mask)" if any(v != 0 for v in background) else "")
        + ".",
    ]
    if stages < len(NVIDIA_FEATURES):
        notes.append(f"the patch allows only {stages} of seed 004's {len(NVIDIA_FEATURES)} encoder stages.")
    return replace(base, planner="brats-seed004", recipe="brats", configurations={"3d_fullres": plan}, notes=notes)


def pools_for_size_list(patch: list[int], opts: PlannerOptions) -> list[int]:
    return [pools_for_size(p, opts.max_pools_3d, opts.min_feature_map) for p in patch]


def plan_with_recipe(
    fp: Fingerprint,
    recipe: str | None = None,
    regions: RegionSet | None = None,
    options: PlannerOptions | None = None,
    patch_size: list[int] | None = None,
    gpu_memory_target_gb: float | None = None,
) -> Plans:
    """Plans for ``recipe`` (one of :data:`RECIPES`); ``regions``: the dataset's declared regions;
    ``gpu_memory_target_gb``: the nnU-Net v2 recipes' memory target (default: the preset's)."""
    recipe = check_recipe(recipe)
    check_patch_size(recipe, patch_size)
    check_memory_target(recipe, gpu_memory_target_gb)
    if recipe == "brats":
        plans = plan_brats(fp, regions, options, patch_size)
    elif recipe in V2_PRESETS:
        plans = plan_v2(fp, recipe, gpu_memory_target_gb)
        plans = _with_regions(plans, regions) if regions is not None else plans
    else:
        plans = plan_experiment(fp, options)
        plans = _with_regions(plans, regions) if regions is not None else plans
    return replace(plans, notes=[*plans.notes, *small_case_warnings(fp, plans)])
