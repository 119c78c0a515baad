"""Where and in what precision tensors are computed: the device and mixed-precision choice that
training and inference share."""

from __future__ import annotations

import torch

from autounet.errors import AutounetError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cuda`` when present unless told otherwise; a clear error for an unusable device."""
    if isinstance(name, torch.device):
        name = str(name)
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


# cuDNN has bf16 convolution kernels from compute capability 8.0 (Ampere) on. Below it
# `torch.cuda.is_bf16_supported()` can still say True (emulation), but every 3D convolution then
# falls back to slow kernels with GB-sized buffers: fp16 with a gradient scaler is the choice there.
BF16_MIN_CAPABILITY = (8, 0)


def autocast_dtype_for(capability: tuple[int, int] | None) -> torch.dtype | None:
    """The autocast dtype for a CUDA device of compute ``capability`` (None: not a CUDA device,
    full precision)."""
    if capability is None:
        return None
    return torch.bfloat16 if tuple(capability) >= BF16_MIN_CAPABILITY else torch.float16


def half_precision(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on ``device`` (the device in use, not the current one): bf16 from
    Ampere on, fp16 on older GPUs, None (full precision) on the CPU."""
    if device.type != "cuda":
        return None
    return autocast_dtype_for(torch.cuda.get_device_capability(device))


def training_precision(device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Autocast dtype and gradient scaler for training: fp16 needs the scaler, bf16 and fp32 do not."""
    dtype = half_precision(device)
    return dtype, torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def configure_backends(device: torch.device) -> None:
    """Let cuDNN pick its fastest kernels: patch shapes are fixed, so the search pays once."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
