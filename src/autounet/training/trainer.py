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
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from autounet.errors import AutounetError
from autounet.training.assemble import Run, assemble_run, parse_fold
from autounet.training.checkpoint import load_checkpoint, rng_state, rng_state_for_rank, save_checkpoint, set_rng_state
from autounet.training.distributed import agree, all_reduce_sum, barrier, gather_objects, shutdown
from autounet.training.loader import BatchLoader
from autounet.training.logbook import format_epoch, plot_progress, write_log
from autounet.training.losses import annotated_targets, one_hot
from autounet.training.options import TrainOptions
from autounet.training.setup import ignore_index
from autounet.training.step import LossTracker, must_stop, train_step
from autounet.training.trackers import Trackers, open_trackers
from autounet.utils.atomic import make_folder
from autounet.utils.plain_data import to_plain
from autounet.utils.progress import progress_enabled
from autounet.utils.temporary import remove_stale_temporaries
from autounet.workspace import Workspace, checkpoint_path, progress_plot_path, training_log_path


@dataclass
class TrainResult:
    fold_dir: Path
    epochs: int  # completed epochs
    stopped: str  # "max_epochs", "converged" or "time_limit"
    log: list[dict[str, Any]]
    best_ema_dice: float
    is_main_process: bool = True  # False on the ranks > 0 of a torchrun job, which write nothing
    trackers: Trackers | None = None  # --logger: open until the hold of `train` ends (validation logs to them)


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


def _class_dice(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> list[float | None]:
    out = []
    for a, b, c in zip(tp.tolist(), fp.tolist(), fn.tolist()):
        out.append(2 * a / (2 * a + b + c) if (a + b + c) > 0 else None)
    return out


def _checkpoint_content(run: Run, state: RunState, kind: str, rng: list[Any]) -> dict[str, Any]:
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
        "initialised_from": run.initialised_from,  # --pretrained: the source run, and what was loaded
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
            "rng": {"per_rank": rng},  # each process's own CPU and training-device state
            "seed": run.options.seed,
            "batch_size": run.batch_size,
            "world_size": run.info.world_size,
            "train_cases": run.train_cases,
            "val_cases": run.val_cases,
        },
    }


def _restore(run: Run, stored: dict[str, Any]) -> RunState:
    t = stored["training"]
    run.network.load_state_dict(stored["state_dict"])
    run.optimizer.load_state_dict(t["optimizer"])
    for group in run.optimizer.param_groups:  # an --lr override applies from now on
        group["initial_lr"] = run.preset.optimizer.lr
    run.schedule.load_state_dict(t["schedule"])
    if run.scaler is not None and t["scaler"] is not None:
        run.scaler.load_state_dict(t["scaler"])
    saved = t.get("world_size", 1)
    if saved != run.info.world_size and run.info.is_main:
        print(
            f"warning: this run was trained with {saved} process(es) and resumes with {run.info.world_size}: each step "
            "now draws other batches, so the result will differ from an uninterrupted run (it is still a valid run)",
            file=sys.stderr,
        )
    own = rng_state_for_rank(t.get("rng"), run.info.rank)
    if own is not None:
        set_rng_state(own, run.device)
    best = t.get("best_scores")
    if best is None:  # a checkpoint from before two best checkpoints existed
        best = [t["best_ema_dice"]] if math.isfinite(t["best_ema_dice"]) else []
    best = kept_scores(run.fold_dir, run.preset.best_checkpoints, [float(v) for v in best])
    return RunState(
        epoch=t["epoch"],
        step=t["step"],
        log=list(t["log"]),
        ema_dice=t["ema_dice"],
        best_ema_dice=t["best_ema_dice"],
        best_scores=[float(v) for v in best],
    )


