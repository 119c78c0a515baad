"""Fine-tuning against training from scratch on a small dataset, end to end. Prints a table, writes a PNG and a JSON.

    OMP_NUM_THREADS=1 python benchmarks/finetune.py ../shared/data/hippocampus --out /tmp/autounet_finetune

1. Splits the raw MSD dataset's cases (shuffled with ``--split-seed``) into three disjoint sets:
   ``--pretrain-cases`` for pretraining, a ``--subset-cases`` small dataset, and ``--heldout-cases``
   used nowhere else. Each becomes a raw dataset folder of its own under ``OUT/raw/`` (copies of
   the files, with its own dataset.json).
2. Pretrains ``--configuration`` on the pretraining cases (fold ``all``, ``--pretrain-epochs`` x
   ``--pretrain-iters``).
3. Plans the small dataset with ``--plans-from`` the pretraining workspace, preprocesses it and
   trains its fold 0 twice with the same seed and budget (``--epochs`` x ``--iters-per-epoch``):
   from scratch (workspace ``subset_scratch``) and from the pretrained weights (``subset_finetuned``,
   ``--pretrained``).
4. Compares the fold's validation pseudo-Dice per epoch (log.jsonl), its full-case validation Dice
   (summary.json) and the Dice on the held-out cases (predicted without mirroring), with the
   pretrained network alone on the held-out cases for reference.

Re-running with the same ``--out`` reuses finished steps (a trained fold is not retrained).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

import autounet
from autounet import api
from autounet.workspace import checkpoint_path, training_log_path


def _subset(raw: Path, descriptor: dict, entries: list[dict], out: Path, name: str) -> Path:
    """A raw MSD dataset folder ``out`` holding copies of ``entries``' files and its own dataset.json."""
    if (out / "dataset.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for e in entries:
        for key in ("image", "label"):
            target = tmp / e[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(raw / e[key], target)
    d = {k: v for k, v in descriptor.items() if k not in ("training", "test")}
    d.update(name=name, numTraining=len(entries), numTest=0, training=entries, test=[])
    (tmp / "dataset.json").write_text(json.dumps(d, indent=1))
    tmp.rename(out)
    return out


def _heldout(raw: Path, entries: list[dict], out: Path) -> tuple[Path, Path]:
    """``out/images`` and ``out/labels``: the held-out cases' files, for predict and evaluate."""
    images, labels = out / "images", out / "labels"
    if not labels.is_dir():
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for e in entries:
            for key, folder in (("image", "images"), ("label", "labels")):
                (tmp / folder).mkdir(parents=True, exist_ok=True)
                shutil.copy2(raw / e[key], tmp / folder / Path(e[key]).name)
        tmp.rename(out)
    return images, labels


def _train(name: str, work: Path, args, fold, epochs: int, iters: int, val_iters: int, pretrained=None) -> dict:
    """Train (or resume, or reuse) one fold; returns its training minutes (the epochs' wall time, from
    its log), full-validation Dice and log."""
    ws = api.workspace(name, work=work)
    fold_dir = ws.fold_dir(args.configuration, fold)
    if not checkpoint_path(fold_dir, "final").is_file():
        autounet.train(
            name,
            args.configuration,
            fold,
            work=work,
            epochs=epochs,
            iterations_per_epoch=iters,
            validation_iterations=val_iters,
            seed=args.seed,
            resume=checkpoint_path(fold_dir, "latest").is_file(),
            validation_tta=False,
            pretrained=pretrained,
        )
    elif fold != "all":
        print(f"{name} {args.configuration} fold {fold}: trained before, reused")
    summary = fold_dir / "validation" / "summary.json"
    dice = None
    if fold != "all" and summary.is_file():
        dice = json.loads(summary.read_text())["foreground_mean"]["dice"]
    log = [json.loads(line) for line in training_log_path(fold_dir).read_text().splitlines() if line.strip()]
    minutes = sum(e["seconds"] for e in log) / 60
    return {"fold_dir": str(fold_dir), "minutes": minutes, "validation_dice": dice, "log": log}


def _heldout_dice(model: Path, images: Path, labels: Path, out: Path) -> dict:
    """Mean foreground Dice (and per class) of ``model``'s predictions of the held-out cases."""
    autounet.predict(images, out, model=model, tta=False, postprocess=False, overwrite=True, engine="torch")
    result = autounet.evaluate(out, labels)
    return {"dice": result.foreground_mean["dice"], "per_class": {k: v["dice"] for k, v in result.mean.items()}}


def _plot(path: Path, runs: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_dice, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for (label, run), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        log = run["log"]
        steps = [sum(e["iterations"] for e in log[: i + 1]) for i in range(len(log))]
        ax_dice.plot(steps, [e.get("val_dice_mean") for e in log], "o-", color=color, label=label)
        ax_loss.plot(steps, [e["train_loss"] for e in log], "o-", color=color, label=f"{label}: training")
        ax_loss.plot(steps, [e.get("val_loss") for e in log], "s--", color=color, label=f"{label}: validation")
    ax_dice.set_xlabel("training iterations")
    ax_dice.set_ylabel("validation pseudo-Dice (mean of classes)")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend()
    ax_loss.set_xlabel("training iterations")
    ax_loss.set_ylabel("loss (Dice + CE)")
    ax_loss.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", type=Path, help="an MSD-layout raw dataset (e.g. ../shared/data/hippocampus)")
    p.add_argument("--out", type=Path, default=Path("/tmp/autounet_finetune"), help="work folder (reused)")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--pretrain-cases", type=int, default=160)
    p.add_argument("--subset-cases", type=int, default=20)
    p.add_argument("--heldout-cases", type=int, default=20)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--pretrain-iters", type=int, default=20)
    p.add_argument("--epochs", type=int, default=4, help="epochs of both runs on the small dataset")
    p.add_argument("--iters-per-epoch", type=int, default=25)
    p.add_argument("--val-iters", type=int, default=5, help="validation batches per epoch (the pseudo-Dice)")
    p.add_argument("--seed", type=int, default=0, help="training seed of both runs")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the case shuffle")
    p.add_argument("--png", type=Path, default=Path("docs/finetune_hippocampus.png"))
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.time()

    descriptor = json.loads((args.raw / "dataset.json").read_text())
    entries = list(descriptor["training"])
    random.Random(args.split_seed).shuffle(entries)
    n_pre, n_sub, n_held = args.pretrain_cases, args.subset_cases, args.heldout_cases
    if n_pre + n_sub + n_held > len(entries):
        sys.exit(f"{args.raw} has {len(entries)} cases, fewer than {n_pre} + {n_sub} + {n_held}")
    pretrain, subset = entries[:n_pre], entries[n_pre : n_pre + n_sub]
    heldout = entries[n_pre + n_sub : n_pre + n_sub + n_held]
    raw_dir, work = args.out / "raw", args.out / "work"
    pre_raw = _subset(args.raw, descriptor, pretrain, raw_dir / "pretrain", "pretrain")
    sub_raw = _subset(args.raw, descriptor, subset, raw_dir / "subset", "subset")
    images, labels = _heldout(args.raw, heldout, raw_dir / "heldout")

    print(f"[1/4] pretrain {args.configuration} on {n_pre} cases", flush=True)
    autounet.plan(pre_raw, work=work, name="pretrain")
    autounet.preprocess("pretrain", work=work, configurations=[args.configuration])
    pre = _train("pretrain", work, args, "all", args.pretrain_epochs, args.pretrain_iters, 0)
    source = work / "pretrain"

    print(f"[2/4] plan the {n_sub}-case dataset --plans-from {source}", flush=True)
    runs: dict[str, dict] = {}
    for name in ("subset_scratch", "subset_finetuned"):  # the same plans: only the initialisation differs
        autounet.plan(sub_raw, work=work, name=name, plans_from=source)
        autounet.preprocess(name, work=work, configurations=[args.configuration])
    print("[3/4] train fold 0 from scratch and fine-tuned (same seed and budget)", flush=True)
    for name, pretrained in (("subset_scratch", None), ("subset_finetuned", source)):
        runs[name] = _train(name, work, args, 0, args.epochs, args.iters_per_epoch, args.val_iters, pretrained)

    print(f"[4/4] predict the {n_held} held-out cases", flush=True)
    held = {"pretrained only": _heldout_dice(Path(pre["fold_dir"]), images, labels, args.out / "pred" / "pretrained")}
    for name, run in runs.items():
        run["heldout"] = _heldout_dice(Path(run["fold_dir"]), images, labels, args.out / "pred" / name)
        held[name] = run["heldout"]

    plans = api.workspace("subset_finetuned", work=work).plans_json
    batch = json.loads(plans.read_text())["configurations"][args.configuration]["batch_size"]
    title = (
        f"hippocampus, {args.configuration}: fold 0 of a {n_sub}-case dataset ({n_sub - n_sub // 5} training cases, "
        f"batch {batch}), {args.epochs}x{args.iters_per_epoch} iterations, seed {args.seed};\n"
        f"pretrained on {n_pre} other cases ({args.pretrain_epochs}x{args.pretrain_iters} iterations)"
    )
    _plot(args.png, {"from scratch": runs["subset_scratch"], "fine-tuned": runs["subset_finetuned"]}, title)

    header = (
        "run",
        "val pseudo-Dice, epoch 1",
        "last epoch",
        f"fold-0 validation Dice ({n_sub // 5})",
        f"held-out Dice ({n_held}; per class)",
        "training min",
    )
    rows = [header]
    for label, name in (("from scratch", "subset_scratch"), ("fine-tuned", "subset_finetuned")):
        r = runs[name]
        first, last = r["log"][0], r["log"][-1]
        rows.append(
            (
                label,
                f"{first['val_dice_mean']:.3f}",
                f"{last['val_dice_mean']:.3f}",
                f"{r['validation_dice']:.3f}",
                f"{r['heldout']['dice']:.3f} ("
                + " / ".join(f"{v:.3f}" for v in r["heldout"]["per_class"].values())
                + ")",
                f"{r['minutes']:.1f}",
            )
        )
    h = held["pretrained only"]
    rows.append(
        (
            "pretrained only",
            "-",
            "-",
            "-",
            f"{h['dice']:.3f} (" + " / ".join(f"{v:.3f}" for v in h["per_class"].values()) + ")",
            f"{pre['minutes']:.1f}",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print("\n" + "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows))
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage) / 60
    print(
        f"\ncurves: {args.png}; this run {(time.time() - started) / 60:.1f} min, {cpu:.1f} CPU min (steps reused from an earlier run not counted)"
    )
    result = {
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "pretrain": pre,
        "runs": runs,
        "heldout": held,
        "minutes": (time.time() - started) / 60,
        "cpu_minutes": cpu,
    }
    (args.out / "finetune.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
