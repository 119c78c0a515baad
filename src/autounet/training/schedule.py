"""Training presets (plain data) and the learning-rate schedules they name.

``plateau`` (seed 001 §2.3), ``warmup_cosine`` (seed 004 §3.2) and ``poly`` (the public
nnU-Net v2). A :class:`Schedule` holds all of its state in :meth:`state_dict`, so a resumed run
continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from autounet import presets
from autounet.errors import AutounetError

SCHEDULES = ("plateau", "warmup_cosine", "poly")
OPTIMIZERS = ("adam", "sgd")
BEST_METRICS = ("ema", "raw")
INFERENCE_CHECKPOINTS = ("final", "best", "second_best", "latest")


@dataclass
class OptimizerSettings:
    name: str
    lr: float
    weight_decay: float
    momentum: float  # SGD only
    nesterov: bool  # SGD only


@dataclass
class ScheduleSettings:
    name: str
    warmup_steps: int  # warmup_cosine: linear warm-up from 0
    poly_exponent: float  # poly
    train_ema: float  # plateau: moving-average factor of the training loss
    val_ema: float  # plateau: ... of the validation loss
    threshold: float  # plateau: an improvement smaller than this does not count
    lr_patience: int  # plateau: epochs without improvement of the training average before lr * lr_factor
    lr_factor: float
    stop_patience: int  # plateau: epochs without improvement of the validation average before stopping ...
    min_lr: float  # ... once lr is below this


@dataclass
class TrainingPreset:
    name: str
    description: str
    optimizer: OptimizerSettings
    schedule: ScheduleSettings
    max_epochs: int
    iterations_per_epoch: int
    validation_iterations: int
    grad_clip_norm: float  # 0: no clipping
    augmentation: str  # augmentation preset name or JSON path
    deep_supervision_normalized: bool
    best_dice_ema: float  # moving-average factor of the validation Dice (best_metric "ema")
    schema_version: int = 1
    # checkpoint_best.pt (and checkpoint_second_best.pt when 2) follow the epoch's mean validation
    # Dice: its moving average ("ema", seed 001's public code) or the raw value ("raw", seed 004 §3.2)
    best_checkpoints: int = 1
    best_metric: str = "ema"
    # what inference and the end-of-training validation use by default: each fold's "final", or
    # its two best averaged (seed 004 §3.2: ["best", "second_best"])
    inference_checkpoints: list[str] = field(default_factory=lambda: ["final"])
    focal_loss: bool = False  # Focal (gamma 2) instead of (binary) cross-entropy, seed 004 Table 2

    def validate(self) -> None:
        if self.optimizer.name not in OPTIMIZERS:
            raise AutounetError(f"training preset {self.name}: optimizer must be one of {OPTIMIZERS}")
        if self.schedule.name not in SCHEDULES:
            raise AutounetError(f"training preset {self.name}: schedule must be one of {SCHEDULES}")
        if (
            not 0 < self.optimizer.lr < float("inf")  # NaN too
            or self.max_epochs < 1
            or self.iterations_per_epoch < 1
            or self.validation_iterations < 0
        ):
            raise AutounetError(f"training preset {self.name}: lr, epochs and iterations must be positive")
        for key in ("train_ema", "val_ema"):
            if not 0 <= getattr(self.schedule, key) < 1:
                raise AutounetError(f"training preset {self.name}: schedule.{key} must be in [0, 1)")
        if self.best_checkpoints not in (1, 2):
            raise AutounetError(f"training preset {self.name}: best_checkpoints must be 1 or 2")
        if self.best_metric not in BEST_METRICS:
            raise AutounetError(f"training preset {self.name}: best_metric must be one of {BEST_METRICS}")
        bad = [c for c in self.inference_checkpoints if c not in INFERENCE_CHECKPOINTS]
        if (
            not self.inference_checkpoints
            or bad
            or len(set(self.inference_checkpoints)) < len(self.inference_checkpoints)
        ):
            raise AutounetError(
                f"training preset {self.name}: inference_checkpoints must list distinct names of {INFERENCE_CHECKPOINTS}"
            )
        if "second_best" in self.inference_checkpoints and self.best_checkpoints < 2:
            raise AutounetError(f"training preset {self.name}: second_best needs best_checkpoints 2")


def training_preset_names() -> list[str]:
    return presets.names("training")


def load_training_preset(name_or_path: str | Path) -> TrainingPreset:
    """A built-in training preset by name (``paper``, ``nvidia``, ``poly``) or a JSON file."""
    return presets.load("training", name_or_path, TrainingPreset, 1)


def make_optimizer(parameters, settings: OptimizerSettings) -> torch.optim.Optimizer:
    if settings.name == "adam":
        if settings.weight_decay:
            return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
        return torch.optim.Adam(parameters, lr=settings.lr)
    return torch.optim.SGD(
        parameters,
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov,
        weight_decay=settings.weight_decay,
    )


class Schedule:
    """Learning rate per step and the stopping rule, with all state in :meth:`state_dict`."""

    def __init__(self, settings: ScheduleSettings, base_lr: float, max_epochs: int, iterations_per_epoch: int):
        self.s, self.base_lr = settings, base_lr
        self.max_epochs, self.iterations_per_epoch = max_epochs, iterations_per_epoch
        self.lr = base_lr  # the plateau schedule's current rate
        self.train_avg: float | None = None
        self.val_avg: float | None = None
        self.best_train = math.inf
        self.best_val = math.inf
        self.since_train_improved = 0
        self.since_val_improved = 0

    def lr_for(self, epoch: int, step: int) -> float:
        """Learning rate for optimiser step ``step`` (0-based, global) in epoch ``epoch``."""
        if self.s.name == "plateau":
            return self.lr
        if self.s.name == "poly":
            return self.base_lr * (1 - epoch / self.max_epochs) ** self.s.poly_exponent
        total = self.max_epochs * self.iterations_per_epoch
        if step < self.s.warmup_steps:
            return self.base_lr * (step + 1) / self.s.warmup_steps
        span = max(1, total - self.s.warmup_steps)
        progress = min(1.0, (step - self.s.warmup_steps) / span)
        return self.s.min_lr + (self.base_lr - self.s.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def end_epoch(self, train_loss: float, val_loss: float | None) -> bool:
        """Update the moving averages (and, for ``plateau``, the rate); True when training should stop."""
        a = self.s.train_ema
        self.train_avg = train_loss if self.train_avg is None else a * self.train_avg + (1 - a) * train_loss
        if val_loss is not None:
            b = self.s.val_ema
            self.val_avg = val_loss if self.val_avg is None else b * self.val_avg + (1 - b) * val_loss
        if self.s.name != "plateau":
            return False
        if self.train_avg < self.best_train - self.s.threshold:
            self.best_train, self.since_train_improved = self.train_avg, 0
        else:
            self.since_train_improved += 1
            if self.since_train_improved >= self.s.lr_patience:
                self.lr *= self.s.lr_factor
                self.since_train_improved = 0
        if self.val_avg is not None:
            if self.val_avg < self.best_val - self.s.threshold:
                self.best_val, self.since_val_improved = self.val_avg, 0
            else:
                self.since_val_improved += 1
        return self.since_val_improved >= self.s.stop_patience and self.lr < self.s.min_lr

    def state_dict(self) -> dict:
        return {
            "lr": self.lr,
            "train_avg": self.train_avg,
            "val_avg": self.val_avg,
            "best_train": self.best_train,
            "best_val": self.best_val,
            "since_train_improved": self.since_train_improved,
            "since_val_improved": self.since_val_improved,
            "settings": asdict(self.s),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in (
            "lr",
            "train_avg",
            "val_avg",
            "best_train",
            "best_val",
            "since_train_improved",
            "since_val_improved",
        ):
            setattr(self, key, state[key])
