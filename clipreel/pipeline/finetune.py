"""Fine-tune CLIP on raw frames: `clipreel finetune METHOD --videos LIST --out RUN_DIR`.

The methods (`clipreel.heads.methods`: vifi, prompt, xclip, ezclip) update or prompt the backbone
itself, so they cannot train from the feature cache: every step decodes, samples and augments clips
(`clipreel.pipeline.data.raw_frames`, through a loader of `clipreel.pipeline.data.frame_loaders`) and runs the
whole CLIP.

The loop follows `clipreel.pipeline.train` (the cache trainer) and reuses its helpers: AdamW with
linear warmup then cosine decay per step, everything random a function of (seed, epoch), a
checkpoint after every epoch that a re-run of the same command resumes, log.csv and curves.png,
and a run directory (`stores.runs.save_run`, kind ``finetune-METHOD``) that
`clipreel.pipeline.finetune_eval` scores on raw videos with multi-view testing.

Loss of the classifier methods (vifi, prompt, xclip): cross-entropy on the class logits with
label smoothing 0.1; with ``mixup`` on, soft targets from `frames.mix_batch` (X-CLIP's
CutmixMixupBlending). Mixup is off by default: on the tiny synthetic world (a few videos per
class) blended clips slowed learning; the reference recipes turn it on for real datasets. EZ-CLIP
trains with its in-batch KL contrastive loss plus the motion loss.

Learning rates: None picks the reference's (METHODS.md): vifi 8e-6, prompt 8e-3 (ViFi-CLIP's
few-shot prompting; base-to-novel uses 4e-2), xclip 8e-6 (8e-5 for the new modules; 10x groups),
ezclip 1e-4. Those are tuned for ViT-B/16, batches of 64-256 and many steps; the tiny synthetic CLIP
with batches of 8 and a few hundred steps learns at vifi 1e-4, prompt 8e-3, xclip 1e-4 with its new
modules at 100x (option new_module_lr_scale), ezclip 3e-3 (tests/test_finetune_learning.py).
Normalisation: ImageNet mean/std for vifi, prompt and xclip, CLIP's for ezclip (METHODS.md 7.5).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from clipreel.devices import resolve_device
from clipreel.errors import ClipreelError
from clipreel.heads.checkpoints import read_checkpoint
from clipreel.heads.clip import (
    file_sha256,
    load_clip,
    register_model_config,
    resolve_model_name,
    user_model_config,
)
from clipreel.heads.methods import METHODS, build_method_model, image_size_of
from clipreel.heads.raw.ezclip import (
    EZCLIPClassifier,
    contrastive_kl_loss,
    motion_loss,
    same_label_matrix,
)
from clipreel.pipeline.data.augment import AugmentConfig, mix_batch, stable_generator
from clipreel.pipeline.data.frame_loaders import (
    FrameLoading,
    frame_loader,
    resolve_loading,
)
from clipreel.pipeline.data.raw_frames import RawFrameDataset
from clipreel.pipeline.data.sampling import SamplingConfig
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.evaluate import mean_softmax_over_views
from clipreel.pipeline.progress import progress_bar
from clipreel.pipeline.train import (
    CHECKPOINT_FILE,
    CURVES_FILE,
    LOG_FILE,
    adamw_with_schedule,
    backward_and_step,
    epoch_seed,
    final_metrics,
    log_row,
    mixed_precision,
    plot_curves,
    save_checkpoint_atomically,
    write_log,
)
from clipreel.stores.manifest import classnames_from_manifest
from clipreel.stores.runs import WEIGHTS_FILE, load_run, save_run

RUN_KIND_PREFIX = "finetune-"
METRIC_NAMES = ("epochs", "resumed_from_epoch", "trainable_parameters", "train_videos", "val_videos",
                "train_loss", "train_acc", "val_top1", "best_val_top1", "seconds")


@dataclass(frozen=True)
class MethodRecipe:
    """A method's default optimisation recipe and input normalisation (METHODS.md 2.7, 3.4, 4.4)."""

    lr: float
    weight_decay: float
    norm: str  # "imagenet" or "clip"
    warmup_epochs: int = 1  # the references warm up 5 epochs of 10-150; 1 suits short runs
    betas: tuple[float, float] = (0.9, 0.98)


