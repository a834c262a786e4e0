"""Scoring `clipreel finetune` runs (and the untrained methods) on the raw videos of a split.

Each video is scored by the mean softmax over its views (V temporal clips x C spatial crops),
decoded, sampled and preprocessed like the run's training clips but without augmentation (segment
centres, short side to S, centre or 3 crops). `evaluate_finetuned` rebuilds a run from its CLIP
(checked by checksum) and its saved weights; `zero_shot_raw` scores a method model before any
training, which is where fine-tuning starts from. Both write the same report as `clipreel eval` on
a feature store: top-1/top-5, mean class accuracy, per class, confusion matrix (JSON + PNG).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from clipreel.devices import resolve_device
from clipreel.errors import ClipreelError
from clipreel.heads.clip import register_model_config
from clipreel.heads.methods import image_size_of
from clipreel.pipeline.data.frame_loaders import (
    FrameLoading,
    frame_loader,
    resolve_loading,
)
from clipreel.pipeline.data.sampling import SamplingConfig
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.evaluate import compute_metrics, write_report_files
from clipreel.pipeline.finetune import (
    RUN_KIND_PREFIX,
    augment_config,
    clip_dataset,
    fresh_method_model,
    method_norm,
    predict_raw,
    split_rows,
)
from clipreel.stores.manifest import classnames_from_manifest, read_label_map
from clipreel.stores.runs import load_run


def score_rows(model: nn.Module, rows: pd.DataFrame, classnames: Sequence[str], *, frames: int, image_size: int,
               norm: str, views: int = 1, crops: int = 1, batch_size: int = 8,
               loading: FrameLoading | None = None, device: torch.device | str = "cpu") -> dict:
    """compute_metrics of `model` on manifest `rows` (labels index `classnames`), with multi-view
    testing: each video's `views` temporal clips x `crops` spatial crops, mean of their softmax."""
    device = torch.device(device)
    loading = loading or resolve_loading("auto", "auto", device, workers=0)
    sampling = SamplingConfig(frames=frames, views=views)
    dataset = clip_dataset(rows, sampling, augment_config(image_size, norm), loading, train=False, crops=crops)
    loader = frame_loader(dataset, batch_size, loading, shuffle=False)
    probabilities, labels, _ = predict_raw(model, loader, device)
    return {**compute_metrics(probabilities, labels, classnames), "classnames": list(classnames),
            "views": views, "crops": crops}


def eval_rows(manifest: pd.DataFrame, where: str, split: str, classnames: Sequence[str],
              others: str = "refuse") -> pd.DataFrame:
    """The labelled videos of `split`, relabelled as indices into `classnames`.

    Videos of other classes are refused (others="refuse": closed-set evaluation) or left out
    (others="leave out": scoring a subset of the classes, as base-to-novel does).
    """
    rows = split_rows(manifest, split)
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


def evaluate_finetuned(run_dir: str | os.PathLike, videos: str, split: str, report_path: str | None = None, *,
                       classes: Sequence[str] | None = None, views: int = 1, crops: int = 1, batch_size: int = 8,
                       workers: int = 0, decoder: str = "auto", loader: str = "auto", device: str = "auto",
                       trust_checkpoint_code: bool = False) -> dict:
    """Score a `clipreel finetune` run on the raw videos of `split`: top-1/top-5, per class, confusion.

    The model is rebuilt from the run's CLIP (model + pretrained, checked by checksum) and loaded
    with the run's weights; each video is scored by the mean softmax over `views` temporal clips x
    `crops` spatial crops. classes None: among the run's classes (every video's class must be one of
    them); else among `classes`, which the run need not have seen (zero-shot transfer, novel classes),
    leaving out the videos of other classes. With `report_path`, the JSON report and its confusion
    PNG are written. trust_checkpoint_code: let the run's CLIP checkpoint run its code, if it is a
    TorchScript archive other than OpenAI's.
    """
    run = load_run(run_dir)
    if not run.kind.startswith(RUN_KIND_PREFIX):
        raise ClipreelError(f"{run_dir} is a {run.kind!r} run, not a `clipreel finetune` run: evaluate it with "
                            "`clipreel eval` on a feature store.")
    config = run.head_config
    torch_device = resolve_device(device)
    model = rebuild_finetuned(run.path, torch_device, trust_checkpoint_code)
    if classes is not None:
        model.set_classnames(list(classes))
    classnames = list(classes) if classes is not None else run.classnames
    rows = eval_rows(read_sources(videos), videos, split, classnames,
                     others="refuse" if classes is None else "leave out")
    report = {"run": str(run.path), "kind": run.kind, "split": split,
              **score_rows(model, rows, classnames, frames=config["frames"], image_size=config["image_size"],
                           norm=config["norm"], views=views, crops=crops, batch_size=batch_size,
                           loading=resolve_loading(decoder, loader, torch_device, workers), device=torch_device)}
    if report_path is not None:
        write_report_files(report, Path(report_path))
    return report


