"""Baseline heads on the per-frame CLIP embeddings: a linear probe and a frame-mean MLP.

Both see a video as the average of its L2-normalised frame embeddings, so they cannot use
frame order: they are the floor a temporal head has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipreel.config import JsonConfig


def frame_mean_of_normalised(embeds: torch.Tensor) -> torch.Tensor:
    """(B, T, E) -> (B, E): normalise each frame embedding, then average over frames."""
    return F.normalize(embeds, dim=-1).mean(dim=1)



@dataclass
class LinearProbeConfig(JsonConfig):
    embed_dim: int
    num_classes: int


class LinearProbe(nn.Module):
    """logits (B, K) = Linear(mean_T(normalised embeds)).

    A linear layer is affine, so this equals classifying every frame and averaging the logits.
    """

    def __init__(self, config: LinearProbeConfig):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.embed_dim, config.num_classes)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds (B, T, E) -> logits (B, K)."""
        video = frame_mean_of_normalised(embeds.to(self.linear.weight.dtype))  # (B, E)
        return self.linear(video)  # (B, K)


@dataclass
class FrameMeanMLPConfig(JsonConfig):
    embed_dim: int
    num_classes: int
    hidden: int = 512
    dropout: float = 0.5


class FrameMeanMLP(nn.Module):
    """logits (B, K) = Linear(Dropout(GELU(Linear(mean_T(normalised embeds)))))."""

    def __init__(self, config: FrameMeanMLPConfig):
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(
            nn.Linear(config.embed_dim, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds (B, T, E) -> logits (B, K)."""
        video = frame_mean_of_normalised(embeds.to(self.mlp[0].weight.dtype))  # (B, E)
        return self.mlp(video)  # (B, K)
