"""`autounet train`: one fold of one configuration, orchestrating the building blocks.

Per epoch: training iterations fed by the background sampler and the on-device augmenter, then
validation on fixed patches of the fold's validation cases (loss and per-class Dice, or
per-region Dice of sigmoid > 0.5 for region plans). Mixed precision on CUDA, gradient clipping, a
stop with a clear message on a non-finite loss. After every epoch ``checkpoint_latest.pt``,
``checkpoint_best.pt`` (and ``checkpoint_second_best.pt`` when the training preset keeps two: seed
004 §3.2), ``log.jsonl`` and ``progress.png`` are written atomically; ``checkpoint_final.pt`` at
the end. Without ``--preset`` the plan's training preset is used (``nvidia`` for the brats
recipe), so a pipeline needs no recipe knowledge.
Each batch is a pure function of (seed, step), so ``--resume`` continues exactly. Under
``torchrun`` the batch is split across processes (DDP), batch Dice is summed over them,
validation is sharded, and only rank 0 writes.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from autounet.errors import AutounetError
from autounet.networks.spec import NetworkSpec
from autounet.networks.unet import UNet
from autounet.planning.plans import ConfigurationPlan, Plans, load_plans
from autounet.preprocessing.store import case_paths
from autounet.training.augmentation.pipeline import Augmenter
from autounet.training.augmentation.preset import AugmentationPreset, load_augmentation_preset
from autounet.training.checkpoint import checkpoint_path, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from autounet.training.distributed import Distributed, all_reduce_sum, barrier, differentiable_sum, init_distributed
from autounet.training.loader import BatchLoader, default_loader_threads
from autounet.training.logbook import format_epoch, plot_progress, write_log
from autounet.training.losses import DeepSupervisionLoss, one_hot
from autounet.training.sampler import PatchSampler, SamplerSettings, previous_stage_path
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
from autounet.training.splits import fold_cases, load_or_create_splits
from autounet.utils.atomic import read_json
from autounet.utils.plain_data import from_plain, to_plain
from autounet.utils.progress import progress_enabled
from autounet.workspace import Workspace


@dataclass
class TrainOptions:
    """`autounet train` flags; None keeps the preset's (or, on --resume, the run's) value."""

    configuration: str
    fold: int | str
    preset: str | None = None  # None: the plan's training preset ("paper", "nvidia" for --preset brats)
    augmentation: str | None = None  # None: the plan's, else the training preset's
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    validation_iterations: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    device: str | None = None
    seed: int = 0
    max_minutes: float | None = None
    resume: bool = False
    loader_threads: int | None = None
    validate: bool = True  # predict the validation cases in full at the end
    validation_tta: bool = True  # mirroring test-time augmentation in that prediction
    # seed 004 ablation switches (Tables 2-3); None keeps the plan's network / the preset's loss
    attention: bool | None = None  # attention gates in the decoder
    residual: bool | None = None  # residual blocks (encoder and decoder)
    drop_block: float | None = None  # DropBlock probability (block size 5); 0: off
    focal: bool | None = None  # Focal loss (gamma 2) instead of (binary) cross-entropy
    deep_supervision_heads: int | None = None  # extra output heads; 0: no deep supervision
    features: list[int] | None = None  # features per encoder stage (longer: a deeper encoder)
    deeper: bool = False  # seed 004's 64, 96, 128, 192, 256, 384, 512 encoder
    width_multiplier: float | None = None  # every stage's features times this
    foreground_channel: bool | None = None  # False: drop the one-hot foreground input channel


@dataclass
class TrainResult:
    fold_dir: Path
    epochs: int  # completed epochs
    stopped: str  # "max_epochs", "converged" or "time_limit"
    log: list[dict[str, Any]]
    best_ema_dice: float


@dataclass
class RunState:
    """Everything that changes while training; stored in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps taken (global)
    log: list[dict[str, Any]] = field(default_factory=list)
    ema_dice: float | None = None
    best_ema_dice: float = -math.inf
    best_scores: list[float] = field(
        default_factory=list
    )  # of checkpoint_best (, _second_best), by the preset's metric


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AutounetError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AutounetError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise AutounetError(f"device {name!r} is not supported (use cpu, cuda or cuda:N)")
    return device


