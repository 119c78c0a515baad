"""One way to assemble a training run: every piece of one fold's training (plan entry, presets,
network, optimiser, schedule, precision, loss, samplers, augmenter, device and processes) from the
workspace and `autounet train`'s options. The trainer, the benchmarks and the tests all use it."""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from autounet.errors import AutounetError
from autounet.networks.spec import NetworkSpec
from autounet.networks.unet import UNet
from autounet.planning.plans import ConfigurationPlan, Plans, load_plans
from autounet.preprocessing.store import case_paths, check_preprocessed
from autounet.runtime import configure_backends, resolve_device, training_precision
from autounet.training.augmentation.pipeline import Augmenter
from autounet.training.augmentation.preset import AugmentationPreset, load_augmentation_preset
from autounet.training.checkpoint import load_checkpoint
from autounet.training.distributed import Distributed, barrier, differentiable_sum, init_distributed
from autounet.training.loader import default_loader_threads
from autounet.training.losses import DeepSupervisionLoss
from autounet.training.options import TrainOptions
from autounet.training.pretrained import WeightTransfer, load_matching_weights, pretrained_checkpoint
from autounet.training.sampler import PatchSampler, SamplerSettings
from autounet.training.schedule import Schedule, TrainingPreset, load_training_preset, make_optimizer
from autounet.training.setup import (
    RegionTargets,
    apply_loss_options,
    build_spec,
    has_network_overrides,
    model_setup,
    run_plan,
    stored_channels,
)
from autounet.training.splits import check_fold_number, fold_cases, load_or_create_splits
from autounet.utils.atomic import read_json
from autounet.utils.lock import exclusive
from autounet.utils.plain_data import from_plain, to_plain
from autounet.workspace import Workspace, checkpoint_path, manifest_path, previous_stage_path


@dataclass
class Run:
    """The assembled pieces of one training run."""

    ws: Workspace
    plans: Plans
    plan: ConfigurationPlan
    preset: TrainingPreset
    augmentation: AugmentationPreset
    spec: NetworkSpec
    network: UNet
    model: torch.nn.Module  # the network, wrapped by DDP when distributed
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    loss: DeepSupervisionLoss
    validation_loss: Any
    targets: RegionTargets | None  # region plans: class indices -> region maps on the device
    augmenter: Augmenter
    train_sampler: PatchSampler
    val_sampler: PatchSampler
    device: torch.device
    info: Distributed
    fold_dir: Path
    options: TrainOptions
    batch_size: int
    train_cases: list[str]
    val_cases: list[str]
    threads: int
    pretrained: WeightTransfer | None = None  # what --pretrained loaded (a new run only)
    initialised_from: dict[str, Any] | None = None  # the run's record of it (kept by its checkpoints)


def parse_fold(fold: int | str) -> int | str:
    if fold == "all" or isinstance(fold, int):
        return fold
    try:
        return int(fold)
    except (TypeError, ValueError):
        raise AutounetError(f"fold must be a number or 'all', got {fold!r}") from None


def _complete_cases(folder: Path, name: str, configuration: str) -> list[str]:
    manifest = manifest_path(folder)
    if not manifest.is_file():
        raise AutounetError(
            f"{folder} is not completely preprocessed: run `autounet preprocess {name} -c {configuration}` first"
        )
    cases = read_json(manifest, dict).get("cases")
    if not isinstance(cases, list) or not all(isinstance(c, str) for c in cases):
        raise AutounetError(f"{manifest}: no list of case names; run `autounet preprocess {name} -c {configuration}`")
    return list(cases)


def _previous_stage(ws: Workspace, plan: ConfigurationPlan, cases: list[str]) -> Path | None:
    if not plan.previous_stage:
        return None
    folder = ws.next_stage_dir(plan.previous_stage)
    missing = [c for c in cases if not previous_stage_path(folder, c).is_file()]
    if missing:
        raise AutounetError(
            f"{plan.name} trains on the predictions of {plan.previous_stage} for every training case, and {len(missing)} are missing "
            f"in {folder} (e.g. {', '.join(missing[:3])}). Each fold of {plan.previous_stage} writes them for its validation "
            f"cases when it finishes: run `autounet train {ws.name} -c {plan.previous_stage} -f K` for every fold K first."
        )
    return folder


