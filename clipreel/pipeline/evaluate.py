"""Evaluation on a held-out split: the `eval` and `zeroshot` commands, one entry function each.

- `evaluate(EvalConfig)` (`clipreel eval RUN_DIR`): a `clipreel train` run on a feature store
  (`--store`), or a `clipreel finetune` run on raw videos (`--videos`).
- `zero_shot(ZeroShotEvalConfig)` (`clipreel zeroshot`): CLIP's zero-shot classifier on a store's
  frame embeddings (`--store`); or, on raw videos (`--videos`), an untrained method model
  (`--method`: where fine-tuning starts) or a fine-tuned run among the list's own classes (`--run`:
  zero-shot transfer, as X-CLIP and ViFi-CLIP test it).

A run is scored on the classes it was trained on: its config.json records their names in label
order, and the store's (or list's) labels must name the same classes (`match_classes`). The same
names in another order are matched by name, and the report says so; a label naming a class the
run does not know is refused, naming it.

Every path scores each video by the mean softmax over its views (`pipeline.scoring`): from a store,
every stored view; from raw videos, V temporal clips x C spatial crops decoded, sampled and
preprocessed like the run's training clips but without augmentation. Each writes the same report:
top-1/top-5, mean class accuracy, per class, confusion matrix (JSON + PNG, `pipeline.reports`).
The functions print nothing: they return the report, and the CLI prints it.

May import: torch, numpy, pandas, clipreel.errors, clipreel.devices, clipreel.heads, clipreel.stores,
clipreel.pipeline (data, scoring, reports, models).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from clipreel.config import DECODE_WORKERS, DEFAULT_MODEL
from clipreel.devices import resolve_device
from clipreel.errors import ClipreelError
from clipreel.heads.clip import load_text_model
from clipreel.heads.layers import image_size_of
from clipreel.heads.registry import create_head, head_entry, method_entry
from clipreel.pipeline.data.cache_loader import CacheLoader
from clipreel.pipeline.data.frame_loaders import FrameLoading, frame_loader, resolve_loading
from clipreel.pipeline.data.raw_frames import RawFrameDataset, augment_config, check_on_bad_video, labelled_rows
from clipreel.pipeline.data.sampling import SamplingConfig
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.models import (
    new_method_model,
    text_model_for,
    trained_head,
    trained_method_model,
)
from clipreel.pipeline.reports import write_report_files
from clipreel.pipeline.scoring import compute_metrics, predict_raw, predict_store
from clipreel.stores.audit import require_done_videos
from clipreel.stores.features import FeatureStore
from clipreel.stores.manifest import classnames_from_manifest, read_label_map
from clipreel.stores.runs import load_run, provenance_mismatch

# Videos per evaluation batch. Each comes with all its views, so a batch of ViT-B/16 tokens for
# EVL (8 frames, 4 blocks, 4 x 3 views) is ~0.9 GB at 8 videos.
EVAL_BATCH_SIZE = 8


# ---------------------------------------------------------------------- the two commands


@dataclass
class EvalConfig:
    """Everything `clipreel eval` needs."""

    run: str  # a run directory of `clipreel train` (with store) or of `clipreel finetune` (with videos)
    store: str | None = None  # the feature store to score a `train` run on (features meaning the same)
    videos: str | None = None  # the video list to score a `finetune` run on, from raw frames
    split: str = "test"
    report: str | None = None  # the JSON report (default RUN_DIR/eval-SPLIT.json); the confusion PNG goes next to it
    store_checkpoint: str | None = None  # the local checkpoint file a store was extracted from (text heads)
    trust_checkpoint_code: bool = False  # let a checkpoint that is a TorchScript archive (not OpenAI's) run its code
    classes: str | None = None  # a label map naming the store's (or list's) label ids, when they are not its own names
    views: int | None = None  # raw videos: temporal views per video (None: an imported run's record, else 1)
    crops: int | None = None  # raw videos: spatial crops per view, 1 or 3 (None: an imported run's record, else 1)
    batch_size: int = EVAL_BATCH_SIZE  # videos per batch, each with all its views
    workers: int = DECODE_WORKERS  # raw videos: decode processes (0: decode in this process)
    decoder: str = "auto"
    loader: str = "auto"
    device: str = "auto"
    on_bad_video: str = "stop"  # raw videos: a video that cannot be decoded stops, or is "skip"ped (and reported)


def evaluate(cfg: EvalConfig) -> tuple[dict, Path]:
    """`clipreel eval`: score a trained run on a split -> (the report, where it was written)."""
    if (cfg.store is None) == (cfg.videos is None):
        raise ClipreelError("clipreel eval: give either --store (a `train` run) or --videos (a `finetune` run)")
    path = Path(cfg.report) if cfg.report is not None else Path(cfg.run) / f"eval-{cfg.split}.json"
    if cfg.store is not None:
        report = evaluate_store_run(cfg.run, cfg.store, cfg.split, path, store_checkpoint=cfg.store_checkpoint,
                                    classes=cfg.classes, batch_size=cfg.batch_size, device=cfg.device,
                                    trust_code=cfg.trust_checkpoint_code)
    else:
        report = evaluate_raw_run(cfg.run, cfg.videos, cfg.split, path, label_map=cfg.classes, views=cfg.views,
                                  crops=cfg.crops, batch_size=cfg.batch_size, workers=cfg.workers,
                                  decoder=cfg.decoder, loader=cfg.loader, device=cfg.device,
                                  trust_code=cfg.trust_checkpoint_code, on_bad_video=cfg.on_bad_video)
    return report, path


@dataclass
class ZeroShotEvalConfig:
    """Everything `clipreel zeroshot` needs."""

    store: str | None = None  # a feature store: CLIP's frame-mean embeddings against the class texts
    videos: str | None = None  # a video list, scored from raw frames by `method` (untrained) or `run`
    method: str | None = None  # with videos: an untrained method model
    run: str | None = None  # with videos: a `clipreel finetune` run, classifying among the list's classes
    split: str = "test"
    classes: str | None = None  # a class list (one name per line) that restricts or renames the classes
    template: str = "ensemble"  # store: a template set of heads/cache/zeroshot.py or one literal template
    report: str | None = None  # the JSON report (and its confusion PNG); default: none written
    store_checkpoint: str | None = None  # the local checkpoint file a store was extracted from
    trust_checkpoint_code: bool = False  # let a checkpoint that is a TorchScript archive (not OpenAI's) run its code
    model: str = DEFAULT_MODEL  # method: the open_clip model
    pretrained: str = "default"  # method: the CLIP's weights
    frames: int = 8  # method: frames per clip
    views: int = 1  # raw videos: temporal views per video
    options: dict = field(default_factory=dict)  # method: its options
    workers: int = DECODE_WORKERS  # raw videos: decode processes
    device: str = "auto"


def zero_shot(cfg: ZeroShotEvalConfig) -> dict:
    """`clipreel zeroshot`: classify by class names, with no training on these classes -> the report."""
    if (cfg.store is None) == (cfg.videos is None):
        raise ClipreelError("clipreel zeroshot: give either --store (a feature store) or --videos (raw videos)")
    report_path = Path(cfg.report) if cfg.report is not None else None
    if cfg.store is not None:
        return zero_shot_store(cfg.store, cfg.split, classes_file=cfg.classes, template=cfg.template,
                               report_path=report_path, store_checkpoint=cfg.store_checkpoint, device=cfg.device,
                               trust_code=cfg.trust_checkpoint_code)
    if (cfg.method is None) == (cfg.run is None):
        raise ClipreelError("clipreel zeroshot --videos: give either --method (an untrained model) or --run "
                            "(a finetune run)")
    classnames = zero_shot_classes(cfg.videos, cfg.classes)
    if cfg.method is not None:
        return zero_shot_raw(cfg.method, cfg.videos, cfg.split, cfg.model, cfg.pretrained, frames=cfg.frames,
                             options=cfg.options, views=cfg.views, workers=cfg.workers, device=cfg.device,
                             classes=classnames, report_path=report_path, trust_code=cfg.trust_checkpoint_code)
    return evaluate_raw_run(cfg.run, cfg.videos, cfg.split, report_path, classes=classnames, views=cfg.views,
                            workers=cfg.workers, device=cfg.device, trust_code=cfg.trust_checkpoint_code)


# ---------------------------------------------------------------------- from a feature store


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
    require_done_videos(store)
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


def match_classes(run_classnames: Sequence[str], label_names: dict[int, str], where, run_dir) -> bool:
    """Check that the labels of the videos to score (`label_names`: label id -> class name) name the
    classes of the run, trained on `run_classnames` (label i = run_classnames[i]) -> True when some
    label's name sits at another id in the run (the videos are then matched to the run's classes by
    name), False when every label names the run's class of the same id.

    A label id of the run that names a class the run does not know is refused, naming the first.
    Labels beyond the run's classes (a source with more classes) are left to the closed-set check of
    the videos scored.
    """
    renamed = [(label, name) for label, name in sorted(label_names.items())
               if label < len(run_classnames) and name not in run_classnames]
    if renamed:
        label, name = renamed[0]
        raise ClipreelError(
            f"{where} names its classes otherwise than the run {run_dir} was trained on: its label {label} is "
            f"{name!r}, the run's label {label} is {run_classnames[label]!r} (config.json, classnames), and "
            f"{name!r} is none of the run's {len(run_classnames)} classes ({len(renamed)} such label(s)). Score "
            "the run on videos labelled with its classes; if these label ids mean the run's classes under other "
            "names, give --classes with a label map that names them as the run does."
        )
    return any(label >= len(run_classnames) or run_classnames[label] != name
               for label, name in label_names.items() if name in run_classnames)


def label_names(manifest: pd.DataFrame, label_map: Sequence[str] | None = None) -> dict[int, str]:
    """label id -> class name of the manifest's labelled videos: label_map[label] when a label map is
    given, else their label_name (unnamed labels, and labels beyond the label map, are left out)."""
    labelled = manifest[manifest["label"] >= 0]
    if label_map is not None:
        return {int(label): label_map[label] for label in labelled["label"].unique() if label < len(label_map)}
    named = labelled[labelled["label_name"] != ""]
    return {int(label): str(name) for label, name in zip(named["label"], named["label_name"])}


def store_classnames(store: FeatureStore) -> list[str]:
    """The store's class names by label id (the manifest's label_name of each label)."""
    return classnames_from_manifest(store.manifest(), str(store.path))


def score_store(store: FeatureStore, videos: EvalVideos, name: str, head: nn.Module, *,
                batch_size: int = EVAL_BATCH_SIZE, device: str = "auto") -> dict:
    """The body of a report: what was evaluated (store, split, views, classes) and the metrics of
    cache head `name` on every stored view of `videos`."""
    torch_device = resolve_device(device)
    entry = head_entry(name)
    loader = CacheLoader(store, videos.rows, videos.targets, entry.reads, entry.blocks, batch_size,
                         shuffle=False, seed=0, views="all")
    probabilities, _ = predict_store(name, head.to(torch_device), loader.epoch(0), torch_device)  # (N, K)
    context = {
        "store": str(store.path),
        "split": videos.split,
        "views": store.layout.views,
        "aggregation": "mean of softmax over views",
        "left_out_videos": videos.left_out,
        "not_extracted_videos": videos.not_extracted,
        "classnames": videos.classnames,
    }
    return {**context, **compute_metrics(probabilities, videos.targets, videos.classnames)}


def evaluate_store_run(run_dir: str | os.PathLike, store_path: str | os.PathLike, split: str,
                       report_path: Path | None = None, *, store_checkpoint: str | None = None,
                       classes: str | None = None, batch_size: int = EVAL_BATCH_SIZE, device: str = "auto",
                       trust_code: bool = False) -> dict:
    """A `clipreel train` run's report on `split` of a store (the JSON + PNG written at `report_path`).

    The store's features must mean the same as those the head was trained on (same model, weights,
    frames, blocks, preprocessing; views and sampling may differ), else it is refused. Every video
    must belong to one of the run's classes (closed set), and the store's labels must name the run's
    classes (`match_classes`). `classes`: a label map naming the store's label ids, when they are not
    the manifest's names.
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
    require_done_videos(store)
    label_map = read_label_map(classes) if classes is not None else None
    by_name = match_classes(run.classnames, label_names(store.manifest(), label_map), store_path, run_dir)
    videos = select_videos(store, split, run.classnames, label_map=label_map, others="refuse")
    head = trained_head(run, text_model=text_model_for(run.kind, store.provenance, store_checkpoint, trust_code))
    report = {"kind": run.kind, "run": str(run_dir), "classes_matched_by_name": by_name,
              **score_store(store, videos, run.kind, head, batch_size=batch_size, device=device)}
    if report_path is not None:
        write_report_files(report, report_path)
    return report


