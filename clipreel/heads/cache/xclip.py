"""X-CLIP heads trained from the feature cache: MIT and the video-specific prompt generator.

X-CLIP (Ni et al., ECCV 2022) adds three things to CLIP: message tokens inside the vision
tower (they need raw frames, not here), a Multi-frame Integration Transformer (MIT) that
turns the per-frame embeddings into one video embedding, and a prompt generator that shifts
each class text embedding towards what the video shows. The last two only read what the
cache holds, so they train here without ever running the backbone:

- ``embeds`` (B, T, E): the projected per-frame CLIP embeddings, ``ln_post(CLS) @ proj``;
- ``patch_tokens`` (B, T, N, D): the last block's patch tokens, before ``ln_post``
  (``tokens[:, :, 1:]`` of the cache);
- the class text embeddings (K, E): ``encode_text`` of the bare class names (X-CLIP's template
  "{}", `utils/tools.py: generate_text`), computed by the store's CLIP, which the heads hold frozen
  and outside their state dict, so they classify any class list.

Module and parameter names follow the released X-CLIP checkpoints (`models/xclip.py`, `models/mit.py`,
`models/prompt.py`: ``mit.*``, ``prompts_visual_ln``, ``prompts_visual_proj``,
``prompts_generator.*``), so their weights load into these heads without renaming.

May import: torch, open_clip, clipreel.errors, clipreel.config, clipreel.heads (layers, registry, cache.inputs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

from clipreel.config import POSITIVE, SIZE, JsonConfig, ranged
from clipreel.errors import ClipreelError
from clipreel.heads.cache.inputs import block_values
from clipreel.heads.layers import FrozenCLIP, cosine_logits, logit_scale_of, readable_classname
from clipreel.heads.registry import HeadEntry, Recipe, register_head

# CLIP initialises its temperature to 1/0.07; a trained CLIP ends near log(100).
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)


def _init_linear_and_norm(module: nn.Module) -> None:
    """X-CLIP's init for its new modules: Linear trunc-normal(0.02) with zero bias, LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# Multi-frame Integration Transformer
# ---------------------------------------------------------------------------------------------


@dataclass
class MITConfig(JsonConfig):
    """Shape of the MIT: E, T (fixed by the positional embedding), depth and heads."""

    embed_dim: int
    frames: int
    layers: int = ranged(1, SIZE)
    heads: int | None = ranged(None, SIZE)  # None = E // 64, at least 1 (8 for ViT-B/16)
    mlp_ratio: float = ranged(4.0, POSITIVE)

    @property
    def num_heads(self) -> int:
        return self.heads if self.heads is not None else max(1, self.embed_dim // 64)


class MultiFrameIntegration(nn.Module):
    """MIT: per-frame embeddings (B, T, E) -> one video embedding (B, E).

    A learned positional embedding tells the frames apart, ``layers`` pre-norm residual
    attention blocks mix them, the input is added back (outer residual) and the frames are
    averaged. Without the positional embedding the result would not depend on frame order.
    """

    def __init__(self, config: MITConfig):
        super().__init__()
        self.config = config
        self.positional_embedding = nn.Parameter(torch.empty(1, config.frames, config.embed_dim))
        self.resblocks = nn.Sequential(
            *[
                ResidualAttentionBlock(
                    config.embed_dim,
                    config.num_heads,
                    mlp_ratio=config.mlp_ratio,
                    act_layer=QuickGELU,
                    norm_layer=nn.LayerNorm,
                    batch_first=True,
                )
                for _ in range(config.layers)
            ]
        )
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)
        # The attention's fused in_proj keeps PyTorch's default init, as in X-CLIP.
        self.apply(_init_linear_and_norm)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        embeds = embeds.to(self.positional_embedding.dtype)  # the cache stores fp16
        x = embeds + self.positional_embedding  # (B, T, E)
        x = self.resblocks(x)  # (B, T, E)
        x = x + embeds  # outer residual
        return x.mean(dim=1)  # (B, E)


@dataclass
class MITHeadConfig(MITConfig):
    """MIT alone, classifying by cosine similarity against fixed class text embeddings."""

    logit_scale: float = CLIP_INIT_LOGIT_SCALE  # log temperature, from the CLIP model, frozen


def class_name_texts(clip: FrozenCLIP, classnames: Sequence[str]) -> torch.Tensor:
    """X-CLIP's fixed class embeddings (K, E): ``encode_text`` of the bare class names, not normalised."""
    if not classnames:
        raise ClipreelError("X-CLIP: no class names given; pass the label map's class names.")
    return clip.encode_texts([readable_classname(name) for name in classnames])


