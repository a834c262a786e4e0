"""Evaluation on a held-out split: a trained run (`clipreel eval`) or zero-shot CLIP (`clipreel zeroshot`).

Both paths stream the split's videos from the feature store with every stored view (each view is
one temporal clip x one spatial crop), turn each view's logits into class probabilities with a
softmax, and average the probabilities over the views of a video ("mean of softmax", the
multi-view testing of EVL, X-CLIP and ViFi-CLIP; METHODS.md 2.7, 3.4). The metrics are top-1,
top-5, mean class accuracy, per-class accuracy and the confusion matrix. The report is a JSON
file with the confusion matrix drawn next to it as a PNG.

The functions here print nothing unless given a rich `console`, and return the report dict, so
the CLI commands stay thin wrappers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from clipreel.devices import resolve_device
from clipreel.errors import ClipreelError
from clipreel.heads.cache.zeroshot import (
    TEMPLATES,
    ZeroShotClassifier,
    ZeroShotConfig,
    class_text_embeddings,
)
from clipreel.heads.clip import TextModel, load_text_model
from clipreel.heads.kinds import TEXT_KINDS, head_logits, head_spec, rebuild_head
from clipreel.pipeline.data.cache_loader import CacheLoader
from clipreel.stores.features import FeatureStore
from clipreel.stores.manifest import classnames_from_manifest, read_label_map
from clipreel.stores.runs import Run, load_run, provenance_mismatch

TOP_K = 5
# Videos per evaluation batch. Each comes with all its views, so a batch of ViT-B/16 tokens for
# EVL (8 frames, 4 blocks, 4 x 3 views) is ~0.9 GB at 8 videos.
EVAL_BATCH_SIZE = 8
# Up to this many classes the confusion plot names every class on its axes; beyond, no tick labels.
MAX_LABELLED_CLASSES = 50
# Up to this many classes each cell of the confusion plot also shows its count.
MAX_ANNOTATED_CLASSES = 15


# ---------------------------------------------------------------------- metrics


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


def mean_softmax_over_views(logits: torch.Tensor) -> torch.Tensor:
    """(B, V, K) logits of every view of B videos -> (B, K) probabilities: softmax per view, mean over views."""
    return torch.softmax(logits.float(), dim=-1).mean(dim=1)


# ---------------------------------------------------------------------- report files


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


# ---------------------------------------------------------------------- which videos, which classes


@dataclass
class EvalVideos:
    """The videos of a split to score: store rows, their true class (index into classnames)."""

    split: str
    rows: np.ndarray  # (N,) store rows
    targets: np.ndarray  # (N,) index of each video's class in `classnames`
    classnames: list[str]
    left_out: int  # videos of the split whose class is not among `classnames` (when allowed)
    not_extracted: int  # videos of the split that are not done in the store


def select_videos(
    store: FeatureStore,
    split: str,
    classnames: Sequence[str],
    *,
    label_map: Sequence[str] | None = None,
    others: str = "refuse",
) -> EvalVideos:
    """The extracted videos of `split`, each with its class index among `classnames`.

    A video's class is its manifest `label_name`, or `label_map[label]` when a label map is given
    (a label map names the store's label ids, like `clipreel train --classes`). Videos whose class
    is not among `classnames` are refused (`others="refuse"`: closed-set evaluation) or left out
    (`others="leave out"`: evaluating a subset of the classes). Unlabelled videos (label -1) are
    refused: accuracy needs a true class. Videos not extracted yet are skipped and counted.
    """
    if others not in ("refuse", "leave out"):
        raise ClipreelError(f"select_videos: others={others!r}; choose 'refuse' or 'leave out'")
    manifest = store.manifest()
    in_split = (manifest["split"] == split).to_numpy()
    if not in_split.any():
        splits = sorted(manifest["split"].unique())
        raise ClipreelError(f"{store.path}: no video in split {split!r}; the store's splits are {splits}")
    done = store.done_mask()
    videos = manifest[in_split & done]
    not_extracted = int((in_split & ~done).sum())
    if videos.empty:
        raise ClipreelError(
            f"{store.path}: none of the {not_extracted} videos of split {split!r} is extracted yet; "
            "run `clipreel extract` again to finish the store"
        )
    unlabelled = videos[videos["label"] < 0]
    if len(unlabelled):
        raise ClipreelError(
            f"{store.path}: {len(unlabelled)} video(s) of split {split!r} have no label (label -1), e.g. "
            f"{unlabelled['video_id'].iloc[0]!r}; accuracy needs a true class for every video: label them "
            "in the video list and extract again, or evaluate another split"
        )
    names = _video_classnames(videos, label_map, store.path)  # (N,)
    index_of = {name: index for index, name in enumerate(classnames)}
    known = np.array([name in index_of for name in names], dtype=bool)
    if not known.all():
        outside = pd.Series(names[~known]).value_counts()
        listed = ", ".join(f"{name!r} ({count} videos)" for name, count in outside.head(10).items())
        if others == "refuse":
            raise ClipreelError(
                f"{store.path}: split {split!r} holds videos of {len(outside)} class(es) the classifier does not "
                f"know: {listed}. Its classes are {list(classnames)[:20]}{' ...' if len(classnames) > 20 else ''}. "
                "Closed-set evaluation needs every video's class among them: evaluate a split of those classes, "
                "or, if the run was trained with a label map (--classes) that renames the store's labels, give "
                "the same label map here"
            )
        if not known.any():
            raise ClipreelError(
                f"{store.path}: no video of split {split!r} belongs to the classes {list(classnames)[:20]}; "
                f"its classes are {sorted(set(names))[:20]}"
            )
    return EvalVideos(
        split=split,
        rows=videos.index.to_numpy()[known].astype(np.int64),
        targets=np.array([index_of[name] for name in names[known]], dtype=np.int64),
        classnames=list(classnames),
        left_out=int((~known).sum()),
        not_extracted=not_extracted,
    )


def _video_classnames(videos: pd.DataFrame, label_map: Sequence[str] | None, where) -> np.ndarray:
    """The class name of each (labelled) video: label_map[label], else its manifest label_name."""
    labels = videos["label"].to_numpy()
    if label_map is not None:
        too_large = sorted(set(labels[labels >= len(label_map)].tolist()))
        if too_large:
            raise ClipreelError(
                f"{where}: labels {too_large[:10]} have no name in the label map ({len(label_map)} classes, "
                "labels 0..K-1); give the full label map"
            )
        return np.array([label_map[label] for label in labels], dtype=object)
    names = videos["label_name"].to_numpy(dtype=object)
    unnamed = videos["video_id"][names == ""]
    if len(unnamed):
        raise ClipreelError(
            f"{where}: {len(unnamed)} video(s) have a label id but no class name, e.g. {unnamed.iloc[0]!r}; "
            "give a label map (one class name per line, line i = label i)"
        )
    return names


def store_classnames(store: FeatureStore) -> list[str]:
    """The store's class names by label id (the manifest's label_name of each label)."""

    return classnames_from_manifest(store.manifest(), str(store.path))


# ---------------------------------------------------------------------- scoring


def load_head(run: Run, classnames: Sequence[str] | None = None, text_model: TextModel | None = None) -> nn.Module:
    """The run's trained head, in eval mode, classifying among `classnames` (default: the run's).

    Text kinds may be given other class names (novel classes: their class text is recomputed);
    they need the store's text tower (`text_model`).
    """
    classnames = list(run.classnames if classnames is None else classnames)
    head = rebuild_head(run.kind, run.head_config, classnames, text_model)
    head.load_state_dict(run.state_dict)
    return head.eval()


@torch.no_grad()
def predict_probabilities(
    store: FeatureStore,
    videos: EvalVideos,
    kind: str,
    head: nn.Module,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str = "auto",
) -> np.ndarray:
    """Class probabilities (N, K) of `videos` (in their order), from every stored view of each.

    Each view goes through the head on its own; its logits become a softmax, and a video's
    probabilities are the mean over its views (mean_softmax_over_views). batch_size counts
    videos, each with all its views.
    """
    torch_device = resolve_device(device)
    head = head.to(torch_device).eval()
    spec = head_spec(kind)
    loader = CacheLoader(
        store, videos.rows, videos.targets, spec.fields, spec.layers, batch_size,
        shuffle=False, seed=0, views="all",
    )
    chunks = [view_averaged_probabilities(kind, head, batch, torch_device).cpu() for batch in loader.epoch(0)]
    return torch.cat(chunks).numpy().astype(np.float64)  # (N, K)


def view_averaged_probabilities(
    kind: str, head: nn.Module, batch: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Class probabilities (B, K) of a multi-view batch (tensors (B, V, ...)): each view goes
    through the head on its own, then the mean over views of their softmax."""
    fields = head_spec(kind).fields
    count, views = batch[fields[0]].shape[:2]
    one_view_each = {field: batch[field].flatten(0, 1).to(device) for field in fields}  # (B*V, ...)
    logits = head_logits(kind, head, one_view_each).unflatten(0, (count, views))  # (B, V, K)
    return mean_softmax_over_views(logits)