def _parse_fold(fold: int | str) -> int | str:
    if fold == "all" or isinstance(fold, int):
        return fold
    try:
        return int(fold)
    except (TypeError, ValueError):
        raise AutounetError(f"fold must be a number or 'all', got {fold!r}") from None


def _complete_cases(folder: Path, name: str, configuration: str) -> list[str]:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise AutounetError(
            f"{folder} is not completely preprocessed: run `autounet preprocess {name} -c {configuration}` first"
        )
    return list(read_json(manifest)["cases"])


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


def _amp(device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """bf16 where the GPU supports it, else fp16 with a gradient scaler; full precision on the CPU."""
    if device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def _class_dice(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> list[float | None]:
    out = []
    for a, b, c in zip(tp.tolist(), fp.tolist(), fn.tolist()):
        out.append(2 * a / (2 * a + b + c) if (a + b + c) > 0 else None)
    return out


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


def _checkpoint_content(run: Run, state: RunState, kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "dataset": run.ws.name,
        "configuration": run.options.configuration,
        "fold": run.options.fold,
        "network_spec": to_plain(run.spec),
        "state_dict": run.network.state_dict(),
        "plan": to_plain(run.plan),
        "labels": dict(run.plans.labels),
        "channel_names": list(run.plans.channel_names),
        "training_preset": to_plain(run.preset),
        "augmentation_preset": to_plain(run.augmentation),
        "regions": to_plain(run.plan.regions) if run.plan.regions else None,
        "training": {
            "epoch": state.epoch,
            "step": state.step,
            "log": state.log,
            "ema_dice": state.ema_dice,
            "best_ema_dice": state.best_ema_dice,
            "best_scores": list(state.best_scores),
            "optimizer": run.optimizer.state_dict(),
            "schedule": run.schedule.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "rng": rng_state(),
            "seed": run.options.seed,
            "batch_size": run.batch_size,
            "world_size": run.info.world_size,
            "train_cases": run.train_cases,
            "val_cases": run.val_cases,
        },
    }


def _assemble(work: str | Path | None, name: str, options: TrainOptions) -> tuple[Run, dict[str, Any] | None]:
    """Build every piece of the run; also return the checkpoint to resume from, if any."""
    device = resolve_device(options.device)
    info = init_distributed(device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if info.enabled and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))))
    ws = Workspace.at(work, name)
    plans = load_plans(ws.plans_json)
    planned = plans.configuration(options.configuration)
    fold_dir = ws.fold_dir(options.configuration, options.fold)
    latest = checkpoint_path(fold_dir, "latest")
    stored = load_checkpoint(latest) if (options.resume and latest.is_file()) else None
    if latest.is_file() and not options.resume:
        raise AutounetError(
            f"{fold_dir} already holds a run (checkpoint_latest.pt): add --resume to continue it, or remove the folder to start over"
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
    cases = _complete_cases(folder, name, options.configuration)
    if info.is_main:
        splits = load_or_create_splits(ws.splits_json, cases)
    barrier(info)
    if not info.is_main:
        splits = load_or_create_splits(ws.splits_json, cases, write=False)
    train_cases, val_cases = fold_cases(splits, options.fold, cases)
    missing = [c for c in train_cases + val_cases if not case_paths(folder, c)["properties"].is_file()]
    if missing:
        raise AutounetError(f"{folder}: case(s) of the split are not preprocessed: {', '.join(missing[:5])}")
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
    network = UNet(spec).to(device)
    model = network
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = make_optimizer(network.parameters(), preset.optimizer)
    schedule = Schedule(preset.schedule, preset.optimizer.lr, preset.max_epochs, preset.iterations_per_epoch)
    amp_dtype, scaler = _amp(device)
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
    )
    return run, stored


