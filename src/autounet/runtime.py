"""Where and in what precision tensors are computed: the device and mixed-precision choice that
training and inference share."""

from __future__ import annotations

import functools
import sys

import torch

from autounet.errors import AutounetError


def mps_available() -> bool:
    """Whether this PyTorch build can use an Apple silicon GPU (``mps``) here."""
    mps = getattr(torch.backends, "mps", None)
    try:
        return bool(mps is not None and mps.is_available())
    except Exception:  # a build without the backend
        return False


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cuda`` when present unless told otherwise; ``mps`` (Apple silicon) when asked for and
    available, else the CPU with a note; a clear error for an unusable device."""
    if isinstance(name, torch.device):
        name = str(name)
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AutounetError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AutounetError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            present = f"cuda:0 to cuda:{count - 1}" if count > 1 else "cuda:0 only"
            raise AutounetError(f"device {name!r} requested but this machine has {count} CUDA device(s) ({present})")
    if device.type == "mps":
        if not mps_available():
            print(
                f"note: device {name!r} (Apple silicon GPU) is not available on this machine or in this PyTorch "
                "build; using the CPU",
                file=sys.stderr,
            )
            return torch.device("cpu")
        return torch.device("mps")
    if device.type not in ("cpu", "cuda"):
        raise AutounetError(f"device {name!r} is not supported (use cpu, cuda, cuda:N or mps)")
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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU features that compute bf16 natively
# `train --precision auto` on a CPU with native bf16: bf16 autocast when True. Decided by measurement
# (docs/explanation/measurements.md, "CPU speed"): on hippocampus 3d_fullres (AVX512-BF16 CPU,
# same seed, 120 steps) a bf16 epoch took 112 s against 200 s in fp32 (1.8x) and the full
# validation Dice was 0.7638 against 0.7628; the rule was "faster, and within 0.01 of fp32".
CPU_BF16_TRAINING_BY_DEFAULT = True


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str]) -> bool:
    """Whether a CPU with these feature flags computes in bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def training_dtype(
    device_type: str, precision: str, capability: tuple[int, int] | None, cpu_bf16: bool
) -> torch.dtype | None:
    """The autocast dtype of training for ``precision`` (None: fp32), from the device facts:
    ``auto`` is the GPU's half type (:func:`autocast_dtype_for`), and on a CPU bf16 only where it
    runs natively and :data:`CPU_BF16_TRAINING_BY_DEFAULT` says it pays."""
    if precision not in PRECISIONS:
        raise AutounetError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if device_type == "cuda":
        if precision == "auto":
            return autocast_dtype_for(capability)
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        raise AutounetError(f"--precision fp16 needs a CUDA GPU (on {device_type} use bf16 or fp32)")
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device_type == "cpu" and cpu_bf16 and CPU_BF16_TRAINING_BY_DEFAULT else None


def training_precision(
    device: torch.device, precision: str = "auto"
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Autocast dtype and gradient scaler for training: fp16 needs the scaler, bf16 and fp32 do not."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    dtype = training_dtype(device.type, precision, capability, native_bf16(cpu_flags()))
    return dtype, torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def configure_backends(device: torch.device) -> None:
    """Let cuDNN pick its fastest kernels: patch shapes are fixed, so the search pays once."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
