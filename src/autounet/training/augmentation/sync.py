"""When an augmentation may skip work: deciding it reads a value back from the device."""

from __future__ import annotations

import torch


def nothing_chosen(chosen: torch.Tensor) -> bool:
    """Whether a transform drew no sample of the batch, as an early exit. Reading that is a host
    sync: free on the CPU, where skipping saves the work; on a GPU it would stall the queue every
    batch, so there the transform is computed for the whole batch and masked (this returns False)."""
    return chosen.device.type == "cpu" and not bool(chosen.any())


def kernel_sigma(sigmas: torch.Tensor, upper: float) -> float | None:
    """The sigma that sizes a Gaussian kernel: the largest drawn (a host sync) on the CPU, the
    preset's upper bound on a GPU (known without reading the device)."""
    return None if sigmas.device.type == "cpu" else float(upper)
