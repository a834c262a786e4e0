"""The optimiser of both trainers: a model's recipe resolved against the user's settings, AdamW over
parameter groups (split by the no-decay rule where the recipe asks), and its per-step schedule:
linear warmup, then cosine decay to zero, restored exactly when a run resumes.

May import: torch, clipreel.errors, clipreel.heads.registry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from clipreel.errors import ClipreelError
from clipreel.heads.registry import Recipe


def resolved_recipe(default: Recipe, *, lr: float | None, weight_decay: float | None, warmup_epochs: int | None,
                    **others) -> Recipe:
    """The model's default recipe with the user's choices (None = the default) put in; `others` are
    further fields of the recipe (a method's `norm`)."""
    chosen = {"lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, **others}
    return dataclasses.replace(default, **{name: value for name, value in chosen.items() if value is not None})


def check_settings(command: str, checks: dict[str, bool], values: dict, rules: str) -> None:
    """Refuse the settings whose check is False, and every checked number that is not finite (inf or
    nan: a learning rate of inf passes `lr > 0`, and trains nothing but NaN), naming each with its
    value and the rules."""
    bad = [name for name, ok in checks.items() if not ok or not _finite_or_absent(values[name])]
    if bad:
        listed = ", ".join(f"{name}={values[name]!r}" for name in bad)
        raise ClipreelError(f"{command} settings out of range: {listed} ({rules}; every number finite)")


def _finite_or_absent(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def recipe_dict(recipe: Recipe) -> dict:
    """The recipe as JSON (the run's config and the checkpoint's identity)."""
    return {**dataclasses.asdict(recipe), "betas": list(recipe.betas)}


def exempt_from_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """X-CLIP's no-decay rule (its `utils/optimizer.py`): no weight decay on 1-D parameters, biases and
    positional embeddings."""
    return parameter.ndim <= 1 or name.endswith(".bias") or "positional_embedding" in name


def optimizer_groups(model: nn.Module, groups: Iterable[dict], decay_everything: bool) -> list[dict]:
    """The model's parameter groups, each split in two by the no-decay rule unless the recipe decays
    everything: the exempt parameters go to a "<name>_no_decay" group with weight decay 0. Empty
    groups are left out."""
    if decay_everything:
        return [group for group in groups if group["params"]]
    names = {id(param): name for name, param in model.named_parameters()}
    split = []
    for group in groups:
        exempt = [param for param in group["params"] if exempt_from_weight_decay(names[id(param)], param)]
        decayed = [param for param in group["params"] if not exempt_from_weight_decay(names[id(param)], param)]
        split.append({**group, "params": decayed})
        split.append({**group, "name": f"{group['name']}_no_decay", "params": exempt, "weight_decay": 0.0})
    return [group for group in split if group["params"]]


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of optimizer step `step`: linear warmup to 1, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def adamw_with_schedule(groups: list[dict], recipe: Recipe, steps_per_epoch: int, epochs: int,
                        checkpoint: dict | None):
    """AdamW over `groups` (each with its own lr) and its per-step warmup + cosine schedule, planned
    for `epochs`; restored from `checkpoint` (its "optimizer" and "scheduler") when resuming. When a
    finished run is asked for more epochs, the restored step continues on the longer cosine."""
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, eps=1e-8)
    schedule = warmup_cosine(recipe.warmup_epochs * steps_per_epoch, epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if checkpoint:
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
        except (ValueError, KeyError, TypeError) as error:
            raise ClipreelError(f"the checkpoint's optimizer state does not fit this model ({error}): it belongs to "
                                "another run. Choose a new --out.") from None
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)
    return optimizer, scheduler