# On a GPU, reading a value back (the loss for the progress bar, the finiteness and time-limit
# checks under DDP) stalls the queue: it is done every this many steps there, every step on the CPU.
CHECK_EVERY = 10


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
    tracker = LossTracker(run.device)
    waited, done, cut = 0.0, 0, False
    for i in range(iters):
        t = time.perf_counter()
        batch, image, seg = next(loader)
        waited += time.perf_counter() - t
        image, seg = run.augmenter(image, seg, batch.augmentation_seed)
        lr = run.schedule.lr_for(epoch, state.step)
        loss = train_step(run, image, seg, lr)
        tracker.observe(loss)
        state.step += 1
        done += 1
        bar.update(1)
        check = run.device.type != "cuda" or (i + 1) % CHECK_EVERY == 0 or i + 1 == iters
        if check:
            bad = tracker.nonfinite(run.info)
            if must_stop(bad, run.scaler is not None):
                raise AutounetError(
                    f"non-finite training loss ({bad} step(s) so far) in epoch {epoch + 1}, iteration {i + 1}: training stopped "
                    f"instead of continuing on NaN. checkpoint_latest.pt holds epoch {state.epoch}; try a lower --lr "
                    f"(now {lr:.2e}) or check the data with `autounet check`."
                )
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        if deadline is not None and (check or not run.info.enabled):
            if agree(time.time() > deadline, run.info):  # every process stops at the same step
                cut = True
                break
    bar.close()
    loader.close()
    if must_stop(tracker.nonfinite(run.info), run.scaler is not None):
        raise AutounetError(
            f"non-finite training losses in epoch {epoch + 1}: training stopped. checkpoint_latest.pt holds epoch "
            f"{state.epoch}; try a lower --lr or check the data with `autounet check`."
        )
    return tracker.mean(run.info), waited, done, cut


