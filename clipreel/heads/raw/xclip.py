"""Full X-CLIP on raw frames: the cross-frame communication vision tower (CCT) + MIT + prompts.

X-CLIP (Ni et al., ECCV 2022) fine-tunes CLIP's whole image tower and inserts, in every vision
block, a **message token** per frame (X-CLIP's `models/cct.py`):

1. each frame's CLS token goes through ``message_fc`` (Linear D->D): one message per frame;
2. the T messages of a video attend to each other (``message_ln`` + ``message_attn``, residual);
3. each frame appends its message as token L+1 and runs the block's usual self-attention, so its
   patches can read what the other frames carry;
4. the message token is dropped and the block's MLP runs on the L original tokens.

On top of the per-frame embeddings sits the cache head (`clipreel.heads.cache.xclip.XCLIPHead`):
the Multi-frame Integration Transformer (video embedding) and the video-specific prompt generator
(class texts shifted by the video's patch tokens). Class texts are ``encode_text`` of the bare class
names (template "{}"), computed by the frozen CLIP the head holds. The text tower and
``logit_scale`` stay frozen; everything else trains, the new modules at 10x the learning rate
(``XCLIP.parameter_groups``, X-CLIP's `utils/optimizer.py`).

State dict layout: ``visual.*`` follows the released X-CLIP checkpoints key for key
(``visual.transformer.resblocks.j.message_fc.weight``, ...); the MIT and the prompt generator
sit under ``head.`` (``head.mit.*``, ``head.prompts_*``, ``head.logit_scale``). The frozen CLIP is
not saved: it belongs to the CLIP model the module is rebuilt from, and the class text embeddings
are recomputed from the class names.

May import: torch, open_clip, clipreel.errors, clipreel.config, clipreel.heads (layers, registry, cache).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from clipreel.config import POSITIVE, PROBABILITY, SIZE, JsonConfig, ranged
from clipreel.heads.cache.xclip import XCLIPHead, XCLIPHeadConfig
from clipreel.heads.layers import (
    DropPath,
    FrozenCLIP,
    call_block,
    check_clips,
    check_standard_block,
    check_standard_vit,
    drop_path_rates,
    logit_scale_of,
    patch_stem,
    trainable_parameters,
)
from clipreel.heads.registry import MethodEntry, MethodModel, MethodRecipe, register_method

# Parameters whose names contain one of these are X-CLIP's new modules: they train at 10x the
# CLIP learning rate (X-CLIP's utils/optimizer.py; XCLIPConfig.new_module_lr_scale).
NEW_MODULE_KEYWORDS = ("message_", "mit", "prompts")


class CrossFrameBlock(nn.Module):
    """One CLIP vision block with X-CLIP's cross-frame message token.

    Takes over the block's own modules (``ln_1``, ``attn``, ``ls_1``, ``ln_2``, ``mlp``,
    ``ls_2``; not copied) and adds ``message_fc``, ``message_ln`` and ``message_attn`` with
    PyTorch's default init, as X-CLIP (its ``init_weights`` is never called).
    """

    def __init__(self, block: ResidualAttentionBlock, drop_path: float = 0.0):
        super().__init__()
        check_standard_block(block, "X-CLIP")
        width = block.ln_1.normalized_shape[0]
        reference = block.mlp.c_fc.weight
        factory = {"device": reference.device, "dtype": reference.dtype}
        self.message_fc = nn.Linear(width, width, **factory)
        self.message_ln = nn.LayerNorm(width, **factory)
        self.message_attn = nn.MultiheadAttention(width, max(1, width // 64), batch_first=True, **factory)
        self.ln_1 = block.ln_1
        self.attn = block.attn
        self.ls_1 = block.ls_1
        self.ln_2 = block.ln_2
        self.mlp = block.mlp
        self.ls_2 = block.ls_2
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x (B*T, L, D), frames of a video consecutive -> (B*T, L, D)."""
        frames_total, length, width = x.shape
        cls = x[:, 0].reshape(frames_total // num_frames, num_frames, width)  # (B, T, D)
        message = self.message_fc(cls)  # (B, T, D)
        normed = self.message_ln(message)
        message = message + self.drop_path(
            self.message_attn(normed, normed, normed, need_weights=False)[0]
        )  # (B, T, D): each frame's message has read the other frames'
        x = torch.cat([x, message.reshape(frames_total, 1, width)], dim=1)  # (B*T, L+1, D)
        normed = self.ln_1(x)
        x = x + self.drop_path(self.ls_1(self.attn(normed, normed, normed, need_weights=False)[0]))
        x = x[:, :length]  # (B*T, L, D): the message token is dropped
        return x + self.drop_path(self.ls_2(self.mlp(self.ln_2(x))))


class CrossFrameTransformer(nn.Module):
    """The stack of CrossFrameBlocks (named ``transformer.resblocks`` as in X-CLIP checkpoints)."""

    def __init__(self, blocks: Sequence[ResidualAttentionBlock], drop_path_rate: float, gradient_checkpointing: bool):
        super().__init__()
        rates = drop_path_rates(drop_path_rate, len(blocks))
        self.resblocks = nn.ModuleList([CrossFrameBlock(block, rate) for block, rate in zip(blocks, rates)])
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x (B*T, L, D) -> (B*T, L, D)."""
        for block in self.resblocks:
            x = call_block(block, x, num_frames, checkpointed=self.gradient_checkpointing)
        return x


class XCLIPVideoEncoder(nn.Module):
    """CLIP's image tower with cross-frame communication: frames (B, T, 3, S, S) -> per-frame outputs.

    Built from a deep copy of an open_clip ``VisionTransformer`` (the CLIP model passed in is
    left untouched and frozen), with every block wrapped as a CrossFrameBlock.
    ``forward`` returns the projected per-frame embeddings ``ln_post(CLS) @ proj`` (B, T, E) and
    the last block's patch tokens without ``ln_post`` (B, T, L-1, D), as X-CLIP's prompt
    generator reads them.
    """

    def __init__(self, visual: nn.Module, drop_path_rate: float = 0.0, gradient_checkpointing: bool = False):
        super().__init__()
        check_standard_vit(visual, "X-CLIP")
        visual = copy.deepcopy(visual)
        self.image_size = tuple(visual.image_size)  # (H, W)
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding  # (D,)
        self.positional_embedding = visual.positional_embedding  # (L, D)
        self.ln_pre = visual.ln_pre
        self.transformer = CrossFrameTransformer(
            list(visual.transformer.resblocks), drop_path_rate, gradient_checkpointing
        )
        self.ln_post = visual.ln_post
        self.proj = visual.proj  # (D, E)

    @property
    def width(self) -> int:
        return self.class_embedding.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.proj.shape[1]

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, T, 3, H, W), normalised -> (frame_embeds (B, T, E), patch_tokens (B, T, L-1, D))."""
        batch, num_frames = frames.shape[:2]
        images = frames.flatten(0, 1).to(self.conv1.weight.dtype)  # (B*T, 3, H, W)
        x = self.ln_pre(patch_stem(self, images))  # (B*T, L, D)
        x = self.transformer(x, num_frames)  # (B*T, L, D)
        frame_embeds = self.ln_post(x[:, 0]) @ self.proj  # (B*T, E)
        patch_tokens = x[:, 1:]  # (B*T, L-1, D)
        return (
            frame_embeds.reshape(batch, num_frames, -1),  # (B, T, E)
            patch_tokens.reshape(batch, num_frames, *patch_tokens.shape[1:]),  # (B, T, L-1, D)
        )


# ---------------------------------------------------------------------------------------------
# The full model
# ---------------------------------------------------------------------------------------------


@dataclass
class XCLIPConfig(JsonConfig):
    """Everything besides the CLIP model and the class names needed to rebuild a full X-CLIP (the
    defaults of X-CLIP's `models/xclip.py: load`). The widths come from the CLIP model."""

    frames: int  # T, fixed by the MIT positional embedding
    mit_layers: int = ranged(1, SIZE)
    mit_heads: int | None = ranged(None, SIZE)  # None = E // 64
    prompt_layers: int = ranged(2, SIZE)
    prompt_heads: int | None = ranged(None, SIZE)  # None = E // 64
    prompt_alpha: float = 0.1
    drop_path_rate: float = ranged(0.0, PROBABILITY)  # X-CLIP's MODEL.DROP_PATH_RATE (default 0)
    gradient_checkpointing: bool = False  # trade compute for memory (X-CLIP: L/14-336)
    # learning rate of the new modules / that of the CLIP weights (X-CLIP: 10)
    new_module_lr_scale: float = ranged(10.0, POSITIVE)


class XCLIP(MethodModel):
    """X-CLIP on raw frames: ``forward(frames (B, T, 3, S, S))`` -> logits against the class names.

    Trainable: the whole vision tower (CLIP weights fine-tuned, plus the message modules), the
    MIT and the prompt generator. Frozen: the CLIP the head holds (its text tower encodes the
    class names; not copied, not saved) and ``logit_scale``. ``set_classnames`` switches the
    classes (zero-shot, base-to-novel) without touching the trained weights. It trains with
    cross-entropy on the class logits (X-CLIP's `main.py`: `MethodModel`'s loss).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        classnames: Sequence[str],
        config: XCLIPConfig,
    ):
        super().__init__()
        self.config = config
        self.visual = XCLIPVideoEncoder(clip_model.visual, config.drop_path_rate, config.gradient_checkpointing)
        self.visual.requires_grad_(True)
        reference = self.visual.proj
        head_config = XCLIPHeadConfig(
            embed_dim=self.visual.embed_dim,
            visual_width=self.visual.width,
            frames=config.frames,
            mit_layers=config.mit_layers,
            mit_heads=config.mit_heads,
            prompt_layers=config.prompt_layers,
            prompt_heads=config.prompt_heads,
            prompt_alpha=config.prompt_alpha,
        )
        self.head = XCLIPHead(head_config, FrozenCLIP(clip_model, tokenizer), classnames).to(
            device=reference.device, dtype=reference.dtype)
        # The CLIP model's temperature, frozen (a buffer of the head, saved with it). Copied as a
        # tensor rather than through XCLIPHeadConfig.logit_scale so a meta-device model builds too.
        with torch.no_grad():
            self.head.logit_scale.copy_(logit_scale_of(clip_model))

    @property
    def classnames(self) -> list[str]:
        return self.head.classnames

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify among these classes: their text embeddings (not saved; recomputed on load)."""
        self.head.set_classnames(classnames)

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames (B, T, 3, S, S), normalised (ImageNet mean/std for X-CLIP) ->
        ``logits`` (B, K), ``frame_embeds`` (B, T, E), ``video_embeds`` (B, E) from the MIT."""
        check_clips(frames, self.visual.image_size[0], "X-CLIP", self.config.frames)
        frame_embeds, patch_tokens = self.visual(frames)  # (B, T, E), (B, T, L-1, D)
        logits, video_embeds = self.head.score(frame_embeds, patch_tokens)  # (B, K), (B, E)
        return {"logits": logits, "frame_embeds": frame_embeds, "video_embeds": video_embeds}

    def parameter_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups, as X-CLIP's `utils/optimizer.py`: the CLIP weights at ``lr``, the new
        modules (names with ``message_``, ``mit`` or ``prompts``) at ``new_module_lr_scale`` (10) x
        ``lr``. X-CLIP's no-decay rule (1-D parameters, biases, positional embeddings) is the
        recipe's (`MethodRecipe.decay_everything`), applied by the trainer."""
        clip_weights, new_modules = [], []
        for name, param in trainable_parameters(self).items():
            (new_modules if any(keyword in name for keyword in NEW_MODULE_KEYWORDS) else clip_weights).append(param)
        return [
            {"name": "clip", "params": clip_weights, "lr": lr, "weight_decay": weight_decay},
            {"name": "new", "params": new_modules, "lr": lr * self.config.new_module_lr_scale,
             "weight_decay": weight_decay},
        ]


register_method(MethodEntry(
    name="xclip",
    summary="X-CLIP: cross-frame message tokens, MIT and video-specific prompts",
    config_class=XCLIPConfig,
    model_class=XCLIP,
    # X-CLIP's configs: AdamW 8e-6 for the CLIP weights (8e-5 for the new modules), betas (0.9, 0.98),
    # weight decay 0.001 except on 1-D parameters, biases and positional embeddings, 5 warmup epochs
    # (1 here: short runs); ImageNet mean/std.
    recipe=MethodRecipe(lr=8e-6, weight_decay=0.001, warmup_epochs=1, betas=(0.9, 0.98), decay_everything=False,
                        norm="imagenet"),
))
