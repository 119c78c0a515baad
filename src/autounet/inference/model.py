"""Trained models for inference: one configuration's networks (one per fold and checkpoint).

A model folder is ``W/NAME/results/CONFIG`` (its ``fold_K`` folders are the ensemble) or one
``fold_K`` folder. Every checkpoint is self-contained (network spec, weights, plan entry, labels),
read with ``weights_only=True``; nothing else about the training run is needed. A cascade's
second stage brings its first stage from the sibling folder ``results/<previous_stage>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autounet.errors import AutounetError
from autounet.networks.spec import NetworkSpec
from autounet.networks.unet import UNet
from autounet.planning.plans import ConfigurationPlan
from autounet.regions import RegionSet
from autounet.training.checkpoint import load_checkpoint
from autounet.utils.plain_data import from_plain
from autounet.workspace import checkpoint_path, fold_folders, fold_of


@dataclass
class StageModel:
    """The networks of one configuration and what is needed to use them."""

    configuration: str
    plan: ConfigurationPlan
    spec: NetworkSpec
    labels: dict[str, str]  # label value (as text) -> name
    channel_names: list[str]
    networks: list[torch.nn.Module]
    sources: list[str]  # one description per network (checkpoint path)
    mirror_axes: tuple[int, ...]  # spatial axes the network was trained to see mirrored
    regions: RegionSet | None = None  # sigmoid region outputs; None for softmax classes
    previous: StageModel | None = None  # a cascade's first stage
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label_values(self) -> list[int]:
        return sorted(int(v) for v in self.labels)

    @property
    def num_outputs(self) -> int:
        return self.spec.num_outputs

    @property
    def activation(self) -> str:
        return "sigmoid" if self.regions else "softmax"

    @property
    def image_channels(self) -> int:
        return len(self.plan.normalization)

    def to(self, device: torch.device) -> StageModel:
        self.networks = [n.to(device).eval() for n in self.networks]
        if self.previous is not None:
            self.previous.to(device)
        return self


def stage_chain(stage: StageModel) -> list[StageModel]:
    """A cascade's stages, first stage first (a single stage: itself)."""
    out = []
    while stage is not None:
        out.insert(0, stage)
        stage = stage.previous
    return out


def mirror_axes_of(augmentation: dict | None, dims: int) -> tuple[int, ...]:
    """All spatial axes when the augmentation mirrored them (seed 001 §2.4), else none."""
    p = ((augmentation or {}).get("mirror") or {}).get("p_per_axis", 0.5)
    return tuple(range(dims)) if p > 0 else ()


def network_from_checkpoint(content: dict[str, Any], where: str) -> tuple[NetworkSpec, torch.nn.Module]:
    spec = from_plain(NetworkSpec, content["network_spec"], f"{where}: network_spec")
    network = UNet(spec)
    try:
        network.load_state_dict(content["state_dict"])
    except RuntimeError as exc:
        raise AutounetError(f"{where}: weights do not fit the stored network ({str(exc).splitlines()[0]})") from None
    return spec, network.eval()


def stage_from_checkpoints(paths: Sequence[Path], configuration: str | None = None) -> StageModel:
    """A :class:`StageModel` from checkpoint files of one configuration (an ensemble)."""
    if not paths:
        raise AutounetError("no checkpoints given")
    networks, sources, first = [], [], None
    for path in paths:
        content = load_checkpoint(path, mmap=True)  # the optimiser state stays on disk
        spec, network = network_from_checkpoint(content, str(path))
        if first is None:
            first = (content, spec)
        else:
            ref, ref_spec = first
            if content["plan"] != ref["plan"] or spec.num_outputs != ref_spec.num_outputs:
                raise AutounetError(f"{path}: its plan differs from {paths[0]}'s; they cannot be ensembled")
            if content.get("labels") != ref.get("labels"):
                raise AutounetError(f"{path}: its labels differ from {paths[0]}'s")
        networks.append(network)
        sources.append(str(path))
    content, spec = first
    plan = from_plain(ConfigurationPlan, content["plan"], f"{paths[0]}: plan")
    return StageModel(
        configuration=configuration or content.get("configuration") or plan.name,
        plan=plan,
        spec=spec,
        labels={str(k): str(v) for k, v in content["labels"].items()},
        channel_names=list(content.get("channel_names") or []),
        networks=networks,
        sources=sources,
        mirror_axes=mirror_axes_of(content.get("augmentation_preset"), plan.network_dims),
        regions=from_plain(RegionSet, content["regions"], f"{sources[0]}: regions") if content.get("regions") else None,
    )


