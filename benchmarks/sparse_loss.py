"""Sparse-label cross-entropy: `F.cross_entropy(ignore_index=...)` (training/losses.py) against the
masked mean it replaced, on one training step (forward, Dice + CE with deep supervision, backward).

    OMP_NUM_THREADS=1 python benchmarks/sparse_loss.py [--patch 48 48 48] [--repeats 20]

Prints the largest difference of loss and gradients between the two, and the median step time of
each (interleaved, so that a busy machine slows both alike).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from autounet.networks.spec import NetworkSpec
from autounet.networks.unet import UNet
from autounet.training import losses
from autounet.training.losses import DeepSupervisionLoss, DiceCELoss


class MaskedMeanCE:
    """The former CrossEntropyLoss with an ignore index: CE of every voxel, then a masked mean."""

    def __init__(self, ignore_index: int):
        self.ignore_index = ignore_index

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target, mask = losses.annotated_targets(target, self.ignore_index)
        ce = F.cross_entropy(logits.float(), target[:, 0].long(), reduction="none")
        mask = mask[:, 0].expand_as(ce)
        return (ce * mask).sum() / mask.sum().clamp_min(1.0)


def step(network: UNet, loss: DeepSupervisionLoss, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list]:
    network.zero_grad(set_to_none=True)
    value = loss(network(x), y)
    value.backward()
    return value.item(), [p.grad.clone() for p in network.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[48, 48, 48])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    classes, ignore = 3, 3
    spec = NetworkSpec(3, 1, classes, [8, 16, 32, 64], [[3, 3, 3]] * 4, [[2, 2, 2]] * 3, deep_supervision_heads=2)
    network = UNet(spec)
    x = torch.randn(args.batch, 1, *args.patch)
    y = torch.randint(0, classes, (args.batch, 1, *args.patch))
    y[:, :, 1::3] = ignore  # two of three slices unannotated
    new = DeepSupervisionLoss(DiceCELoss(batch_dice=True, ignore_index=ignore))
    old = DeepSupervisionLoss(DiceCELoss(batch_dice=True, ignore_index=ignore))
    old.loss.ce = MaskedMeanCE(ignore)
    value_new, grads_new = step(network, new, x, y)
    value_old, grads_old = step(network, old, x, y)
    worst = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-12) for a, b in zip(grads_new, grads_old))
    print(f"loss: new {value_new:.8f}, masked mean {value_old:.8f}, difference {abs(value_new - value_old):.2e}")
    print(f"gradients: largest difference relative to each tensor's largest value {worst:.2e}")
    times: dict[str, list[float]] = {"F.cross_entropy(ignore_index)": [], "masked mean": []}
    for _ in range(args.repeats):
        for name, loss in (("F.cross_entropy(ignore_index)", new), ("masked mean", old)):
            started = time.perf_counter()
            step(network, loss, x, y)
            times[name].append(time.perf_counter() - started)
    for name, seconds in times.items():
        print(f"{name:30s} median step {statistics.median(seconds) * 1000:7.1f} ms over {args.repeats}")
    # the cross-entropy term alone (forward and backward on full-resolution logits): what changed
    logits = torch.randn(args.batch, classes, *args.patch, requires_grad=True)
    alone: dict[str, list[float]] = {"F.cross_entropy(ignore_index)": [], "masked mean": []}
    for _ in range(args.repeats * 5):
        for name, ce in (("F.cross_entropy(ignore_index)", new.loss.ce), ("masked mean", old.loss.ce)):
            started = time.perf_counter()
            ce(logits, y).backward()
            alone[name].append(time.perf_counter() - started)
            logits.grad = None
    for name, seconds in alone.items():
        print(f"{name:30s} median CE term {statistics.median(seconds) * 1000:7.2f} ms over {args.repeats * 5}")


if __name__ == "__main__":
    main()
