"""One fold brought to the end: train it, then validate it in full (a separate stage that the
trainer does not know about)."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

from autounet.training.options import TrainOptions
from autounet.training.trainer import TrainResult, train
from autounet.utils.lock import exclusive
from autounet.validation.fold import ValidationResult, validate_trained_fold
from autounet.workspace import Workspace, validation_summary_path


@dataclass
class FoldResult:
    training: TrainResult
    validation: ValidationResult | None  # None: fold 'all', validation switched off, or a rank > 0


def validate_and_report(
    ws: Workspace, configuration: str, fold: int | str, device: str | None = None, tta: bool = True
) -> ValidationResult:
    """Validate a trained fold in full and print one line with its mean Dice (holding the fold's
    lock: a `train` of the same fold fails at once meanwhile)."""
    with ExitStack() as hold:
        if ws.fold_dir(configuration, fold).is_dir():  # else validation says what is missing
            hold.enter_context(
                exclusive(ws.fold_lock(configuration, fold), f"`autounet train` of {configuration} fold {fold}")
            )
        return _validate_and_report(ws, configuration, fold, device, tta)


def _validate_and_report(
    ws: Workspace, configuration: str, fold: int | str, device: str | None, tta: bool
) -> ValidationResult:
    result = validate_trained_fold(ws, configuration, fold, device, tta=tta)
    dice = result.evaluation.foreground_mean.get("dice")
    what = "region" if result.evaluation.settings.get("regions") else "foreground"
    n = len(result.evaluation.per_case)
    print(
        f"{configuration} fold {fold}: {n} validation cases predicted in full ({' + '.join(result.checkpoints)}) "
        f"in {result.seconds:.1f} s; mean {what} Dice {dice:.4f} -> {validation_summary_path(result.folder.parent)}"
    )
    return result


def train_and_validate(
    ws: Workspace, options: TrainOptions, validate: bool = True, validation_tta: bool = True
) -> FoldResult:
    """Train one fold (:func:`autounet.training.trainer.train`), then, on the main process and for
    a numbered fold, predict its validation cases in full and score them; the fold's lock is held
    throughout."""
    with ExitStack() as hold:
        trained = train(ws, options, hold)
        validation = None
        if validate and trained.is_main_process and str(options.fold) != "all":
            validation = _validate_and_report(ws, options.configuration, options.fold, options.device, validation_tta)
            if trained.trackers is not None:  # --logger: the full-case scores beside the curves
                trained.trackers.log_validation(validation.evaluation.mean, validation.evaluation.foreground_mean)
    return FoldResult(trained, validation)
