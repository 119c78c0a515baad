"""Checkpoints: self-contained, atomic, and loadable only as data.

A checkpoint holds the network specification (plain data), the weights, the plan entry, the
presets and the training state (optimiser, schedule, scaler, RNG, epoch, log), all as tensors
and plain Python values. It is read with ``torch.load(weights_only=True)``: a file that contains
anything else (a pickled callable, a class) is refused, so a model file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write

CHECKPOINT_FORMAT = "autounet-checkpoint"
CHECKPOINT_VERSION = 1
NAMES = ("latest", "best", "second_best", "final")


def checkpoint_path(fold_dir: Path, kind: str) -> Path:
    if kind not in NAMES:
        raise ValueError(kind)
    return Path(fold_dir) / f"checkpoint_{kind}.pt"


def save_checkpoint(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` (tensors and plain data only) atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **content}
    atomic_write(path, lambda p: torch.save(payload, p))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint as data only; one clear error if it is missing, foreign or unsafe.

    ``mmap``: map the tensors instead of reading them (cheap when only the plain data is wanted).
    """
    path = Path(path)
    if not path.is_file():
        raise AutounetError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        unsafe = next((line for line in lines if "GLOBAL" in line), None)
        if unsafe:
            raise AutounetError(
                f"{path}: refused: the file contains Python objects other than tensors and plain data, "
                f"which could run code when loaded ({unsafe})"
            ) from None
        raise AutounetError(f"{path}: not a readable checkpoint (corrupt, or not written by torch.save)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise AutounetError(
            f"{path}: not a readable checkpoint ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise AutounetError(f"{path}: not an autounet checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise AutounetError(
            f"{path}: checkpoint version {payload.get('version')} is not supported (expected {CHECKPOINT_VERSION})"
        )
    return payload


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
