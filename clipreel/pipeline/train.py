"""Train a head from the feature cache: `clipreel train KIND --store STORE --out RUN_DIR`.

The backbone never runs: batches of cached features stream out of the store (CacheLoader), one
random cached view per video per epoch, into a small head. The recipe follows the reference
methods: AdamW, linear warmup then cosine decay per optimizer step, optional label smoothing and
gradient accumulation, bf16 autocast on GPU and plain fp32 on CPU.

Resuming: after every epoch the run directory gets `checkpoint.pt` (head, optimizer, scheduler,
finished epochs, history, the config). Re-running the same command continues from the last
finished epoch, and the result equals an uninterrupted run, because everything random is a
function of (seed, epoch): the loader's order and views, and the torch generator, which is
re-seeded from (seed, epoch, rank) at the start of every epoch (so no generator state needs
saving). Asking for more epochs than a finished run had continues it, re-planning the cosine
over the new total from the step reached. A run directory made with another head kind, another
store (provenance) or another recipe is refused.

Outputs (rank 0 only): log.csv, curves.png, checkpoint.pt and, at the end, the run itself
(weights.safetensors, config.json, metrics.json: see stores/runs.py).

Several workers (`workers > 1`): Ray Train's TorchTrainer runs this same loop in each worker;
each reads its shard of the shuffled rows and gradients are all-reduced through DDP
(`ray.train.torch.prepare_model`; gloo on CPU, NCCL on GPU). The run directory must then be on a
filesystem every worker sees (all read checkpoint.pt when resuming; rank 0 writes).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from clipreel.devices import resolve_device
from clipreel.errors import ClipreelError
from clipreel.heads.cache.xclip import exempt_from_weight_decay
from clipreel.heads.clip import load_text_model
from clipreel.heads.kinds import (
    TEXT_KINDS,
    build_head,
    head_logits,
    head_spec,
    trainable_parameters,
)
from clipreel.pipeline.data.cache_loader import CacheLoader
from clipreel.pipeline.evaluate import view_averaged_probabilities
from clipreel.pipeline.progress import progress_bar
from clipreel.pipeline.raycluster import ensure_ray
from clipreel.stores.features import FeatureStore, provenance_diff
from clipreel.stores.location import StoreAccess, store_location
from clipreel.stores.manifest import classnames_from_manifest, read_label_map
from clipreel.stores.runs import CONFIG_FILE, METRICS_FILE, save_run

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.csv"
CURVES_FILE = "curves.png"
LOG_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_top1", "val_loss", "seconds")
# The TrainSummary fields that metrics.json keeps.
METRIC_NAMES = ("epochs", "resumed_from_epoch", "train_videos", "val_videos", "skipped_videos", "train_loss",
                "train_acc", "val_top1", "best_val_top1", "seconds")


@dataclass(frozen=True)
class KindRecipe:
    """A head kind's default optimisation recipe, from its reference implementation."""

    lr: float
    weight_decay: float
    warmup_epochs: int
    betas: tuple[float, float] = (0.9, 0.999)
    decay_everything: bool = True  # False: no weight decay on biases, norms, positional embeddings


RECIPES = {
    # EVL (METHODS 1.5): AdamW 4e-4, wd 0.05 on every parameter, no warmup, cosine.
    "evl": KindRecipe(lr=4e-4, weight_decay=0.05, warmup_epochs=0),
    # X-CLIP (METHODS 2.7): new modules at 10x the base 8e-6, betas (0.9, 0.98), wd 0.001 except
    # 1-D parameters, biases and positional embeddings, 5 warmup epochs (1 here: short runs).
    "mit": KindRecipe(lr=8e-5, weight_decay=0.001, warmup_epochs=1, betas=(0.9, 0.98), decay_everything=False),
    "xclip-prompt": KindRecipe(lr=8e-5, weight_decay=0.001, warmup_epochs=1, betas=(0.9, 0.98), decay_everything=False),
    # ViFi-CLIP's prompting stage (METHODS 3.4): one AdamW group, betas (0.9, 0.98), wd 0.001.
    "text-prompt": KindRecipe(lr=2e-3, weight_decay=0.001, warmup_epochs=1, betas=(0.9, 0.98)),
    # Baselines: no reference recipe; plain AdamW with a light weight decay.
    "linear": KindRecipe(lr=1e-3, weight_decay=1e-4, warmup_epochs=1),
    "mlp": KindRecipe(lr=1e-3, weight_decay=1e-4, warmup_epochs=1),
    "zeroshot": KindRecipe(lr=0.0, weight_decay=0.0, warmup_epochs=0),  # nothing to train
}


