"""Assemble the training building blocks of one configuration from its workspace: the network,
the loss, the sampler and the augmenter, all configured by the plan and an augmentation preset
(the loss by the plan's training preset: region plans train sigmoid outputs on region targets)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from autounet.errors import AutounetError
from autounet.networks.spec import NetworkSpec, spec_from_plan
from autounet.networks.unet import UNet
from autounet.planning.plans import ConfigurationPlan, load_plans
from autounet.training.augmentation.pipeline import Augmenter
from autounet.training.augmentation.preset import AugmentationPreset, load_augmentation_preset
from autounet.training.losses import DeepSupervisionLoss
from autounet.training.sampler import PatchSampler, SamplerSettings
from autounet.training.schedule import load_training_preset
from autounet.training.setup import RegionTargets, build_losses, region_set, stored_channels
from autounet.workspace import Workspace


@dataclass
class TrainingComponents:
    plan: ConfigurationPlan
    spec: NetworkSpec
    network: UNet
    loss: DeepSupervisionLoss
    sampler: PatchSampler
    augmenter: Augmenter
    preset: AugmentationPreset
    device: torch.device
    targets: RegionTargets | None = None  # region plans: class indices -> region maps


def preprocessed_cases(folder: Path) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.json") if p.name != "manifest.json")


def build_components(
    work: str | Path | None,
    name: str,
    configuration: str,
    preset: str | Path | None = None,
    device: str | torch.device | None = None,
    cases: list[str] | None = None,
    seed: int = 0,
    previous_stage_dir: Path | None = None,
) -> TrainingComponents:
    """Network, loss (Dice + CE, or BCE + Dice per region, with deep supervision), sampler and
    augmenter for a configuration; ``preset``: augmentation preset (default: the plan's, else paper)."""
    ws = Workspace.at(work, name)
    plans = load_plans(ws.plans_json)
    plan = plans.configuration(configuration)
    folder = ws.preprocessed_dir(plan.data_identifier)
    cases = cases if cases is not None else preprocessed_cases(folder)
    if not cases:
        raise AutounetError(f"{folder}: no preprocessed cases (run `autounet preprocess {name} -c {configuration}`)")
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    aug_preset = load_augmentation_preset(preset or plan.augmentation_preset or "paper")
    augmenter = Augmenter(
        aug_preset,
        plan.patch_size,
        plan.in_plane_augmentation,
        image_channels=plan.image_channels,
        device=device,
        passthrough_channels=1 if plan.foreground_channel else 0,
    )
    settings = SamplerSettings(
        patch_size=tuple(plan.patch_size),
        sample_size=tuple(augmenter.sample_size),
        batch_size=plan.batch_size,
        foreground_mode=aug_preset.foreground.mode,
        foreground_value=aug_preset.foreground.value,
        num_classes=plan.num_classes,
        previous_stage_dir=previous_stage_dir,
        p_remove_component=aug_preset.cascade.p_remove_component,
        max_component_fraction=aug_preset.cascade.max_component_fraction,
        stored_channels=stored_channels(plan),
    )
    sampler = PatchSampler(folder, cases, settings, seed=seed)
    torch.manual_seed(seed)
    spec = spec_from_plan(plan)
    network = UNet(spec).to(device)
    loss, _ = build_losses(plan, load_training_preset(plan.training_preset))
    regions = region_set(plan)
    targets = RegionTargets(regions, plans.labels, device) if regions is not None else None
    return TrainingComponents(plan, spec, network, loss, sampler, augmenter, aug_preset, device, targets)


def training_step(
    c: TrainingComponents, optimizer: torch.optim.Optimizer, image: torch.Tensor, seg: torch.Tensor
) -> float:
    """One optimiser step on an augmented batch; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = c.loss(c.network(image), c.targets(seg) if c.targets is not None else seg)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
