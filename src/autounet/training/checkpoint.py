"""Checkpoints: self-contained, atomic, and loadable only as data.

A checkpoint holds the network specification (plain data), the weights, the plan entry, the
presets and the training state (optimiser, schedule, scaler, RNG, epoch, log), all as tensors
and plain Python values. It is read with ``torch.load(weights_only=True)``: a file that contains
anything else (a pickled callable, a class) is refused, so a model file cannot run code.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write
from autounet.utils.loaders import regular_file
from autounet.utils.temporary import write_failure

CHECKPOINT_FORMAT = "autounet-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` (tensors and plain data only) atomically; a failed write (disk full, file
    size limit) raises :class:`OSError` naming ``path`` and leaves the earlier checkpoint intact."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **content}

    def write(tmp: Path) -> None:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch reports a short write without an errno
            raise write_failure(path, str(exc)) from None

    atomic_write(path, write)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint as data only; one clear error if it is missing, foreign or unsafe.

    ``mmap``: map the tensors instead of reading them (cheap when only the plain data is wanted).
    """
    path = regular_file(path, "checkpoint", "checkpoint cannot be read")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        unsafe = next((line for line in lines if "GLOBAL" in line), None) or _code_in_pickle(path)
        if unsafe:
            raise AutounetError(
                f"{path}: refused: the file contains Python objects other than tensors and plain data, "
                f"which could run code when loaded ({unsafe})"
            ) from None
        raise AutounetError(f"{path}: not a readable checkpoint (corrupt, or not written by torch.save)") from None
    except OSError as exc:
        raise AutounetError(f"{path}: checkpoint cannot be read ({exc.strerror or exc})") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        unsafe = _code_in_pickle(path)
        if unsafe:
            raise AutounetError(
                f"{path}: refused: the file contains Python objects other than tensors and plain data, "
                f"which could run code when loaded ({unsafe})"
            ) from None
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


# What torch's own pickles name; anything else in a pickle is a callable that loading would run.
_SAFE_GLOBALS = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.slice")
_DOTTED = re.compile(r"^[A-Za-z_][\w.]*$")
_TEXT_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _code_in_pickle(path: Path) -> str | None:
    """The first callable other than torch's that the pickle in ``path`` (a plain pickle, a legacy
    torch file, or a torch zip's ``data.pkl``) would call when loaded; read without loading it."""
    import io
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                stream: Any = io.BytesIO(z.read(name))
        else:
            stream = open(path, "rb")  # closed below
    except (OSError, zipfile.BadZipFile):
        return None
    with stream:
        if stream.read(1) != b"\x80":  # pickles from protocol 2 on start with PROTO
            return None
        stream.seek(0)
        for _ in range(4):  # a legacy torch file is several pickles in a row, then raw data
            texts: list[str] = []
            try:
                for op, arg, _ in pickletools.genops(stream):
                    if op.name in _TEXT_OPS:
                        texts.append(str(arg))
                    name = None
                    if op.name in ("GLOBAL", "INST"):
                        name = str(arg).replace(" ", ".")
                    elif op.name == "STACK_GLOBAL" and len(texts) >= 2:
                        name = f"{texts[-2]}.{texts[-1]}"
                    if name and _DOTTED.match(name) and not name.startswith(_SAFE_GLOBALS):
                        return name
            except Exception:  # the end of the pickles (raw tensor data), or not a pickle at all
                return None
    return None


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random state: the CPU generator and the training device's own (not every
    visible GPU's, so a resume on fewer or other GPUs restores what this rank used)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "device_type": device.type, "device": None}
    if device.type == "cuda":
        state["device"] = torch.cuda.get_rng_state(device)
    return state


def rng_state_for_rank(stored: Any, rank: int) -> dict[str, Any] | None:
    """The state rank ``rank`` saved, from a checkpoint's ``rng`` entry: ``{"per_rank": [...]}``
    (one state per process), or the single state of a checkpoint written before that existed.
    None when no state was saved for this rank (more processes now than then)."""
    if isinstance(stored, dict) and "per_rank" in stored:
        states = stored["per_rank"]
        return states[rank] if rank < len(states) else None
    if isinstance(stored, dict) and "torch" in stored:  # before per-rank states
        if rank > 0:
            return None
        cuda = stored.get("cuda")
        return {
            "torch": stored["torch"],
            "device_type": "cuda" if cuda else "cpu",
            "device": cuda[0] if cuda else None,
        }
    return None


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore a state from :func:`rng_state` on ``device`` (a GPU state only onto a GPU)."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("device_type") == "cuda" and state.get("device") is not None:
        torch.cuda.set_rng_state(state["device"].cpu(), device)