@dataclass
class TrainConfig:
    """Everything `clipreel train` needs. None means "the head kind's default" (see RECIPES)."""

    kind: str  # head kind: evl, mit, xclip-prompt, text-prompt, linear, mlp or zeroshot
    store: str  # the feature store to train from (NAME.zarr, written by `clipreel extract`)
    out: str  # the run directory to write; re-running the same command resumes it
    split: str = "train"  # manifest split to train on
    val_split: str | None = "val"  # manifest split to validate on after every epoch (skipped if empty)
    epochs: int = 10  # passes over the training videos
    lr: float | None = None  # peak learning rate (evl 4e-4, mit/xclip-prompt 8e-5, text-prompt 2e-3, linear/mlp 1e-3)
    weight_decay: float | None = None  # AdamW decay (evl 0.05, mit/xclip-prompt/text-prompt 0.001, linear/mlp 1e-4)
    batch_size: int = 16  # videos per optimizer micro-step, over all workers together
    accumulate: int = 1  # micro-steps whose gradients are summed before each optimizer step
    warmup_epochs: int | None = None  # epochs of linear warmup before the cosine decay (evl 0, others 1)
    label_smoothing: float = 0.0  # cross-entropy label smoothing (X-CLIP and ViFi-CLIP use 0.1)
    seed: int = 0  # seeds the head's initialisation, the batch order, the views and dropout
    options: dict = field(default_factory=dict)  # head hyper-parameters, e.g. {"n_ctx": 4} or {"mlp_dropout": 0.1}
    pretrained: str | None = None  # the store's CLIP checkpoint file, for text kinds of file-extracted stores
    classes: str | None = None  # label map (one class name per line); default: the manifest's label names
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N (one process)
    workers: int = 1  # data-parallel workers; > 1 trains through Ray Train
    address: str | None = None  # Ray cluster to join when workers > 1 (default: a local Ray)
    prefetch: int = 2  # batches read ahead of the training step


@dataclass
class TrainSummary:
    """What a training run did, for the CLI's closing table."""

    run_dir: str
    kind: str
    epochs: int  # epochs finished in total
    resumed_from_epoch: int  # epochs already finished when this call started (0 = a fresh run)
    train_videos: int
    val_videos: int
    skipped_videos: int  # videos of the training split that are not extracted (not done) yet
    train_loss: float | None
    train_acc: float | None
    val_top1: float | None
    best_val_top1: float | None
    seconds: float
    history: list[dict]  # one row of log.csv per epoch
    head: nn.Module | None = None  # the trained head, in this process (None after Ray Train)


def run_training(
    cfg: TrainConfig, progress: bool = True, on_epoch_end: Callable[[dict], None] | None = None
) -> TrainSummary:
    """Train `cfg.kind` from `cfg.store` into the run directory `cfg.out` (resuming it if it exists).

    on_epoch_end(log_row) is called after every finished epoch, once its checkpoint is written
    (single-process runs only).
    """
    if cfg.workers > 1 and cfg.kind != "zeroshot":
        return _train_with_ray(cfg)
    return _train(cfg, rank=0, world_size=1, device=resolve_device(cfg.device), progress=progress,
                  on_epoch_end=on_epoch_end)


# --------------------------------------------------------------------------- what to train on


@dataclass
class _Data:
    """The rows and class names a run trains and validates on."""

    store: FeatureStore
    classnames: list[str]
    train_rows: np.ndarray
    train_labels: np.ndarray
    val_rows: np.ndarray
    val_labels: np.ndarray
    skipped: int