RECIPES = {
    "vifi": MethodRecipe(lr=8e-6, weight_decay=0.001, norm="imagenet"),
    "prompt": MethodRecipe(lr=8e-3, weight_decay=0.001, norm="imagenet"),
    "xclip": MethodRecipe(lr=8e-6, weight_decay=0.001, norm="imagenet"),
    "ezclip": MethodRecipe(lr=1e-4, weight_decay=0.2, norm="clip"),
}


@dataclass
class FinetuneConfig:
    """Everything `clipreel finetune` needs. None means "the method's default" (see RECIPES)."""

    method: str  # vifi, prompt, xclip or ezclip
    videos: str  # the video list (anything read_sources reads: CSV, "path label" list, class folders)
    out: str  # the run directory; re-running the same command resumes it
    model: str = "clipreel-synth"  # open_clip model name or config file (NAME.json)
    pretrained: str = "default"  # open_clip tag, local checkpoint file, "none", "default", or a vifi run directory
    trust_checkpoint_code: bool = False  # let a --pretrained TorchScript file that is not OpenAI's run its code
    split: str = "train"
    val_split: str | None = "val"  # validated after every epoch (skipped when the split is empty)
    epochs: int = 10
    lr: float | None = None  # peak learning rate (xclip: of the CLIP weights; new modules get 10x)
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    label_smoothing: float = 0.1
    mixup: bool = False  # mixup / cutmix with soft targets (vifi, prompt, xclip)
    batch_size: int = 8
    accumulate: int = 1  # micro-batches whose gradients are summed before each optimizer step
    frames: int = 8  # T frames per clip
    workers: int = 2  # decode processes, or concurrent Ray tasks with loader "ray" (0: decode in this process)
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
    train_loss: float | None
    train_acc: float | None
    val_top1: float | None
    best_val_top1: float | None
    seconds: float
    history: list[dict]
    model: nn.Module | None = None


# --------------------------------------------------------------------------- the method models


def fresh_method_model(method: str, model_name: str, pretrained: str, classnames: Sequence[str], frames: int,
                       options: dict, seed: int, device: torch.device, trust_code: bool = False
                       ) -> tuple[nn.Module, dict, str | None]:
    """A fresh CLIP (a new copy every call) wrapped by the method -> (model, config, weights sha256)."""
    clip_model, sha256 = load_method_clip(model_name, pretrained, device, trust_code)
    tokenizer = open_clip.get_tokenizer(resolve_model_name(model_name))
    torch.manual_seed(seed)  # the new modules' initialisation
    model, method_config = build_method_model(method, clip_model, tokenizer, classnames, frames, options)
    return model.to(device), method_config, sha256


def load_method_clip(model_name: str, pretrained: str, device: torch.device | str = "cpu", trust_code: bool = False
                     ) -> tuple[nn.Module, str | None]:
    """`load_clip`, and one more source of weights: the run directory of a `clipreel finetune vifi`.

    That is ViFi-CLIP's "bridge": its fine-tuned CLIP is where bridge-and-prompt starts (``finetune
    prompt --pretrained RUN_DIR``), or any other method. The sha256 is that of the run's weights file.
    trust_code: see `load_clip`.
    """
    run_dir = Path(pretrained).expanduser()
    if not run_dir.is_dir():
        return load_clip(model_name, pretrained, device=device, trust_code=trust_code)
    run = load_run(run_dir)
    if run.head_config.get("model_config") is not None:  # a model from a config file
        register_model_config(run.head_config["model"], run.head_config["model_config"])
    if run.kind != RUN_KIND_PREFIX + "vifi":
        raise ClipreelError(f"--pretrained {run_dir}: a {run.kind!r} run holds no whole CLIP; give the run directory "
                            "of a `clipreel finetune vifi`, or a checkpoint file")
    if resolve_model_name(run.head_config["model"]) != resolve_model_name(model_name):
        raise ClipreelError(f"--pretrained {run_dir} fine-tuned {run.head_config['model']}, not {model_name}: "
                            f"pass --model {run.head_config['model']}")
    clip_model, _ = load_clip(model_name, "none", device=device)
    prefix = "clip."  # ViFiCLIP keeps the whole CLIP under it
    clip_model.load_state_dict({key.removeprefix(prefix): value for key, value in run.state_dict.items()})
    return clip_model, file_sha256(run_dir / WEIGHTS_FILE)


