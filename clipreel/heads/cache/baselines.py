"""Baseline heads on the per-frame CLIP embeddings: a linear probe and a frame-mean MLP.

Both see a video as the average of its L2-normalised frame embeddings, so they cannot use
frame order: they are the floor a temporal head has to beat.

May import: torch, clipreel.config, clipreel.heads (layers, registry).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipreel.config import PROBABILITY, SIZE, JsonConfig, ranged
from clipreel.heads.layers import check_class_count
from clipreel.heads.registry import HeadEntry, Recipe, register_head


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

    def set_classnames(self, classnames: Sequence[str]) -> None:
        check_class_count(self.config.num_classes, classnames, type(self).__name__)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """batch["embeds"] (B, T, E) -> logits (B, K)."""
        video = frame_mean_of_normalised(batch["embeds"].to(self.linear.weight.dtype))  # (B, E)
        return self.linear(video)  # (B, K)


@dataclass
class FrameMeanMLPConfig(JsonConfig):
    embed_dim: int
    num_classes: int
    hidden: int = ranged(512, SIZE)
    dropout: float = ranged(0.5, PROBABILITY)


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

    def set_classnames(self, classnames: Sequence[str]) -> None:
        check_class_count(self.config.num_classes, classnames, type(self).__name__)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """batch["embeds"] (B, T, E) -> logits (B, K)."""
        video = frame_mean_of_normalised(batch["embeds"].to(self.mlp[0].weight.dtype))  # (B, E)
        return self.mlp(video)  # (B, K)


def store_sizes(layout, provenance: Mapping, num_classes: int, text_model=None) -> dict:
    """The config values the store fixes: the embedding width (and the class count)."""
    return {"embed_dim": layout.embed_dim, "num_classes": num_classes}


# Baselines have no reference recipe: plain AdamW with a light weight decay.
BASELINE_RECIPE = Recipe(lr=1e-3, weight_decay=1e-4, warmup_epochs=1)

register_head(HeadEntry(
    name="linear", summary="linear probe on the frame-mean embedding", config_class=LinearProbeConfig,
    head_class=LinearProbe, reads=("embeds",), blocks="last", scores_text=False, trains=True,
    recipe=BASELINE_RECIPE, store_sizes=store_sizes,
))
register_head(HeadEntry(
    name="mlp", summary="MLP on the frame-mean embedding", config_class=FrameMeanMLPConfig,
    head_class=FrameMeanMLP, reads=("embeds",), blocks="last", scores_text=False, trains=True,
    recipe=BASELINE_RECIPE, store_sizes=store_sizes,
))
