"""Sparse annotations (the ignore label) against dense labels, at equal budget, on held-out cases.

    OMP_NUM_THREADS=1 python benchmarks/sparse_labels.py ../shared/data/hippocampus \
        [--work /tmp/sparse_bench] [-c 3d_fullres] [--epochs 4] [--iterations 25] [--batch-size B] \
        [--held-out 20] [--train-cases N] [--every 3] [--axis 0] [--seed 0]

From an MSD dataset (labels 0..K-1) it writes two raw datasets into WORK that share every image
and every training case: ``dense`` (the labels as they are) and ``sparse`` (only every
``--every``-th slice along ``--axis`` of the stored ``(Z, Y, X)`` array keeps its labels; every
other voxel becomes ``ignore``, value K, declared in dataset.json as ``"K": "ignore"``). The last
``--held-out`` cases (in dataset.json order) are left out of both and kept with their dense labels.
Each dataset is planned, preprocessed and trained on fold ``all`` with the same configuration,
budget and seed; each model predicts the held-out images, which are evaluated against the dense
held-out labels (`autounet evaluate`). Prints a table (and one JSON line) with both results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LAYOUT = ("imagesTr", "labelsTr")


def _write_dataset(
    root: Path, descriptor: dict, cases: list[dict], source: Path, sparse: tuple[int, int] | None
) -> float:
    """Write one MSD dataset of ``cases``; ``sparse=(every, axis)`` keeps labels on those slices only.

    Returns the mean share of annotated voxels.
    """
    for sub in LAYOUT:
        (root / sub).mkdir(parents=True, exist_ok=True)
    ignore = max(int(k) for k in descriptor["labels"]) + 1
    annotated = []
    for case in cases:
        shutil.copyfile(source / case["image"], root / case["image"])
        label = sitk.ReadImage(str(source / case["label"]))
        if sparse is None:
            shutil.copyfile(source / case["label"], root / case["label"])
            annotated.append(1.0)
            continue
        every, axis = sparse
        array = sitk.GetArrayFromImage(label)  # (Z, Y, X)
        keep = np.zeros(array.shape[axis], dtype=bool)
        keep[(array.shape[axis] // 2) % every :: every] = True  # a fixed phase that keeps the middle slice
        index = [slice(None)] * 3
        index[axis] = ~keep
        array[tuple(index)] = ignore
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(label)
        sitk.WriteImage(out, str(root / case["label"]), useCompression=True)
        annotated.append(float(np.mean(array != ignore)))
    d = dict(descriptor, training=cases, numTraining=len(cases))
    if sparse is not None:
        d["labels"] = {**descriptor["labels"], str(ignore): "ignore"}
    (root / "dataset.json").write_text(json.dumps(d, indent=2))
    return float(np.mean(annotated))


def _held_out(root: Path, cases: list[dict], source: Path) -> tuple[Path, Path]:
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copyfile(source / case["image"], images / Path(case["image"]).name)
        shutil.copyfile(source / case["label"], labels / Path(case["label"]).name)
    return images, labels


def _run_one(name: str, work: Path, raw: Path, images: Path, labels: Path, args: argparse.Namespace) -> dict:
    import autounet
    import autounet.api

    start = time.perf_counter()
    autounet.plan(raw, work=work, name=name, workers=args.workers)
    autounet.preprocess(name, work=work, configurations=[args.configuration], workers=args.workers)
    prepared = time.perf_counter()
    autounet.train(
        name,
        args.configuration,
        "all",
        work=work,
        epochs=args.epochs,
        batch_size=args.batch_size,
        iterations_per_epoch=args.iterations,
        validation_iterations=0,
        seed=args.seed,
        device="cpu",
    )
    trained = time.perf_counter()
    ws = autounet.api.workspace(name, work=work)
    out = work / f"{name}_predictions"
    autounet.predict(images, out, model=ws.fold_dir(args.configuration, "all"), device="cpu", overwrite=True)
    found = set()
    for path in sorted(out.glob("*.nii.gz")):
        found |= set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist())
    result = autounet.evaluate(out, labels, labels=[1, 2], json_path=out / "evaluation.json", workers=args.workers)
    plans = json.loads(ws.plans_json.read_text())["configurations"][args.configuration]
    return {
        "dice": result.foreground_mean["dice"],
        "per_class": {k: v["dice"] for k, v in result.mean.items()},
        "hd95": result.foreground_mean["hd95"],
        "surface_dice": result.foreground_mean["surface_dice"],
        "predicted_values": sorted(int(v) for v in found),
        "patch_size": plans["patch_size"],
        "batch_size": plans["batch_size"],
        "num_classes": plans["num_classes"],
        "ignore_label": plans.get("ignore_label"),
        "prepare_s": round(prepared - start, 1),
        "train_s": round(trained - prepared, 1),
        "predict_evaluate_s": round(time.perf_counter() - trained, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="MSD dataset folder (e.g. ../shared/data/hippocampus)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autounet_sparse_labels"), help="scratch folder")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=25, help="iterations per epoch")
    parser.add_argument("--batch-size", type=int, help="default: the plan's")
    parser.add_argument("--held-out", type=int, default=20)
    parser.add_argument("--train-cases", type=int, help="use only the first N training cases (default: all others)")
    parser.add_argument("--every", type=int, default=3, help="keep the labels of every N-th slice")
    parser.add_argument("--axis", type=int, default=0, choices=(0, 1, 2), help="stored array axis (Z, Y, X) sliced")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    descriptor = json.loads((args.dataset / "dataset.json").read_text())
    cases = list(descriptor["training"])
    if args.held_out >= len(cases):
        parser.error(f"--held-out {args.held_out} leaves no training case of {len(cases)}")
    train, held = cases[: len(cases) - args.held_out], cases[len(cases) - args.held_out :]
    train = train[: args.train_cases] if args.train_cases else train
    if args.work.exists():
        shutil.rmtree(args.work)
    raw = args.work / "raw"
    fractions = {
        "dense": _write_dataset(raw / "dense", descriptor, train, args.dataset, None),
        "sparse": _write_dataset(raw / "sparse", descriptor, train, args.dataset, (args.every, args.axis)),
    }
    images, labels = _held_out(args.work / "held_out", held, args.dataset)
    results = {}
    for name in ("dense", "sparse"):
        results[name] = _run_one(name, args.work / "w", raw / name, images, labels, args)
        results[name]["annotated_fraction"] = round(fractions[name], 4)

    batch = results["dense"]["batch_size"] if args.batch_size is None else args.batch_size
    budget = (
        f"{args.configuration}, fold all, {args.epochs} epochs x {args.iterations} iterations of batch {batch}, "
        f"seed {args.seed}"
    )
    print(f"\n{len(train)} training cases, {len(held)} held-out cases with dense labels; {budget}")
    print(f"sparse: every {args.every}th slice along stored axis {args.axis} labelled, the rest 'ignore'\n")
    print(
        f"{'labels':<8} {'annotated':>9} {'Dice':>7} {'class 1':>8} {'class 2':>8} {'HD95 mm':>8} {'NSD 1mm':>8} {'train s':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<8} {r['annotated_fraction']:>9.1%} {r['dice']:>7.4f} {r['per_class'].get('1', float('nan')):>8.4f} "
            f"{r['per_class'].get('2', float('nan')):>8.4f} {r['hd95']:>8.2f} {r['surface_dice']:>8.4f} {r['train_s']:>8.0f}"
        )
    gap = results["dense"]["dice"] - results["sparse"]["dice"]
    print(
        f"\ndense - sparse Dice: {gap:+.4f}; values predicted: {results['sparse']['predicted_values']} (sparse model)"
    )
    print(json.dumps({"settings": vars(args) | {"dataset": str(args.dataset), "work": str(args.work)}, **results}))


if __name__ == "__main__":
    main()
