"""`autounet train`'s options, shared by the trainer and the pieces it assembles."""

from __future__ import annotations

from dataclasses import dataclass

from autounet.errors import AutounetError
from autounet.training.trackers import check_loggers
from autounet.utils import arguments


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
    precision: str = "auto"  # fp32, bf16, fp16 (CUDA) or auto: see runtime.training_dtype
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
    # A run to start from (training/pretrained.py): checkpoint, fold, configuration or workspace
    # folder; used only when the fold starts from scratch (a resume continues its own checkpoint).
    pretrained: str | None = None
    pretrained_label: str | None = None  # how logs name the source (e.g. the package .zip); None: pretrained
    loggers: list[str] | None = None  # experiment trackers (training/trackers.py): tensorboard, wandb, mlflow

    def validate(self) -> TrainOptions:
        """Refuse impossible numbers with one clear message each (before anything is read or written)."""
        fold = self.fold
        if not (str(fold) == "all" or isinstance(fold, int) or (isinstance(fold, str) and fold.strip().isdigit())):
            raise AutounetError(f"-f/--fold must be a fold number (0..4) or 'all', got {fold!r}")
        if isinstance(fold, int):
            arguments.whole("-f/--fold", fold, 0)
        arguments.whole("--epochs", self.epochs, 1)
        arguments.whole("--iters-per-epoch", self.iterations_per_epoch, 1)
        arguments.whole("--val-iters", self.validation_iterations, 0)
        arguments.whole("--batch-size", self.batch_size, 1)
        arguments.real("--lr", self.lr, above=0)
        arguments.whole("--seed", self.seed, 0)
        arguments.real("--max-minutes", self.max_minutes, above=0)
        arguments.whole("--threads", self.loader_threads, 1)
        arguments.real("--drop-block", self.drop_block, at_least=0, below=1)
        arguments.whole("--deep-supervision-heads", self.deep_supervision_heads, 0)
        arguments.sizes("--features", self.features)
        arguments.real("--width-multiplier", self.width_multiplier, above=0)
        check_loggers(self.loggers)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise AutounetError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        return self