def rebuild_finetuned(run_dir: str | os.PathLike, device: torch.device | str = "cpu",
                      trust_checkpoint_code: bool = False) -> nn.Module:
    """The trained model of a `clipreel finetune` run, in eval mode."""
    run = load_run(run_dir)
    config = run.head_config
    if config.get("model_config") is not None:  # a model from a config file
        register_model_config(config["model"], config["model_config"])
    method = run.kind.removeprefix(RUN_KIND_PREFIX)
    options = dict(config["method_config"])
    if method in ("xclip", "ezclip"):
        options.pop("frames")
    model, _, sha256 = fresh_method_model(method, config["model"], config["pretrained"], run.classnames,
                                          config["frames"], options, 0, torch.device(device), trust_checkpoint_code)
    if config["checkpoint_sha256"] and sha256 != config["checkpoint_sha256"]:
        raise ClipreelError(f"{run_dir} was trained from a CLIP checkpoint with sha256 {config['checkpoint_sha256']}, "
                            f"but {config['pretrained']} now has {sha256}: give the run's original weights file.")
    model.load_state_dict(run.state_dict)
    return model.eval()


def zero_shot_raw(method: str, videos: str, split: str, model: str = "clipreel-synth", pretrained: str = "default",
                  *, frames: int = 8, options: dict | None = None, norm: str | None = None, seed: int = 0,
                  classes: Sequence[str] | None = None, views: int = 1, crops: int = 1, batch_size: int = 8,
                  workers: int = 0, decoder: str = "auto", loader: str = "auto", device: str = "auto",
                  report_path: str | None = None, trust_checkpoint_code: bool = False) -> dict:
    """The untrained method model's metrics on `split`: where fine-tuning starts from.

    classes None: among the list's classes; else among `classes`, leaving out videos of other classes.
    """
    torch_device = resolve_device(device)
    manifest = read_sources(videos)
    classnames = list(classes) if classes is not None else classnames_from_manifest(manifest, videos)
    network, _, _ = fresh_method_model(method, model, pretrained, classnames, frames, options or {}, seed, torch_device,
                                       trust_checkpoint_code)
    rows = eval_rows(manifest, videos, split, classnames, others="refuse" if classes is None else "leave out")
    report = {"method": method, "model": model, "pretrained": pretrained, "split": split,
              **score_rows(network, rows, classnames, frames=frames, image_size=image_size_of(network),
                           norm=method_norm(method, norm), views=views, crops=crops, batch_size=batch_size,
                           loading=resolve_loading(decoder, loader, torch_device, workers), device=torch_device)}
    if report_path is not None:
        write_report_files(report, Path(report_path))
    return report


def zero_shot_classes(videos: str, classes_file: str | os.PathLike | None = None) -> list[str]:
    """What zero-shot classifies among: the names of a class list file (one per line), else the list's own classes."""
    if classes_file is not None:
        return read_label_map(classes_file)
    return classnames_from_manifest(read_sources(videos), videos)
