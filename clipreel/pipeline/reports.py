"""The report files of an evaluation: the JSON report and its confusion matrix drawn as a PNG.

May import: numpy, matplotlib, clipreel.errors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipreel.errors import ClipreelError

# Up to this many classes the confusion plot names every class on its axes; beyond, no tick labels.
MAX_LABELLED_CLASSES = 50
# Up to this many classes each cell of the confusion plot also shows its count.
MAX_ANNOTATED_CLASSES = 15


def save_report(report: dict, path: str | Path) -> Path:
    """Write the report as indented JSON (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def plot_confusion(confusion: Sequence[Sequence[int]], classnames: Sequence[str], path: str | Path) -> Path:
    """Draw the confusion matrix (rows = true class, columns = predicted) as a PNG; returns the path.

    Each row is shown as fractions of its videos, so rare and common classes read alike; cells
    also show their counts up to MAX_ANNOTATED_CLASSES classes, and the axes name the classes up
    to MAX_LABELLED_CLASSES (beyond that the labels would be unreadable and are left out).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.int64)  # (K, K)
    num_classes = len(classnames)
    if counts.shape != (num_classes, num_classes):
        raise ClipreelError(
            f"plot_confusion: the matrix has shape {counts.shape}, expected ({num_classes}, {num_classes})"
        )
    row_totals = counts.sum(axis=1, keepdims=True)
    fractions = counts / np.maximum(row_totals, 1)  # (K, K), rows of absent classes stay 0

    labelled = num_classes <= MAX_LABELLED_CLASSES
    side = min(4 + 0.3 * num_classes, 20) if labelled else 10  # inches
    figure = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if labelled:
        font_size = 10 if num_classes <= 20 else 8  # rows are >= 0.3 inch apart: 8 pt still fits
        axes.set_xticks(range(num_classes), labels=list(classnames), rotation=90, fontsize=font_size)
        axes.set_yticks(range(num_classes), labels=list(classnames), fontsize=font_size)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    if num_classes <= MAX_ANNOTATED_CLASSES:
        for true_class in range(num_classes):
            for predicted in range(num_classes):
                if counts[true_class, predicted]:
                    dark = fractions[true_class, predicted] > 0.5
                    axes.text(predicted, true_class, str(counts[true_class, predicted]), ha="center",
                              va="center", fontsize=8, color="white" if dark else "black")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def write_report_files(report: dict, path: Path) -> tuple[Path, Path]:
    """The JSON report at `path` and its confusion matrix next to it (same name, .png)."""
    json_path = save_report(report, path)
    png_path = plot_confusion(report["confusion"], report["classnames"], Path(path).with_suffix(".png"))
    return json_path, png_path
