"""One epoch of training, the same for both trainers: per-epoch seeding, micro-batches whose
gradients accumulate into one optimizer step, autocast on a GPU, and the running loss and accuracy.

Everything random in an epoch is a function of (seed, epoch, rank): the loaders' order, views and
augmentation are seeded by the loaders, and the torch generator (dropout, drop path, new modules'
draws) is re-seeded here at the start of every epoch, so a resumed run equals an uninterrupted one
without saving any generator state.

Training never goes on with broken numbers: a micro-batch whose loss is not finite, or an update
whose gradients are not (their total norm is inf or nan), stops the run with a ClipreelError naming
the epoch and the step, before the optimizer touches the weights. The trainers save a checkpoint
after every finished epoch, so the last good one stays in the run directory.

May import: torch, numpy, clipreel.errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from clipreel.errors import ClipreelError

# What one training step returns: the loss to backpropagate, the logits (B, K) and the class ids (B,)
# that the running accuracy counts; or None for a micro-batch with nothing to learn from (every video
# of it was skipped as unreadable).
StepResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one epoch on one rank (dropout masks etc.)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def mixed_precision(device: torch.device):
    """bf16 autocast on GPU (fp16 where bf16 is missing); plain fp32 elsewhere (bf16 is slow on CPU)."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def backward_and_step(loss: torch.Tensor | None, index: int, batches: int, accumulate: int, optimizer, scheduler,
                      epoch: int) -> None:
    """Backpropagate micro-batch `index` of epoch `epoch`'s `batches` (loss None: nothing to
    backpropagate); after every `accumulate` of them (and after the last), one optimizer and
    scheduler step, once the gradients are known to be finite. The micro-batches of a step weigh
    equally (the epoch's last group may be shorter)."""
    group_start = index - index % accumulate
    group_size = min(accumulate, batches - group_start)
    if loss is not None:
        (loss / group_size).backward()
    if index + 1 == group_start + group_size:
        norm = _gradient_norm(optimizer)
        if not math.isfinite(norm):
            raise ClipreelError(_diverged(f"the gradients are not finite (total norm {norm})", epoch, index, batches,
                                          accumulate))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def _gradient_norm(optimizer) -> float:
    """The total L2 norm of the gradients the optimizer is about to apply (0 when there are none)."""
    gradients = [param.grad for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
    return float(torch.nn.utils.get_total_norm(gradients)) if gradients else 0.0


def _diverged(what: str, epoch: int, index: int, batches: int, accumulate: int) -> str:
    """The message of a run stopped at micro-batch `index` of epoch `epoch` (0-based) because `what`."""
    step = (f"step {index + 1} of {batches}" if accumulate == 1
            else f"step {index // accumulate + 1} (batch {index + 1} of {batches})")
    kept = (f"The run directory keeps the checkpoint of epoch {epoch}, the last good one."
            if epoch else "No epoch had finished: the run directory holds no checkpoint.")
    return (f"training stopped at epoch {epoch + 1}, {step}: {what}. {kept} Lower the learning rate (--lr), "
            "check the inputs for NaN or inf (`clipreel verify` checks a store), and train into a new --out.")


def train_epoch(model: nn.Module, batches: Iterable, batch_count: int, step: Callable[[object, int], StepResult], *,
                seed: int, epoch: int, rank: int, accumulate: int, optimizer, scheduler, device: torch.device,
                on_batch: Callable[[float | None], None]) -> tuple[float | None, float | None]:
    """One pass over this rank's share of the training batches -> (mean loss, accuracy of the argmax),
    None when no batch held anything to learn from.

    step(batch, index) runs the model on one micro-batch (under autocast on a GPU) and returns
    (loss, logits, labels), or None when the batch holds nothing to learn from; on_batch(running mean
    loss, None before the first video) follows every micro-batch. A loss or gradients that are not
    finite stop the run (ClipreelError).
    """
    torch.manual_seed(epoch_seed(seed, epoch, rank))
    model.train()
    total_loss = correct = seen = 0.0
    optimizer.zero_grad(set_to_none=True)
    autocast = mixed_precision(device)
    for index, batch in enumerate(batches):
        with autocast:
            result = step(batch, index)
        if result is None:
            backward_and_step(None, index, batch_count, accumulate, optimizer, scheduler, epoch)
        else:
            loss, logits, labels = result
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise ClipreelError(_diverged(f"the loss is {loss_value}", epoch, index, batch_count, accumulate))
            backward_and_step(loss, index, batch_count, accumulate, optimizer, scheduler, epoch)
            total_loss += loss_value * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += len(labels)
        on_batch(total_loss / seen if seen else None)
    return (total_loss / seen, correct / seen) if seen else (None, None)


def progress_text(epoch: int, epochs: int, running_loss: float | None) -> str:
    """The progress bar's text during epoch `epoch` (0-based) of `epochs`."""
    loss = "-" if running_loss is None else f"{running_loss:.3f}"
    return f"epoch {epoch + 1}/{epochs} loss {loss}"
