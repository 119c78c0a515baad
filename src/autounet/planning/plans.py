"""Plans: the planner's output, one entry per configuration, stored as ``W/NAME/plans.json``.

Plain data only (the schema is documented in ``docs/formats.md``). Every configuration entry is
self-contained: preprocessing, the network topology and the loss mode can be rebuilt from it
alone, so a checkpoint can carry its entry and need nothing else.

Axis order: arrays of a configuration (``spacing``, ``median_shape``, ``patch_size``, kernel
sizes) are in *network order*: the preprocessed image is the raw ``(Z, Y, X)`` array permuted by
``transpose_forward``, which puts the axis with the coarsest spacing first. 2D configurations
drop that first axis (they see slices of it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autounet.errors import AutounetError
from autounet.regions import RegionSet
from autounet.utils.atomic import atomic_write_json
from autounet.utils.plain_data import load_json_dataclass, to_plain

PLANS_SCHEMA_VERSION = 1

CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


@dataclass
class ChannelNormalization:
    """How one input channel is normalised (seed 001 §2.2).

    ``scheme``: ``ct`` (clip to ``[clip_low, clip_high]``, then ``(x - mean) / std`` with the
    dataset's foreground statistics), ``zscore`` (per case), ``rescale_0_1`` (per case min-max)
    or ``none``. ``use_nonzero_mask``: normalise inside the nonzero region only, 0 outside.
    """

    channel: int
    name: str
    scheme: str
    use_nonzero_mask: bool
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass
class ResamplingPlan:
    """Interpolation orders for resampling to the target spacing (seed 001 §2.2).

    When the data is anisotropic (largest / smallest spacing > ``anisotropy_threshold``) the
    coarse axis is resampled separately with the ``*_low_res_axis`` orders.
    """

    image_order: int = 3
    label_order: int = 0
    anisotropy_threshold: float = 3.0
    image_order_low_res_axis: int = 0
    label_order_low_res_axis: int = 0


@dataclass
class ConfigurationPlan:
    name: str
    network_dims: int  # 2 or 3
    data_identifier: str  # preprocessed/<data_identifier>/ holds this configuration's data
    transpose_forward: list[int]  # raw (Z, Y, X) axis -> network axis
    transpose_backward: list[int]
    spacing: list[float]  # target spacing, mm, network order (3 values, also for 2D)
    median_shape: list[int]  # median case shape at ``spacing``, network order (3 values)
    patch_size: list[int]  # 2 or 3 values
    batch_size: int
    num_pool_per_axis: list[int]
    pool_op_kernel_sizes: list[list[int]]  # one per down-sampling step
    conv_kernel_sizes: list[list[int]]  # one per stage (= pools + 1)
    features_per_stage: list[int]
    batch_dice: bool  # Dice over the batch as one pseudo-volume (True) or per sample (False)
    in_plane_augmentation: bool  # spatial augmentation slice-wise (3D patch edge ratio > 2)
    normalization: list[ChannelNormalization]
    resampling: ResamplingPlan
    num_input_channels: int  # network input channels: image channels (+1 foreground channel) (+ the cascade's classes)
    num_classes: int  # including background, without the ignore label
    previous_stage: str | None = None
    next_stage: str | None = None
    # Region-based training (seed 004 §2.4): one sigmoid output per region; None: softmax over
    # the classes.
    regions: RegionSet | None = None
    # Seed 004 §2.2: an extra input channel, 1 inside the (hole-filled) nonzero mask, 0 outside.
    foreground_channel: bool = False
    # Per image channel, the intensity that counts as "zero" for cropping and the nonzero mask:
    # a number (the same in every case), or null (each case's own: the value of its 8 corners
    # when they agree, else 0). None: 0 for every channel (seed 001).
    background: list[float | None] | None = None
    # Keyword overrides of networks.spec.spec_from_plan (plain data), e.g. seed 004's encoder.
    network: dict[str, Any] = field(default_factory=dict)
    training_preset: str = "paper"  # used by `autounet train` without --preset
    augmentation_preset: str | None = None  # None: the training preset's
    # Sparse annotations (nnU-Net v2's ignore label): the raw label value of unannotated voxels,
    # or None. It is no class: stored class index ``num_classes`` (it is the highest value), no
    # network output, left out of every loss term and metric.
    ignore_label: int | None = None
    # nnU-Net v2 recipes: the planner's static estimate of one sample's feature-map values and
    # the GPU memory it stands for at this batch (GB); None for the seed 001 / 004 recipes.
    feature_map_voxels: int | None = None
    estimated_memory_gb: float | None = None

    @property
    def image_channels(self) -> int:
        """Channels of the raw image (what preprocessing reads)."""
        return len(self.normalization)


@dataclass
class Plans:
    dataset_name: str
    planner: str
    channel_names: list[str]
    labels: dict[str, str]  # the classes, value -> name (an `ignore` label is not one: see ignore_label)
    original_median_spacing: list[float]  # raw (z, y, x) order
    original_median_shape: list[int]  # after cropping, at the original spacing, raw order
    configurations: dict[str, ConfigurationPlan]
    notes: list[str] = field(default_factory=list)
    schema_version: int = PLANS_SCHEMA_VERSION
    recipe: str = "nnunet"  # planning preset: "nnunet" (seed 001), "brats" (seed 004), "nnunetv2", "resenc-m|l|xl"
    gpu_memory_target_gb: float | None = None  # the nnU-Net v2 recipes' memory target

    @property
    def ignore_label(self) -> int | None:
        """The ignore label's value (every configuration has the same), or None; ``labels`` lacks it."""
        values = {c.ignore_label for c in self.configurations.values()}
        if len(values) > 1:
            raise AutounetError(f"plans of {self.dataset_name}: the configurations disagree on ignore_label {values}")
        return values.pop() if values else None

    def configuration(self, name: str) -> ConfigurationPlan:
        if name not in self.configurations:
            raise AutounetError(
                f"configuration '{name}' is not planned for {self.dataset_name}; planned: {', '.join(self.configurations)}"
            )
        return self.configurations[name]


def save_plans(plans: Plans, path: str | Path) -> None:
    atomic_write_json(path, to_plain(plans))


def load_plans(path: str | Path) -> Plans:
    """``path``'s plans, refused (naming the file and field) when a value is out of range: plans may come
    from strangers (``--plans-from``, a model package), and a negative patch or a NaN spacing would
    otherwise fail deep inside preprocessing or training."""
    plans = load_json_dataclass(Plans, path, "plans", PLANS_SCHEMA_VERSION, hint="run `autounet plan` first")
    problem = plans_problem(plans)
    if problem:
        raise AutounetError(f"{path}: invalid plans: {problem}")
    return plans


MAX_PATCH_EDGE = 4096  # voxels; far above any planned patch


def plans_problem(plans: Plans) -> str | None:
    """What makes ``plans`` unusable (sizes, spacings, axis orders, kernel lists), or None."""
    if not _finite_positive(plans.original_median_spacing, 3):
        return f"original_median_spacing {plans.original_median_spacing}: expected 3 finite numbers > 0"
    if not plans.configurations:
        return "no configuration"
    for name, c in plans.configurations.items():
        problem = _configuration_problem(c, plans.configurations)
        if problem:
            return f"configuration {name}: {problem}"
    return None


def _finite_positive(values: list[float], count: int) -> bool:
    return len(values) == count and all(v == v and 0 < v < float("inf") for v in values)


def _whole(values: list[int], count: int, low: int = 1, high: int = MAX_PATCH_EDGE) -> bool:
    return len(values) == count and all(low <= v <= high for v in values)


def _configuration_problem(c: ConfigurationPlan, configurations: dict[str, ConfigurationPlan]) -> str | None:
    dims = c.network_dims
    if dims not in (2, 3):
        return f"network_dims {dims}: expected 2 or 3"
    if sorted(c.transpose_forward) != [0, 1, 2] or [c.transpose_forward[i] for i in c.transpose_backward] != [0, 1, 2]:
        return f"transpose_forward {c.transpose_forward} / transpose_backward {c.transpose_backward}: not inverse axis orders"
    if not _finite_positive(c.spacing, 3):
        return f"spacing {c.spacing}: expected 3 finite numbers > 0"
    if not _whole(c.median_shape, 3, high=2**31):
        return f"median_shape {c.median_shape}: expected 3 whole numbers > 0"
    if not _whole(c.patch_size, dims):
        return f"patch_size {c.patch_size}: expected {dims} whole numbers in 1..{MAX_PATCH_EDGE}"
    if c.batch_size < 1:  # nnU-Net v2's 2D plans of small images reach thousands
        return f"batch_size {c.batch_size}: expected a whole number > 0"
    if not all(_whole(k, dims, high=64) for k in c.pool_op_kernel_sizes):
        return f"pool_op_kernel_sizes {c.pool_op_kernel_sizes}: expected {dims} whole numbers in 1..64 per step"
    if len(c.conv_kernel_sizes) != len(c.pool_op_kernel_sizes) + 1 or not all(
        _whole(k, dims, high=64) for k in c.conv_kernel_sizes
    ):
        return f"conv_kernel_sizes {c.conv_kernel_sizes}: expected {len(c.pool_op_kernel_sizes) + 1} stages of {dims} sizes"
    if len(c.features_per_stage) != len(c.conv_kernel_sizes) or not all(1 <= f <= 65536 for f in c.features_per_stage):
        return f"features_per_stage {c.features_per_stage}: expected {len(c.conv_kernel_sizes)} numbers in 1..65536"
    if not c.normalization or not 1 <= c.num_input_channels <= 4096 or not 1 <= c.num_classes <= 65536:
        return "no channel normalisation, or input channels / classes out of range"
    for stage in (c.previous_stage, c.next_stage):
        if stage is not None and stage not in configurations:
            return f"stage {stage!r} is not one of the configurations"
    return None