def zero_shot_store(store_path: str | os.PathLike, split: str, *, classes_file: str | os.PathLike | None = None,
                    template: str = "ensemble", report_path: Path | None = None, store_checkpoint: str | None = None,
                    batch_size: int = EVAL_BATCH_SIZE, device: str = "auto", trust_code: bool = False) -> dict:
    """CLIP zero-shot recognition of a store's videos, no training.

    A video is the mean over frames of its stored projected embeddings; a class is the text
    embedding of its name in `template`: a template set of heads/cache/zeroshot.py ("ensemble",
    "video", "photo", "none") or a literal template with one "{}" ("a video of {}."). Scores are
    scaled cosines, aggregated over the stored views by the mean of their softmax.

    classes_file (one class name per line) either restricts the list (every name is one of the
    store's classes: only those are candidates and the split's videos of other classes are left
    out) or renames it (as many names as the store has labels: line i names label i). Default:
    the store's class names by label id.
    """
    store = FeatureStore.open(store_path)
    classnames, label_map = _zero_shot_classes(store, classes_file)
    videos = select_videos(store, split, classnames, label_map=label_map, others="leave out")
    text_model = load_text_model(store.provenance, store_checkpoint, trust_code=trust_code)
    classifier, _ = create_head("zeroshot", store_layout=store.layout, provenance=store.provenance,
                                classnames=classnames, options={"templates": template}, text_model=text_model)
    report = {
        "kind": "zeroshot",
        "template": template,
        "classes_file": str(classes_file) if classes_file is not None else None,
        **score_store(store, videos, "zeroshot", classifier, batch_size=batch_size, device=device),
    }
    if report_path is not None:
        write_report_files(report, report_path)
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


