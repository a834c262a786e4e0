"""One epoch of training, the same for both trainers: per-epoch seeding, micro-batches whose
gradients accumulate into one optimizer step, autocast on a GPU, and the running loss and accuracy.

Everything random in an epoch is a function of (seed, epoch, rank): the loaders' order, views and
augmentation are seeded by the loaders, and the torch generator (dropout, drop path, new modules'
draws) is re-seeded here at the start of every epoch, so a resumed run equals an uninterrupted one
without saving any generator state.

May import: torch, numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

# What one training step returns: the loss to backpropagate, the logits (B, K) and the class ids (B,)
# that the running accuracy counts.
StepResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one epoch on one rank (dropout masks etc.)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def mixed_precision(device: torch.device):
    """bf16 autocast on GPU (fp16 where bf16 is missing); plain fp32 elsewhere (bf16 is slow on CPU)."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


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


def train_epoch(model: nn.Module, batches: Iterable, batch_count: int, step: Callable[[object, int], StepResult], *,
                seed: int, epoch: int, rank: int, accumulate: int, optimizer, scheduler, device: torch.device,
                on_batch: Callable[[float], None]) -> tuple[float, float]:
    """One pass over this rank's share of the training batches -> (mean loss, accuracy of the argmax).

    step(batch, index) runs the model on one micro-batch (under autocast on a GPU) and returns
    (loss, logits, labels); on_batch(running mean loss) follows every micro-batch.
    """
    torch.manual_seed(epoch_seed(seed, epoch, rank))
    model.train()
    total_loss = correct = seen = 0.0
    optimizer.zero_grad(set_to_none=True)
    autocast = mixed_precision(device)
    for index, batch in enumerate(batches):
        with autocast:
            loss, logits, labels = step(batch, index)
        backward_and_step(loss, index, batch_count, accumulate, optimizer, scheduler)
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
        on_batch(total_loss / seen)
    return total_loss / seen, correct / seen
