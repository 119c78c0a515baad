"""`autounet run` with the folds trained one after the other (``--executor local``) and at once
on a local Ray instance (``--executor ray``), in wall time. Prints one JSON line.

    python benchmarks/ray_run.py ../shared/data/hippocampus [--cases N] [--epochs E] [--iters-per-epoch I]
        [--val-iters V] [--configs 2d] [--folds 0 1] [--out JSON]

The raw dataset (its first ``--cases`` training cases, default all) is planned and preprocessed
once; the workspace is then copied into two fresh work folders without any trained fold, and
each run is the same `autounet run` command (same configurations, folds, budget and seed) in a
fresh process with one PyTorch thread per fold (``OMP_NUM_THREADS=1``; ``--cpus-per-fold 1``
under Ray), so the wall time includes Ray's start. ``local_s`` / ``ray_s``: wall time of each
command; ``speedup``: their ratio; ``fold_train_s``: each fold's training time from its
``log.jsonl``; ``winner_dice``: the selected model's cross-validation Dice of each run (the same
seeds give the same training, so they should agree).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _subset(raw: Path, cases: int | None, folder: Path) -> Path:
    """``raw`` itself, or a copy holding its first ``cases`` training cases (MSD layout)."""
    if cases is None:
        return raw
    descriptor = json.loads((raw / "dataset.json").read_text())
    training = sorted(descriptor["training"], key=lambda c: c["image"])[:cases]
    out = folder / raw.name
    for entry in training:
        for key in ("image", "label"):
            target = out / entry[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(raw / entry[key], target)
    descriptor.update(training=training, numTraining=len(training), test=[], numTest=0)
    (out / "dataset.json").write_text(json.dumps(descriptor, indent=2))
    return out


def _run(raw: Path, work: Path, args, executor: str) -> float:
    command = [
        sys.executable, "-m", "autounet", "run", str(raw), "--work", str(work), "-c", *args.configs,
        "--folds", *map(str, args.folds), "--epochs", str(args.epochs), "--iters-per-epoch", str(args.iters_per_epoch),
        "--val-iters", str(args.val_iters), "-j", "1", "--device", "cpu", "--executor", executor,
    ]  # fmt: skip
    if executor == "ray":
        command += ["--cpus-per-fold", "1", "--gpus-per-fold", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOUNET_PROGRESS": "0"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{executor} run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def _summary(root: Path, args) -> dict:
    selection = json.loads((root / "selection.json").read_text())
    folds = {}
    for config in args.configs:
        for fold in args.folds:
            log = root / "results" / config / f"fold_{fold}" / "log.jsonl"
            entries = [json.loads(line) for line in log.read_text().splitlines()]
            folds[f"{config} fold {fold}"] = round(sum(e["seconds"] for e in entries), 1)
    return {
        "winner": selection["winner"]["name"],
        "winner_dice": selection["ranking"][0]["foreground_dice"],
        "folds": folds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path)
    parser.add_argument("--cases", type=int, help="use only the first N training cases (default all)")
    parser.add_argument("--configs", nargs="+", default=["2d"])
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iters-per-epoch", type=int, default=50)
    parser.add_argument("--val-iters", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write the JSON line here")
    args = parser.parse_args()

    from autounet import api

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = _subset(args.raw.resolve(), args.cases, tmp / "raw")
        name = raw.name
        api.plan(raw, work=tmp / "base", name=name, workers=1)
        api.preprocess(name, work=tmp / "base", configurations=args.configs, workers=1)
        seconds, summaries = {}, {}
        for executor in ("local", "ray"):
            work = tmp / executor
            shutil.copytree(tmp / "base", work)
            seconds[executor] = _run(raw, work, args, executor)
            summaries[executor] = _summary(work / name, args)
        result = {
            "dataset": name,
            "cases": args.cases,
            "configs": args.configs,
            "folds": args.folds,
            "epochs": args.epochs,
            "iters_per_epoch": args.iters_per_epoch,
            "cores": os.cpu_count(),
            "local_s": round(seconds["local"], 1),
            "ray_s": round(seconds["ray"], 1),
            "speedup": round(seconds["local"] / seconds["ray"], 2),
            "fold_train_s": {k: v["folds"] for k, v in summaries.items()},
            "winner_dice": {k: round(v["winner_dice"], 4) for k, v in summaries.items()},
        }
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