# ---------------------------------------------------------------------- from raw videos


def eval_rows(manifest: pd.DataFrame, where: str, split: str, classnames: Sequence[str],
              others: str = "refuse") -> pd.DataFrame:
    """The labelled videos of `split`, relabelled as indices into `classnames`.

    Videos of other classes are refused (others="refuse": closed-set evaluation) or left out
    (others="leave out": scoring a subset of the classes, as base-to-novel does).
    """
    rows = labelled_rows(manifest, split)
    if rows.empty:
        raise ClipreelError(f"{where}: no labelled video in split {split!r}; its splits are "
                            f"{sorted(manifest['split'].unique())}")
    index_of = {name: index for index, name in enumerate(classnames)}
    known = rows["label_name"].isin(list(index_of))
    if not known.all() and others == "refuse":
        unknown = sorted(set(rows.loc[~known, "label_name"]))
        raise ClipreelError(f"{where}: split {split!r} holds classes the run does not know: {unknown[:10]}; its "
                            f"classes are {list(classnames)[:20]}. To classify among the list's own classes "
                            "(zero-shot transfer), use `clipreel zeroshot --videos LIST --run RUN_DIR`.")
    rows = rows[known]
    if rows.empty:
        raise ClipreelError(f"{where}: no video of split {split!r} belongs to the classes {list(classnames)[:20]}")
    return rows.assign(label=[index_of[name] for name in rows["label_name"]])