def method_norm(method: str, norm: str | None) -> str:
    return norm if norm is not None else RECIPES[method].norm


# --------------------------------------------------------------------------- data


def split_rows(manifest: pd.DataFrame, split: str | None) -> pd.DataFrame:
    """The labelled, existing videos of `split` (rows keep their manifest index)."""
    if split is None:
        return manifest.iloc[0:0]
    status_ok = manifest["status"] != "failed" if "status" in manifest else True
    return manifest[(manifest["split"] == split) & (manifest["label"] >= 0) & status_ok]


def augment_config(image_size: int, norm: str, settings: dict | None = None) -> AugmentConfig:
    """The training augmentation (and, through its preprocess_config, the evaluation transform) of a run."""
    try:
        return AugmentConfig(**{**(settings or {}), "image_size": image_size, "norm": norm})
    except TypeError as error:  # a setting AugmentConfig does not have
        raise ClipreelError(f"--augment: {error}; the settings are the fields of clipreel.pipeline.data.raw_frames."
                            "AugmentConfig (crop, scales, flip, color_jitter, grayscale, ...)") from None


def clip_dataset(rows: pd.DataFrame, sampling: SamplingConfig, augment: AugmentConfig, loading: FrameLoading, *,
                 train: bool, seed: int = 0, crops: int = 1) -> RawFrameDataset:
    """The clips of manifest `rows`, decoded the way `loading` says."""
    return RawFrameDataset(rows, sampling, augment, train=train, seed=seed, crops=crops, decoder=loading.decoder,
                           device=loading.device)


# --------------------------------------------------------------------------- training


