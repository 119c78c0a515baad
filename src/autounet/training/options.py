"""`autounet train`'s options, shared by the trainer and the pieces it assembles."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainOptions:
    """`autounet train` flags; None keeps the preset's (or, on --resume, the run's) value."""

    configuration: str
    fold: int | str
    preset: str | None = None  # None: the plan's training preset ("paper", "nvidia" for --recipe brats)
    augmentation: str | None = None  # None: the plan's, else the training preset's
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    validation_iterations: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    device: str | None = None
    seed: int = 0
    max_minutes: float | None = None
    resume: bool = False
    loader_threads: int | None = None
    # seed 004 ablation switches (Tables 2-3); None keeps the plan's network / the preset's loss
    attention: bool | None = None  # attention gates in the decoder
    residual: bool | None = None  # residual blocks (encoder and decoder)
    drop_block: float | None = None  # DropBlock probability (block size 5); 0: off
    focal: bool | None = None  # Focal loss (gamma 2) instead of (binary) cross-entropy
    deep_supervision_heads: int | None = None  # extra output heads; 0: no deep supervision
    features: list[int] | None = None  # features per encoder stage (longer: a deeper encoder)
    deeper: bool = False  # seed 004's 64, 96, 128, 192, 256, 384, 512 encoder
    width_multiplier: float | None = None  # every stage's features times this
    foreground_channel: bool | None = None  # False: drop the one-hot foreground input channel