def score_raw(model: nn.Module, rows: pd.DataFrame, classnames: Sequence[str], *, frames: int, image_size: int,
              norm: str, views: int = 1, crops: int = 1, batch_size: int = EVAL_BATCH_SIZE,
              loading: FrameLoading | None = None, device: torch.device | str = "cpu",
              sampling: SamplingConfig | None = None, short_side: int | None = None,
              on_bad_video: str = "stop") -> dict:
    """compute_metrics of a raw-frame method on manifest `rows` (labels index `classnames`), with
    multi-view testing: each video's `views` temporal clips x `crops` spatial crops, mean of their softmax.

    sampling: the temporal sampling (default: TSN segment centres of `frames` frames, `views` views);
    short_side: the short side frames are resized to before cropping (default: the crop size).
    With on_bad_video "skip", videos that cannot be decoded are left out and listed ("skipped_videos")."""
    device = torch.device(device)
    loading = loading or resolve_loading("auto", "auto", device, workers=0)
    sampling = sampling or SamplingConfig(frames=frames, views=views)
    dataset = RawFrameDataset(rows, sampling, augment_config(image_size, norm), train=False, crops=crops,
                              decoder=loading.decoder, device=loading.device, short_side=short_side,
                              on_bad_video=on_bad_video)
    loader = frame_loader(dataset, batch_size, loading, shuffle=False)
    probabilities, labels, _ = predict_raw(model, loader, device)
    skipped = [{"video_id": rows.at[row, "video_id"], "path": rows.at[row, "path"], "error": error}
               for row, error in loader.skipped.items()]
    if len(labels) == 0:
        raise ClipreelError(f"none of the {len(rows)} videos to score could be decoded, e.g. {skipped[0]['error']}")
    return {**compute_metrics(probabilities, labels, classnames), "classnames": list(classnames),
            "views": sampling.views, "crops": crops, "skipped_videos": skipped}


