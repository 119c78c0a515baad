"""Agreement of inference precisions on hippocampus with a barely trained model (issue 22). One JSON line.

    python benchmarks/precision.py DATA_DIR [--test 52] [--cases N] [--epochs 2] [--iterations 10] [--out FOLDER]

Copies the dataset (``DATA_DIR``: an MSD folder, e.g. /work/shared/data/hippocampus) into
``--out`` (default: a temporary folder), holds its last ``--test`` cases out, plans, preprocesses
and trains ``3d_fullres`` fold ``all`` for ``--epochs`` x ``--iterations`` on the CPU, then
predicts the held-out cases with:

* ``reference``: PyTorch fp32 with float32 accumulators (the accumulators before issue 22);
* ``torch fp32``: PyTorch fp32 with the float16 accumulators: its segmentations may differ from
  the reference only at voxels whose float32 top-two probabilities are within
  :data:`~autounet.inference.sliding_window.HALF_ACCUMULATION_TIE` (counted as ``changed`` and
  ``changed_not_tie``);
* ``auto`` (what ``--engine auto --precision auto`` runs here), ``torch bf16`` (the head in
  float32) and ``torch bf16, bf16 head`` (the logits rounded, as before issue 22): Dice per class
  against ``torch fp32``, pooled over the held-out cases.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from autounet.api import plan, preprocess
from autounet.data.image_io import read_image
from autounet.inference import sliding_window
from autounet.inference.predictor import Predictor
from autounet.networks.unet import UNet
from autounet.pipeline.fold import train_and_validate
from autounet.training.options import TrainOptions
from autounet.workspace import Workspace


def _dataset(source: Path, target: Path, test: int) -> tuple[Path, list[Path]]:
    """The training part of ``source`` as an MSD folder at ``target``, and the held-out images."""
    meta = json.loads((source / "dataset.json").read_text())
    cases = meta["training"]
    keep, held = cases[: len(cases) - test], cases[len(cases) - test :]
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for c in keep:
        for key in ("image", "label"):
            shutil.copy(source / c[key], target / c[key])
    meta.update(training=keep, numTraining=len(keep))
    (target / "dataset.json").write_text(json.dumps(meta, indent=1))
    return target, [source / c["image"] for c in held]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total


def _plain_head(self, level, x):  # the head as before issue 22: under autocast, bf16 logits
    return self.heads[level](x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--test", type=int, default=52)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cases", type=int, default=None, help="predict only the first N held-out cases")
    parser.add_argument(
        "--checkpoint", default="final", help="which checkpoint predicts (latest: use a training cut short)"
    )
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="autounet-precision-"))
    raw, held = _dataset(args.data, root / "raw" / "Hippocampus", args.test)
    work = root / "W"
    ws = Workspace.at(work, "Hippocampus")
    model = ws.results_dir("3d_fullres")
    if not (model / "fold_all" / f"checkpoint_{args.checkpoint}.pt").is_file():
        plan(raw, work=work, workers=1)
        preprocess("Hippocampus", work=work, workers=1, configurations=["3d_fullres"])
        options = TrainOptions(
            "3d_fullres",
            "all",
            epochs=args.epochs,
            iterations_per_epoch=args.iterations,
            validation_iterations=1,
            device="cpu",
        )
        train_and_validate(ws, options, False, False)
    images = [read_image([p]) for p in held[: args.cases]]

    def run(engine: str, precision: str, accumulate=torch.float16, keep=False):
        sliding_window.ACCUMULATOR_DTYPE = accumulate
        try:
            predictor = Predictor(
                model, device="cpu", engine=engine, precision=precision, quiet=True, checkpoints=[args.checkpoint]
            )
            out = [predictor.predict_array(im, geo, f"c{i}", keep) for i, (im, geo) in enumerate(images)]
        finally:
            sliding_window.ACCUMULATOR_DTYPE = torch.float16
        return predictor.engines, out

    _, reference = run("torch", "fp32", torch.float32, keep=True)
    _, fp32 = run("torch", "fp32")
    changed = changed_not_tie = 0
    for ref, new in zip(reference, fp32):
        top2 = np.sort(ref.probabilities, axis=0)[-2:]
        tie = (top2[1] - top2[0]) < sliding_window.HALF_ACCUMULATION_TIE
        differ = ref.segmentation != new.segmentation
        changed += int(differ.sum())
        changed_not_tie += int((differ & ~tie).sum())
    report = {
        "cases": len(images),
        "training": f"{args.epochs} epochs x {args.iterations} iterations",
        "checkpoint": args.checkpoint,
        "half_accumulators": {
            "voxels": int(sum(r.segmentation.size for r in reference)),
            "changed": changed,
            "changed_not_tie": changed_not_tie,
        },
        "dice_vs_torch_fp32": {},
    }
    runs = {"auto": ("auto", "auto"), "torch bf16": ("torch", "bf16")}
    for label, (engine, precision) in runs.items():
        described, preds = run(engine, precision)
        report["dice_vs_torch_fp32"][f"{label} ({described})"] = _per_class(preds, fp32)
    UNet._head, saved = _plain_head, UNet._head
    try:
        described, preds = run("torch", "bf16")
    finally:
        UNet._head = saved
    report["dice_vs_torch_fp32"][f"torch bf16, bf16 head as before ({described})"] = _per_class(preds, fp32)
    print(json.dumps(report))
    return 0


def _per_class(preds, reference) -> dict[str, float]:
    seg = np.concatenate([p.segmentation.ravel() for p in preds])
    ref = np.concatenate([p.segmentation.ravel() for p in reference])
    return {str(v): round(_dice(seg == v, ref == v), 5) for v in (1, 2)}


if __name__ == "__main__":
    sys.exit(main())
