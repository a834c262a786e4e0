"""Train a cache head from the feature store: `clipreel train HEAD --store STORE --out RUN_DIR`.

The backbone never runs: batches of cached features stream out of the store (CacheLoader), one
random cached view per video per epoch, into a small head (`clipreel.heads.registry`). The recipe
follows the reference methods (the head's registry entry): AdamW, linear warmup then cosine decay
per optimizer step, optional label smoothing and gradient accumulation, bf16 autocast on GPU and
plain fp32 on CPU. The training kit (`pipeline.training`) holds the pieces this file puts together.

Resuming: after every epoch the run directory gets `checkpoint.pt`; re-running the same command
continues from the last finished epoch, and the result equals an uninterrupted run (everything
random is a function of (seed, epoch, rank)). What may change on resume, and what must not, is the
kit's one resume rule (`pipeline.training.checkpoint`).

Outputs (rank 0 only): log.csv, curves.png, checkpoint.pt and, at the end, the run itself
(weights.safetensors, config.json, metrics.json: see stores/runs.py).

Several workers (`workers > 1`): Ray Train runs this same loop in each worker; each reads its shard
of the shuffled rows and gradients are all-reduced through DDP (`pipeline.training.ray_train`).

May import: torch, numpy, clipreel.errors, clipreel.devices, clipreel.heads, clipreel.stores,
clipreel.pipeline (training, data, scoring, models, progress).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipreel.devices import resolve_device
from clipreel.config import DEFAULT_VAL_SPLIT
from clipreel.errors import ClipreelError
from clipreel.heads.layers import classification_loss, one_parameter_group
from clipreel.heads.registry import create_head, head_entry
from clipreel.pipeline.data.cache_loader import CacheLoader
from clipreel.pipeline.models import start_weights, text_model_for
from clipreel.pipeline.progress import progress_bar
from clipreel.pipeline.scoring import predict_store, top1_and_loss
from clipreel.pipeline.training.checkpoint import checkpoint_to_resume, restore_model, run_identity, save_checkpoint
from clipreel.pipeline.training.logs import (
    CURVES_FILE,
    LOG_FILE,
    final_metrics,
    log_row,
    plot_curves,
    read_log,
    write_log,
)
from clipreel.pipeline.training.loop import progress_text, train_epoch
from clipreel.pipeline.training.optim import (
    adamw_with_schedule,
    check_settings,
    optimizer_groups,
    recipe_dict,
    resolved_recipe,
)
from clipreel.pipeline.training.ray_train import train_with_ray, worker_context
from clipreel.stores.audit import require_done_videos
from clipreel.stores.features import FeatureStore
from clipreel.stores.location import StoreAccess, is_remote, store_location
from clipreel.stores.manifest import classnames_from_manifest, read_label_map
from clipreel.stores.runs import METRICS_FILE, load_weights, save_run

# The TrainSummary fields that metrics.json keeps.
METRIC_NAMES = ("epochs", "resumed_from_epoch", "train_videos", "val_videos", "skipped_videos", "train_loss",
                "train_acc", "val_top1", "best_val_top1", "seconds")


@dataclass
class TrainConfig:
    """Everything `clipreel train` needs. None means "the head's default" (its registry recipe)."""

    kind: str  # the cache head (`clipreel.heads.registry.list_heads()`)
    store: str  # the feature store to train from (NAME.zarr, written by `clipreel extract`)
    out: str  # the run directory to write; re-running the same command resumes it
    split: str = "train"  # manifest split to train on
    # manifest split to validate on after every epoch; a store without the default split trains without validation
    val_split: str | None = DEFAULT_VAL_SPLIT
    epochs: int = 10  # passes over the training videos
    lr: float | None = None  # peak learning rate
    weight_decay: float | None = None  # AdamW decay
    batch_size: int = 16  # videos per optimizer micro-step, over all workers together
    accumulate: int = 1  # micro-steps whose gradients are summed before each optimizer step
    warmup_epochs: int | None = None  # epochs of linear warmup before the cosine decay
    label_smoothing: float = 0.0  # cross-entropy label smoothing (X-CLIP and ViFi-CLIP use 0.1)
    seed: int = 0  # seeds the head's initialisation, the batch order, the views and dropout
    options: dict = field(default_factory=dict)  # head hyper-parameters, e.g. {"n_ctx": 4} or {"mlp_dropout": 0.1}
    store_checkpoint: str | None = None  # the local checkpoint file a store was extracted from (text heads)
    trust_checkpoint_code: bool = False  # let a store checkpoint that is a TorchScript archive (not OpenAI's) run its code
    classes: str | None = None  # label map (one class name per line); default: the manifest's label names
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N (one process)
    workers: int = 1  # data-parallel workers; > 1 trains through Ray Train
    address: str | None = None  # Ray cluster to join when workers > 1 (default: a local Ray)
    prefetch: int = 2  # batches read ahead of the training step
    start: str | None = None  # a run of the same head (trained or imported) whose weights the training starts from


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
    recipe = checked_recipe(cfg)  # bad settings fail here, before any worker starts
    if cfg.workers > 1 and head_entry(cfg.kind).trains:
        started = time.perf_counter()
        # The workers may run on other nodes: they get the store's storage options and variables.
        train_with_ray(_ray_worker, {"cfg": asdict(_with_absolute_paths(cfg)),
                                     "store_access": StoreAccess.of(store_location(cfg.store))},
                       cfg.workers, cfg.address)
        return _summary_from_run_dir(cfg, time.perf_counter() - started)
    return _train(cfg, recipe, rank=0, world_size=1, device=resolve_device(cfg.device), progress=progress,
                  on_epoch_end=on_epoch_end)


def _with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its local paths made absolute: Ray Train starts every worker in a folder of its
    own (its trial directory, ray.train's RAY_CHDIR_TO_TRIAL_DIR), where a relative path names
    nothing. URLs are left as they are."""

    def absolute(path: str | os.PathLike | None) -> str | None:
        if path is None or is_remote(store_location(path)):
            return path
        return os.path.abspath(store_location(path).expanduser())

    return replace(cfg, store=absolute(cfg.store), out=absolute(cfg.out), classes=absolute(cfg.classes),
                   store_checkpoint=absolute(cfg.store_checkpoint), start=absolute(cfg.start))


