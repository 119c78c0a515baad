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
from torch.serialization import get_unsafe_globals_in_checkpoint
from torch.torch_version import TorchVersion

from autounet.errors import AutounetError
from autounet.utils.atomic import atomic_write
from autounet.utils.loaders import regular_file
from autounet.utils.plain_data import from_plain
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


# torch.load(weights_only=True) is a safe loader only from torch 2.10 on: before 2.6 it could run
# code (CVE-2025-32434), before 2.10 a crafted file could corrupt memory (CVE-2026-24747).
SAFE_TORCH = (2, 10)


def require_safe_torch(path: str | Path) -> None:
    """Refuse to read the checkpoint or package ``path`` with a torch whose weights-only loader is unsafe."""
    if TorchVersion(torch.__version__) < SAFE_TORCH:
        raise AutounetError(
            f"{path}: refused: torch {torch.__version__} cannot load model files safely "
            f"(torch.load(weights_only=True) before torch {SAFE_TORCH[0]}.{SAFE_TORCH[1]} lets a crafted file run code "
            "or corrupt memory: CVE-2025-32434, CVE-2026-24747); install torch>="
            f"{SAFE_TORCH[0]}.{SAFE_TORCH[1]}"
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint as data only; one clear error if it is missing, foreign or unsafe, or if
    this torch's weights-only loader is not safe (:func:`require_safe_torch`).

    ``mmap``: map the tensors instead of reading them (cheap when only the plain data is wanted).
    """
    path = regular_file(path, "checkpoint", "checkpoint cannot be read")
    require_safe_torch(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError as exc:
        raise AutounetError(f"{path}: checkpoint cannot be read ({exc.strerror or exc})") from None
    except MemoryError:
        raise
    except RecursionError:
        raise AutounetError(f"{path}: not a readable checkpoint (nested too deeply)") from None
    # a damaged file makes torch's unpickler raise almost anything (KeyError, IndexError, struct.error, ...)
    except Exception as exc:
        unsafe = _unsafe_globals(path, exc)
        if unsafe:
            raise AutounetError(
                f"{path}: refused: the file contains Python objects other than tensors and plain data, "
                f"which could run code when loaded ({unsafe})"
            ) from None
        if isinstance(exc, pickle.UnpicklingError):
            raise AutounetError(f"{path}: not a readable checkpoint (corrupt, or not written by torch.save)") from None
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


def _unsafe_globals(path: Path, error: BaseException) -> str | None:
    """The callables (beyond what torch's weights-only loader allows) that the pickle of ``path``
    names, read without loading it, or named in torch's ``error``; None when there are none or
    it cannot tell. Files torch.save writes are scanned by torch
    (``get_unsafe_globals_in_checkpoint``); a plain pickle, which torch's scan does not read
    from protocol 4 on, with :mod:`pickletools`."""
    named = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), None)
    if named:
        return named
    try:
        found = get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file
        found = _globals_in_plain_pickle(path)
    return ", ".join(found[:3]) if found else None


def _globals_in_plain_pickle(path: Path) -> list[str]:
    import pickletools

    from torch._weights_only_unpickler import _get_allowed_globals

    names, texts = [], []
    try:
        with open(path, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(texts) >= 2:
                    names.append(".".join(texts[-2:]))
                elif isinstance(arg, str):
                    texts.append(arg)
    except Exception:  # the end of the pickle, or not a pickle
        pass
    allowed = set(_get_allowed_globals())
    return [n for n in dict.fromkeys(names) if n not in allowed]


def check_inference_content(content: dict[str, Any], path: str | Path) -> None:
    """Check the fields `predict` reads from a checkpoint (network spec, weights, plan, labels):
    present, of the right type, and weights that fit the network; one error naming ``path``."""
    from autounet.networks.spec import NetworkSpec
    from autounet.networks.unet import UNet
    from autounet.planning.plans import ConfigurationPlan

    for key in ("network_spec", "state_dict", "plan", "labels"):
        if not isinstance(content.get(key), dict):
            found = "missing" if key not in content else f"a {type(content[key]).__name__}"
            raise AutounetError(f"{path}: not a usable model checkpoint: '{key}' is {found}, expected a mapping")
    weights = content["state_dict"]
    if not weights or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise AutounetError(f"{path}: not a usable model checkpoint: 'state_dict' must map names to tensors")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in content["labels"].items()):
        raise AutounetError(f"{path}: not a usable model checkpoint: 'labels' must map label values to names")
    spec = from_plain(NetworkSpec, content["network_spec"], f"{path}: network_spec")
    from_plain(ConfigurationPlan, content["plan"], f"{path}: plan")
    try:
        with torch.device("meta"):  # the shapes only: nothing is allocated
            expected = {k: tuple(v.shape) for k, v in UNet(spec).state_dict().items()}
    except Exception as exc:
        raise AutounetError(f"{path}: network_spec does not describe a buildable network ({exc})") from None
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise AutounetError(f"{path}: the weights do not fit the stored network (first difference: {differ[0]})")
    broken = next((k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if broken is not None:  # such a network predicts background everywhere, silently
        raise AutounetError(f"{path}: the weights hold NaN or infinite values ({broken}): the network cannot predict")


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
