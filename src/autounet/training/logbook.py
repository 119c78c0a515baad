"""The training log of a fold: ``log.jsonl`` (one JSON object per epoch) and ``progress.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autounet.utils.atomic import atomic_write, atomic_write_text


def write_log(path: Path, entries: list[dict[str, Any]]) -> None:
    """Rewrite the whole log (it is small), atomically: it always matches the latest checkpoint."""
    atomic_write_text(path, "".join(json.dumps(e, allow_nan=True) + "\n" for e in entries))


def format_epoch(e: dict[str, Any]) -> str:
    dice = " ".join("-" if v is None else f"{v:.3f}" for v in e["val_dice"].values()) if e.get("val_dice") else "-"
    val = f"{e['val_loss']:.4f}" if e.get("val_loss") is not None else "-"
    ema = f"{e['ema_dice']:.3f}" if e.get("ema_dice") is not None else "-"  # none yet without validation batches
    partial = " (partial: time limit)" if e.get("partial") else ""
    return (
        f"epoch {e['epoch']:4d}  lr {e['lr']:.2e}  train {e['train_loss']:.4f}  val {val}  "
        f"dice {dice}  ema {ema}  {e['seconds']:.0f}s  "
        f"{e['iterations_per_s']:.2f} it/s  data wait {100 * e['data_wait_fraction']:.0f}%{partial}"
    )


def plot_progress(path: Path, entries: list[dict[str, Any]]) -> None:
    """Loss, validation Dice and learning-rate curves."""
    if not entries:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in entries]
    fig, (ax_loss, ax_dice, ax_lr) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot(epochs, [e["train_loss"] for e in entries], label="train loss")
    if any(e.get("val_loss") is not None for e in entries):
        ax_loss.plot(epochs, [e.get("val_loss") for e in entries], label="validation loss")
    ax_loss.plot(epochs, [e.get("train_loss_avg") for e in entries], "--", label="train (moving average)")
    ax_loss.legend(fontsize=8)
    ax_loss.set_ylabel("loss")
    classes = list(entries[-1].get("val_dice", {}))
    for c in classes:
        ax_dice.plot(epochs, [e.get("val_dice", {}).get(c) for e in entries], label=f"class {c}")
    ax_dice.plot(epochs, [e.get("ema_dice") for e in entries], "k--", label="moving average (best checkpoint)")
    ax_dice.set_ylabel("validation Dice")
    ax_dice.legend(fontsize=8)
    ax_lr.plot(epochs, [e["lr"] for e in entries])
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=80))
    plt.close(fig)