def score_videos(
    store: FeatureStore,
    videos: EvalVideos,
    kind: str,
    head: nn.Module,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str = "auto",
) -> dict:
    """The body of a report: what was evaluated (store, split, views, classes) and the metrics."""
    probabilities = predict_probabilities(store, videos, kind, head, batch_size=batch_size, device=device)
    return {**_context(store, videos), **compute_metrics(probabilities, videos.targets, videos.classnames)}


def _context(store: FeatureStore, videos: EvalVideos) -> dict:
    """What was evaluated, for the report."""
    return {
        "store": str(store.path),
        "split": videos.split,
        "views": store.layout.views,
        "aggregation": "mean of softmax over views",
        "left_out_videos": videos.left_out,
        "not_extracted_videos": videos.not_extracted,
        "classnames": videos.classnames,
    }




# ---------------------------------------------------------------------- clipreel eval


def evaluate_run(
    run_dir: str | Path,
    store_path: str | Path,
    split: str,
    report_path: str | Path | None = None,
    pretrained: str | None = None,
    classes: str | Path | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str = "auto",
    console=None,
    trust_checkpoint_code: bool = False,
) -> dict:
    """`clipreel eval RUN_DIR --store STORE --split SPLIT`: score a trained head on a split.

    run_dir: a run written by `clipreel train`. store_path: a feature store whose features mean
    the same as those the head was trained on (same model, weights, frames, blocks, preprocessing;
    views and sampling may differ), else refused. split: the manifest split to score; every video
    must belong to one of the run's classes (closed set). report_path: the JSON report (default
    RUN_DIR/eval-SPLIT.json); the confusion matrix PNG goes next to it. pretrained: the store's
    CLIP checkpoint file, needed by text kinds when the store was extracted from a local file
    (trust_checkpoint_code: let it run its code, if it is a TorchScript archive other than OpenAI's).
    classes: a label map naming the store's label ids, when they are not the manifest's names.
    Returns the report (metrics plus what was evaluated).
    """
    run = load_run(run_dir)
    store = FeatureStore.open(store_path)
    differences = provenance_mismatch(run.provenance, store.provenance)
    if differences:
        raise ClipreelError(
            f"{store_path} holds features that differ from those the run {run_dir} was trained on, so its "
            "scores would be meaningless:\n  - " + "\n  - ".join(differences)
            + "\nEvaluate on a store extracted with the run's settings (see its config.json, store.provenance)."
        )
    label_map = read_label_map(classes) if classes is not None else None
    videos = select_videos(store, split, run.classnames, label_map=label_map, others="refuse")
    text_model = (
        load_text_model(store.provenance, pretrained, trust_code=trust_checkpoint_code)
        if run.kind in TEXT_KINDS else None
    )
    head = load_head(run, text_model=text_model)
    report = {
        "kind": run.kind,
        "run": str(run_dir),
        **score_videos(store, videos, run.kind, head, batch_size=batch_size, device=device),
    }
    path = Path(report_path) if report_path is not None else Path(run_dir) / f"eval-{split}.json"
    write_report_files(report, path)
    _print_summary(console, f"eval {run.kind} on {split}", report, path)
    return report