def _restore(run: Run, stored: dict[str, Any]) -> RunState:
    t = stored["training"]
    run.network.load_state_dict(stored["state_dict"])
    run.optimizer.load_state_dict(t["optimizer"])
    for group in run.optimizer.param_groups:  # an --lr override applies from now on
        group["initial_lr"] = run.preset.optimizer.lr
    run.schedule.load_state_dict(t["schedule"])
    if run.scaler is not None and t["scaler"] is not None:
        run.scaler.load_state_dict(t["scaler"])
    set_rng_state(t["rng"])
    best = t.get("best_scores")
    if best is None:  # a checkpoint from before two best checkpoints existed
        best = [t["best_ema_dice"]] if math.isfinite(t["best_ema_dice"]) else []
    return RunState(
        epoch=t["epoch"],
        step=t["step"],
        log=list(t["log"]),
        ema_dice=t["ema_dice"],
        best_ema_dice=t["best_ema_dice"],
        best_scores=[float(v) for v in best],
    )


def _stop_if_nonfinite(run: Run, loss: torch.Tensor, epoch: int, iteration: int, state: RunState) -> None:
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=run.device)
    all_reduce_sum(bad, run.info)
    if bad.item() > 0:
        raise AutounetError(
            f"non-finite training loss ({loss.item()}) in epoch {epoch + 1}, iteration {iteration + 1}: training stopped instead of "
            f"continuing on NaN. checkpoint_latest.pt holds epoch {state.epoch}; try a lower --lr "
            f"(now {run.optimizer.param_groups[0]['lr']:.2e}) or check the data with `autounet check`."
        )


def _train_epoch(run: Run, state: RunState, epoch: int, deadline: float | None) -> tuple[float, float, int, bool]:
    """Returns mean training loss, seconds waited for data, iterations done, and whether the time limit cut the epoch."""
    run.model.train()
    iters = run.preset.iterations_per_epoch
    world, rank = run.info.world_size, run.info.rank
    loader = iter(
        BatchLoader(
            run.train_sampler,
            start=state.step * world + rank,
            count=iters,
            stride=world,
            threads=run.threads,
            pin_memory=run.device.type == "cuda",
        )
    )
    bar = tqdm(
        total=iters,
        desc=f"epoch {epoch + 1}",
        unit="it",
        disable=not (run.info.is_main and progress_enabled()),
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )
    total, waited, done, cut = 0.0, 0.0, 0, False
    for i in range(iters):
        t = time.perf_counter()
        batch, image, seg = next(loader)
        waited += time.perf_counter() - t
        image, seg = run.augmenter(image, seg, batch.augmentation_seed)
        lr = run.schedule.lr_for(epoch, state.step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            output = run.model(image)
        loss = run.loss(output, run.targets(seg) if run.targets is not None else seg)
        _stop_if_nonfinite(run, loss, epoch, i, state)
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.optimizer)
        else:
            loss.backward()
        if run.preset.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(run.network.parameters(), run.preset.grad_clip_norm)
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        state.step += 1
        done += 1
        value = float(loss.detach())
        total += value
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if deadline is not None and time.time() > deadline:
            cut = True
            break
    bar.close()
    loader.close()
    summed = all_reduce_sum(torch.tensor([total, float(done)], device=run.device, dtype=torch.float64), run.info)
    return float(summed[0] / max(1.0, float(summed[1]))), waited, done, cut


