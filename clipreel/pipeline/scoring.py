"""Class probabilities of a model on batches of videos, and the metrics computed from them.

Each view of a video (one temporal clip x one spatial crop) goes through the model on its own; its
logits become a softmax, and a video's probabilities are the mean over its views ("mean of
softmax", the multi-view testing of EVL's `main.py: evaluate`, X-CLIP's and ViFi-CLIP's `main.py`).
The same functions score validation during training and held-out splits in `pipeline.evaluate`.
The metrics are top-1, top-5, mean class accuracy, per-class accuracy and the confusion matrix.

May import: torch, numpy, clipreel.errors, clipreel.heads.registry, clipreel.pipeline.training,
clipreel.stores.encoding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from clipreel.errors import ClipreelError
from clipreel.heads.registry import head_entry
from clipreel.pipeline.training.loop import mixed_precision
from clipreel.stores.encoding import SCALE_SUFFIX

TOP_K = 5


def mean_softmax_over_views(logits: torch.Tensor) -> torch.Tensor:
    """(B, V, K) logits of every view of B videos -> (B, K) probabilities: softmax per view, mean over views."""
    return torch.softmax(logits.float(), dim=-1).mean(dim=1)


def view_averaged_probabilities(
    name: str, head: nn.Module, batch: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Class probabilities (B, K) of cache head `name` on a multi-view store batch (tensors (B, V, ...)):
    each view goes through the head on its own, then the mean over views of their softmax."""
    fields = head_entry(name).reads
    count, views = batch[fields[0]].shape[:2]
    one_view_each = {key: values.flatten(0, 1).to(device) for key, values in batch.items()
                     if key.removesuffix(SCALE_SUFFIX) in fields}  # (B*V, ...): values, or 8-bit codes and scales
    logits = head(one_view_each).unflatten(0, (count, views))  # (B, V, K)
    return mean_softmax_over_views(logits)


@torch.no_grad()
def predict_store(name: str, head: nn.Module, batches: Iterable[dict],
                  device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Every view of every video of `batches` (a CacheLoader epoch with views="all") through cache head
    `name` -> (probabilities (N, K) float64, labels (N,))."""
    was_training = head.training
    head.eval()
    probabilities, labels = [], []
    for batch in batches:
        with mixed_precision(device):
            probabilities.append(view_averaged_probabilities(name, head, batch, device).cpu())  # (B, K)
        labels.append(batch["labels"])
    head.train(was_training)
    return torch.cat(probabilities).numpy().astype(np.float64), torch.cat(labels).numpy()


@torch.no_grad()
def predict_raw(model: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every view of every clip through a raw-frame method -> (probabilities (N, K), labels, manifest rows).

    `loader` yields RawFrameDataset(train=False) batches: frames (B, V*C, T, 3, S, S). Batches without a
    clip (their videos were skipped as unreadable) are passed over; when every batch is, N is 0.
    """
    was_training = model.training
    model.eval()
    probabilities, labels, rows = [], [], []
    for batch in loader:
        if len(batch["label"]) == 0:
            continue
        views = batch["frames"].to(device)  # (B, V*C, T, 3, S, S)
        with mixed_precision(device):
            logits = model(views.flatten(0, 1))["logits"]  # (B*V*C, K)
        probabilities.append(mean_softmax_over_views(logits.unflatten(0, views.shape[:2])).cpu())  # (B, K)
        labels.append(batch["label"])
        rows.append(batch["row"])
    model.train(was_training)
    if not probabilities:
        nothing = np.zeros(0, dtype=np.int64)
        return np.zeros((0, 0)), nothing, nothing
    return torch.cat(probabilities).numpy(), torch.cat(labels).numpy(), torch.cat(rows).numpy()


def top1_and_loss(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1 accuracy and the mean negative log-probability of the true class (validation)."""
    top1 = float((probabilities.argmax(axis=1) == labels).mean())
    picked = probabilities[np.arange(len(labels)), labels]
    return top1, float(-np.log(np.clip(picked, 1e-12, None)).mean())


def compute_metrics(probabilities: np.ndarray, labels: np.ndarray, classnames: Sequence[str]) -> dict:
    """Classification metrics of N videos over K classes.

    probabilities (N, K): class scores per video (any monotone score works; argmax and top-k are
    all that is used). labels (N,): the true class index in 0..K-1 (-1, "unknown", is refused).
    Returns top1, top5 (top-k with k = min(5, K)), mean_class_acc (the mean of the per-class
    accuracies over the classes that have videos), n, per_class ({name: {"acc", "n"}}; acc is None
    for a class without videos) and confusion (K x K counts, row = true class, column = predicted).
    """
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels)
    classnames = list(classnames)
    num_classes = len(classnames)
    if probabilities.ndim != 2 or probabilities.shape[1] != num_classes:
        raise ClipreelError(
            f"compute_metrics: probabilities have shape {probabilities.shape}, expected (N, {num_classes}) "
            f"for the {num_classes} class names"
        )
    if labels.shape != (probabilities.shape[0],):
        raise ClipreelError(
            f"compute_metrics: {labels.shape} labels for {probabilities.shape[0]} videos; give one label per video"
        )
    if len(labels) == 0:
        raise ClipreelError("compute_metrics: no videos to score; the split holds no labelled, extracted videos")
    if labels.dtype.kind not in "iu":
        raise ClipreelError(f"compute_metrics: labels must be integers, got {labels.dtype}")
    unknown = np.flatnonzero(labels < 0)
    if len(unknown):
        raise ClipreelError(
            f"compute_metrics: {len(unknown)} video(s) have label -1 (unknown), e.g. position {int(unknown[0])}; "
            "accuracy needs a true class for every video: label them, or evaluate a split without unlabelled videos"
        )
    outside = np.flatnonzero(labels >= num_classes)
    if len(outside):
        raise ClipreelError(
            f"compute_metrics: label {int(labels[outside[0]])} (position {int(outside[0])}) is outside the "
            f"{num_classes} classes (0..{num_classes - 1})"
        )

    k = min(TOP_K, num_classes)
    # Stable sort on the negated scores: ties go to the lower class index, as argmax does.
    ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]  # (N, k), best first
    predicted = ranked[:, 0]  # (N,)
    correct = predicted == labels
    in_top_k = (ranked == labels[:, None]).any(axis=1)

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class_n = confusion.sum(axis=1)  # (K,)
    per_class_acc = [
        float(confusion[c, c] / per_class_n[c]) if per_class_n[c] else None for c in range(num_classes)
    ]
    present = [acc for acc in per_class_acc if acc is not None]
    return {
        "top1": float(correct.mean()),
        "top5": float(in_top_k.mean()),
        "top5_k": k,
        "mean_class_acc": float(np.mean(present)),
        "n": int(len(labels)),
        "per_class": {
            name: {"acc": acc, "n": int(count)} for name, acc, count in zip(classnames, per_class_acc, per_class_n)
        },
        "confusion": confusion.tolist(),
    }