class MITHead(nn.Module):
    """``clipreel train mit``: MIT video embedding vs fixed class text embeddings."""

    def __init__(self, config: MITHeadConfig, clip: FrozenCLIP, classnames: Sequence[str]):
        super().__init__()
        self.config = config
        self.clip = clip
        self.mit = MultiFrameIntegration(config)
        self.register_buffer("logit_scale", torch.tensor(float(config.logit_scale)))
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify among these classes: their text embeddings (K, E), not saved."""
        self.classnames = list(classnames)
        self.register_buffer("class_text_embeds", class_name_texts(self.clip, classnames), persistent=False)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """batch["embeds"] (B, T, E) -> logits (B, K)."""
        video = self.mit(batch["embeds"])  # (B, E)
        return cosine_logits(video, self.class_text_embeds.to(video.dtype), self.logit_scale)


# ---------------------------------------------------------------------------------------------
# Video-specific prompt generator
# ---------------------------------------------------------------------------------------------


@dataclass
class PromptGeneratorConfig(JsonConfig):
    """Shape of the prompt generator: E, the ViT width D of the patch tokens, depth, heads, alpha."""

    embed_dim: int
    visual_width: int
    layers: int = ranged(2, SIZE)
    # None = E // 64 as X-CLIP's code (8 for ViT-B/16, 12 for L/14; at least 1); a given
    # number is lowered to the nearest divisor of embed_dim.
    heads: int | None = ranged(None, SIZE)
    alpha: float = 0.1  # initial value of the per-channel output scale

    @property
    def num_heads(self) -> int:
        if self.heads is None:
            return max(1, self.embed_dim // 64)
        heads = min(self.heads, self.embed_dim)
        while self.embed_dim % heads:
            heads -= 1
        return heads


class CrossAttention(nn.Module):
    """Multi-head attention from text queries to visual keys/values (q/k/v without bias)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)  # (B, H, len, E/H)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """text (B, K, E), visual (B, N, E) -> (B, K, E)."""
        q = self._split_heads(self.q_proj(text))  # (B, H, K, E/H)
        k = self._split_heads(self.k_proj(visual))  # (B, H, N, E/H)
        v = self._split_heads(self.v_proj(visual))  # (B, H, N, E/H)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, K, E/H)
        out = out.transpose(1, 2).flatten(2)  # (B, K, E)
        return self.proj(out)


