"""Training-step throughput with the real data pipeline and with ready tensors. One JSON line.

    python benchmarks/train_step.py ../shared/data/hippocampus 3d_fullres [--work W] [--iterations N]
    python benchmarks/train_step.py ../shared/data/hippocampus 3d_fullres --precision fp32 bf16
    python benchmarks/train_step.py ../shared/data/hippocampus 3d_fullres --recipe resenc-m --batch-size 2
    python benchmarks/train_step.py ../shared/data/hippocampus 3d_fullres --recipes nnunet resenc-m --batch-size 2

Uses the trainer's own run and step (the plan's network and batch size, the training preset's
optimiser, autocast on CUDA, gradient clipping). Peak memory: resident set of this process (and CUDA's peak allocation on a GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from data_pipeline import interleaved_iterations


def _planned_workspace(args, tmp: Path, recipe: str | None = None):
    """``args.raw`` planned (with ``recipe``, else ``--recipe``) and preprocessed for
    ``args.configuration`` (in ``--work``, else ``tmp``)."""
    from autounet.api import plan, preprocess

    work = args.work or tmp
    recipe = recipe or args.recipe
    memory = args.gpu_memory_target if recipe not in (None, "nnunet", "brats") else None
    name = args.raw.resolve().name + (f"_{recipe}" if recipe else "")
    planned = plan(args.raw, work=work, name=name, recipe=recipe, gpu_memory_target_gb=memory)
    preprocess(planned.workspace.name, work=work, configurations=[args.configuration])
    return planned.workspace


def _interleaved_steps(runs: dict, batches: dict, iterations: int, device) -> dict[str, list[float]]:
    """Seconds per training step of each run, the runs taking turns (A, B, A, B, ...); one untimed
    warm-up step each."""
    from autounet.training.step import train_step

    times: dict[str, list[float]] = {key: [] for key in runs}
    for i in range(iterations + 1):
        for key, run in runs.items():
            start = time.perf_counter()
            train_step(run, *batches[key], run.preset.optimizer.lr)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times[key].append(time.perf_counter() - start)
    return times


def compare_recipes(args) -> int:
    """The trainer's step of each recipe's network (same configuration, ``--batch-size`` or each
    plan's batch), each on one augmented batch of its own, interleaved A, B, A, B after a warm-up
    step each, so that every network sees the same machine state."""
    from autounet.training.assemble import assemble_run
    from autounet.training.options import TrainOptions

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        runs, batches = {}, {}
        for r in args.recipes:
            ws = _planned_workspace(args, Path(tmp), r)
            options = TrainOptions(
                args.configuration, "all", augmentation=args.preset, device=str(device), batch_size=args.batch_size
            )
            runs[r], _ = assemble_run(ws, options)
            runs[r].model.train()
            batch = runs[r].train_sampler.batch(10_000)
            batches[r] = runs[r].augmenter(
                torch.from_numpy(batch.image), torch.from_numpy(batch.seg), batch.augmentation_seed
            )
        times = _interleaved_steps(runs, batches, args.iterations, device)
    base = statistics.median(times[args.recipes[0]])
    result = {
        "dataset": str(args.raw),
        "configuration": args.configuration,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "recipes": {
            r: {
                "batch_size": runs[r].batch_size,
                "patch_size": runs[r].plan.patch_size,
                "parameters": sum(p.numel() for p in runs[r].model.parameters()),
                "s_per_step": round(statistics.median(t), 3),
                "steps": [round(x, 3) for x in t],
                "time_ratio": round(statistics.median(t) / base, 2),
            }
            for r, t in times.items()
        },
    }
    print(json.dumps(result))
    return 0


def compare_precisions(args) -> int:
    """The trainer's step in each precision on one augmented batch, interleaved (the same machine
    state for all), after a warm-up step each."""
    from autounet.training.assemble import assemble_run
    from autounet.training.options import TrainOptions

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        ws = _planned_workspace(args, Path(tmp))
        runs = {}
        for p in args.precision:
            options = TrainOptions(args.configuration, "all", augmentation=args.preset, device=str(device), precision=p)
            runs[p], _ = assemble_run(ws, options)
            runs[p].model.train()
        first = next(iter(runs.values()))
        batch = first.train_sampler.batch(10_000)
        image, seg = first.augmenter(
            torch.from_numpy(batch.image), torch.from_numpy(batch.seg), batch.augmentation_seed
        )
        times = _interleaved_steps(runs, {p: (image, seg) for p in runs}, args.iterations, device)
    base = statistics.median(times[args.precision[0]])
    result = {
        "dataset": str(args.raw),
        "configuration": args.configuration,
        "device": str(device),
        "batch_size": first.batch_size,
        "patch_size": first.plan.patch_size,
        "precisions": {
            p: {
                "autocast": str(runs[p].amp_dtype or "fp32").replace("torch.", ""),
                "s_per_step": round(statistics.median(t), 3),
                "steps": [round(x, 3) for x in t],
                "speedup": round(base / statistics.median(t), 2),
            }
            for p, t in times.items()
        },
    }
    print(json.dumps(result))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path)
    parser.add_argument("configuration")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--preset", default="paper", help="augmentation preset")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--recipe", help="planning recipe (default: nnunet), e.g. resenc-m")
    parser.add_argument("--gpu-memory-target", type=float, help="--recipe nnunetv2 / resenc-*: GB")
    parser.add_argument("--batch-size", type=int, help="instead of the plan's (compare networks at one batch)")
    parser.add_argument(
        "--precision",
        nargs="+",
        metavar="P",
        help="compare training precisions (fp32, bf16, auto, ...) on one ready batch, steps interleaved A, B, A, B; "
        "prints seconds per step and the speed-up over the first",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        metavar="R",
        help="compare the recipes' networks (e.g. nnunet resenc-m) on ready batches, steps interleaved; prints "
        "seconds per step and the ratio to the first",
    )
    args = parser.parse_args()
    if args.recipes:
        return compare_recipes(args)
    if args.precision:
        return compare_precisions(args)

    from autounet.training.assemble import assemble_run
    from autounet.training.loader import default_loader_threads
    from autounet.training.options import TrainOptions

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        ws = _planned_workspace(args, Path(tmp))
        options = TrainOptions(
            args.configuration, "all", augmentation=args.preset, device=str(device), batch_size=args.batch_size
        )
        run, _ = assemble_run(ws, options)
        threads = args.threads or default_loader_threads(device)
        batch = run.train_sampler.batch(10_000)
        image = torch.from_numpy(batch.image).to(device)
        seg = torch.from_numpy(batch.seg).to(device)
        image, seg = run.augmenter(image, seg, batch.augmentation_seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ready, piped = interleaved_iterations(run, image, seg, args.iterations, threads)
    ready_s, piped_s = statistics.median(ready), statistics.median(piped)
    b = run.batch_size
    result = {
        "dataset": str(args.raw),
        "configuration": args.configuration,
        "recipe": args.recipe or "nnunet",
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "device": str(device),
        "batch_size": b,
        "patch_size": run.plan.patch_size,
        "ready": {
            "s_per_iteration": round(ready_s, 3),
            "iterations_per_s": round(1 / ready_s, 3),
            "samples_per_s": round(b / ready_s, 2),
        },
        "pipeline": {
            "s_per_iteration": round(piped_s, 3),
            "iterations_per_s": round(1 / piped_s, 3),
            "samples_per_s": round(b / piped_s, 2),
        },
        "pipeline_cost": round(piped_s / ready_s - 1, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