def fold_dirs(model_dir: Path) -> dict[str, Path]:
    """``fold name -> folder`` inside a configuration's results folder (fold order: 0, 1, ...,
    all), or the folder itself for one fold."""
    model_dir = Path(model_dir)
    fold = fold_of(model_dir)
    return {fold: model_dir} if fold is not None else fold_folders(model_dir)


def inference_checkpoints(fold_dir: Path) -> list[str]:
    """The checkpoints a fold's training preset names for inference (``inference_checkpoints``,
    stored in ``checkpoint_final.pt``; seed 004's preset: the two best), else ``["final"]``."""
    path = checkpoint_path(fold_dir, "final")
    if not path.is_file():
        return ["final"]
    preset = load_checkpoint(path, mmap=True).get("training_preset") or {}
    return [str(k) for k in preset.get("inference_checkpoints") or ["final"]]


def _default_checkpoints(fold_dir: Path) -> list[str]:
    """The preset's checkpoints that exist (a short run may have no second best), else ``final``."""
    wanted = inference_checkpoints(fold_dir)
    found = [k for k in wanted if checkpoint_path(fold_dir, k).is_file()]
    return found or ["final"]


def load_stage(
    model_dir: str | Path,
    folds: Sequence[int | str] | None = None,
    checkpoints: Sequence[str] | None = None,
) -> StageModel:
    """Load the networks of a configuration folder (``folds``: default every cross-validation fold).

    ``checkpoints``: which checkpoint(s) of each fold (``final``, ``best``, ``latest``,
    ``second_best``); several are ensembled (seed 004 §3.1 averages the two best). None: what
    each fold's training preset names (``inference_checkpoints`` in its ``checkpoint_final.pt``:
    ``final``, or ``best`` and ``second_best`` for the nvidia preset, those of them that exist),
    else ``final``. ``stage.extra["checkpoints"]`` lists the kinds used (of the first fold).
    """
    model_dir = Path(model_dir)
    available = fold_dirs(model_dir)
    if not available:
        raise AutounetError(
            f"{model_dir}: no trained model here (expected fold_K folders, as in W/NAME/results/CONFIG, or one fold_K folder)"
        )
    if folds is None:
        numbered = [f for f in available if f != "all"]
        chosen = numbered or ["all"]
    else:
        chosen = [str(f) for f in folds]
        missing = [f for f in chosen if f not in available]
        if missing:
            raise AutounetError(
                f"{model_dir}: fold(s) {', '.join(missing)} not found (available: {', '.join(available)})"
            )
    paths = []
    used: list[str] = []
    for f in chosen:
        kinds = list(checkpoints) if checkpoints is not None else _default_checkpoints(available[f])
        used = used or kinds
        for kind in kinds:
            path = checkpoint_path(available[f], kind)
            if not path.is_file():
                hint = ""
                if kind == "final" and checkpoint_path(available[f], "latest").is_file():
                    hint = " (training has not finished: resume it, or use --checkpoint latest)"
                raise AutounetError(f"{path}: not found{hint}")
            paths.append(path)
    configuration = model_dir.parent.name if fold_of(model_dir) is not None else model_dir.name
    stage = stage_from_checkpoints(paths, configuration)
    stage.extra["checkpoints"] = used
    if stage.plan.previous_stage:
        results = model_dir.parent.parent if fold_of(model_dir) is not None else model_dir.parent
        previous_dir = results / stage.plan.previous_stage
        if not fold_dirs(previous_dir):
            raise AutounetError(
                f"{model_dir}: this cascade stage needs its first stage {stage.plan.previous_stage} in {previous_dir}, which holds no trained folds"
            )
        stage.previous = load_stage(previous_dir, None, checkpoints)
    return stage