class PromptGeneratorLayer(nn.Module):
    """text <- text + CrossAttn(norm1(text), visual); text <- text + MLP(norm3(text))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.cross_attn = CrossAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * 4),
            QuickGELU(),
            nn.Dropout(0.0),  # X-CLIP's (unused) dropout: keeps the Linears at mlp.0 and mlp.3
            nn.Linear(dim * 4, dim),
        )

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        text = text + self.cross_attn(self.norm1(text), visual)  # (B, K, E)
        return text + self.mlp(self.norm3(text))  # (B, K, E)


class VideoSpecificPrompt(nn.Module):
    """The prompt generator: class texts (B, K, E) read the video's visual context (B, N, E).

    Returns ``alpha * decoded_text`` (B, K, E); the caller adds it to the class text
    embeddings. ``alpha`` is per channel and starts small (0.1), so training starts close to
    plain CLIP text embeddings.
    """

    def __init__(self, config: PromptGeneratorConfig):
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.embed_dim)
        self.decoder = nn.ModuleList(
            [PromptGeneratorLayer(config.embed_dim, config.num_heads) for _ in range(config.layers)]
        )
        self.alpha = nn.Parameter(torch.full((config.embed_dim,), float(config.alpha)))
        self.apply(_init_linear_and_norm)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """text (B, K, E), visual (B, N, E) -> prompt offset (B, K, E)."""
        visual = self.norm(visual)
        for layer in self.decoder:
            text = layer(text, visual)
        return self.alpha * text


# ---------------------------------------------------------------------------------------------
# The X-CLIP head
# ---------------------------------------------------------------------------------------------


@dataclass
class XCLIPHeadConfig(JsonConfig):
    """Everything needed to rebuild an X-CLIP cache head (the defaults of X-CLIP's `models/xclip.py: load`)."""

    embed_dim: int  # E, CLIP joint embedding width (512 for ViT-B/16)
    visual_width: int  # D, ViT width of the patch tokens (768 for ViT-B/16)
    frames: int  # T, fixed by the MIT positional embedding
    mit_layers: int = ranged(1, SIZE)
    mit_heads: int | None = ranged(None, SIZE)  # None = E // 64
    prompt_layers: int = ranged(2, SIZE)
    prompt_heads: int | None = ranged(None, SIZE)  # None = E // 64
    prompt_alpha: float = 0.1
    logit_scale: float = CLIP_INIT_LOGIT_SCALE  # log temperature, from the CLIP model, frozen

    def mit_config(self) -> MITConfig:
        return MITConfig(self.embed_dim, self.frames, layers=self.mit_layers, heads=self.mit_heads)

    def prompt_config(self) -> PromptGeneratorConfig:
        return PromptGeneratorConfig(
            self.embed_dim,
            self.visual_width,
            layers=self.prompt_layers,
            heads=self.prompt_heads,
            alpha=self.prompt_alpha,
        )


class XCLIPHead(nn.Module):
    """MIT video embedding vs class text embeddings shifted by the video-specific prompt.

    logits = exp(logit_scale) * cos(MIT(embeds), text + generator(text, visual context)),
    where the visual context is the patch tokens through ``prompts_visual_ln`` and
    ``prompts_visual_proj``, averaged over frames. ``logit_scale`` is a buffer: X-CLIP freezes it.
    The class texts are the bare class names through the held CLIP's ``encode_text`` (X-CLIP does
    not normalise them before the generator). The full X-CLIP (`heads.raw.xclip`) scores its
    cross-frame embeddings through the same head (`score`).
    """

    def __init__(self, config: XCLIPHeadConfig, clip: FrozenCLIP, classnames: Sequence[str]):
        super().__init__()
        self.config = config
        self.clip = clip
        self.mit = MultiFrameIntegration(config.mit_config())
        self.prompts_visual_ln = nn.LayerNorm(config.visual_width)
        # std-1 init (torch.randn), as X-CLIP: this projection replaces CLIP's visual proj.
        self.prompts_visual_proj = nn.Parameter(torch.randn(config.visual_width, config.embed_dim))
        self.prompts_generator = VideoSpecificPrompt(config.prompt_config())
        self.register_buffer("logit_scale", torch.tensor(float(config.logit_scale)))
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify among these classes: their text embeddings (K, E), not saved."""
        self.classnames = list(classnames)
        self.register_buffer("class_text_embeds", class_name_texts(self.clip, classnames), persistent=False)

    def visual_context(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """patch_tokens (B, T, N, D) -> frame-averaged context (B, N, E) for the prompt generator."""
        patch_tokens = patch_tokens.to(self.prompts_visual_proj.dtype)
        context = self.prompts_visual_ln(patch_tokens) @ self.prompts_visual_proj  # (B, T, N, E)
        return context.mean(dim=1)  # (B, N, E)

    def score(self, frame_embeds: torch.Tensor, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frame_embeds (B, T, E), patch_tokens (B, T, N, D) -> (logits (B, K), video embeddings (B, E))."""
        video = self.mit(frame_embeds)  # (B, E)
        visual = self.visual_context(patch_tokens)  # (B, N, E)
        text = self.class_text_embeds.to(video.dtype).expand(video.shape[0], -1, -1)  # (B, K, E)
        text = text + self.prompts_generator(text, visual)  # (B, K, E): video-specific class texts
        return cosine_logits(video, text, self.logit_scale), video

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """batch["embeds"] (B, T, E), batch["tokens"] (B, T, 1, L, D) of the last feature block (or a
        store's 8-bit codes with tokens_scale) -> logits (B, K)."""
        last_block = block_values(batch, "tokens", -1, self.prompts_visual_proj.dtype)  # (B, T, L, D)
        patch_tokens = last_block[:, :, 1:]  # (B, T, L-1, D): no CLS
        return self.score(batch["embeds"], patch_tokens)[0]


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def mit_store_sizes(layout, provenance: Mapping, num_classes: int, text_model) -> dict:
    """The config values the store fixes: embedding width, frames, the CLIP's temperature."""
    return {"embed_dim": layout.embed_dim, "frames": layout.frames,
            "logit_scale": float(logit_scale_of(text_model.clip))}


def xclip_store_sizes(layout, provenance: Mapping, num_classes: int, text_model) -> dict:
    """The MIT's sizes and the ViT width of the patch tokens."""
    return {**mit_store_sizes(layout, provenance, num_classes, text_model), "visual_width": layout.width}


# X-CLIP's recipe (`utils/optimizer.py`, `configs/`): its new modules at 10x the base 8e-6, betas
# (0.9, 0.98), weight decay 0.001 except on 1-D parameters, biases and positional embeddings, 5
# warmup epochs (1 here: cache runs are short).
XCLIP_RECIPE = Recipe(lr=8e-5, weight_decay=0.001, warmup_epochs=1, betas=(0.9, 0.98), decay_everything=False)

register_head(HeadEntry(
    name="mit", summary="X-CLIP's multi-frame integration transformer vs class-name texts",
    config_class=MITHeadConfig, head_class=MITHead, reads=("embeds",), blocks="last", scores_text=True,
    trains=True, recipe=XCLIP_RECIPE, store_sizes=mit_store_sizes,
))
register_head(HeadEntry(
    name="xclip-prompt", summary="X-CLIP's MIT and video-specific prompts read from the last block's patch tokens",
    config_class=XCLIPHeadConfig, head_class=XCLIPHead, reads=("embeds", "tokens"), blocks="last",
    scores_text=True, trains=True, recipe=XCLIP_RECIPE, store_sizes=xclip_store_sizes,
))
