"""The accuracy guard of every engine and precision on hippocampus with a barely trained model (issue 22). One JSON line.

    python benchmarks/precision.py DATA_DIR [--test 52] [--cases N] [--epochs 2] [--iterations 10]
        [--out FOLDER] [--runs torch:fp32 torch:bf16 ...] [--no-tta]

Copies the dataset (``DATA_DIR``: an MSD folder, e.g. /work/shared/data/hippocampus) into
``--out`` (default: a temporary folder), holds its last ``--test`` cases out, plans, preprocesses
and trains ``3d_fullres`` fold ``all`` for ``--epochs`` x ``--iterations`` on the CPU in fp32
(skipped when ``--out`` holds that training already), then predicts the held-out cases with:

* the reference: PyTorch fp32 with float32 accumulators (the accumulators before issue 22), its
  probabilities kept;
* with ``--before FILE`` (the sliding window before issue 22: ``git show
  aa4cd39^:src/autounet/inference/sliding_window.py > FILE``): PyTorch fp32 through that code,
  float32 accumulators and unscaled Gaussian weights, its probabilities kept: ``torch:fp32``'s
  labels are then also compared with it (``vs_before``: differing voxels, and how many of them
  are ties within ``HALF_ACCUMULATION_TIE`` of its probabilities);
* each of ``--runs`` (``ENGINE:PRECISION``; default every engine and precision, ``auto:auto``
  included, and ``torch:bf16-head`` = PyTorch bf16 with the head in bf16 as before issue 22),
  through the predictor's streaming export (what ``autounet predict`` writes), with the float16
  accumulators.

For each run it reports what ran (after any fallback; ``then``: what precision ``auto`` went on
with after a case too near ties for half precision), the seconds, per-class Dice against the
reference, the differing voxels and how many of them are ties (the reference's two best classes
within :data:`~autounet.inference.agreement.FP32_TIE`; for ``torch:fp32`` also within
:data:`~autounet.inference.sliding_window.HALF_ACCUMULATION_TIE` alone; ``widest_differing``: the
largest reference margin among the differing voxels; ``label_voxels``: per label, the reference's
and the run's voxels), and whether the accuracy
guard (:func:`~autounet.inference.agreement.guard_problem`) holds. A run whose engine or precision
falls back is reported as such and not predicted.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from autounet.api import plan, preprocess
from autounet.data.image_io import read_image
from autounet.inference import predictor as predictor_module
from autounet.inference import sliding_window
from autounet.inference.agreement import Agreement, agreement_for, decision_margin, guard_problem
from autounet.inference.engines import resolve_engine, resolve_precision
from autounet.inference.predictor import Predictor
from autounet.networks.unet import UNet
from autounet.pipeline.fold import train_and_validate
from autounet.training.options import TrainOptions
from autounet.workspace import Workspace

RUNS = (
    "torch:fp32",
    "onnxruntime:fp32",
    "openvino:fp32",
    "openvino:bf16",
    "torch:bf16",
    "torch:bf16-head",
    "torch:fp16",
    "auto:auto",
)


def _dataset(source: Path, target: Path, test: int) -> tuple[Path, list[Path]]:
    """The training part of ``source`` as an MSD folder at ``target``, and the held-out images."""
    meta = json.loads((source / "dataset.json").read_text())
    cases = meta["training"]
    keep, held = cases[: len(cases) - test], cases[len(cases) - test :]
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for c in keep:
        for key in ("image", "label"):
            if not (target / c[key]).is_file():
                shutil.copy(source / c[key], target / c[key])
    meta.update(training=keep, numTraining=len(keep))
    (target / "dataset.json").write_text(json.dumps(meta, indent=1))
    return target, [source / c["image"] for c in held]


def _before(path: Path):
    """``predict_volume`` as the predictor calls it, computed by the sliding window in ``path``."""
    spec = importlib.util.spec_from_file_location("sliding_window_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accepted = inspect.signature(module.predict_volume).parameters

    def predict_volume(networks, image, *args, sink=None, **kwargs):
        nets = networks if isinstance(networks, (list, tuple)) else [networks]
        if len(nets) != 1 or sink is not None:
            raise SystemExit("--before: one network and no spilling only")
        return module.predict_volume(nets[0], image, *args, **{k: v for k, v in kwargs.items() if k in accepted})

    return predict_volume


def _bf16_head(self, level, x):  # the head as before issue 22: under autocast, bf16 logits
    return self.heads[level](x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--test", type=int, default=52)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cases", type=int, default=None, help="predict only the first N held-out cases")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), help="ENGINE:PRECISION to compare (default: all)")
    parser.add_argument(
        "--no-tta", action="store_true", help="no mirroring (bf16 is emulated, and slow, without AVX512-BF16)"
    )
    parser.add_argument("--before", type=Path, default=None, help="sliding_window.py of before issue 22 (see above)")
    parser.add_argument(
        "--checkpoint", default="final", help="which checkpoint predicts (latest: use a training cut short)"
    )
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="autounet-precision-"))
    work = root / "W"
    ws = Workspace.at(work, "Hippocampus")
    model = ws.results_dir("3d_fullres")
    held = _dataset(args.data, root / "raw" / "Hippocampus", args.test)[1]
    if not (model / "fold_all" / f"checkpoint_{args.checkpoint}.pt").is_file():
        plan(root / "raw" / "Hippocampus", work=work, workers=1)
        preprocess("Hippocampus", work=work, workers=1, configurations=["3d_fullres"])
        options = TrainOptions(
            "3d_fullres",
            "all",
            epochs=args.epochs,
            iterations_per_epoch=args.iterations,
            validation_iterations=1,
            device="cpu",
            precision="fp32",
        )
        train_and_validate(ws, options, False, False)
    log = [json.loads(line) for line in (model / "fold_all" / "log.jsonl").read_text().splitlines() if line.strip()]
    images = [read_image([p]) for p in held[: args.cases]]

    def predictor(engine: str, precision: str) -> Predictor:
        return Predictor(
            model,
            device="cpu",
            engine=engine,
            precision=precision,
            quiet=True,
            checkpoints=[args.checkpoint],
            tta=not args.no_tta,
        )

    sliding_window.ACCUMULATOR_DTYPE = torch.float32
    try:
        t = time.perf_counter()
        ref_predictor = predictor("torch", "fp32")
        reference = [ref_predictor.predict_array(im, geo, f"c{i}", True) for i, (im, geo) in enumerate(images)]
        ref_seconds = time.perf_counter() - t
    finally:
        sliding_window.ACCUMULATOR_DTYPE = torch.float16
    labels = [v for v in ref_predictor.stage.label_values if v != 0]
    margins = [decision_margin(r.probabilities, ref_predictor.stage.activation) for r in reference]
    report = {
        "cases": len(images),
        "training": f"{len(log)} epochs x {log[-1]['iterations'] if log else '?'} iterations ({model / 'fold_all'})",
        "checkpoint": args.checkpoint,
        "tta": not args.no_tta,
        "reference": {"run": "torch fp32, float32 accumulators", "seconds": round(ref_seconds, 1)},
        "auto_here": _auto(),
        "runs": {},
    }
    before = None
    if args.before:
        saved_volume = predictor_module.predict_volume
        predictor_module.predict_volume = _before(args.before)
        try:
            t = time.perf_counter()
            before = [
                predictor("torch", "fp32").predict_array(im, geo, f"c{i}", True) for i, (im, geo) in enumerate(images)
            ]
            seconds = round(time.perf_counter() - t, 1)
        finally:
            predictor_module.predict_volume = saved_volume
        same = Agreement(sliding_window.HALF_ACCUMULATION_TIE, labels)
        for b, r, m in zip(before, reference, margins):
            same.add(b.segmentation, r.segmentation, m)
        report["before"] = {"seconds": seconds, "reference_vs_before": same.summary()}
    for run in args.runs:
        engine, _, precision = run.partition(":")
        old_head = precision == "bf16-head"
        precision = "bf16" if old_head else precision
        saved = UNet._head
        if old_head:
            UNet._head = _bf16_head
        try:
            pred = predictor(engine, precision)
            entry: dict = {"ran": pred.engines}
            if engine != "auto" and pred.engines != f"{engine} {precision}":
                entry["skipped"] = "falls back here"
                report["runs"][run] = entry
                continue
            t = time.perf_counter()
            segs = [pred.predict_array(im, geo, f"c{i}").segmentation for i, (im, geo) in enumerate(images)]
            entry["seconds"] = round(time.perf_counter() - t, 1)
        finally:
            UNet._head = saved
        if pred.engines != entry["ran"]:  # precision auto gave up half precision at some case
            entry["then"] = pred.engines
        ran_precision = entry["ran"].split()[-1]  # a run that began in bf16 is judged as bf16
        agreement = agreement_for(ran_precision, labels)
        strict = Agreement(sliding_window.HALF_ACCUMULATION_TIE, labels)
        for ref, seg, margin in zip(reference, segs, margins):
            agreement.add(ref.segmentation, seg, margin)
            strict.add(ref.segmentation, seg, margin)
        entry.update(agreement.summary())
        entry["differing_ties_half_accumulation"] = strict.differing - strict.differing_not_tie
        if before is not None and run == "torch:fp32":
            vs = Agreement(sliding_window.HALF_ACCUMULATION_TIE, labels)
            for b, seg in zip(before, segs):
                vs.add(b.segmentation, seg, decision_margin(b.probabilities, pred.stage.activation))
            entry["vs_before"] = vs.summary()
        problem = guard_problem(agreement, ran_precision)
        entry["guard"] = problem or "holds"
        report["runs"][run] = entry
        print(json.dumps({run: entry}), file=sys.stderr, flush=True)
    print(json.dumps(report))
    return 0


def _auto() -> str:
    engine = resolve_engine("auto", "cpu", "auto")
    return f"{engine} {resolve_precision('auto', engine, 'cpu')} on this CPU"


if __name__ == "__main__":
    sys.exit(main())