def checked_recipe(cfg: TrainConfig):
    """The head's recipe with the user's choices put in, after checking every setting's range."""
    entry = head_entry(cfg.kind)
    checks = {
        "epochs": cfg.epochs >= 1,
        "batch_size": cfg.batch_size >= 1,
        "accumulate": cfg.accumulate >= 1,
        "workers": cfg.workers >= 1,
        "label_smoothing": 0.0 <= cfg.label_smoothing < 1.0,
        "lr": cfg.lr is None or cfg.lr > 0,
        "weight_decay": cfg.weight_decay is None or cfg.weight_decay >= 0,
        "warmup_epochs": cfg.warmup_epochs is None or 0 <= cfg.warmup_epochs <= cfg.epochs,
    }
    check_settings("train", checks, asdict(cfg), "epochs, batch size, accumulate, workers >= 1; "
                   "0 <= label smoothing < 1; lr > 0; weight decay >= 0; 0 <= warmup epochs <= epochs")
    return resolved_recipe(entry.recipe, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs)


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
    require_done_videos(store)
    manifest = store.manifest()
    classnames = read_label_map(cfg.classes) if cfg.classes else classnames_from_manifest(manifest, cfg.store)
    done = store.done_mask()
    labelled = manifest["label"].to_numpy() >= 0

    def split_rows(split: str | None) -> tuple[np.ndarray, int]:
        in_split = (manifest["split"] == split).to_numpy() & labelled
        return np.flatnonzero(in_split & done), int((in_split & ~done).sum())

    splits = sorted(manifest.loc[labelled & done, "split"].unique())
    train_rows, skipped = split_rows(cfg.split)
    if len(train_rows) == 0:
        raise ClipreelError(
            f"{cfg.store}: no labelled, extracted video in split {cfg.split!r} "
            f"({skipped} not extracted: failed or pending). Splits with labelled, extracted videos: "
            f"{splits or 'none'}. Choose one with --split, or extract the videos first."
        )
    val_rows, val_not_extracted = split_rows(cfg.val_split) if cfg.val_split else (np.zeros(0, dtype=np.int64), 0)
    if len(val_rows) == 0 and cfg.val_split not in (None, DEFAULT_VAL_SPLIT):
        raise ClipreelError(
            f"{cfg.store}: no labelled, extracted video in the validation split {cfg.val_split!r} "
            f"({val_not_extracted} not extracted: failed or pending). Splits with labelled, extracted videos: "
            f"{splits or 'none'}. Choose one with --val-split, or validate on none (--val-split '')."
        )
    labels = manifest["label"].to_numpy()
    too_large = sorted(set(labels[np.concatenate([train_rows, val_rows])]) - set(range(len(classnames))))
    if too_large:
        raise ClipreelError(
            f"{cfg.store}: labels {too_large[:10]} have no class name: the label map has {len(classnames)} "
            "classes (labels 0..K-1). Give the full label map with --classes."
        )
    return _Data(store, classnames, train_rows, labels[train_rows], val_rows, labels[val_rows], skipped)


