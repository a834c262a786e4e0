"""Fine-tune CLIP on raw frames: `clipreel finetune METHOD --videos LIST --out RUN_DIR`.

The methods (`clipreel.heads.registry.list_methods()`: vifi, prompt, xclip, ezclip) update or
prompt the backbone itself, so they cannot train from the feature cache: every step decodes, samples
and augments clips (`clipreel.pipeline.data.raw_frames`, through a loader of
`clipreel.pipeline.data.frame_loaders`) and runs the whole CLIP.

The recipe is the cache trainer's, from the same kit (`pipeline.training`): AdamW with linear warmup
then cosine decay per step, everything random a function of (seed, epoch), a checkpoint after every
epoch that a re-run of the same command resumes (the kit's one resume rule), log.csv and
curves.png, and a run directory (`stores.runs.save_run`, kind ``finetune-METHOD``) that
`clipreel eval --videos` scores with multi-view testing.

A video that cannot be decoded stops the run, naming its manifest row (``on_bad_video`` "stop",
the default); with "skip" it is left out of its batch (the other videos keep theirs, so a seed
still gives the same batches), validation goes on without it, and the run directory lists it in
skipped.csv (video_id, path, split, error), with the list's missing files. A run stopped by a bad
video resumes with "skip".

The loss is the method's own (`model.loss`): cross-entropy on the class logits with label
smoothing 0.1 for the classifier methods, EZ-CLIP's in-batch KL contrastive loss plus its motion
loss. With ``mixup`` on, the clips are blended and the targets soft (`augment.mix_batch`, X-CLIP's
CutmixMixupBlending). Mixup is off by default: on the tiny synthetic world (a few videos per class)
blended clips slowed learning; the reference recipes turn it on for real datasets.

Learning rates: None picks the method's reference recipe (its registry entry). Those are tuned for
ViT-B/16, batches of 64-256 and many steps; the tiny synthetic CLIP with batches of 8 and a few
hundred steps learns at vifi 1e-4, prompt 8e-3, xclip 1e-4 with its new modules at 100x (option
new_module_lr_scale), ezclip 3e-3 (tests/pipeline/test_finetune_learning.py).

May import: torch, pandas, clipreel.errors, clipreel.devices, clipreel.heads, clipreel.stores,
clipreel.pipeline (training, data, scoring, models, progress).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from clipreel.config import DECODE_WORKERS, DEFAULT_MODEL, DEFAULT_VAL_SPLIT
from clipreel.devices import resolve_device
from clipreel.errors import ClipreelError
from clipreel.heads.clip import resolve_model_name, user_model_config
from clipreel.heads.layers import image_size_of, trainable_parameter_count
from clipreel.heads.registry import method_entry
from clipreel.pipeline.data.augment import mix_batch, stable_generator
from clipreel.pipeline.data.frame_loaders import frame_loader, resolve_loading
from clipreel.pipeline.data.raw_frames import RawFrameDataset, augment_config, check_on_bad_video, labelled_rows
from clipreel.pipeline.data.sampling import SamplingConfig
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.models import RUN_KIND_PREFIX, new_method_model
from clipreel.pipeline.progress import progress_bar
from clipreel.pipeline.scoring import predict_raw, top1_and_loss
from clipreel.pipeline.training.checkpoint import checkpoint_to_resume, restore_model, run_identity, save_checkpoint
from clipreel.pipeline.training.logs import CURVES_FILE, LOG_FILE, final_metrics, log_row, plot_curves, write_log
from clipreel.pipeline.training.loop import progress_text, train_epoch
from clipreel.pipeline.training.optim import (
    adamw_with_schedule,
    check_settings,
    optimizer_groups,
    recipe_dict,
    resolved_recipe,
)
from clipreel.stores.manifest import classnames_from_manifest
from clipreel.stores.runs import SKIPPED_FILE, read_skipped, save_run, write_skipped

METRIC_NAMES = ("epochs", "resumed_from_epoch", "trainable_parameters", "train_videos", "val_videos",
                "skipped_videos", "train_loss", "train_acc", "val_top1", "best_val_top1", "seconds")


@dataclass
class FinetuneConfig:
    """Everything `clipreel finetune` needs. None means "the method's default" (its registry recipe)."""

    method: str  # the raw-frame method (`clipreel.heads.registry.list_methods()`)
    videos: str  # the video list (anything read_sources reads: CSV, "path label" list, class folders)
    out: str  # the run directory; re-running the same command resumes it
    model: str = DEFAULT_MODEL  # open_clip model name or config file (NAME.json)
    pretrained: str = "default"  # open_clip tag, local checkpoint file, "none", "default", or a vifi run directory
    trust_checkpoint_code: bool = False  # let a --pretrained TorchScript file that is not OpenAI's run its code
    split: str = "train"
    # validated after every epoch; a list without the default split trains without validation
    val_split: str | None = DEFAULT_VAL_SPLIT
    epochs: int = 10
    lr: float | None = None  # peak learning rate (xclip: of the CLIP weights; its new modules get more)
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    label_smoothing: float = 0.1
    mixup: bool = False  # mixup / cutmix with soft targets (methods whose loss takes them)
    batch_size: int = 8
    accumulate: int = 1  # micro-batches whose gradients are summed before each optimizer step
    frames: int = 8  # T frames per clip
    workers: int = DECODE_WORKERS  # decode processes, or concurrent Ray tasks with loader "ray" (0: this process)
    decoder: str = "auto"  # pyav, dali, or auto (DALI when training on a GPU, else PyAV)
    loader: str = "auto"  # workers, ray (Ray Data streaming) or device (decode on the model's device); auto:
    # device for DALI on a GPU, else workers (frame_loaders.resolve_loading)
    address: str | None = None  # the Ray cluster of loader "ray" (None: a local Ray)
    seed: int = 0
    options: dict = field(default_factory=dict)  # method options, e.g. {"variant": "image"} for vifi
    device: str = "auto"
    norm: str | None = None  # "imagenet" or "clip"; None: the method's
    # AugmentConfig settings of the training clips, e.g. {"flip": 0} where left and right make the class
    # (SSv2, "moving left"), {"color_jitter": 0, "grayscale": 0} where colour does
    augment: dict = field(default_factory=dict)
    on_bad_video: str = "stop"  # a video that cannot be decoded: "stop" the run, or "skip" it (skipped.csv)


@dataclass
class FinetuneSummary:
    """What a fine-tuning run did."""

    run_dir: str
    method: str
    trainable_parameters: int
    epochs: int
    resumed_from_epoch: int
    train_videos: int
    val_videos: int
    skipped_videos: int  # videos of the training and validation splits left out as unreadable (skipped.csv)
    train_loss: float | None
    train_acc: float | None
    val_top1: float | None
    best_val_top1: float | None
    seconds: float
    history: list[dict]
    model: nn.Module | None = None


def checked_recipe(cfg: FinetuneConfig):
    """The method's recipe with the user's choices put in, after checking every setting (before any model loads)."""
    entry = method_entry(cfg.method)
    checks = {
        "epochs": cfg.epochs >= 1, "batch_size": cfg.batch_size >= 1, "accumulate": cfg.accumulate >= 1,
        "frames": cfg.frames >= 1, "label_smoothing": 0.0 <= cfg.label_smoothing < 1.0,
        "lr": cfg.lr is None or cfg.lr > 0, "weight_decay": cfg.weight_decay is None or cfg.weight_decay >= 0,
        "warmup_epochs": cfg.warmup_epochs is None or 0 <= cfg.warmup_epochs <= cfg.epochs,
    }
    check_settings("finetune", checks, asdict(cfg), "epochs, batch size, accumulate, frames >= 1; "
                   "0 <= label smoothing < 1; lr > 0; weight decay >= 0; 0 <= warmup epochs <= epochs")
    augment_config(224, "clip", cfg.augment)  # a bad augmentation setting fails before the model loads
    check_on_bad_video(cfg.on_bad_video)
    if cfg.mixup and not entry.soft_targets:
        raise ClipreelError(f"--mixup does not apply to {cfg.method} (its loss needs class ids): leave it off")
    return resolved_recipe(entry.recipe, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
                           norm=cfg.norm)


def run_finetune(cfg: FinetuneConfig, progress: bool = True) -> FinetuneSummary:
    """Fine-tune `cfg.method` on the raw videos of `cfg.videos` into `cfg.out` (resuming it if it exists)."""
    started = time.perf_counter()
    recipe = checked_recipe(cfg)
    device = resolve_device(cfg.device)

    # 1. The videos and the method's model around its CLIP.
    manifest = read_sources(cfg.videos, skip_missing=cfg.on_bad_video == "skip")
    classnames = classnames_from_manifest(manifest, cfg.videos)
    train_rows, val_rows = labelled_rows(manifest, cfg.split), labelled_rows(manifest, cfg.val_split)
    splits = sorted(manifest["split"].unique())
    if train_rows.empty:
        raise ClipreelError(f"{cfg.videos}: no labelled video in split {cfg.split!r}; its splits are {splits}. "
                            "Choose one with --split.")
    if val_rows.empty and cfg.val_split not in (None, DEFAULT_VAL_SPLIT):
        raise ClipreelError(f"{cfg.videos}: no labelled video in the validation split {cfg.val_split!r}; its splits "
                            f"are {splits}. Choose one with --val-split, or validate on none.")
    model, method_config, sha256 = new_method_model(cfg.method, cfg.model, cfg.pretrained, classnames, cfg.frames,
                                                    cfg.options, cfg.seed, device, cfg.trust_checkpoint_code)
    trainable = trainable_parameter_count(model)
    if progress:
        print(f"{cfg.method}: {trainable:,} trainable parameters")

    # 2. Resume the run directory if it holds an earlier run of the same command.
    run_dir = Path(cfg.out)
    identity = run_identity(asdict(cfg), recipe_dict(recipe), classnames=list(classnames),
                            method_config=method_config, checkpoint_sha256=sha256)
    checkpoint = checkpoint_to_resume(run_dir, identity, cfg.epochs, "finetune")
    finished = checkpoint["epoch"] if checkpoint else 0
    history = list(checkpoint["history"]) if checkpoint else []
    if checkpoint:
        restore_model(model, checkpoint, run_dir)
    # The videos left out as unreadable (video_id -> its skipped.csv row): missing files first.
    skipped = {record["video_id"]: record for record in (read_skipped(run_dir) if checkpoint else [])}
    missing = manifest[(manifest["status"] == "failed") & (manifest["label"] >= 0)
                       & manifest["split"].isin([cfg.split, cfg.val_split])]
    _note_skipped(skipped, manifest, dict(zip(missing.index, missing["error"])))

    # 3. The loaders: augmented training clips, every view of the validation clips.
    image_size = image_size_of(model)
    augment = augment_config(image_size, recipe.norm, cfg.augment)
    sampling = SamplingConfig(frames=cfg.frames)
    loading = resolve_loading(cfg.decoder, cfg.loader, device, cfg.workers, cfg.address)
    train_data = RawFrameDataset(train_rows, sampling, augment, train=True, seed=cfg.seed, decoder=loading.decoder,
                                 device=loading.device, on_bad_video=cfg.on_bad_video)
    train_loader = frame_loader(train_data, cfg.batch_size, loading, shuffle=True, seed=cfg.seed)
    val_loader = None
    if not val_rows.empty:
        val_data = RawFrameDataset(val_rows, sampling, augment, train=False, seed=cfg.seed, decoder=loading.decoder,
                                   device=loading.device, on_bad_video=cfg.on_bad_video)
        val_loader = frame_loader(val_data, cfg.batch_size, loading, shuffle=False, seed=cfg.seed)

    def validate() -> tuple[float | None, float | None]:
        if val_loader is None:
            return None, None
        probabilities, labels, _ = predict_raw(model, val_loader, device)
        _note_skipped(skipped, manifest, val_loader.skipped)
        return top1_and_loss(probabilities, labels) if len(labels) else (None, None)

    # 4. The optimiser: the method's parameter groups, the recipe's no-decay rule, AdamW and its schedule.
    groups = optimizer_groups(model, model.parameter_groups(recipe.lr, recipe.weight_decay), recipe.decay_everything)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accumulate)
    optimizer, scheduler = adamw_with_schedule(groups, recipe, steps_per_epoch, cfg.epochs, checkpoint)

    def step(batch: dict, index: int):
        if len(batch["label"]) == 0:  # every video of this batch was skipped
            return None
        clips = batch["frames"].to(device, non_blocking=True)  # (B, T, 3, S, S)
        labels = batch["label"].to(device)  # (B,)
        targets = labels
        if cfg.mixup:
            generator = stable_generator("mix", cfg.seed, train_data.epoch, index)
            clips, soft = mix_batch(clips, labels.cpu(), len(classnames), label_smoothing=cfg.label_smoothing,
                                    generator=generator)
            targets = soft.to(device)  # (B, K)
        outputs = model(clips)
        return model.loss(outputs, targets, cfg.label_smoothing), outputs["logits"], labels

    # 5. The epochs: train, validate, checkpoint, log.
    epochs_to_run = range(finished, cfg.epochs)
    with progress_bar(f"finetune {cfg.method}", len(epochs_to_run) * len(train_loader), progress) as advance:
        for epoch in epochs_to_run:
            epoch_started = time.perf_counter()
            train_data.set_epoch(epoch)
            train_loss, train_acc = train_epoch(
                model, train_loader, len(train_loader), step, seed=cfg.seed, epoch=epoch, rank=0,
                accumulate=cfg.accumulate, optimizer=optimizer, scheduler=scheduler, device=device,
                on_batch=lambda loss: advance(progress_text(epoch, cfg.epochs, loss)),
            )
            _note_skipped(skipped, manifest, train_loader.skipped)
            if train_loss is None:
                raise ClipreelError(f"{cfg.videos}: no training video of epoch {epoch + 1} could be decoded; their "
                                    f"errors are in {run_dir / SKIPPED_FILE}.")
            history.append(log_row(epoch + 1, optimizer.param_groups[0]["lr"], train_loss, train_acc, *validate(),
                                   time.perf_counter() - epoch_started))
            save_checkpoint(run_dir, identity, model, optimizer, scheduler, epoch + 1, history)
            write_log(run_dir / LOG_FILE, history)
            if skipped:
                write_skipped(run_dir, list(skipped.values()))

    # 6. The run directory: log, curves, weights, config, metrics.
    summary = FinetuneSummary(
        run_dir=str(run_dir), method=cfg.method, trainable_parameters=trainable, epochs=len(history),
        resumed_from_epoch=finished, train_videos=len(train_rows), val_videos=len(val_rows),
        skipped_videos=len(skipped), seconds=time.perf_counter() - started, history=history, model=model,
        **final_metrics(history),
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    if skipped:
        write_skipped(run_dir, list(skipped.values()))
    write_log(run_dir / LOG_FILE, history)
    plot_curves(run_dir / CURVES_FILE, history)
    model_name = resolve_model_name(cfg.model)
    head_config = {
        "method": cfg.method, "model": model_name, "pretrained": cfg.pretrained, "checkpoint_sha256": sha256,
        "frames": cfg.frames, "image_size": image_size, "norm": recipe.norm, "method_config": method_config,
        # a model from a config file: its config, which rebuilds the run's model without the file
        "model_config": user_model_config(model_name),
    }
    save_run(
        run_dir, kind=RUN_KIND_PREFIX + cfg.method, head=model, head_config=head_config, classnames=classnames,
        provenance={"source": "raw frames", "model": model_name, "pretrained": cfg.pretrained,
                    "checkpoint_sha256": sha256, "image_size": image_size, "norm": recipe.norm, "frames": cfg.frames},
        store_path=cfg.videos, train_config={**asdict(cfg), "resolved": recipe_dict(recipe)},
        metrics={name: getattr(summary, name) for name in METRIC_NAMES},
    )
    return summary


def _note_skipped(skipped: dict[str, dict], manifest, errors: dict[int, str]) -> None:
    """Add the videos at these manifest rows (row -> error) to `skipped` (video_id -> its skipped.csv
    row), each once."""
    for row, error in errors.items():
        video = manifest.loc[row]
        skipped.setdefault(video["video_id"], {"video_id": video["video_id"], "path": video["path"],
                                               "split": video["split"], "error": error})
