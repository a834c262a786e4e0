"""What a training run writes as it goes: log.csv (one row per epoch), curves.png, and the summary
metrics taken from the log.

May import: numpy, pandas, matplotlib.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

LOG_FILE = "log.csv"
CURVES_FILE = "curves.png"
LOG_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_top1", "val_loss", "seconds")


def log_row(epoch, lr, train_loss, train_acc, val_top1, val_loss, seconds) -> dict:
    values = (epoch, lr, train_loss, train_acc, val_top1, val_loss, round(seconds, 3))
    return dict(zip(LOG_COLUMNS, values, strict=True))


def final_metrics(history: list[dict]) -> dict:
    """The summary's metric fields from the per-epoch history."""
    last = history[-1] if history else {}
    val = [row["val_top1"] for row in history if row["val_top1"] is not None]
    return {
        "train_loss": last.get("train_loss"),
        "train_acc": last.get("train_acc"),
        "val_top1": last.get("val_top1"),
        "best_val_top1": max(val) if val else None,
    }


def write_log(path: Path, history: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})


def read_log(path: Path) -> list[dict]:
    """log.csv back as the history it was written from (empty cells as None)."""
    history = pd.read_csv(path).astype(object)
    return history.where(history.notna(), None).to_dict("records")


def plot_curves(path: Path, history: list[dict]) -> None:
    """Loss and accuracy per epoch (matplotlib's object API: no pyplot, no global backend)."""
    from matplotlib.figure import Figure

    rows = [row for row in history if row["epoch"] > 0]
    if not rows:
        return
    epochs = [row["epoch"] for row in rows]

    def series(key):
        return [np.nan if row[key] is None else row[key] for row in rows]

    figure = Figure(figsize=(9, 3.5), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, series("train_loss"), marker="o", label="train")
    loss_axes.plot(epochs, series("val_loss"), marker="o", label="val")
    loss_axes.set(xlabel="epoch", ylabel="loss", title="loss")
    accuracy_axes.plot(epochs, series("train_acc"), marker="o", label="train (one random view)")
    accuracy_axes.plot(epochs, series("val_top1"), marker="o", label="val top-1 (all views)")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for axes in (loss_axes, accuracy_axes):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
