"""One optimiser step exactly as training takes it: autocast, loss, (scaled) backward, gradient
clipping and the optimiser step; and the guard that stops training on non-finite losses. The
trainer and the benchmarks both use them, so benchmark numbers are the trainer's."""

from __future__ import annotations

import torch

from autounet.training.assemble import Run
from autounet.training.distributed import Distributed, all_reduce_sum

# Under fp16 the gradient scaler skips a step whose gradients overflow and lowers its scale; a
# few such steps are normal (the first ones, a spike), so an epoch may have this many before the
# run is stopped. bf16 and fp32 have no scaler: one non-finite loss already corrupted the weights.
FP16_TOLERATED_NONFINITE = 10


def train_step(run: Run, image: torch.Tensor, seg: torch.Tensor, lr: float) -> torch.Tensor:
    """One step on an augmented batch at learning rate ``lr``; returns the detached loss, still on
    the device (reading it is a host sync the caller decides on)."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        output = run.model(image)
    loss = run.loss(output, run.targets(seg) if run.targets is not None else seg)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if run.preset.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.network.parameters(), run.preset.grad_clip_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # skipped when the gradients are not finite
        run.scaler.update()
    else:
        run.optimizer.step()
    return loss.detach()


def must_stop(nonfinite_losses: int, scaler_active: bool, tolerated: int = FP16_TOLERATED_NONFINITE) -> bool:
    """Whether ``nonfinite_losses`` (this epoch, all processes) end training."""
    return nonfinite_losses > (tolerated if scaler_active else 0)


class LossTracker:
    """The epoch's loss sum and count of non-finite losses, kept on the device: observing a step
    costs no host sync; :meth:`nonfinite` (a sync, and a collective under DDP) is called only
    when the trainer checks."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.finite = torch.zeros((), dtype=torch.float64, device=device)
        self.bad = torch.zeros((), dtype=torch.float64, device=device)

    def observe(self, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss)
        self.total += torch.where(ok, loss.double(), torch.zeros_like(self.total))
        self.finite += ok.double()
        self.bad += (~ok).double()

    def nonfinite(self, info: Distributed) -> int:
        """Non-finite losses so far this epoch, summed over processes."""
        return int(all_reduce_sum(self.bad.clone(), info).item())

    def mean(self, info: Distributed) -> float:
        """Mean finite loss over processes."""
        summed = all_reduce_sum(torch.stack([self.total, self.finite]), info)
        return float(summed[0] / summed[1].clamp_min(1.0))