def _local_batch(batch: int, info: Distributed) -> int:
    if batch < info.world_size:
        raise AutounetError(f"batch size {batch} is smaller than the number of processes ({info.world_size})")
    return batch // info.world_size + (1 if info.rank < batch % info.world_size else 0)


def assemble_run(
    ws: Workspace, options: TrainOptions, hold: ExitStack | None = None
) -> tuple[Run, dict[str, Any] | None]:
    """Build every piece of the run; also return the checkpoint to resume from, if any.

    ``hold``: where the fold's lock goes (taken by the main process only, so the ranks of one
    torchrun job never wait for each other; a second job or process on the fold fails at once)."""
    device = resolve_device(options.device)
    info = init_distributed(device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if info.enabled and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))))
    configure_backends(device)
    plans = load_plans(ws.plans_json)
    planned = plans.configuration(options.configuration)
    fold_dir = ws.fold_dir(options.configuration, options.fold)
    check_fold_number(ws.splits_json, options.fold)  # before the lock file is made for it
    if hold is not None and info.is_main:
        what = f"`autounet train` of {options.configuration} fold {options.fold}"
        hold.enter_context(exclusive(ws.fold_lock(options.configuration, options.fold), what))
    latest = checkpoint_path(fold_dir, "latest")
    stored = load_checkpoint(latest) if (options.resume and latest.is_file()) else None
    if latest.is_file() and not options.resume:
        raise AutounetError(
            f"{fold_dir} already holds a run (checkpoint_latest.pt): add --resume to continue it, or remove the folder to start over"
        )
    pretrained_file = (
        pretrained_checkpoint(options.pretrained, options.configuration) if options.pretrained and not stored else None
    )

    if stored is None:
        preset = apply_loss_options(load_training_preset(options.preset or planned.training_preset), options)
        plan = run_plan(planned, options.foreground_channel)
    else:
        preset = from_plain(TrainingPreset, stored["training_preset"], f"{latest}: training_preset")
        stored_plan = from_plain(ConfigurationPlan, stored["plan"], f"{latest}: plan")
        if options.foreground_channel is not None and options.foreground_channel != stored_plan.foreground_channel:
            raise AutounetError(f"{latest}: --no-foreground-channel cannot change when a run is resumed")
        if options.focal is not None and options.focal != preset.focal_loss:
            raise AutounetError(f"{latest}: --focal cannot change when a run is resumed")
        source = stored.get("configuration") or stored_plan.name
        if source != options.configuration:
            raise AutounetError(
                f"{latest}: this checkpoint is of a {source} run (fold {stored.get('fold', '?')}), not of {options.configuration}: "
                f"resuming a {source} run's checkpoint into a {options.configuration} fold is not possible; remove it from "
                f"{fold_dir} (or resume it in {ws.fold_dir(source, stored.get('fold', options.fold))})"
            )
        if "fold" in stored and str(stored["fold"]) != str(options.fold):
            raise AutounetError(
                f"{latest}: this checkpoint is of fold {stored['fold']}, not fold {options.fold}: its training cases "
                f"are another split's, so it cannot be resumed here; remove it from {fold_dir} to start this fold anew"
            )
        plan = run_plan(planned, stored_plan.foreground_channel)
        if to_plain(plan) != to_plain(stored_plan):
            raise AutounetError(
                f"{latest}: the plans of {options.configuration} changed since this run started; start a new run (remove {fold_dir})"
            )
    changes = {}
    if options.epochs is not None:
        changes["max_epochs"] = options.epochs
    if options.iterations_per_epoch is not None:
        changes["iterations_per_epoch"] = options.iterations_per_epoch
    if options.validation_iterations is not None:
        changes["validation_iterations"] = options.validation_iterations
    if options.lr is not None:
        changes["optimizer"] = replace(preset.optimizer, lr=options.lr)
    preset = replace(preset, **changes)
    preset.validate()
    if stored is None:
        augmentation = load_augmentation_preset(
            options.augmentation or planned.augmentation_preset or preset.augmentation
        )
    else:
        augmentation = from_plain(AugmentationPreset, stored["augmentation_preset"])

    folder = ws.preprocessed_dir(plan.data_identifier)
    cases = _complete_cases(folder, ws.name, options.configuration)
    if info.is_main:
        splits = load_or_create_splits(ws.splits_json, cases)
    barrier(info)
    if not info.is_main:
        splits = load_or_create_splits(ws.splits_json, cases, write=False)
    train_cases, val_cases = fold_cases(splits, options.fold, cases)
    missing = [c for c in train_cases + val_cases if not case_paths(folder, c)["properties"].is_file()]
    if missing:
        raise AutounetError(f"{folder}: case(s) of the split are not preprocessed: {', '.join(missing[:5])}")
    redo = f"autounet preprocess {ws.name} -c {options.configuration} --work {ws.work}"
    check_preprocessed(folder, sorted(set(train_cases + val_cases)), redo)
    previous = _previous_stage(ws, plan, sorted(set(train_cases + val_cases)))

    batch_size = options.batch_size or (stored["training"]["batch_size"] if stored else plan.batch_size)
    local_batch = _local_batch(batch_size, info)
    augmenter = Augmenter(
        augmentation,
        plan.patch_size,
        plan.in_plane_augmentation,
        image_channels=plan.image_channels,
        device=device,
        passthrough_channels=1 if plan.foreground_channel else 0,
    )
    common = dict(
        patch_size=tuple(plan.patch_size),
        batch_size=local_batch,
        foreground_mode=augmentation.foreground.mode,
        foreground_value=augmentation.foreground.value,
        num_classes=plan.num_classes,
        previous_stage_dir=previous,
        stored_channels=stored_channels(plan),
    )
    train_sampler = PatchSampler(
        folder,
        train_cases,
        SamplerSettings(
            sample_size=tuple(augmenter.sample_size),
            p_remove_component=augmentation.cascade.p_remove_component,
            max_component_fraction=augmentation.cascade.max_component_fraction,
            **common,
        ),
        seed=options.seed,
    )
    val_sampler = PatchSampler(
        folder, val_cases, SamplerSettings(sample_size=tuple(plan.patch_size), **common), seed=options.seed + 1
    )

    reduce = differentiable_sum if info.enabled else None
    setup = model_setup(
        plan, preset, replace(options, focal=None, foreground_channel=None), plans.labels, device, reduce
    )
    spec = setup.spec
    if stored is not None:
        stored_spec = from_plain(NetworkSpec, stored["network_spec"], f"{latest}: network_spec")
        if has_network_overrides(options) and build_spec(plan, options) != stored_spec:
            raise AutounetError(
                f"{latest}: the network switches differ from the stored run's; resume without them or start a new run"
            )
        spec = stored_spec
    torch.manual_seed(options.seed)
    network = UNet(spec)
    transfer = None
    if pretrained_file is not None:
        transfer = load_matching_weights(
            network,
            options.pretrained_label or str(options.pretrained),
            pretrained_file,
            labels=dict(plans.labels),
            regions=plan.regions,
        )
    network = network.to(device)
    model = network
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = make_optimizer(network.parameters(), preset.optimizer)
    schedule = Schedule(preset.schedule, preset.optimizer.lr, preset.max_epochs, preset.iterations_per_epoch)
    amp_dtype, scaler = training_precision(device, options.precision)
    run = Run(
        ws=ws,
        plans=plans,
        plan=plan,
        preset=preset,
        augmentation=augmentation,
        spec=spec,
        network=network,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        scaler=scaler,
        amp_dtype=amp_dtype,
        loss=setup.loss,
        validation_loss=setup.validation_loss,
        targets=setup.targets,
        augmenter=augmenter,
        train_sampler=train_sampler,
        val_sampler=val_sampler,
        device=device,
        info=info,
        fold_dir=fold_dir,
        options=options,
        batch_size=batch_size,
        train_cases=train_cases,
        val_cases=val_cases,
        threads=options.loader_threads or default_loader_threads(device),
        pretrained=transfer,
        initialised_from=transfer.record() if transfer else (stored or {}).get("initialised_from"),
    )
    return run, stored
