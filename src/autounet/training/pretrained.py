"""Starting a run from another run's weights (`autounet train ... --pretrained SOURCE`).

Every tensor of the new network whose name and shape match a tensor of the source checkpoint is
copied, except the output heads when the source's labels or regions are not the new run's (same
values and names: :func:`autounet.planning.transfer.same_outputs`): a head of the same shape would
still predict the source's classes under the new names. Every other tensor keeps its fresh
initialisation (the first convolution when the input channels differ, any stage whose features
differ). A source of which no encoder convolution weight fits is refused: it is another network.

``SOURCE`` is a checkpoint file, a fold folder (``checkpoint_final.pt``, else ``_best``, else
``_latest``), a configuration folder ``W/NAME/results/CONFIG`` (its ``fold_all`` when trained,
else its lowest-numbered trained fold) or a workspace ``W/NAME`` (its configuration of the same
name as the one being trained). The checkpoint is read as data only (``weights_only=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autounet.errors import AutounetError
from autounet.planning.plans import CONFIGURATIONS
from autounet.planning.transfer import same_outputs
from autounet.regions import RegionSet
from autounet.training.checkpoint import load_checkpoint
from autounet.utils.plain_data import from_plain
from autounet.workspace import CHECKPOINT_KINDS, Workspace, checkpoint_path, fold_folders

# Which checkpoint of a fold folder: what inference uses first (the finished run), then the best,
# then the latest (a run still going or stopped early is still a useful start).
FOLD_CHECKPOINTS = ("final", "best", "latest")
ENCODER = "encoder."
HEADS = "heads."  # the output convolutions (one per deep-supervision level)
NAMES_SHOWN = 6  # names listed per group of re-initialised tensors
MISSING = "not in the source"
OTHER_LABELS = "the source's labels differ"


def _fold_checkpoint(folder: Path) -> Path | None:
    return next((p for k in FOLD_CHECKPOINTS if (p := checkpoint_path(folder, k)).is_file()), None)


def _has_checkpoint(folder: Path) -> bool:
    return any(checkpoint_path(folder, k).is_file() for k in CHECKPOINT_KINDS)


def _configuration_checkpoint(folder: Path) -> Path | None:
    """``fold_all`` when trained, else the lowest-numbered trained fold of a configuration folder."""
    folds = fold_folders(folder)
    ordered = ([folds.pop("all")] if "all" in folds else []) + list(folds.values())
    return next((c for d in ordered if (c := _fold_checkpoint(d)) is not None), None)


def pretrained_checkpoint(source: str | Path, configuration: str) -> Path:
    """The checkpoint file ``source`` names (see the module docstring) for a run of ``configuration``."""
    source = Path(source)
    what = "give a checkpoint file, a fold folder, a configuration folder W/NAME/results/CONFIG or a workspace W/NAME"
    try:
        if source.is_file():
            return source
        if not source.is_dir():
            raise AutounetError(f"--pretrained {source}: not found; {what}")
        if _has_checkpoint(source):
            found = _fold_checkpoint(source)
            if found is None:
                raise AutounetError(
                    f"--pretrained {source}: this fold folder holds no checkpoint_final.pt, _best.pt or _latest.pt"
                )
            return found
        if fold_folders(source):
            found = _configuration_checkpoint(source)
            if found is None:
                raise AutounetError(f"--pretrained {source}: none of its fold folders holds a checkpoint yet")
            return found
        ws = Workspace.of(source)
        if ws.is_planned() or any(ws.results_dir(c).is_dir() for c in CONFIGURATIONS):
            folder = ws.results_dir(configuration)
            found = _configuration_checkpoint(folder) if folder.is_dir() else None
            if found is None:
                there = [c for c in CONFIGURATIONS if ws.results_dir(c).is_dir()]
                raise AutounetError(
                    f"--pretrained {source}: the workspace has no trained {configuration} (configurations there: "
                    f"{', '.join(there) or 'none'}); give one of them as {folder.parent}/CONFIG to start from it"
                )
            return found
    except OSError as exc:
        raise AutounetError(f"--pretrained {source}: cannot be read ({exc.strerror or exc})") from None
    raise AutounetError(f"--pretrained {source}: not a checkpoint, fold, configuration or workspace folder; {what}")


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


@dataclass
class WeightTransfer:
    """What :func:`load_matching_weights` did: which tensors came from the source, which did not and why."""

    source: str  # as the user named it
    checkpoint: Path
    origin: dict[str, Any]  # the source run: dataset, configuration, fold, epoch
    loaded: list[str] = field(default_factory=list)
    reinitialised: dict[str, str] = field(default_factory=dict)  # name -> why
    unused: list[str] = field(default_factory=list)  # source tensors the network has no place for
    labels_differ: str | None = None  # how the source's labels differ from the run's (None: the same)

    def record(self) -> dict[str, Any]:
        """Plain data for the run's checkpoints (``initialised_from``)."""
        return {
            "source": self.source,
            "checkpoint": str(self.checkpoint),
            **self.origin,
            "loaded": len(self.loaded),
            "reinitialised": sorted(self.reinitialised),
        }

    def format(self) -> str:
        """A table of loaded and re-initialised tensors per part of the network, then the reasons."""
        origin = ", ".join(f"{k} {v}" for k, v in self.origin.items() if v is not None)
        lines = [f"initialised from {self.source} ({self.checkpoint.name}: {origin})"]
        parts: dict[str, list[int]] = {}
        for name in self.loaded:
            parts.setdefault(name.split(".")[0], [0, 0])[0] += 1
        for name in self.reinitialised:
            parts.setdefault(name.split(".")[0], [0, 0])[1] += 1
        rows = [("part", "tensors", "loaded", "re-initialised")]
        rows += [(p, str(a + b), str(a), str(b)) for p, (a, b) in parts.items()]
        rows.append(
            (
                "total",
                str(len(self.loaded) + len(self.reinitialised)),
                str(len(self.loaded)),
                str(len(self.reinitialised)),
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        missing = [n for n, why in self.reinitialised.items() if why == MISSING]
        relabelled = [n for n, why in self.reinitialised.items() if why == OTHER_LABELS]
        reshaped = [f"{n} ({why})" for n, why in self.reinitialised.items() if why not in (MISSING, OTHER_LABELS)]
        for what, names in (
            ("another shape in the source", reshaped),
            (MISSING, missing),
            (f"{OTHER_LABELS} ({self.labels_differ})", relabelled),
        ):
            if names:
                more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
                lines.append(f"  re-initialised, {what}: {', '.join(names[:NAMES_SHOWN])}{more}")
        if self.unused:
            more = f" and {len(self.unused) - NAMES_SHOWN} more" if len(self.unused) > NAMES_SHOWN else ""
            lines.append(f"  not used (no such tensor here): {', '.join(self.unused[:NAMES_SHOWN])}{more}")
        return "\n".join(lines)


def _labels_differ(stored: dict[str, Any], labels: dict[str, str], regions: RegionSet | None) -> str | None:
    """How the source checkpoint's outputs differ from the run's (None: they mean the same)."""
    theirs, their_regions = stored.get("labels"), stored.get("regions")
    if not isinstance(theirs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in theirs.items()):
        return "it records no labels"
    try:
        their_regions = from_plain(RegionSet, their_regions, "regions") if their_regions else None
    except AutounetError:
        return "its regions cannot be read"
    if same_outputs(theirs, their_regions, labels, regions):
        return None
    if dict(theirs) != dict(labels):
        return f"{_show(theirs)} there, {_show(labels)} here"
    return "other regions"


def _show(labels: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(labels.items(), key=lambda kv: (len(kv[0]), kv[0])))


def load_matching_weights(
    network: torch.nn.Module,
    source: str,
    checkpoint: Path,
    labels: dict[str, str] | None = None,
    regions: RegionSet | None = None,
) -> WeightTransfer:
    """Copy into ``network`` every tensor of ``checkpoint`` with the same name and shape, the
    output heads only when the checkpoint's labels and regions are ``labels`` and ``regions``
    (the new run's; None: not compared); refused when no encoder tensor matches. The rest keep
    their initialisation."""
    stored = load_checkpoint(checkpoint)
    weights = stored.get("state_dict")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise AutounetError(f"{checkpoint}: holds no network weights (state_dict)")
    origin = {
        "dataset": stored.get("dataset"),
        "configuration": stored.get("configuration"),
        "fold": stored.get("fold"),
        "epoch": (stored.get("training") or {}).get("epoch"),
    }
    own = network.state_dict()
    result = WeightTransfer(source, checkpoint, origin)
    result.labels_differ = _labels_differ(stored, labels, regions) if labels is not None else None
    merged = {}
    for name, tensor in own.items():
        theirs = weights.get(name)
        if theirs is None:
            result.reinitialised[name] = MISSING
        elif result.labels_differ is not None and name.startswith(HEADS):
            result.reinitialised[name] = OTHER_LABELS
        elif theirs.shape != tensor.shape:
            result.reinitialised[name] = f"{_shape(tensor)} here, {_shape(theirs)} in the source"
        else:
            merged[name] = theirs.to(dtype=tensor.dtype)
            result.loaded.append(name)
    result.unused = [n for n in weights if n not in own]
    # Convolution kernels (normalisation scales and biases of the same width fit any network)
    encoder = [n for n, t in own.items() if n.startswith(ENCODER) and t.dim() > 1]
    if not any(n in merged for n in encoder):
        first = encoder[0] if encoder else None
        detail = f" (e.g. {first}: {result.reinitialised.get(first)})" if first else ""
        raise AutounetError(
            f"--pretrained {source}: none of the network's {len(encoder)} encoder convolution weights matches {checkpoint}"
            f"{detail}: it is another network. Plan this dataset with `autounet plan RAW --plans-from` the source's "
            "workspace to train the same network."
        )
    network.load_state_dict(merged, strict=False)
    return result