def _training_data(cfg: TrainConfig) -> _Data:
    store = FeatureStore.open(cfg.store)
    manifest = store.manifest()
    classnames = read_label_map(cfg.classes) if cfg.classes else classnames_from_manifest(manifest, cfg.store)
    done = store.done_mask()
    labelled = manifest["label"].to_numpy() >= 0

    def split_rows(split: str | None) -> tuple[np.ndarray, int]:
        in_split = (manifest["split"] == split).to_numpy() & labelled
        return np.flatnonzero(in_split & done), int((in_split & ~done).sum())

    train_rows, skipped = split_rows(cfg.split)
    if len(train_rows) == 0:
        splits = sorted(manifest.loc[labelled & done, "split"].unique())
        raise ClipreelError(
            f"{cfg.store}: no labelled, extracted video in split {cfg.split!r} "
            f"({skipped} not extracted yet). Splits with labelled videos: {splits or 'none'}. "
            "Choose one with --split, or extract the videos first."
        )
    val_rows, _ = split_rows(cfg.val_split) if cfg.val_split else (np.zeros(0, dtype=np.int64), 0)
    labels = manifest["label"].to_numpy()
    too_large = sorted(set(labels[np.concatenate([train_rows, val_rows])]) - set(range(len(classnames))))
    if too_large:
        raise ClipreelError(
            f"{cfg.store}: labels {too_large[:10]} have no class name: the label map has {len(classnames)} "
            "classes (labels 0..K-1). Give the full label map with --classes."
        )
    return _Data(store, classnames, train_rows, labels[train_rows], val_rows, labels[val_rows], skipped)


# --------------------------------------------------------------------------- the training loop