# --------------------------------------------------------------------------- the recipe


def _train(cfg: TrainConfig, recipe, *, rank: int, world_size: int, device: torch.device, progress: bool,
           on_epoch_end: Callable[[dict], None] | None = None,
           wrap_model: Callable[[nn.Module], nn.Module] | None = None) -> TrainSummary:
    """The training of one process (rank `rank` of `world_size`), top to bottom."""
    started = time.perf_counter()
    entry = head_entry(cfg.kind)

    # 1. The data and the head, built from the store (and its text tower, for text heads).
    data = _training_data(cfg)
    store = data.store
    text_model = text_model_for(cfg.kind, store.provenance, cfg.store_checkpoint, cfg.trust_checkpoint_code)
    torch.manual_seed(cfg.seed)
    head, head_config = create_head(cfg.kind, store_layout=store.layout, provenance=store.provenance,
                                    classnames=data.classnames, options=cfg.options, text_model=text_model)
    if cfg.start is not None:
        load_weights(head, start_weights(cfg.start, cfg.kind, head_config, data.classnames, store.provenance),
                     f"--start {cfg.start}", "Start from a run of this head with the same config.")

    # 2. Resume the run directory if it holds an earlier run of the same command.
    run_dir = Path(cfg.out)
    identity = run_identity(asdict(cfg), recipe_dict(recipe), classnames=data.classnames, head_config=head_config,
                            store_provenance=store.provenance)
    checkpoint = checkpoint_to_resume(run_dir, identity, cfg.epochs, "train", trains=entry.trains)
    finished = checkpoint["epoch"] if checkpoint else 0
    history = list(checkpoint["history"]) if checkpoint else []
    if checkpoint:
        restore_model(head, checkpoint, run_dir)
    model = wrap_model(head) if wrap_model is not None else head.to(device)

    # 3. The loaders: this rank's share of the training videos (one random view each), all views to validate.
    if cfg.batch_size % world_size:
        raise ClipreelError(f"--batch-size {cfg.batch_size} must be a multiple of --workers {world_size}")
    train_loader = CacheLoader(
        store, data.train_rows, data.train_labels, entry.reads, entry.blocks, cfg.batch_size // world_size,
        shuffle=True, seed=cfg.seed, views="random", prefetch=cfg.prefetch, rank=rank, world_size=world_size,
    )
    val_loader = None
    if len(data.val_rows) and rank == 0:
        val_loader = CacheLoader(
            store, data.val_rows, data.val_labels, entry.reads, entry.blocks, cfg.batch_size,
            shuffle=False, seed=cfg.seed, views="all", prefetch=cfg.prefetch,
        )

    def validate() -> tuple[float | None, float | None]:
        if val_loader is None:
            return None, None
        return top1_and_loss(*predict_store(cfg.kind, head, val_loader.epoch(0), device))

    # A head with nothing to train (zero-shot): one validation is the whole run.
    if not entry.trains:
        history = [log_row(0, 0.0, None, None, *validate(), time.perf_counter() - started)] if val_loader else []
        return _finish(cfg, recipe, data, head, head_config, history, finished, started, rank, world_size)

    # 4. The optimiser: the recipe's AdamW and warmup-cosine schedule, per optimizer step.
    groups = optimizer_groups(head, one_parameter_group(head, recipe.lr, recipe.weight_decay), recipe.decay_everything)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accumulate)
    optimizer, scheduler = adamw_with_schedule(groups, recipe, steps_per_epoch, cfg.epochs, checkpoint)

    def step(batch: dict, index: int):
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}  # 8-bit: codes
        logits = model(batch)  # (B, K)
        return classification_loss(logits, batch["labels"], cfg.label_smoothing), logits, batch["labels"]

    # 5. The epochs: train, validate, checkpoint, log.
    epochs_to_run = range(finished, cfg.epochs)
    with progress_bar("train", len(epochs_to_run) * len(train_loader), progress and rank == 0) as advance:
        for epoch in epochs_to_run:
            epoch_started = time.perf_counter()
            train_loss, train_acc = train_epoch(
                model, train_loader.epoch(epoch), len(train_loader), step, seed=cfg.seed, epoch=epoch, rank=rank,
                accumulate=cfg.accumulate, optimizer=optimizer, scheduler=scheduler, device=device,
                on_batch=lambda loss: advance(progress_text(epoch, cfg.epochs, loss)),
            )
            history.append(log_row(epoch + 1, optimizer.param_groups[0]["lr"], train_loss, train_acc, *validate(),
                                   time.perf_counter() - epoch_started))
            if rank == 0:
                save_checkpoint(run_dir, identity, head, optimizer, scheduler, epoch + 1, history)
                write_log(run_dir / LOG_FILE, history)
                if on_epoch_end is not None:
                    on_epoch_end(history[-1])
    return _finish(cfg, recipe, data, head, head_config, history, finished, started, rank, world_size)


