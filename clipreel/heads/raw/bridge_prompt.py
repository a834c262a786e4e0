"""ViFi-CLIP's "bridge and prompt" stage on raw frames: deep vision and language prompts in a frozen CLIP.

Bridge and prompt (ViFi-CLIP, `clip/model.py` and `trainers/vificlip.py` with `PROMPT_MODEL: True`)
starts from a CLIP, usually the one a ViFi-CLIP run fine-tuned (`finetune prompt --pretrained
VIFI_RUN`: the "bridge"), freezes all of it and learns only prompts:

- vision: ``n_ctx`` tokens appended after the patch tokens (after the positional embedding,
  before ``ln_pre``); image layers 1..depth-1 each own ``n_ctx`` tokens that replace the last
  ``n_ctx`` tokens before the layer runs. The CLS output is still the frame embedding.
- language: context vectors before the class name, replaced per text layer
  (`clipreel.heads.cache.text_prompt.TextPromptLearner`).

Where ViFi-CLIP's prompt checkpoint keys land here (for a converter):
``image_encoder.VPT`` -> ``image_encoder.ctx``;
``image_encoder.transformer.resblocks.i.VPT_shallow`` -> ``image_encoder.deep_ctx.{i-1}``;
``prompt_learner.ctx`` -> ``prompt_learner.ctx``;
``text_encoder.transformer.resblocks.i.VPT_shallow`` -> ``prompt_learner.deep_ctx.{i-1}``.
ViFi-CLIP casts its vision prompts and deep text prompts to fp16 inside forward (not the text
ctx); ``fp16_prompts`` does the same (on for imported ViFi-CLIP models), else they take the dtype of
the tokens.

``state_dict()`` holds the prompts and ``logit_scale`` only: rebuild with the same CLIP checkpoint,
then ``load_state_dict``. Frames (B, T, 3, S, S) are normalised with ImageNet statistics.

May import: torch, open_clip, clipreel.errors, clipreel.config, clipreel.heads (layers, registry, cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from clipreel.config import SIZE, JsonConfig, ranged
from clipreel.errors import ClipreelError
from clipreel.heads.cache.text_prompt import TextPromptConfig, TextPromptLearner
from clipreel.heads.layers import (
    FrozenCLIP,
    call_block,
    check_clips,
    check_standard_vit,
    cosine_logits,
    fp16_rounded,
    logit_scale_of,
    patch_stem,
)
from clipreel.heads.registry import MethodEntry, MethodModel, MethodRecipe, register_method


@dataclass
class BridgePromptConfig(JsonConfig):
    """Prompt shapes of the bridge-and-prompt stage.

    The defaults are ViFi-CLIP's base-to-novel setting (16 tokens, depth 9, both sides);
    ``few_shot()`` gives its few-shot setting (10 tokens, depth 12). A depth d means prompts at
    the input and replaced before layers 1..d-1.
    """

    n_ctx_vision: int = ranged(16, SIZE)
    n_ctx_text: int = ranged(16, SIZE)
    depth_vision: int = ranged(9, SIZE)
    depth_text: int = ranged(9, SIZE)
    ctx_init: str | None = "a photo of a"  # initial text ctx when n_ctx_text <= 4, else random
    gradient_checkpointing: bool = False  # recompute each image block in the backward pass (GPU memory)
    # True: the vision prompts and the deep text prompts are rounded to fp16 as they are used, as
    # ViFi-CLIP's `clip/model.py` casts them with .half() (the text ctx is not)
    fp16_prompts: bool = False

    @classmethod
    def few_shot(cls) -> BridgePromptConfig:
        return cls(n_ctx_vision=10, n_ctx_text=10, depth_vision=12, depth_text=12)

    def text_prompt_config(self) -> TextPromptConfig:
        return TextPromptConfig(n_ctx=self.n_ctx_text, ctx_init=self.ctx_init, deep_depth=self.depth_text,
                                fp16_deep_prompts=self.fp16_prompts)


class PromptedImageEncoder(nn.Module):
    """The frozen image tower with deep vision prompts: images (N, 3, S, S) -> embeddings (N, E)."""

    def __init__(self, clip: FrozenCLIP, n_ctx: int, depth: int, gradient_checkpointing: bool = False,
                 fp16_prompts: bool = False):
        super().__init__()
        visual = clip.model.visual
        check_standard_vit(visual, "bridge-and-prompt")
        self.clip = clip
        self.gradient_checkpointing = gradient_checkpointing
        self.fp16_prompts = fp16_prompts
        blocks = visual.transformer.resblocks
        if depth > len(blocks):
            raise ClipreelError(
                f"BridgePromptConfig: depth_vision {depth} exceeds the {len(blocks)} layers of the "
                "image tower; use at most that."
            )
        self.n_ctx = n_ctx
        width = visual.class_embedding.shape[0]
        device = visual.class_embedding.device
        self.ctx = nn.Parameter(torch.randn(n_ctx, width, device=device) * 0.02)  # (n_ctx, width)
        # deep_ctx[i] replaces the last n_ctx tokens before image layer i + 1.
        self.deep_ctx = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx, width, device=device) * 0.02) for _ in range(depth - 1)]
        )

    def _with_prompts(self, x: torch.Tensor, prompts: torch.Tensor, replace: bool) -> torch.Tensor:
        """Append prompts (n_ctx, width) to x (N, L, width), or replace x's last n_ctx tokens by them."""
        if self.fp16_prompts:
            prompts = fp16_rounded(prompts)
        prompts = prompts.to(x.dtype).expand(x.shape[0], -1, -1)  # (N, n_ctx, width)
        kept = x[:, : -self.n_ctx] if replace else x
        return torch.cat([kept, prompts], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.clip.model.visual
        x = patch_stem(visual, images.to(visual.conv1.weight.dtype))  # (N, 1 + P, width)
        x = self._with_prompts(x, self.ctx, replace=False)  # (N, 1 + P + n_ctx, width)
        x = visual.ln_pre(x)
        for layer, block in enumerate(visual.transformer.resblocks):
            if 1 <= layer <= len(self.deep_ctx):
                x = self._with_prompts(x, self.deep_ctx[layer - 1], replace=True)
            x = call_block(block, x, checkpointed=self.gradient_checkpointing)  # (N, 1 + P + n_ctx, width)
        cls = visual.ln_post(x[:, 0])  # (N, width)
        return cls @ visual.proj  # (N, E)


class BridgePrompt(MethodModel):
    """Frozen (ViFi-fine-tuned) CLIP + deep vision and language prompts: frames -> class logits.

    Only the prompts train (cross-entropy on the class logits, one AdamW group: `MethodModel`'s
    defaults); ``logit_scale`` is copied from the CLIP into a frozen buffer, as in ViFi-CLIP's
    prompting stage.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        classnames: Sequence[str],
        config: BridgePromptConfig | None = None,
    ):
        super().__init__()
        self.config = config or BridgePromptConfig()
        clip = FrozenCLIP(clip_model, tokenizer)
        self.image_size = int(clip_model.visual.image_size[0])
        self.image_encoder = PromptedImageEncoder(clip, self.config.n_ctx_vision, self.config.depth_vision,
                                                  self.config.gradient_checkpointing, self.config.fp16_prompts)
        self.prompt_learner = TextPromptLearner(clip, classnames, self.config.text_prompt_config())
        self.register_buffer("logit_scale", logit_scale_of(clip_model))

    @property
    def classnames(self) -> list[str]:
        return self.prompt_learner.classnames

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify among other classes (base-to-novel, zero-shot transfer) with the same prompts."""
        self.prompt_learner.set_classnames(classnames)

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames (B, T, 3, S, S) -> logits (B, K), frame_embeds (B, T, E), video_embeds (B, E)."""
        check_clips(frames, self.image_size, "bridge-and-prompt")
        batch, num_frames = frames.shape[:2]
        frame_embeds = self.image_encoder(frames.flatten(0, 1)).view(batch, num_frames, -1)  # (B, T, E)
        video_embeds = frame_embeds.mean(dim=1)  # (B, E)
        logits = cosine_logits(video_embeds, self.prompt_learner(), self.logit_scale)  # (B, K)
        return {"logits": logits, "frame_embeds": frame_embeds, "video_embeds": video_embeds}


def depths_for(clip_model: nn.Module) -> dict:
    """The default prompt depths, capped by the towers' layers (so the tiny models work with the defaults)."""
    defaults = BridgePromptConfig()
    return {"depth_vision": min(defaults.depth_vision, len(clip_model.visual.transformer.resblocks)),
            "depth_text": min(defaults.depth_text, len(clip_model.transformer.resblocks))}


register_method(MethodEntry(
    name="prompt",
    summary="bridge-and-prompt: deep vision + language prompts in a frozen (ViFi-CLIP) CLIP",
    config_class=BridgePromptConfig,
    model_class=BridgePrompt,
    # ViFi-CLIP's few-shot prompting configs: AdamW 8e-3 (base-to-novel uses 4e-2), betas (0.9, 0.98),
    # weight decay 0.001; ImageNet mean/std.
    recipe=MethodRecipe(lr=8e-3, weight_decay=0.001, warmup_epochs=1, betas=(0.9, 0.98), norm="imagenet"),
    clip_defaults=depths_for,
))