def _train(
    cfg: TrainConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    progress: bool,
    on_epoch_end: Callable[[dict], None] | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainSummary:
    """The training loop of one process (rank `rank` of `world_size`)."""
    started = time.perf_counter()
    recipe = _resolved_recipe(cfg)
    data = _training_data(cfg)
    store, spec = data.store, head_spec(cfg.kind)
    text_model = load_text_model(store.provenance, cfg.pretrained) if cfg.kind in TEXT_KINDS else None
    torch.manual_seed(cfg.seed)
    head, head_config = build_head(
        cfg.kind, store_layout=store.layout, provenance=store.provenance, classnames=data.classnames,
        options=cfg.options, text_model=text_model,
    )
    run_dir = Path(cfg.out)
    checkpoint = _checkpoint_to_resume(run_dir, cfg, recipe, store.provenance, data.classnames, head_config)
    finished = checkpoint["epoch"] if checkpoint else 0
    history = list(checkpoint["history"]) if checkpoint else []
    if checkpoint:
        head.load_state_dict(checkpoint["head"])

    model = wrap_model(head) if wrap_model is not None else head.to(device)
    parameters = trainable_parameters(head)
    if cfg.batch_size % world_size:
        raise ClipreelError(f"--batch-size {cfg.batch_size} must be a multiple of --workers {world_size}")
    train_loader = CacheLoader(
        store, data.train_rows, data.train_labels, spec.fields, spec.layers, cfg.batch_size // world_size,
        shuffle=True, seed=cfg.seed, views="random", prefetch=cfg.prefetch, rank=rank, world_size=world_size,
    )
    val_loader = None
    if len(data.val_rows) and rank == 0:
        val_loader = CacheLoader(
            store, data.val_rows, data.val_labels, spec.fields, spec.layers, cfg.batch_size,
            shuffle=False, seed=cfg.seed, views="all", prefetch=cfg.prefetch,
        )
    optimizer = scheduler = None
    if parameters:
        steps_per_epoch = math.ceil(len(train_loader) / cfg.accumulate)
        optimizer, scheduler = _optimizer_and_schedule(head, recipe, steps_per_epoch, cfg.epochs, checkpoint)
    elif val_loader is not None:
        # Nothing to train (zero-shot): one evaluation is the whole run.
        val_top1, val_loss = _evaluate(cfg.kind, head, val_loader, device)
        history.append(log_row(0, 0.0, None, None, val_top1, val_loss, time.perf_counter() - started))

    autocast = mixed_precision(device)
    epochs_to_run = range(finished, cfg.epochs) if parameters else range(0)
    with progress_bar("train", len(epochs_to_run) * len(train_loader), progress and rank == 0) as advance:
        for epoch in epochs_to_run:
            epoch_started = time.perf_counter()
            torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
            model.train()
            train_loss, train_acc = _train_epoch(
                cfg, model, train_loader, epoch, optimizer, scheduler, device, autocast, advance
            )
            val_top1 = val_loss = None
            if val_loader is not None:
                val_top1, val_loss = _evaluate(cfg.kind, head, val_loader, device)
            row = log_row(epoch + 1, optimizer.param_groups[0]["lr"], train_loss, train_acc, val_top1, val_loss,
                           time.perf_counter() - epoch_started)
            history.append(row)
            if rank == 0:
                _save_checkpoint(run_dir, cfg, recipe, store.provenance, data, head, head_config, optimizer,
                                 scheduler, epoch + 1, history)
                write_log(run_dir / LOG_FILE, history)
                if on_epoch_end is not None:
                    on_epoch_end(row)

    summary = TrainSummary(
        run_dir=str(run_dir), kind=cfg.kind, epochs=len([row for row in history if row["epoch"] > 0]),
        resumed_from_epoch=finished, train_videos=len(data.train_rows), val_videos=len(data.val_rows),
        skipped_videos=data.skipped, seconds=time.perf_counter() - started, history=history, head=head,
        **final_metrics(history),
    )
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_log(run_dir / LOG_FILE, history)
        plot_curves(run_dir / CURVES_FILE, history)
        metrics = {name: getattr(summary, name) for name in METRIC_NAMES}
        save_run(
            run_dir, kind=cfg.kind, head=head, head_config=head_config, classnames=data.classnames,
            provenance=store.provenance, store_path=cfg.store,
            train_config={**asdict(cfg), "resolved": _recipe_dict(recipe), "workers": world_size},
            metrics=metrics,
        )
    return summary


def _train_epoch(cfg, model, loader, epoch, optimizer, scheduler, device, autocast, advance):
    """One pass over this rank's share of the training videos -> (mean loss, accuracy).

    advance(text) moves the progress bar one batch."""
    total_loss = correct = seen = 0.0
    batches = len(loader)
    optimizer.zero_grad(set_to_none=True)
    for index, batch in enumerate(loader.epoch(epoch)):
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        labels = batch["labels"]
        with autocast:
            logits = head_logits(cfg.kind, model, batch)  # (B, C)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        backward_and_step(loss, index, batches, cfg.accumulate, optimizer, scheduler)
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
        advance(f"epoch {epoch + 1}/{cfg.epochs} loss {total_loss / seen:.3f}")
    return total_loss / seen, correct / seen


def backward_and_step(loss: torch.Tensor, index: int, batches: int, accumulate: int, optimizer, scheduler) -> None:
    """Backpropagate micro-batch `index` of an epoch's `batches`; after every `accumulate` of them (and
    after the last), one optimizer and scheduler step. The micro-batches of a step weigh equally (the
    epoch's last group may be shorter)."""
    group_start = index - index % accumulate
    group_size = min(accumulate, batches - group_start)
    (loss / group_size).backward()
    if index + 1 == group_start + group_size:
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _evaluate(kind: str, head: nn.Module, loader: CacheLoader, device: torch.device) -> tuple[float, float]:
    """Top-1 accuracy and loss on every view of every video, scoring each video by the mean of
    its views' softmax (as the reference methods test)."""
    was_training = head.training
    head.eval()
    correct = seen = 0
    total_loss = 0.0
    for batch in loader.epoch(0):
        with mixed_precision(device):
            probabilities = view_averaged_probabilities(kind, head, batch, device)  # (B, C)
        labels = batch["labels"].to(device)
        correct += (probabilities.argmax(dim=1) == labels).sum().item()
        picked = probabilities.gather(1, labels[:, None]).squeeze(1)
        total_loss += -picked.clamp_min(1e-12).log().sum().item()
        seen += len(labels)
    head.train(was_training)
    return correct / seen, total_loss / seen


# --------------------------------------------------------------------------- optimisation


def _resolved_recipe(cfg: TrainConfig) -> KindRecipe:
    """The kind's recipe with the user's choices applied (and the config checked)."""
    if cfg.kind not in RECIPES:
        head_spec(cfg.kind)  # raises the "unknown head kind" error
    default = RECIPES[cfg.kind]
    checks = {
        "epochs": cfg.epochs >= 1,
        "batch_size": cfg.batch_size >= 1,
        "accumulate": cfg.accumulate >= 1,
        "workers": cfg.workers >= 1,
        "label_smoothing": 0.0 <= cfg.label_smoothing < 1.0,
        "lr": cfg.lr is None or cfg.lr > 0,
        "weight_decay": cfg.weight_decay is None or cfg.weight_decay >= 0,
        "warmup_epochs": cfg.warmup_epochs is None or cfg.warmup_epochs >= 0,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        values = ", ".join(f"{name}={getattr(cfg, name)!r}" for name in bad)
        raise ClipreelError(
            f"train settings out of range: {values} (epochs, batch size, accumulate, workers >= 1; "
            "0 <= label smoothing < 1; lr > 0; weight decay and warmup >= 0)"
        )
    return KindRecipe(
        lr=cfg.lr if cfg.lr is not None else default.lr,
        weight_decay=cfg.weight_decay if cfg.weight_decay is not None else default.weight_decay,
        warmup_epochs=cfg.warmup_epochs if cfg.warmup_epochs is not None else default.warmup_epochs,
        betas=default.betas,
        decay_everything=default.decay_everything,
    )


def _recipe_dict(recipe: KindRecipe) -> dict:
    return {**asdict(recipe), "betas": list(recipe.betas)}


def _optimizer_and_schedule(head: nn.Module, recipe: KindRecipe, steps_per_epoch: int, epochs: int,
                            checkpoint: dict | None):
    """AdamW and its per-step warmup + cosine schedule, restored from `checkpoint` when resuming.

    The schedule is planned for `epochs`: when a finished run is asked for more epochs, the
    restored step continues on the longer cosine.
    """
    return adamw_with_schedule(_parameter_groups(head, recipe), recipe.lr, recipe.betas,
                               recipe.warmup_epochs * steps_per_epoch, epochs * steps_per_epoch, checkpoint)


def adamw_with_schedule(groups: list[dict], lr: float, betas: tuple[float, float], warmup_steps: int,
                        total_steps: int, checkpoint: dict | None):
    """AdamW over `groups` and a per-step linear warmup + cosine schedule, restored from
    `checkpoint` (its "optimizer" and "scheduler" states) when resuming."""
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)
    schedule = warmup_cosine(warmup_steps, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)
    return optimizer, scheduler


def _parameter_groups(head: nn.Module, recipe: KindRecipe) -> list[dict]:
    """AdamW groups: decayed and (X-CLIP style) not-decayed parameters."""
    decayed, not_decayed = [], []
    for name, parameter in head.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = exempt_from_weight_decay(name, parameter)
        (not_decayed if exempt and not recipe.decay_everything else decayed).append(parameter)
    groups = [{"params": decayed, "weight_decay": recipe.weight_decay}]
    if not_decayed:
        groups.append({"params": not_decayed, "weight_decay": 0.0})
    return groups


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of optimizer step `step`: linear warmup to 1, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one epoch on one rank (dropout masks etc.)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def mixed_precision(device: torch.device):
    """bf16 autocast on GPU (fp16 where bf16 is missing); plain fp32 elsewhere (bf16 is slow on CPU)."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)




# --------------------------------------------------------------------------- resume


# Settings that must not change when a run directory is resumed (epochs, device, workers,
# validation split and prefetch may).
_RECIPE_KEYS = ("split", "batch_size", "accumulate", "label_smoothing", "seed")


def _checkpoint_to_resume(run_dir: Path, cfg, recipe, provenance, classnames, head_config) -> dict | None:
    """The checkpoint of an earlier run of the same command in `run_dir`, or None for a new run.

    Refuses a run directory that is not one, or that was made with other settings.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ClipreelError(f"--out {run_dir} is a file, not a run directory: choose a new --out.")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file() and cfg.kind == "zeroshot" and (run_dir / CONFIG_FILE).is_file():
        return None  # nothing was trained, so there is nothing to resume: the run is made again
    if not path.is_file():
        raise ClipreelError(
            f"{run_dir} exists and holds no {CHECKPOINT_FILE} of an earlier `clipreel train`: choose a new --out "
            "(or delete the folder)."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    differences = []
    if checkpoint["kind"] != cfg.kind:
        differences.append(f"head kind: the run is {checkpoint['kind']!r}, this command asks for {cfg.kind!r}")
    differences += provenance_diff(checkpoint["provenance"], provenance)
    if checkpoint["classnames"] != list(classnames):
        differences.append("class names differ (label map or manifest labels)")
    if checkpoint["head_config"] != head_config:
        differences.append(f"head options: the run has {checkpoint['head_config']}, this command {head_config}")
    for key in _RECIPE_KEYS:
        if checkpoint["config"][key] != getattr(cfg, key):
            differences.append(f"{key}: the run has {checkpoint['config'][key]!r}, this command {getattr(cfg, key)!r}")
    if checkpoint["recipe"] != _recipe_dict(recipe):
        differences.append(f"optimiser recipe: the run has {checkpoint['recipe']}, this command {_recipe_dict(recipe)}")
    if differences:
        raise ClipreelError(
            f"{run_dir} was trained with other settings, so it cannot be resumed:\n  - "
            + "\n  - ".join(differences)
            + "\nUse the same settings to continue it, or choose a new --out."
        )
    if checkpoint["epoch"] > cfg.epochs:
        raise ClipreelError(
            f"{run_dir} has already trained {checkpoint['epoch']} epochs, more than the {cfg.epochs} asked for: "
            "ask for at least that many epochs, or choose a new --out."
        )
    return checkpoint


def _save_checkpoint(run_dir, cfg, recipe, provenance, data, head, head_config, optimizer, scheduler, epoch,
                     history) -> None:
    """Write checkpoint.pt atomically (a crash while saving keeps the previous one)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch,
        "kind": cfg.kind,
        "config": asdict(cfg),
        "recipe": _recipe_dict(recipe),
        "provenance": provenance,
        "classnames": data.classnames,
        "head_config": head_config,
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
    }
    save_checkpoint_atomically(run_dir, state)


def save_checkpoint_atomically(run_dir: Path, state: dict) -> None:
    """torch.save `state` as run_dir/checkpoint.pt through a temporary file: a crash while saving
    keeps the previous checkpoint."""
    handle, temporary = tempfile.mkstemp(dir=run_dir, prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(state, temporary)
        os.replace(temporary, run_dir / CHECKPOINT_FILE)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


# --------------------------------------------------------------------------- logs and plots


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




# --------------------------------------------------------------------------- Ray Train


def _train_with_ray(cfg: TrainConfig) -> TrainSummary:
    """Run `_train` in `cfg.workers` Ray Train workers (DDP); rank 0 writes the run directory."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _resolved_recipe(cfg)  # fail fast on bad settings, before any worker starts
    started = time.perf_counter()
    started_ray = ensure_ray(cfg.address)
    ray_storage = tempfile.mkdtemp(prefix="clipreel-ray-train-")  # Ray's own bookkeeping; we keep no Ray checkpoints
    try:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        trainer = TorchTrainer(
            _ray_worker,
            # The workers may run on other nodes: hand them the store's storage options and variables.
            train_loop_config={"cfg": asdict(cfg), "store_access": StoreAccess.of(store_location(cfg.store))},
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
            run_config=RunConfig(name="clipreel-train", storage_path=ray_storage),
        )
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as error:
            raise _worker_error(error) from None
    finally:
        shutil.rmtree(ray_storage, ignore_errors=True)
        if started_ray:
            ray.shutdown()
    return _summary_from_run_dir(cfg, time.perf_counter() - started)


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: the training loop on its rank, the model wrapped in DDP."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    config["store_access"].apply()
    _train(
        TrainConfig(**config["cfg"]), rank=context.get_world_rank(), world_size=context.get_world_size(),
        device=ray.train.torch.get_device(), progress=False, wrap_model=ray.train.torch.prepare_model,
    )


def _worker_error(error: Exception) -> Exception:
    """A ClipreelError raised in a worker (a user-fixable problem), else Ray's own error."""
    for failure in getattr(error, "worker_failures", {}).values():
        if isinstance(failure, ClipreelError):
            return failure
        cause = failure.__cause__
        if isinstance(cause, ClipreelError):
            return cause
    return error


def _summary_from_run_dir(cfg: TrainConfig, seconds: float) -> TrainSummary:
    """The summary of a run the workers wrote (rank 0's metrics.json and log.csv)."""
    import json

    run_dir = Path(cfg.out)
    metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    history = pd.read_csv(run_dir / LOG_FILE).astype(object)
    history = history.where(history.notna(), None).to_dict("records")
    fields = {name: metrics[name] for name in METRIC_NAMES if name != "seconds"}
    return TrainSummary(run_dir=str(run_dir), kind=cfg.kind, seconds=seconds, history=history, **fields)
