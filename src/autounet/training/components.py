"""Assemble the training building blocks of one configuration from its workspace: the network,
the loss, the sampler and the augmenter, all configured by the plan and an augmentation preset."""

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
from autounet.training.losses import DeepSupervisionLoss, DiceCELoss
from autounet.training.sampler import PatchSampler, SamplerSettings
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


def preprocessed_cases(folder: Path) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.json") if p.name != "manifest.json")


def build_components(
    work: str | Path | None,
    name: str,
    configuration: str,
    preset: str | Path = "paper",
    device: str | torch.device | None = None,
    cases: list[str] | None = None,
    seed: int = 0,
    previous_stage_dir: Path | None = None,
) -> TrainingComponents:
    """Network, loss (Dice + CE with deep supervision), sampler and augmenter for a configuration."""
    ws = Workspace.at(work, name)
    plan = load_plans(ws.plans_json).configuration(configuration)
    folder = ws.preprocessed_dir(plan.data_identifier)
    cases = cases if cases is not None else preprocessed_cases(folder)
    if not cases:
        raise AutounetError(f"{folder}: no preprocessed cases (run `autounet preprocess {name} -c {configuration}`)")
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    aug_preset = load_augmentation_preset(preset)
    augmenter = Augmenter(
        aug_preset, plan.patch_size, plan.in_plane_augmentation, image_channels=len(plan.normalization), device=device
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
    )
    sampler = PatchSampler(folder, cases, settings, seed=seed)
    torch.manual_seed(seed)
    spec = spec_from_plan(plan)
    network = UNet(spec).to(device)
    loss = DeepSupervisionLoss(DiceCELoss(batch_dice=plan.batch_dice))
    return TrainingComponents(plan, spec, network, loss, sampler, augmenter, aug_preset, device)


def training_step(
    c: TrainingComponents, optimizer: torch.optim.Optimizer, image: torch.Tensor, seg: torch.Tensor
) -> float:
    """One optimiser step on an augmented batch; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = c.loss(c.network(image), seg)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