def evaluate_raw_run(run_dir: str | os.PathLike, videos: str, split: str, report_path: Path | None = None, *,
                     classes: Sequence[str] | None = None, label_map: str | None = None, views: int | None = None,
                     crops: int | None = None,
                     batch_size: int = EVAL_BATCH_SIZE, workers: int = DECODE_WORKERS, decoder: str = "auto",
                     loader: str = "auto", device: str = "auto", trust_code: bool = False,
                     on_bad_video: str = "stop") -> dict:
    """A `clipreel finetune` (or imported) run's report on the raw videos of `split` (the JSON + PNG
    written at `report_path`).

    The model is rebuilt from the run's CLIP (model + pretrained, checked by checksum) and loaded
    with the run's weights. classes None: among the run's classes (every video's class must be one
    of them, and the list's labels must name the run's classes: `match_classes`); else among
    `classes`, which the run need not have seen (zero-shot transfer, novel classes), leaving out the
    videos of other classes. label_map: a file naming the list's label ids (one name per line).
    An imported run is scored with its reference's test preprocessing (sampling, views, crops, short
    side) unless views or crops are given.
    on_bad_video "skip": videos that cannot be decoded (or are missing) are left out and listed in the
    report ("skipped_videos"); "stop": the first one stops the evaluation, naming it.
    """
    check_on_bad_video(on_bad_video)
    run = load_run(run_dir)
    manifest = read_sources(videos, label_map=Path(label_map) if label_map is not None else None,
                            skip_missing=on_bad_video == "skip")
    by_name = None
    if classes is None:
        by_name = match_classes(run.classnames, label_names(manifest), videos, run_dir)
    torch_device = resolve_device(device)
    model = trained_method_model(run.path, torch_device, trust_code)
    if classes is not None:
        model.set_classnames(list(classes))
    classnames = list(classes) if classes is not None else run.classnames
    rows = eval_rows(manifest, videos, split, classnames, others="refuse" if classes is None else "leave out")
    config = run.head_config
    plan = run_clip_plan(run, views=views, crops=crops)
    report = {"run": str(run.path), "kind": run.kind, "split": split, "classes_matched_by_name": by_name,
              **score_raw(model, rows, classnames, frames=config["frames"], image_size=config["image_size"],
                          norm=config["norm"], crops=plan.crops, batch_size=batch_size, sampling=plan.sampling,
                          short_side=plan.short_side,
                          loading=resolve_loading(decoder, loader, torch_device, workers), device=torch_device,
                          on_bad_video=on_bad_video)}
    missing = manifest[(manifest["status"] == "failed") & (manifest["split"] == split) & (manifest["label"] >= 0)]
    missing_files = [{"video_id": video_id, "path": path, "error": error}
                     for video_id, path, error in zip(missing["video_id"], missing["path"], missing["error"])]
    report["skipped_videos"] = missing_files + report["skipped_videos"]
    if report_path is not None:
        write_report_files(report, report_path)
    return report


