"""`autounet demo`: the whole method on a small synthetic dataset, on the CPU, in a few minutes.

Writes a synthetic MRI dataset (training cases plus held-out test cases), runs `autounet run` on it
with a tiny budget (2d and 3d_fullres, five folds), predicts the held-out cases with the selected
model and scores them. Everything lives in the demo folder, so a second run resumes (or just
reprints the results).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from autounet.errors import AutounetError
from autounet.pipeline.run import RunOptions, RunResult, run_pipeline
from autounet.workspace import Workspace

NAME = "synthetic"


@dataclass
class DemoSettings:
    cases: int = 20
    test_cases: int = 6
    shape: tuple[int, int, int] = (24, 28, 26)
    epochs: int = 6
    iterations_per_epoch: int = 10
    validation_iterations: int = 2
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    configurations: tuple[str, ...] = ("2d", "3d_fullres")
    device: str | None = None
    seed: int = 0


@dataclass
class DemoResult:
    run: RunResult
    test_dice: float
    predictions: Path
    pictures: list[Path]
    seconds: float


def run_demo(folder: str | Path = "autounet_demo", settings: DemoSettings | None = None) -> DemoResult:
    """Make (or reuse) the synthetic data in ``folder``, run the pipeline, predict and score the test cases."""
    from autounet.data.synthetic import SyntheticSpec, make_synthetic_dataset
    from autounet.evaluation.evaluate import evaluate_folders, format_table, save_evaluation
    from autounet.inference.predictor import Predictor

    settings = settings or DemoSettings()
    start = time.time()
    folder = Path(folder)
    raw = folder / "raw" / NAME
    if not (raw / "dataset.json").is_file():
        print(f"writing a synthetic dataset ({settings.cases} training + {settings.test_cases} test cases) to {raw}")
        spec = SyntheticSpec(
            cases=settings.cases,
            test_cases=settings.test_cases,
            shape=settings.shape,
            spacing_jitter=0.1,
            seed=settings.seed,
        )
        make_synthetic_dataset(raw, spec)
    work = folder / "work"
    result = run_pipeline(
        raw,
        Workspace.at(work, NAME),
        RunOptions(
            configurations=list(settings.configurations),
            folds=list(settings.folds),
            epochs=settings.epochs,
            iterations_per_epoch=settings.iterations_per_epoch,
            validation_iterations=settings.validation_iterations,
            device=settings.device,
            seed=settings.seed,
        ),
    )
    predictions = folder / "test_predictions"
    print(f"\npredicting the {settings.test_cases} held-out test cases with the selected model -> {predictions}")
    Predictor(result.workspace.root, device=settings.device).predict(
        raw / "imagesTs",
        predictions,
        png=True,
        overwrite=True,  # the demo's own folder, redone with the latest model
    )
    evaluation = evaluate_folders(predictions, raw / "labelsTs", workers=1)
    save_evaluation(evaluation, predictions / "evaluation.json")
    print("\nDice on held-out test cases (never seen in training or selection):")
    print(format_table(evaluation, label_names={str(k): v for k, v in _label_names(raw).items()}))
    dice = evaluation.foreground_mean.get("dice")
    if dice is None:
        raise AutounetError("the held-out evaluation produced no Dice")
    pictures = sorted(predictions.glob("*.png"))
    curves = sorted(result.workspace.root.glob("results/*/fold_*/progress.png"))
    print("\npictures:")
    print(f"  training curves: {len(curves)} files, e.g. {curves[0]}" if curves else "  no training curves")
    print(f"  held-out predictions overlaid: {len(pictures)} files, e.g. {pictures[0]}" if pictures else "")
    if result.report is not None:
        print(f"  report: {result.report}")
    seconds = time.time() - start
    print(f"\ndemo finished in {seconds / 60:.1f} min; held-out mean foreground Dice {dice:.3f}")
    return DemoResult(result, float(dice), predictions, pictures, seconds)


def _label_names(raw: Path) -> dict[int, str]:
    from autounet.utils.atomic import read_json

    labels = read_json(raw / "dataset.json", dict).get("labels", {})
    return {int(k): str(v) for k, v in labels.items()}
