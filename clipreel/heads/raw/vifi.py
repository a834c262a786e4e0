"""ViFi-CLIP and its "bridge and prompt" stage, trained on raw frames (METHODS.md 3 and 7.3).

ViFi-CLIP (`ViFiCLIP`) adds no module to CLIP: every frame goes through the whole image tower,
the frame embeddings are averaged over time, and the video is classified by its cosine to the
text embedding of "a photo of a {class}.". What trains is one or both CLIP towers:

- "both": the image tower, the text tower and ``logit_scale`` (ViFi-CLIP proper);
- "image": the image tower only; "text": the text tower only.

The token embedding table never trains (ViFi-CLIP embeds the class texts once, outside the
trained model), and ViFi-CLIP's checkpoints do not even hold it.

Bridge and prompt (`BridgePrompt`) starts from a CLIP (usually one ViFi-CLIP fine-tuned),
freezes all of it and learns only prompts:

- vision: ``n_ctx`` tokens appended after the patch tokens (after the positional embedding,
  before ``ln_pre``); image layers 1..depth-1 each own ``n_ctx`` tokens that replace the last
  ``n_ctx`` tokens before the layer runs. The CLS output is still the frame embedding.
- language: context vectors before the class name, replaced per text layer
  (`clipreel.heads.cache.text_prompt.TextPromptLearner`).

Where ViFi-CLIP's prompt checkpoint keys land here (for a converter; METHODS.md 7.3):
``image_encoder.VPT`` -> ``image_encoder.ctx``;
``image_encoder.transformer.resblocks.i.VPT_shallow`` -> ``image_encoder.deep_ctx.{i-1}``;
``prompt_learner.ctx`` -> ``prompt_learner.ctx``;
``text_encoder.transformer.resblocks.i.VPT_shallow`` -> ``prompt_learner.deep_ctx.{i-1}``.
ViFi-CLIP casts its prompts to fp16 inside forward; here they take the dtype of the tokens.

Both models take frames (B, T, 3, S, S), normalised with ImageNet statistics as ViFi-CLIP does,
and return a dict with ``frame_embeds`` (B, T, E), ``video_embeds`` (B, E), ``text_embeds``
(K, E) (none of them normalised) and ``logits`` (B, K).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from clipreel.config import JsonConfig
from clipreel.errors import ClipreelError
from clipreel.heads.cache.text_prompt import (
    TextPromptConfig,
    TextPromptLearner,
    leave_out_frozen_weights,
    supply_frozen_weights,
)
from clipreel.heads.cache.xclip import cosine_logits
from clipreel.heads.cache.zeroshot import readable_classname
from clipreel.heads.layers import call_block

VIFI_VARIANTS = ("both", "image", "text")


@dataclass
class ViFiConfig(JsonConfig):
    """Which CLIP towers fine-tune, and the class text template."""

    variant: str = "both"  # "both" (ViFi-CLIP), "image" (image-FT) or "text" (text-FT)
    template: str = "a photo of a {}."
    gradient_checkpointing: bool = False  # recompute each block of both towers in the backward pass (GPU memory)

    def __post_init__(self):
        if self.variant not in VIFI_VARIANTS:
            raise ClipreelError(
                f"ViFiConfig: variant {self.variant!r} is not one of {', '.join(VIFI_VARIANTS)}; "
                "'both' fine-tunes both towers, 'image' or 'text' only that one."
            )
        if self.template.count("{}") != 1:
            raise ClipreelError(
                f"ViFiConfig: template {self.template!r} needs exactly one '{{}}' where the class "
                "name goes, e.g. 'a photo of a {}.'."
            )


def _clip_part(parameter_name: str) -> str:
    """Which part of an open_clip CLIP a parameter belongs to: image, text, token_embedding or scale."""
    if parameter_name.startswith("visual."):
        return "image"
    if parameter_name.startswith("token_embedding."):
        return "token_embedding"
    if parameter_name in ("logit_scale", "logit_bias"):
        return "scale"
    return "text"  # transformer.*, positional_embedding, ln_final.*, text_projection


# ViFi-CLIP variant -> the parts of CLIP that train.
TRAINED_PARTS = {"both": {"image", "text", "scale"}, "image": {"image"}, "text": {"text"}}


class ViFiCLIP(nn.Module):
    """Fine-tuned CLIP with frame-mean pooling: frames (B, T, 3, S, S) -> class logits (B, K).

    The CLIP model is taken over, not copied: the towers chosen by ``config.variant`` are
    unfrozen in place and trained. Pass a model loaded for this purpose (``load_clip``).
    ``state_dict()`` is the CLIP's under the prefix ``clip.``; ``self.clip.state_dict()`` is a
    standard open_clip checkpoint, which ``load_clip`` reads back (the "bridge" to `BridgePrompt`).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        classnames: Sequence[str],
        config: ViFiConfig | None = None,
    ):
        super().__init__()
        self.config = config or ViFiConfig()
        self.clip = clip_model
        self.tokenizer = tokenizer
        trained_parts = TRAINED_PARTS[self.config.variant]
        for name, param in self.clip.named_parameters():
            param.requires_grad_(_clip_part(name) in trained_parts)
        self.text_trains = "text" in trained_parts
        self.clip.set_grad_checkpointing(self.config.gradient_checkpointing)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Tokenize the template for each class (class-dependent, so not saved)."""
        if not classnames:
            raise ClipreelError("ViFiCLIP: no class names given: pass the label map's class names.")
        texts = [self.config.template.format(readable_classname(name)) for name in classnames]
        device = self.clip.logit_scale.device
        self.classnames = list(classnames)
        self.register_buffer("token_ids", self.tokenizer(texts).to(device), persistent=False)  # (K, C)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter, for every parameter the variant trains (give the values to the optimizer)."""
        return {name: param for name, param in self.named_parameters() if param.requires_grad}

    def trainable_parameter_count(self) -> int:
        return sum(param.numel() for param in self.trainable_parameters().values())

    def encode_classes(self) -> torch.Tensor:
        """-> class text embeddings (K, E); without a graph when the text tower is frozen."""
        with nullcontext() if self.text_trains else torch.no_grad():
            return self.clip.encode_text(self.token_ids)  # (K, E)

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames (B, T, 3, S, S) -> frame_embeds, video_embeds, text_embeds, logits."""
        batch, num_frames = frames.shape[:2]
        images = frames.flatten(0, 1).to(self.clip.visual.conv1.weight.dtype)  # (B*T, 3, S, S)
        frame_embeds = self.clip.encode_image(images).view(batch, num_frames, -1)  # (B, T, E)
        video_embeds = frame_embeds.mean(dim=1)  # (B, E)
        text_embeds = self.encode_classes()  # (K, E)
        logits = cosine_logits(video_embeds, text_embeds, self.clip.logit_scale)  # (B, K)
        return {
            "frame_embeds": frame_embeds,
            "video_embeds": video_embeds,
            "text_embeds": text_embeds,
            "logits": logits,
        }



@dataclass
class BridgePromptConfig(JsonConfig):
    """Prompt shapes of the bridge-and-prompt stage.

    The defaults are ViFi-CLIP's base-to-novel setting (16 tokens, depth 9, both sides);
    ``few_shot()`` gives its few-shot setting (10 tokens, depth 12). A depth d means prompts at
    the input and replaced before layers 1..d-1.
    """

    n_ctx_vision: int = 16
    n_ctx_text: int = 16
    depth_vision: int = 9
    depth_text: int = 9
    ctx_init: str | None = "a photo of a"  # initial text ctx when n_ctx_text <= 4, else random
    gradient_checkpointing: bool = False  # recompute each image block in the backward pass (GPU memory)

    def __post_init__(self):
        for name in ("n_ctx_vision", "n_ctx_text", "depth_vision", "depth_text"):
            if getattr(self, name) < 1:
                raise ClipreelError(f"BridgePromptConfig: {name} is {getattr(self, name)}; use at least 1.")

    @classmethod
    def few_shot(cls) -> BridgePromptConfig:
        return cls(n_ctx_vision=10, n_ctx_text=10, depth_vision=12, depth_text=12)

    def text_prompt_config(self) -> TextPromptConfig:
        return TextPromptConfig(n_ctx=self.n_ctx_text, ctx_init=self.ctx_init, deep_depth=self.depth_text)


class FrozenImageTower(nn.Module):
    """An open_clip ``VisionTransformer``, shared with its CLIP model, frozen and kept in eval mode.

    Like `clipreel.heads.cache.text_prompt.FrozenTextEncoder`, its weights stay out of ``state_dict()``:
    they belong to the CLIP checkpoint the prompts are rebuilt with.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        supported = (
            isinstance(visual, VisionTransformer)
            and visual.pool_type == "tok"
            and visual.attn_pool is None
            and not visual.final_ln_after_pool
            and visual.proj is not None
            and visual.transformer.batch_first
        )
        if not supported:
            raise ClipreelError(
                f"{type(visual).__name__}: vision prompts need an open_clip ViT that pools the CLS "
                "token through ln_post and proj (the standard CLIP image tower, e.g. ViT-B-16)."
            )
        self.visual = visual
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()
        self.register_state_dict_post_hook(leave_out_frozen_weights)
        self.register_load_state_dict_pre_hook(supply_frozen_weights)

    def train(self, mode: bool = True):
        """Frozen: stays in eval mode whatever the parent asks."""
        return super().train(False)


