"""Gradient checkpointing of one transformer block: memory traded for compute (useful on a GPU)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def call_block(block: Callable[..., torch.Tensor], *args, checkpointed: bool) -> torch.Tensor:
    """`block(*args)`; checkpointed (and with gradients on), only the inputs are kept and the block's
    activations are recomputed in the backward pass, with the same random state (dropout, drop path)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