def run_finetune(cfg: FinetuneConfig, progress: bool = True) -> FinetuneSummary:
    """Fine-tune `cfg.method` on the raw videos of `cfg.videos` into `cfg.out` (resuming it if it exists)."""
    started = time.perf_counter()
    recipe = _resolved_recipe(cfg)
    device = resolve_device(cfg.device)
    manifest = read_sources(cfg.videos)
    classnames = classnames_from_manifest(manifest, cfg.videos)
    train_rows, val_rows = split_rows(manifest, cfg.split), split_rows(manifest, cfg.val_split)
    if train_rows.empty:
        raise ClipreelError(
            f"{cfg.videos}: no labelled video in split {cfg.split!r}; its splits are "
            f"{sorted(manifest['split'].unique())}. Choose one with --split."
        )
    model, method_config, sha256 = fresh_method_model(cfg.method, cfg.model, cfg.pretrained, classnames, cfg.frames,
                                                      cfg.options, cfg.seed, device, cfg.trust_checkpoint_code)
    trainable = model.trainable_parameter_count()
    if progress:
        print(f"{cfg.method}: {trainable:,} trainable parameters")

    run_dir = Path(cfg.out)
    identity = _run_identity(cfg, recipe, classnames, sha256)
    checkpoint = _checkpoint_to_resume(run_dir, cfg, identity)
    finished = checkpoint["epoch"] if checkpoint else 0
    history = list(checkpoint["history"]) if checkpoint else []
    if checkpoint:
        model.load_state_dict(checkpoint["model"])

    image_size, norm = image_size_of(model), method_norm(cfg.method, cfg.norm)
    augment = augment_config(image_size, norm, cfg.augment)
    sampling = SamplingConfig(frames=cfg.frames)
    loading = resolve_loading(cfg.decoder, cfg.loader, device, cfg.workers, cfg.address)
    train_data = clip_dataset(train_rows, sampling, augment, loading, train=True, seed=cfg.seed)
    train_loader = frame_loader(train_data, cfg.batch_size, loading, shuffle=True, seed=cfg.seed)
    val_loader = None
    if not val_rows.empty:
        val_data = clip_dataset(val_rows, sampling, augment, loading, train=False, seed=cfg.seed)
        val_loader = frame_loader(val_data, cfg.batch_size, loading, shuffle=False, seed=cfg.seed)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.accumulate)
    optimizer, scheduler = _optimizer_and_schedule(model, cfg.method, recipe, steps_per_epoch, cfg.epochs, checkpoint)
    autocast = mixed_precision(device)
    epochs_to_run = range(finished, cfg.epochs)
    with progress_bar(f"finetune {cfg.method}", len(epochs_to_run) * len(train_loader), progress) as advance:
        for epoch in epochs_to_run:
            epoch_started = time.perf_counter()
            torch.manual_seed(epoch_seed(cfg.seed, epoch, 0))
            train_data.set_epoch(epoch)
            train_loss, train_acc = _train_epoch(cfg, model, train_loader, len(classnames), epoch, optimizer,
                                                 scheduler, device, autocast, advance)
            val_top1 = val_loss = None
            if val_loader is not None:
                probabilities, labels, _ = predict_raw(model, val_loader, device)
                val_top1 = float((probabilities.argmax(axis=1) == labels).mean())
                picked = probabilities[np.arange(len(labels)), labels]
                val_loss = float(-np.log(np.clip(picked, 1e-12, None)).mean())
            history.append(log_row(epoch + 1, optimizer.param_groups[0]["lr"], train_loss, train_acc, val_top1,
                                    val_loss, time.perf_counter() - epoch_started))
            _save_checkpoint(run_dir, identity, model, optimizer, scheduler, epoch + 1, history)
            write_log(run_dir / LOG_FILE, history)

    summary = FinetuneSummary(
        run_dir=str(run_dir), method=cfg.method, trainable_parameters=trainable, epochs=len(history),
        resumed_from_epoch=finished, train_videos=len(train_rows), val_videos=len(val_rows),
        seconds=time.perf_counter() - started, history=history, model=model, **final_metrics(history),
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_log(run_dir / LOG_FILE, history)
    plot_curves(run_dir / CURVES_FILE, history)
    model_name = resolve_model_name(cfg.model)
    head_config = {
        "method": cfg.method, "model": model_name, "pretrained": cfg.pretrained, "checkpoint_sha256": sha256,
        "frames": cfg.frames, "image_size": image_size, "norm": norm, "method_config": method_config,
        # a model from a config file: its config, which rebuilds the run's model without the file
        "model_config": user_model_config(model_name),
    }
    save_run(
        run_dir, kind=RUN_KIND_PREFIX + cfg.method, head=model, head_config=head_config, classnames=classnames,
        provenance={"source": "raw frames", "model": cfg.model, "pretrained": cfg.pretrained,
                    "checkpoint_sha256": sha256, "image_size": image_size, "norm": norm, "frames": cfg.frames},
        store_path=cfg.videos, train_config={**asdict(cfg), "resolved": _recipe_dict(recipe)},
        metrics={name: getattr(summary, name) for name in METRIC_NAMES},
    )
    return summary


def _train_epoch(cfg, model, loader, num_classes, epoch, optimizer, scheduler, device, autocast, advance):
    """One pass over the training clips -> (mean loss, accuracy of the argmax logits).

    With cfg.accumulate = n, the gradients of n micro-batches (each weighted equally; the last group
    of an epoch may be shorter) make one optimizer step. EZ-CLIP's contrastive loss stays in-batch:
    its negatives are the clips of the micro-batch.
    """
    model.train()
    total_loss = correct = seen = 0.0
    batches = len(loader)
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(loader):
        clips = batch["frames"].to(device, non_blocking=True)  # (B, T, 3, S, S)
        labels = batch["label"].to(device)  # (B,)
        with autocast:
            if cfg.mixup:
                mixed, targets = mix_batch(clips, labels.cpu(), num_classes, label_smoothing=cfg.label_smoothing,
                                           generator=stable_generator("mix", cfg.seed, epoch, step))
                outputs = model(mixed)
                loss = torch.sum(-targets.to(device) * F.log_softmax(outputs["logits"].float(), dim=1), dim=1).mean()
            else:
                outputs, loss = method_loss(cfg.method, model, clips, labels, cfg.label_smoothing)
        backward_and_step(loss, step, batches, cfg.accumulate, optimizer, scheduler)
        total_loss += loss.item() * len(labels)
        correct += (outputs["logits"].argmax(dim=1) == labels).sum().item()
        seen += len(labels)
        advance(f"epoch {epoch + 1}/{cfg.epochs} loss {total_loss / seen:.3f}")
    return total_loss / seen, correct / seen


def method_loss(method: str, model: nn.Module, clips: torch.Tensor, labels: torch.Tensor,
                label_smoothing: float = 0.1) -> tuple[dict, torch.Tensor]:
    """The method's training loss on clips (B, T, 3, S, S) with labels (B,) -> (model outputs, loss).

    EZ-CLIP: its contrastive + motion loss; the others: cross-entropy on the class logits.
    """
    outputs = model(clips)
    if method == "ezclip":
        return outputs, ezclip_loss(model, outputs, labels)
    return outputs, F.cross_entropy(outputs["logits"].float(), labels, label_smoothing=label_smoothing)


def ezclip_loss(model: EZCLIPClassifier, outputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """EZ-CLIP's training loss: in-batch KL contrastive loss (videos vs their class texts) + motion loss."""
    batch_texts = outputs["text_embeds"][labels]  # (B, E): the text of each video's class
    logits_per_video = model.ezclip.logits(outputs["video_embeds"], batch_texts)  # (B, B)
    contrastive = contrastive_kl_loss(logits_per_video, logits_per_video.t(), same_label_matrix(labels))
    return contrastive + motion_loss(outputs["frame_embeds"])


def _resolved_recipe(cfg: FinetuneConfig) -> MethodRecipe:
    """The method's recipe with the user's choices applied (and the config checked)."""
    if cfg.method not in METHODS:
        raise ClipreelError(f"unknown fine-tuning method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    checks = {
        "epochs": cfg.epochs >= 1, "batch_size": cfg.batch_size >= 1, "accumulate": cfg.accumulate >= 1,
        "frames": cfg.frames >= 1,
        "label_smoothing": 0.0 <= cfg.label_smoothing < 1.0, "lr": cfg.lr is None or cfg.lr > 0,
        "weight_decay": cfg.weight_decay is None or cfg.weight_decay >= 0,
        "warmup_epochs": cfg.warmup_epochs is None or cfg.warmup_epochs >= 0,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        values = ", ".join(f"{name}={getattr(cfg, name)!r}" for name in bad)
        raise ClipreelError(f"finetune settings out of range: {values} (epochs, batch size, accumulate, frames >= 1; "
                            "0 <= label smoothing < 1; lr > 0; weight decay and warmup >= 0)")
    augment_config(224, "clip", cfg.augment)  # a bad augmentation setting fails before the model loads
    if cfg.mixup and cfg.method == "ezclip":
        raise ClipreelError("--mixup does not apply to ezclip (it trains with its contrastive loss): leave it off")
    default = RECIPES[cfg.method]
    return MethodRecipe(
        lr=cfg.lr if cfg.lr is not None else default.lr,
        weight_decay=cfg.weight_decay if cfg.weight_decay is not None else default.weight_decay,
        norm=method_norm(cfg.method, cfg.norm),
        warmup_epochs=cfg.warmup_epochs if cfg.warmup_epochs is not None else default.warmup_epochs,
        betas=default.betas,
    )


def _recipe_dict(recipe: MethodRecipe) -> dict:
    return {**asdict(recipe), "betas": list(recipe.betas)}


def _optimizer_and_schedule(model, method, recipe, steps_per_epoch, epochs, checkpoint):
    """AdamW (X-CLIP: its 10x groups; others: one group) and the per-step warmup + cosine schedule."""
    if method == "xclip":
        groups = model.parameter_groups(recipe.lr, recipe.weight_decay)
    else:
        groups = [{"params": [param for param in model.parameters() if param.requires_grad],
                   "weight_decay": recipe.weight_decay}]
    return adamw_with_schedule(groups, recipe.lr, recipe.betas, recipe.warmup_epochs * steps_per_epoch,
                               epochs * steps_per_epoch, checkpoint)


# --------------------------------------------------------------------------- resume


# FinetuneConfig fields that may change when a run is resumed.
_RESUMABLE_CHANGES = ("out", "epochs", "val_split", "workers", "loader", "address", "device", "trust_checkpoint_code")


def _run_identity(cfg: FinetuneConfig, recipe: MethodRecipe, classnames, sha256) -> dict:
    """What must stay the same for a run directory to be resumed."""
    settings = {key: value for key, value in asdict(cfg).items() if key not in _RESUMABLE_CHANGES}
    return {"config": settings, "recipe": _recipe_dict(recipe), "classnames": list(classnames),
            "checkpoint_sha256": sha256}


def _checkpoint_to_resume(run_dir: Path, cfg: FinetuneConfig, identity: dict) -> dict | None:
    """The checkpoint of an earlier run of the same command in `run_dir`, or None for a new run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ClipreelError(f"--out {run_dir} is a file, not a run directory: choose a new --out.")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise ClipreelError(f"{run_dir} exists and holds no {CHECKPOINT_FILE} of an earlier `clipreel finetune`: "
                            "choose a new --out (or delete the folder).")
    checkpoint = read_checkpoint(path)
    old, new = checkpoint["identity"], identity
    differences = [f"{key}: the run has {old['config'].get(key)!r}, this command {value!r}"
                   for key, value in new["config"].items() if old["config"].get(key) != value]
    differences += [f"{key} differs" for key in ("recipe", "classnames", "checkpoint_sha256") if old[key] != new[key]]
    if differences:
        raise ClipreelError(f"{run_dir} was fine-tuned with other settings, so it cannot be resumed:\n  - "
                            + "\n  - ".join(differences) + "\nUse the same settings to continue it, or a new --out.")
    if checkpoint["epoch"] > cfg.epochs:
        raise ClipreelError(f"{run_dir} has already trained {checkpoint['epoch']} epochs, more than the {cfg.epochs} "
                            "asked for: ask for at least that many epochs, or choose a new --out.")
    return checkpoint


def _save_checkpoint(run_dir: Path, identity, model, optimizer, scheduler, epoch, history) -> None:
    """Write checkpoint.pt atomically (a crash while saving keeps the previous one)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"epoch": epoch, "identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "history": history}
    save_checkpoint_atomically(run_dir, state)


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def predict_raw(model: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every view of every clip through `model` -> (probabilities (N, K) mean softmax over views, labels, rows).

    `loader` yields RawFrameDataset(train=False) batches: frames (B, V*C, T, 3, S, S).
    """
    was_training = model.training
    model.eval()
    probabilities, labels, rows = [], [], []
    for batch in loader:
        views = batch["frames"].to(device)  # (B, V*C, T, 3, S, S)
        with mixed_precision(device):
            logits = model(views.flatten(0, 1))["logits"]  # (B*V*C, K)
        probabilities.append(mean_softmax_over_views(logits.unflatten(0, views.shape[:2])).cpu())  # (B, K)
        labels.append(batch["label"])
        rows.append(batch["row"])
    model.train(was_training)
    return torch.cat(probabilities).numpy(), torch.cat(labels).numpy(), torch.cat(rows).numpy()