def _masks(run: Run, logits: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss target and boolean (prediction, truth) maps ``(B, K, *S)`` per foreground class or region."""
    if run.targets is not None:  # regions: sigmoid > 0.5
        target = run.targets(seg)
        return target, logits > 0, target > 0.5
    k = logits.shape[1]
    pred = one_hot(logits.argmax(1, keepdim=True), k)[:, 1:] > 0
    return seg, pred, one_hot(seg, k)[:, 1:] > 0


@torch.no_grad()
def _validate(run: Run) -> tuple[float | None, dict[str, float | None]]:
    """Loss and Dice per foreground class (label value) or region (name) over the fixed validation
    patches (sharded across processes)."""
    n = run.preset.validation_iterations
    if n == 0 or not run.val_cases:
        return None, {}
    run.model.eval()
    names = run.plan.regions and [r["name"] for r in run.plan.regions["regions"]]
    names = names or sorted(run.plans.labels, key=int)[1:]
    k = len(names)
    sums = torch.zeros(2 + 3 * k, dtype=torch.float64, device=run.device)  # loss, count, tp, fp, fn
    for index in range(run.info.rank, n, run.info.world_size):
        batch = run.val_sampler.batch(index)
        image = torch.from_numpy(batch.image).to(run.device)
        seg = torch.from_numpy(batch.seg).to(run.device)
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            logits = run.network(image)
        target, pred, truth = _masks(run, logits.float(), seg)
        sums[0] += float(run.validation_loss(logits, target))
        sums[1] += 1
        axes = [0, *range(2, pred.ndim)]
        sums[2 : 2 + k] += (pred & truth).sum(axes)
        sums[2 + k : 2 + 2 * k] += (pred & ~truth).sum(axes)
        sums[2 + 2 * k :] += (~pred & truth).sum(axes)
    all_reduce_sum(sums, run.info)
    tp, fp, fn = sums[2 : 2 + k], sums[2 + k : 2 + 2 * k], sums[2 + 2 * k :]
    dice = _class_dice(tp, fp, fn)
    return float(sums[0] / sums[1].clamp_min(1)), dict(zip(names, dice))


def _rank(run: Run, state: RunState, score: float | None) -> int | None:
    """Where ``score`` enters the kept best checkpoints (0: best, 1: second best), or None; updates the state."""
    keep = run.preset.best_checkpoints
    if score is None:
        return None
    rank = sum(1 for s in state.best_scores if s >= score)  # ties: the earlier checkpoint stays ahead
    if rank >= keep:
        return None
    state.best_scores.insert(rank, float(score))
    del state.best_scores[keep:]
    return rank


def _save(run: Run, state: RunState, rank: int | None) -> None:
    """``checkpoint_latest.pt``; ``checkpoint_best.pt`` when the epoch ranks first (the previous
    best moves to ``checkpoint_second_best.pt`` when the preset keeps two), or
    ``checkpoint_second_best.pt`` when it ranks second."""
    if not run.info.is_main:
        return
    content = _checkpoint_content(run, state, "latest")
    save_checkpoint(checkpoint_path(run.fold_dir, "latest"), content)
    best, second = checkpoint_path(run.fold_dir, "best"), checkpoint_path(run.fold_dir, "second_best")
    # for inference only: without the optimiser state (2/3 of an Adam checkpoint's size)
    weights = {**content, "training": {**content["training"], "optimizer": None}}
    if rank == 0:
        if run.preset.best_checkpoints > 1 and best.is_file():
            os.replace(best, second)
        save_checkpoint(best, {**weights, "kind": "best"})
    elif rank == 1:
        save_checkpoint(second, {**weights, "kind": "second_best"})
    write_log(run.fold_dir / "log.jsonl", state.log)
    plot_progress(run.fold_dir / "progress.png", state.log)


def _final_validation(run: Run, state: RunState) -> None:
    """Predict the fold's validation cases in full and score them; a cascade's first stage also
    stores its next stage's inputs from these predictions (not for fold 'all')."""
    if run.options.fold == "all" or not run.val_cases or not run.options.validate:
        return
    from autounet.inference.model import load_stage, stage_from_network
    from autounet.inference.next_stage import next_stage_writer
    from autounet.inference.validation import validate_fold

    if list(run.preset.inference_checkpoints) == ["final"]:
        stage = stage_from_network(
            run.network, run.plan, run.spec, run.plans.labels, to_plain(run.augmentation), regions=run.plan.regions
        )
        used = ["final"]
    else:  # the checkpoints inference will use (seed 004: the two best), read back from disk
        stage = load_stage(run.fold_dir)
        stage.previous = None  # validation reads the stored first-stage predictions instead
        stage.to(run.device)
        used = list(stage.extra.get("checkpoints", run.preset.inference_checkpoints))
    info = {"checkpoints": used, "epoch": state.epoch, "step": state.step}
    writer = next_stage_writer(run.ws, run.plans, run.options.configuration)
    result = validate_fold(
        run.ws,
        stage,
        run.fold_dir,
        run.val_cases,
        run.device,
        run.amp_dtype,
        info,
        tta=run.options.validation_tta,
        on_probabilities=writer,
    )
    dice = result.evaluation.foreground_mean.get("dice")
    what = "region" if run.plan.regions else "foreground"
    print(
        f"{run.options.configuration} fold {run.options.fold}: {len(run.val_cases)} validation cases predicted in full "
        f"({' + '.join(used)}) in {result.seconds:.1f} s; mean {what} Dice {dice:.4f} -> {result.folder / 'summary.json'}"
    )


def train(work: str | Path | None, name: str, options: TrainOptions) -> TrainResult:
    """Train one fold (see the module docstring); returns when the schedule, the epoch budget or the time limit ends it."""
    options = replace(options, fold=_parse_fold(options.fold))
    started = time.time()
    deadline = started + 60 * options.max_minutes if options.max_minutes else None
    run, stored = _assemble(work, name, options)
    state = _restore(run, stored) if stored is not None else RunState()
    if run.info.is_main:
        run.fold_dir.mkdir(parents=True, exist_ok=True)
        where = f"resuming after epoch {state.epoch}" if stored is not None else "starting"
        print(
            f"{options.configuration} fold {options.fold}: {where}; {len(run.train_cases)} training / {len(run.val_cases)} validation cases, "
            f"batch {run.batch_size} of {run.plan.patch_size} on {run.device}"
            + (f" x {run.info.world_size} processes" if run.info.enabled else "")
            + f", {run.preset.iterations_per_epoch} iterations per epoch, up to {run.preset.max_epochs} epochs"
        )
    stopped = "max_epochs"
    last_epoch_seconds = None
    while state.epoch < run.preset.max_epochs:
        if deadline is not None and last_epoch_seconds is not None and time.time() + last_epoch_seconds > deadline:
            stopped = "time_limit"
            break
        epoch_start = time.time()
        epoch = state.epoch
        train_loss, waited, done, cut = _train_epoch(run, state, epoch, deadline)
        val_loss, dice = _validate(run)
        stop = run.schedule.end_epoch(train_loss, val_loss)
        defined = [d for d in dice.values() if d is not None]
        mean_dice = sum(defined) / len(defined) if defined else None
        if mean_dice is not None:
            a = run.preset.best_dice_ema
            state.ema_dice = mean_dice if state.ema_dice is None else a * state.ema_dice + (1 - a) * mean_dice
        if state.ema_dice is not None and state.ema_dice > state.best_ema_dice:
            state.best_ema_dice = state.ema_dice
        score = state.ema_dice if run.preset.best_metric == "ema" else mean_dice
        rank = _rank(run, state, score)
        seconds = time.time() - epoch_start
        state.epoch += 1
        entry = {
            "epoch": state.epoch,
            "lr": run.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_dice": dice,
            "val_dice_mean": mean_dice,
            "ema_dice": state.ema_dice,
            "train_loss_avg": run.schedule.train_avg,
            "val_loss_avg": run.schedule.val_avg,
            "iterations": done,
            "seconds": seconds,
            "iterations_per_s": done / seconds if seconds > 0 else 0.0,
            "data_wait_fraction": waited / seconds if seconds > 0 else 0.0,
            "partial": cut,
        }
        state.log.append(entry)
        _save(run, state, rank)
        if run.info.is_main:
            print(format_epoch(entry), flush=True)
        last_epoch_seconds = seconds
        if stop:
            stopped = "converged"
            break
        if cut:
            stopped = "time_limit"
            break
    if run.info.is_main:
        final = _checkpoint_content(run, state, "final")
        final["training"]["stopped"] = stopped
        save_checkpoint(checkpoint_path(run.fold_dir, "final"), final)
        write_log(run.fold_dir / "log.jsonl", state.log)
        print(
            f"{options.configuration} fold {options.fold}: stopped ({stopped}) after {state.epoch} epochs; best moving-average Dice {state.best_ema_dice:.4f}"
        )
        _final_validation(run, state)
    barrier(run.info)
    return TrainResult(run.fold_dir, state.epoch, stopped, state.log, state.best_ema_dice)