class PromptedImageEncoder(nn.Module):
    """The frozen image tower with deep vision prompts: images (N, 3, S, S) -> embeddings (N, E)."""

    def __init__(self, visual: nn.Module, n_ctx: int, depth: int, gradient_checkpointing: bool = False):
        super().__init__()
        self.tower = FrozenImageTower(visual)
        self.gradient_checkpointing = gradient_checkpointing
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

    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) -> CLS + patch tokens with positional embedding (N, 1 + P, width)."""
        visual = self.tower.visual
        x = visual.conv1(images)  # (N, width, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, P, width), patches row-major
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, width)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + P, width)
        return x + visual.positional_embedding.to(x.dtype)

    def _with_prompts(self, x: torch.Tensor, prompts: torch.Tensor, replace: bool) -> torch.Tensor:
        """Append prompts (n_ctx, width) to x (N, L, width), or replace x's last n_ctx tokens by them."""
        prompts = prompts.to(x.dtype).expand(x.shape[0], -1, -1)  # (N, n_ctx, width)
        kept = x[:, : -self.n_ctx] if replace else x
        return torch.cat([kept, prompts], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.tower.visual
        x = self._patch_tokens(images.to(visual.conv1.weight.dtype))  # (N, 1 + P, width)
        x = self._with_prompts(x, self.ctx, replace=False)  # (N, 1 + P + n_ctx, width)
        x = visual.ln_pre(x)
        for layer, block in enumerate(visual.transformer.resblocks):
            if 1 <= layer <= len(self.deep_ctx):
                x = self._with_prompts(x, self.deep_ctx[layer - 1], replace=True)
            x = call_block(block, x, checkpointed=self.gradient_checkpointing)  # (N, 1 + P + n_ctx, width)
        cls = visual.ln_post(x[:, 0])  # (N, width)
        return cls @ visual.proj  # (N, E)


class BridgePrompt(nn.Module):
    """Frozen (ViFi-fine-tuned) CLIP + deep vision and language prompts: frames -> class logits.

    Only the prompts train; ``logit_scale`` is copied from the CLIP into a frozen buffer, as in
    ViFi-CLIP's prompting stage. ``state_dict()`` holds the prompts and ``logit_scale`` only:
    rebuild with the same CLIP checkpoint, then ``load_state_dict``.
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
        clip_model.requires_grad_(False)
        self.image_encoder = PromptedImageEncoder(clip_model.visual, self.config.n_ctx_vision, self.config.depth_vision,
                                                  self.config.gradient_checkpointing)
        self.prompt_learner = TextPromptLearner(clip_model, tokenizer, classnames, self.config.text_prompt_config())
        self.register_buffer("logit_scale", clip_model.logit_scale.detach().clone().reshape(()))

    @property
    def classnames(self) -> list[str]:
        return self.prompt_learner.classnames

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify among other classes (base-to-novel, zero-shot transfer) with the same prompts."""
        self.prompt_learner.set_classnames(classnames)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter: the vision and language prompts."""
        return {name: param for name, param in self.named_parameters() if param.requires_grad}

    def trainable_parameter_count(self) -> int:
        return sum(param.numel() for param in self.trainable_parameters().values())

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames (B, T, 3, S, S) -> frame_embeds, video_embeds, text_embeds, logits."""
        batch, num_frames = frames.shape[:2]
        frame_embeds = self.image_encoder(frames.flatten(0, 1)).view(batch, num_frames, -1)  # (B, T, E)
        video_embeds = frame_embeds.mean(dim=1)  # (B, E)
        text_embeds = self.prompt_learner()  # (K, E)
        return {
            "frame_embeds": frame_embeds,
            "video_embeds": video_embeds,
            "text_embeds": text_embeds,
            "logits": cosine_logits(video_embeds, text_embeds, self.logit_scale),  # (B, K)
        }
