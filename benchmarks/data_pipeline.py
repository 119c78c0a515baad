"""Does the data pipeline keep the network busy? One JSON line per run.

    python benchmarks/data_pipeline.py ../shared/data/hippocampus -c 3d_fullres [--work W] [--out DIR]

Plans and preprocesses RAW into W (a temporary folder by default; reused when already there),
then measures for configuration CONFIG with the plan's network and batch size:

* ``samples_per_s``: sampler + augmentation alone (background loader, augmentation on the device);
* ``ready_s_per_iteration``: forward + loss + backward + step on one batch held in memory;
* ``pipeline_s_per_iteration``: the same, each batch sampled and augmented by the real pipeline;
* ``ratio``: pipeline / ready (1.0 = the network never waits for data).

It writes ``augmented_CONFIG.png`` (image and label slices of augmented samples side by side) to
``--out`` (default ``benchmarks/output``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def interleaved_iterations(
    run, ready_image, ready_seg, iterations: int, threads: int
) -> tuple[list[float], list[float]]:
    """Seconds per training iteration on a ready in-memory batch and on batches from the real
    pipeline (background sampler + on-device augmentation), interleaved so that both see the
    same machine state; one warm-up step of each is not counted. Each step is the trainer's own
    (autocast, clipping, the preset's optimiser)."""
    from autounet.training.loader import BatchLoader
    from autounet.training.step import train_step

    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    run.model.train()
    lr = run.preset.optimizer.lr
    ready, piped = [], []
    loader = BatchLoader(
        run.train_sampler, start=0, count=iterations + 1, threads=threads, pin_memory=run.device.type == "cuda"
    )
    for i, (batch, image, seg) in enumerate(loader):
        sync()
        t = time.perf_counter()
        train_step(run, *run.augmenter(image, seg, batch.augmentation_seed), lr)
        sync()
        t_pipe = time.perf_counter() - t
        t = time.perf_counter()
        train_step(run, ready_image, ready_seg, lr)
        sync()
        if i:
            piped.append(t_pipe)
            ready.append(time.perf_counter() - t)
    return ready, piped


def save_png(image: torch.Tensor, seg: torch.Tensor, path: Path, n: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Samples with the most labelled voxels first: the picture is about alignment.
    order = torch.argsort((seg > 0).flatten(1).sum(1), descending=True)[:n].tolist()
    n = len(order)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for i, b in enumerate(order):
        img, lab = image[b, 0].cpu().numpy(), seg[b, 0].cpu().numpy()
        if img.ndim == 3:  # the axial slice with the most foreground
            z = int(np.argmax((lab > 0).sum(axis=(1, 2)))) if lab.any() else img.shape[0] // 2
            img, lab = img[z], lab[z]
        axes[i, 0].imshow(img, cmap="gray")
        axes[i, 1].imshow(lab, cmap="viridis", vmin=0, vmax=max(2, int(seg.max())))
        axes[i, 2].imshow(img, cmap="gray")
        axes[i, 2].imshow(np.ma.masked_equal(lab, 0), cmap="autumn", alpha=0.5)
        for ax, title in zip(axes[i], ("augmented image", "augmented label", "overlay")):
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=None, help="loader threads (default: the loader's default for the device)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "output")
    args = parser.parse_args()

    from autounet.api import plan as plan_dataset
    from autounet.api import preprocess
    from autounet.training.assemble import assemble_run
    from autounet.training.loader import BatchLoader, default_loader_threads
    from autounet.training.options import TrainOptions
    from autounet.workspace import Workspace

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = None
    work = args.work
    if work is None:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    name = args.raw.resolve().name
    plan_dataset(args.raw, work=work, name=name)
    preprocess(name, work=work, configurations=[args.configuration])
    run, _ = assemble_run(
        Workspace.at(work, name),
        TrainOptions(args.configuration, "all", augmentation=args.preset, device=str(device)),
    )
    plan, sampler, augmenter = run.plan, run.train_sampler, run.augmenter
    threads = args.threads or default_loader_threads(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # sampler + augmentation alone
    n_batches = 8
    t0 = time.perf_counter()
    for batch, image, seg in BatchLoader(sampler, start=10_000, count=n_batches, threads=threads):
        image, seg = augmenter(image, seg, batch.augmentation_seed)
    sync()
    samples_per_s = n_batches * plan.batch_size / (time.perf_counter() - t0)
    save_png(image, seg, args.out / f"augmented_{args.configuration}.png")

    ready, piped = interleaved_iterations(run, image, seg, args.iterations, threads)
    ready_s, piped_s = statistics.median(ready), statistics.median(piped)
    print(
        json.dumps(
            {
                "dataset": str(args.raw),
                "configuration": args.configuration,
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "loader_threads": threads,
                "preset": args.preset,
                "patch_size": plan.patch_size,
                "sample_size": augmenter.sample_size,
                "batch_size": plan.batch_size,
                "samples_per_s": round(samples_per_s, 1),
                "ready_s_per_iteration": round(ready_s, 3),
                "pipeline_s_per_iteration": round(piped_s, 3),
                "ratio": round(piped_s / ready_s, 3),
                "png": str(args.out / f"augmented_{args.configuration}.png"),
            }
        )
    )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