def _finish(cfg, recipe, data: _Data, head, head_config, history, finished, started, rank, world_size) -> TrainSummary:
    """The summary; on rank 0 the run directory: log, curves, weights, config, metrics."""
    run_dir = Path(cfg.out)
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
        save_run(
            run_dir, kind=cfg.kind, head=head, head_config=head_config, classnames=data.classnames,
            provenance=data.store.provenance, store_path=cfg.store,
            train_config={**asdict(cfg), "resolved": recipe_dict(recipe), "workers": world_size},
            metrics={name: getattr(summary, name) for name in METRIC_NAMES},
        )
    return summary


# --------------------------------------------------------------------------- Ray Train


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: the training on its rank, the head wrapped in DDP."""
    cfg = TrainConfig(**config["cfg"])
    context = worker_context()
    config["store_access"].apply()  # the store's storage options, on whichever node this worker runs
    _train(cfg, checked_recipe(cfg), rank=context.rank, world_size=context.world_size, device=context.device,
           progress=False, wrap_model=context.prepare_model)


def _summary_from_run_dir(cfg: TrainConfig, seconds: float) -> TrainSummary:
    """The summary of a run the workers wrote (rank 0's metrics.json and log.csv)."""
    run_dir = Path(cfg.out)
    metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    fields = {name: metrics[name] for name in METRIC_NAMES if name != "seconds"}
    return TrainSummary(run_dir=str(run_dir), kind=cfg.kind, seconds=seconds, history=read_log(run_dir / LOG_FILE),
                        **fields)