@dataclass(frozen=True)
class ClipPlan:
    """How a raw-frame run's test clips are made: temporal sampling, spatial crops, the resize before them."""

    sampling: SamplingConfig
    crops: int
    short_side: int | None


def run_clip_plan(run, *, views: int | None = None, crops: int | None = None) -> ClipPlan:
    """The test clips of a raw-frame run: what its import recorded (the reference's own test), with
    the given views and crops put in; a run of `clipreel finetune` tests on TSN segment centres, 1 view, 1 crop."""
    record = (run.imported or {}).get("preprocessing") or {}
    sampling = SamplingConfig(
        policy=record.get("sampling", "tsn"),
        frames=run.head_config["frames"],
        stride=record.get("stride") or SamplingConfig().stride,
        views=views or record.get("views", 1),
    )
    short_side = record.get("short_side")
    return ClipPlan(sampling=sampling, crops=crops or record.get("crops", 1),
                    short_side=short_side if short_side != run.head_config["image_size"] else None)


def zero_shot_raw(method: str, videos: str, split: str, model: str = DEFAULT_MODEL, pretrained: str = "default",
                  *, frames: int = 8, options: dict | None = None, norm: str | None = None, seed: int = 0,
                  classes: Sequence[str] | None = None, views: int = 1, crops: int = 1,
                  batch_size: int = EVAL_BATCH_SIZE, workers: int = DECODE_WORKERS, decoder: str = "auto",
                  loader: str = "auto", device: str = "auto", report_path: Path | None = None,
                  trust_code: bool = False) -> dict:
    """The untrained method model's report on `split`: where fine-tuning starts from.

    classes None: among the list's classes; else among `classes`, leaving out videos of other classes.
    """
    norm = norm if norm is not None else method_entry(method).recipe.norm
    torch_device = resolve_device(device)
    manifest = read_sources(videos)
    classnames = list(classes) if classes is not None else classnames_from_manifest(manifest, videos)
    network, _, _ = new_method_model(method, model, pretrained, classnames, frames, options or {}, seed, torch_device,
                                     trust_code)
    rows = eval_rows(manifest, videos, split, classnames, others="refuse" if classes is None else "leave out")
    report = {"method": method, "model": model, "pretrained": pretrained, "split": split,
              **score_raw(network, rows, classnames, frames=frames, image_size=image_size_of(network), norm=norm,
                          views=views, crops=crops, batch_size=batch_size,
                          loading=resolve_loading(decoder, loader, torch_device, workers), device=torch_device)}
    if report_path is not None:
        write_report_files(report, report_path)
    return report


def zero_shot_classes(videos: str, classes_file: str | os.PathLike | None = None) -> list[str]:
    """What zero-shot classifies among: the names of a class list file (one per line), else the list's own classes."""
    if classes_file is not None:
        return read_label_map(classes_file)
    return classnames_from_manifest(read_sources(videos), videos)
