"""What a training run is made of, before any training: the plan entry it uses, the network spec
and the loss, from the plan, the training preset and `autounet train`'s switches.

Seed 004's ablation switches (Tables 2-3) end up in plain data a checkpoint stores, so a resumed
run and inference rebuild exactly the same thing: the network switches in the
:class:`~autounet.networks.spec.NetworkSpec`, Focal loss in the training preset
(``focal_loss``), dropping the one-hot foreground channel in the run's plan entry
(``foreground_channel`` false, one input channel fewer).

Region plans (``plan.regions``) train one sigmoid output per region with BCE (or Focal) + batch
Dice per region; their targets are made on the device after augmentation: class indices (the
sampler's) -> label values -> region maps.

Sparse annotations (``plan.ignore_label``): the stored class index of unannotated voxels is
``plan.num_classes`` (the ignore label is the highest value); softmax losses leave that index out,
region targets mark those voxels with ``IGNORED_REGION_TARGET`` so region losses do too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from autounet.errors import AutounetError
from autounet.networks.spec import NetworkSpec, spec_from_plan
from autounet.planning.plans import ConfigurationPlan
from autounet.planning.topology import NVIDIA_FEATURES
from autounet.preprocessing.case import label_values
from autounet.regions import RegionSet, labels_to_regions_torch
from autounet.training.losses import IGNORED_REGION_TARGET, DeepSupervisionLoss, DiceCELoss, Reduce, RegionLoss
from autounet.training.options import TrainOptions
from autounet.training.schedule import TrainingPreset

# seed 004's public code uses DropBlock blocks of 5 voxels
DROP_BLOCK_SIZE = 5


def stored_channels(plan: ConfigurationPlan) -> int:
    """Channels of the stored preprocessed image the run reads: image channels (+ the foreground channel)."""
    return plan.image_channels + (1 if plan.foreground_channel else 0)


def run_plan(plan: ConfigurationPlan, foreground_channel: bool | None) -> ConfigurationPlan:
    """The plan entry a run uses: ``foreground_channel`` False drops the one-hot foreground input
    channel (the network gets one input channel fewer; the checkpoint's plan says so, and
    inference preprocesses without it)."""
    if foreground_channel is None or bool(foreground_channel) == plan.foreground_channel:
        return plan
    if foreground_channel:
        raise AutounetError(
            f"{plan.name} was planned without a foreground channel; plan with `autounet plan RAW --recipe brats` to add it"
        )
    return replace(plan, foreground_channel=False, num_input_channels=plan.num_input_channels - 1)


def network_overrides(options: TrainOptions) -> dict[str, Any]:
    """``spec_from_plan`` keywords for the switches set in ``options`` (None: the plan's)."""
    out: dict[str, Any] = {}
    if options.attention is not None:
        out["attention_gates"] = bool(options.attention)
    if options.residual is not None:
        out["residual_encoder"] = out["residual_decoder"] = bool(options.residual)
    if options.drop_block is not None:
        if not 0 <= options.drop_block < 1:
            raise AutounetError(f"--drop-block must be a probability in [0, 1), got {options.drop_block}")
        out["drop_block_prob"] = float(options.drop_block)
        out["drop_block_size"] = DROP_BLOCK_SIZE
    if options.deep_supervision_heads is not None:
        if options.deep_supervision_heads < 0:
            raise AutounetError(f"--deep-supervision-heads must be >= 0, got {options.deep_supervision_heads}")
        out["deep_supervision_heads"] = int(options.deep_supervision_heads)
    if options.deeper and options.features:
        raise AutounetError("give either --deeper or --features, not both")
    if options.deeper:
        out["features_per_stage"] = list(NVIDIA_FEATURES)
    if options.features:
        if any(int(f) < 1 for f in options.features):
            raise AutounetError(f"--features must all be positive, got {list(options.features)}")
        out["features_per_stage"] = [int(f) for f in options.features]
    if options.width_multiplier is not None:
        out["width_multiplier"] = float(options.width_multiplier)
    return out


def has_network_overrides(options: TrainOptions) -> bool:
    return bool(network_overrides(options))


def build_spec(plan: ConfigurationPlan, options: TrainOptions) -> NetworkSpec:
    """The network a run trains: the plan's (with its recipe's ``network`` entry) plus the switches."""
    try:
        return spec_from_plan(plan, **network_overrides(options))
    except AutounetError as exc:
        raise AutounetError(f"{plan.name}: {exc}") from None


def region_set(plan: ConfigurationPlan) -> RegionSet | None:
    return plan.regions


def ignore_index(plan: ConfigurationPlan) -> int | None:
    """The stored class index of unannotated voxels (the classes come first), or None."""
    return plan.num_classes if plan.ignore_label is not None else None


def build_losses(
    plan: ConfigurationPlan, preset: TrainingPreset, reduce: Reduce | None = None
) -> tuple[DeepSupervisionLoss, Any]:
    """Training loss (deep supervision over the heads) and validation loss (full resolution).

    Region plans: BCE (or Focal) + batch Dice per region (seed 004 §2.4); softmax plans: Dice +
    CE (or Focal) (seed 001 eq. 1). Deep-supervision weights 1, 1/2, 1/4, ..., normalised or not
    as the preset says.
    """
    if plan.regions:
        train = RegionLoss(focal=preset.focal_loss, batch_dice=plan.batch_dice, reduce=reduce)
        validation = RegionLoss(focal=preset.focal_loss, batch_dice=plan.batch_dice)
    else:
        ignore = ignore_index(plan)
        train = DiceCELoss(plan.batch_dice, reduce=reduce, focal=preset.focal_loss, ignore_index=ignore)
        validation = DiceCELoss(plan.batch_dice, focal=preset.focal_loss, ignore_index=ignore)
    return DeepSupervisionLoss(train, normalize=preset.deep_supervision_normalized), validation


class RegionTargets:
    """Class indices ``(B, 1, *S)`` (index i = the i-th declared label value) -> float region maps
    ``(B, R, *S)``; the ignore index (when given) becomes ``IGNORED_REGION_TARGET`` in every region."""

    def __init__(
        self,
        regions: RegionSet,
        labels: dict[str, str],
        device: torch.device | str = "cpu",
        ignore_label: int | None = None,
    ):
        self.regions = regions
        self.values = torch.as_tensor(label_values(labels, ignore_label), dtype=torch.long, device=device)
        self.ignore_index = len(self.values) - 1 if ignore_label is not None else None

    def __call__(self, seg: torch.Tensor) -> torch.Tensor:
        values = self.values.to(seg.device)[seg.long().clamp(0, len(self.values) - 1)]
        out = labels_to_regions_torch(values, self.regions)
        if self.ignore_index is not None:
            out = out.masked_fill(seg == self.ignore_index, IGNORED_REGION_TARGET)
        return out


@dataclass
class ModelSetup:
    plan: ConfigurationPlan  # the run's plan entry
    preset: TrainingPreset
    spec: NetworkSpec
    regions: RegionSet | None
    loss: DeepSupervisionLoss
    validation_loss: Any
    targets: RegionTargets | None  # None: the class indices are the targets


def apply_loss_options(preset: TrainingPreset, options: TrainOptions) -> TrainingPreset:
    if options.focal is None:
        return preset
    return replace(preset, focal_loss=bool(options.focal))


def model_setup(
    plan: ConfigurationPlan,
    preset: TrainingPreset,
    options: TrainOptions,
    labels: dict[str, str],
    device: torch.device | str = "cpu",
    reduce: Reduce | None = None,
) -> ModelSetup:
    """Plan entry, spec, loss and targets for ``options`` (no network is built, nothing trains)."""
    plan = run_plan(plan, options.foreground_channel)
    preset = apply_loss_options(preset, options)
    spec = build_spec(plan, options)
    regions = region_set(plan)
    loss, validation = build_losses(plan, preset, reduce)
    targets = RegionTargets(regions, labels, device, plan.ignore_label) if regions is not None else None
    return ModelSetup(plan, preset, spec, regions, loss, validation, targets)