def _masks(run: Run, logits: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss target and boolean (prediction, truth) maps ``(B, K, *S)`` per foreground class or
    region; both are False at unannotated voxels (sparse annotations), which count in no Dice."""
    if run.targets is not None:  # regions: sigmoid > 0.5
        target = run.targets(seg)
        return target, (logits > 0) & (target[:, :1] >= 0), target > 0.5
    k = logits.shape[1]
    pred = one_hot(logits.argmax(1, keepdim=True), k)[:, 1:] > 0
    classes, annotated = annotated_targets(seg, ignore_index(run.plan))
    truth = one_hot(classes, k)[:, 1:] > 0
    if annotated is not None:
        pred &= annotated > 0
    return seg, pred, truth


@torch.no_grad()
def _validate(run: Run) -> tuple[float | None, dict[str, float | None]]:
    """Loss and Dice per foreground class (label value) or region (name) over the fixed validation
    patches (sharded across processes)."""
    n = run.preset.validation_iterations
    if n == 0 or not run.val_cases:
        return None, {}
    run.model.eval()
    names = run.plan.regions.names if run.plan.regions else None
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
        sums[0] += run.validation_loss(logits, target).detach().double()
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


def _save(run: Run, state: RunState, rank: int | None, score: float | None) -> None:
    """``checkpoint_best.pt`` when the epoch ranks first (the previous best becomes
    ``checkpoint_second_best.pt`` when the preset keeps two), or ``checkpoint_second_best.pt``
    when it ranks second; then ``checkpoint_latest.pt``.

    Each best checkpoint records its own score, and a resumed run reads the ranking from them, so
    the kept pair and its scores agree after a crash at any point between these writes."""
    rng = gather_objects(rng_state(run.device), run.info)  # every process takes part
    if not run.info.is_main:
        return
    content = _checkpoint_content(run, state, "latest", rng)
    best, second = checkpoint_path(run.fold_dir, "best"), checkpoint_path(run.fold_dir, "second_best")
    # for inference only: without the optimiser state (2/3 of an Adam checkpoint's size)
    weights = {**content, "training": {**content["training"], "optimizer": None, "score": score}}
    if rank == 0:
        if run.preset.best_checkpoints > 1 and best.is_file():
            previous = load_checkpoint(best)
            save_checkpoint(second, {**previous, "kind": "second_best"})
        save_checkpoint(best, {**weights, "kind": "best"})
    elif rank == 1:
        save_checkpoint(second, {**weights, "kind": "second_best"})
    save_checkpoint(checkpoint_path(run.fold_dir, "latest"), content)
    write_log(training_log_path(run.fold_dir), state.log)
    plot_progress(progress_plot_path(run.fold_dir), state.log)


def kept_scores(fold_dir: Path, keep: int, recorded: list[float]) -> list[float]:
    """The scores of the kept best checkpoints, best first, read from the files themselves
    (``recorded``, the latest checkpoint's list, for files written before they held a score)."""
    scores = []
    for kind in ("best", "second_best")[:keep]:
        path = checkpoint_path(fold_dir, kind)
        if not path.is_file():
            break
        score = load_checkpoint(path, mmap=True)["training"].get("score")
        if score is None:
            return list(recorded)
        scores.append(float(score))
    return scores


def train(ws: Workspace, options: TrainOptions, hold: ExitStack | None = None) -> TrainResult:
    """Train one fold (see the module docstring); returns when the schedule, the epoch budget or the time limit ends it.

    The fold's lock is held until then, or in ``hold`` (to keep it for what follows, e.g. validation)."""
    options = replace(options.validate(), fold=parse_fold(options.fold))
    with ExitStack() as own:
        return _train(ws, options, own if hold is None else hold)


def _train(ws: Workspace, options: TrainOptions, hold: ExitStack) -> TrainResult:
    started = time.time()
    deadline = started + 60 * options.max_minutes if options.max_minutes else None
    run, stored = assemble_run(ws, options, hold)
    state = _restore(run, stored) if stored is not None else RunState()
    if run.info.is_main:
        make_folder(run.fold_dir)
        remove_stale_temporaries(run.fold_dir)  # of a killed run (the fold's lock is held)
        where = f"resuming after epoch {state.epoch}" if stored is not None else "starting"
        print(
            f"{options.configuration} fold {options.fold}: {where}; {len(run.train_cases)} training / {len(run.val_cases)} validation cases, "
            f"batch {run.batch_size} of {run.plan.patch_size} on {describe_device(run.device)} in {precision_name(run)}"
            + (f" x {run.info.world_size} processes" if run.info.enabled else "")
            + f", {run.preset.iterations_per_epoch} iterations per epoch, up to {run.preset.max_epochs} epochs"
        )
        if run.pretrained is not None:
            print(run.pretrained.format())
        elif options.pretrained and stored is not None:
            print(f"--pretrained {options.pretrained} not applied: a resumed run continues from its own checkpoint")
    trackers = None
    if run.info.is_main and options.loggers:
        trackers = open_trackers(
            options.loggers, ws, options.configuration, options.fold, _tracker_config(run), state.epoch
        )
        hold.callback(trackers.close)
    stopped = "max_epochs"
    last_epoch_seconds = None
    while state.epoch < run.preset.max_epochs:
        if deadline is not None and last_epoch_seconds is not None:
            if agree(time.time() + last_epoch_seconds > deadline, run.info):
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
        _save(run, state, rank, score)
        if run.info.is_main:
            print(format_epoch(entry), flush=True)
            if trackers is not None:
                trackers.log_epoch(entry)
        last_epoch_seconds = seconds
        if stop:
            stopped = "converged"
            break
        if cut:
            stopped = "time_limit"
            break
    rng = gather_objects(rng_state(run.device), run.info)
    if run.info.is_main:
        final = _checkpoint_content(run, state, "final", rng)
        final["training"]["stopped"] = stopped
        save_checkpoint(checkpoint_path(run.fold_dir, "final"), final)
        write_log(training_log_path(run.fold_dir), state.log)
        print(
            f"{options.configuration} fold {options.fold}: stopped ({stopped}) after {state.epoch} epochs; best moving-average Dice {state.best_ema_dice:.4f}"
        )
    barrier(run.info)
    shutdown(run.info)  # the other processes are free; validation runs after, on the main one
    return TrainResult(run.fold_dir, state.epoch, stopped, state.log, state.best_ema_dice, run.info.is_main, trackers)


def precision_name(run: Run) -> str:
    """What the training start line says: fp32, bf16, or fp16 with its gradient scaler."""
    if run.scaler is not None:
        return "fp16 with gradient scaler"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(run.amp_dtype, "fp32")


def describe_device(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 ...)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _tracker_config(run: Run) -> dict[str, Any]:
    """A run's hyperparameters and plan, as the trackers' config."""
    return {
        "dataset": run.ws.name,
        "configuration": run.options.configuration,
        "fold": str(run.options.fold),
        "options": to_plain(run.options),
        "training_preset": to_plain(run.preset),
        "augmentation_preset": to_plain(run.augmentation),
        "batch_size": run.batch_size,
        "precision": precision_name(run),
        "device": str(run.device),
        "world_size": run.info.world_size,
        "train_cases": len(run.train_cases),
        "val_cases": len(run.val_cases),
        "plan": to_plain(run.plan),
    }