# ---------------------------------------------------------------------- clipreel zeroshot


def zero_shot(
    store_path: str | Path,
    split: str,
    classes_file: str | Path | None = None,
    template: str = "ensemble",
    report_path: str | Path | None = None,
    pretrained: str | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str = "auto",
    console=None,
    trust_checkpoint_code: bool = False,
) -> dict:
    """`clipreel zeroshot --store STORE --split SPLIT`: CLIP zero-shot recognition, no training.

    A video is the mean over frames of its stored projected embeddings; a class is the text
    embedding of its name in `template`: a template set of heads/zeroshot.py ("ensemble", "video",
    "photo", "none") or a literal template with one "{}" ("a video of {}."). Scores are scaled
    cosines, aggregated over the stored views by the mean of their softmax.

    classes_file (one class name per line) either restricts the list (every name is one of the
    store's classes: only those are candidates and the split's videos of other classes are left
    out) or renames it (as many names as the store has labels: line i names label i). Default:
    the store's class names by label id. pretrained: the store's CLIP checkpoint file, when it was
    extracted from a local file (trust_checkpoint_code: as for `evaluate_run`). report_path: write the JSON report and its confusion PNG there
    (default: nothing is written). Returns the report.
    """
    store = FeatureStore.open(store_path)
    classnames, label_map = _zero_shot_classes(store, classes_file)
    videos = select_videos(store, split, classnames, label_map=label_map, others="leave out")
    text_model = load_text_model(store.provenance, pretrained, trust_code=trust_checkpoint_code)
    classifier = _zero_shot_classifier(text_model, classnames, template)
    report = {
        "kind": "zeroshot",
        "template": template,
        "classes_file": str(classes_file) if classes_file is not None else None,
        **score_videos(store, videos, "zeroshot", classifier, batch_size=batch_size, device=device),
    }
    if report_path is not None:
        write_report_files(report, Path(report_path))
    _print_summary(console, f"zero-shot on {split}", report, report_path)
    return report


def _zero_shot_classes(store: FeatureStore, classes_file) -> tuple[list[str], list[str] | None]:
    """(candidate class names, label map for the videos or None) for zero_shot's classes_file."""
    if classes_file is None:
        return store_classnames(store), None
    names = read_label_map(classes_file)
    manifest = store.manifest()
    store_names = set(manifest.loc[manifest["label"] >= 0, "label_name"]) - {""}
    if set(names) <= store_names:
        return names, None  # a subset of the store's classes
    label_count = int(manifest["label"].max()) + 1
    if len(names) == label_count:
        return names, names  # new names for the store's labels, by id
    unknown = sorted(set(names) - store_names)
    raise ClipreelError(
        f"{classes_file}: {len(unknown)} of its names are not classes of {store.path} (e.g. {unknown[:5]}), and it "
        f"has {len(names)} names for the store's {label_count} labels. Give either a subset of the store's class "
        "names (to restrict the candidates) or one name per label, line i naming label i (to rename them)."
    )


def _zero_shot_classifier(text_model: TextModel, classnames: Sequence[str], template: str) -> ZeroShotClassifier:
    """A ZeroShotClassifier of the store's CLIP for a template set name or a literal template."""
    if template in TEMPLATES:
        templates = TEMPLATES[template]
    elif template.count("{}") == 1:
        templates = [template]
    else:
        raise ClipreelError(
            f"--template {template!r}: give a template set ({', '.join(TEMPLATES)}) or a template with one "
            "'{}' where the class name goes, e.g. 'a video of {}.'"
        )
    class_embeds = class_text_embeddings(text_model.clip, text_model.tokenizer, classnames, templates)  # (K, E)
    config = ZeroShotConfig(
        embed_dim=class_embeds.shape[1],
        num_classes=class_embeds.shape[0],
        templates=template,
        logit_scale=float(text_model.clip.logit_scale.detach().reshape(())),
    )
    return ZeroShotClassifier(config, class_embeds)


# ---------------------------------------------------------------------- console


def _print_summary(console, title: str, report: dict, path) -> None:
    """One line of metrics (and where the report went) on a rich console, if one was given."""
    if console is None:
        return
    console.print(
        f"{title}: top-1 {report['top1']:.4f}  top-{report['top5_k']} {report['top5']:.4f}  "
        f"mean class {report['mean_class_acc']:.4f}  ({report['n']} videos x {report['views']} views)",
        highlight=False,
    )
    if path is not None:
        console.print(f"report → {path}", highlight=False)
