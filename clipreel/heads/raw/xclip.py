"""Full X-CLIP on raw frames: the cross-frame communication vision tower (CCT) + MIT + prompts.

X-CLIP (Ni et al., ECCV 2022) fine-tunes CLIP's whole image tower and inserts, in every vision
block, a **message token** per frame (METHODS.md 2.2):

1. each frame's CLS token goes through ``message_fc`` (Linear D->D): one message per frame;
2. the T messages of a video attend to each other (``message_ln`` + ``message_attn``, residual);
3. each frame appends its message as token L+1 and runs the block's usual self-attention, so its
   patches can read what the other frames carry;
4. the message token is dropped and the block's MLP runs on the L original tokens.

On top of the per-frame embeddings sit the pieces the cache head already has
(``clipreel.heads.cache.xclip``): the Multi-frame Integration Transformer (video embedding) and the
video-specific prompt generator (class texts shifted by the video's patch tokens). Class texts
are ``encode_text`` of the bare class names (template "{}"), computed once by the frozen text
tower. The text tower and ``logit_scale`` stay frozen; everything else trains, the new modules
at 10x the learning rate (``XCLIP.parameter_groups``, METHODS.md 2.7).

State dict layout: ``visual.*`` follows the released X-CLIP checkpoints key for key
(``visual.transformer.resblocks.j.message_fc.weight``, ...); the MIT and the prompt generator
sit under ``head.`` (``head.mit.*``, ``head.prompts_*``, ``head.logit_scale``). The frozen text
tower is not saved: it belongs to the CLIP model the module is rebuilt from, and the class text
embeddings are recomputed from the class names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from open_clip.transformer import (
    ResidualAttentionBlock,
    VisionTransformer,
    text_global_pool,
)
from torch import nn

from clipreel.config import JsonConfig
from clipreel.errors import ClipreelError
from clipreel.heads.cache.text_prompt import FrozenTextEncoder
from clipreel.heads.cache.xclip import (
    XCLIPHead,
    XCLIPHeadConfig,
    cosine_logits,
    exempt_from_weight_decay,
)
from clipreel.heads.cache.zeroshot import readable_classname
from clipreel.heads.layers import call_block

# Parameters whose names contain one of these are X-CLIP's new modules: they train at 10x the
# CLIP learning rate (X-CLIP's utils/optimizer.py; XCLIPConfig.new_module_lr_scale).
NEW_MODULE_KEYWORDS = ("message_", "mit", "prompts")


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of samples.

    Kept samples are scaled by 1 / (1 - rate) so the expected output is unchanged.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask_shape = (x.shape[0],) + (1,) * (x.dim() - 1)  # one draw per sample
        mask = x.new_empty(mask_shape).bernoulli_(keep)
        return x * mask / keep


class CrossFrameBlock(nn.Module):
    """One CLIP vision block with X-CLIP's cross-frame message token.

    Takes over the block's own modules (``ln_1``, ``attn``, ``ls_1``, ``ln_2``, ``mlp``,
    ``ls_2``; not copied) and adds ``message_fc``, ``message_ln`` and ``message_attn`` with
    PyTorch's default init, as X-CLIP (its ``init_weights`` is never called).
    """

    def __init__(self, block: ResidualAttentionBlock, drop_path: float = 0.0):
        super().__init__()
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
            raise ClipreelError(
                f"X-CLIP wraps open_clip ResidualAttentionBlocks with nn.MultiheadAttention; got a "
                f"{type(block).__name__}. Use a standard open_clip ViT (e.g. ViT-B-16)."
            )
        if not block.attn.batch_first:
            raise ClipreelError("X-CLIP needs a batch-first open_clip vision transformer (open_clip >= 2.23).")
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
        # Linear drop-path schedule from 0 at the first block to drop_path_rate at the last.
        rates = torch.linspace(0, drop_path_rate, len(blocks)).tolist()
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
        _check_vision_tower(visual)
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

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) -> stem tokens (N, L, D): CLS + patches, positions added, ln_pre."""
        x = self.conv1(images)  # (N, D, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (N, grid*grid, D), patches row-major
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, L, D)
        return self.ln_pre(x)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, T, 3, H, W), normalised -> (frame_embeds (B, T, E), patch_tokens (B, T, L-1, D))."""
        if frames.dim() != 5 or tuple(frames.shape[-3:]) != (3, *self.image_size):
            raise ClipreelError(
                f"X-CLIP expects frames shaped (B, T, 3, {self.image_size[0]}, {self.image_size[1]}); "
                f"got {tuple(frames.shape)}. Resize/crop the frames to the model's image size."
            )
        batch, num_frames = frames.shape[:2]
        images = frames.flatten(0, 1).to(self.conv1.weight.dtype)  # (B*T, 3, H, W)
        x = self._tokens(images)  # (B*T, L, D)
        x = self.transformer(x, num_frames)  # (B*T, L, D)
        frame_embeds = self.ln_post(x[:, 0]) @ self.proj  # (B*T, E)
        patch_tokens = x[:, 1:]  # (B*T, L-1, D)
        return (
            frame_embeds.reshape(batch, num_frames, -1),  # (B, T, E)
            patch_tokens.reshape(batch, num_frames, *patch_tokens.shape[1:]),  # (B, T, L-1, D)
        )


def _check_vision_tower(visual: nn.Module) -> None:
    """Refuse image towers the cross-frame blocks cannot be built from."""
    why = None
    if not isinstance(visual, VisionTransformer):
        why = f"its image tower is a {type(visual).__name__}, not an open_clip VisionTransformer"
    elif visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        why = "it does not pool by its class token (X-CLIP's messages come from the CLS token)"
    elif visual.proj is None:
        why = "its image tower has no output projection"
    if why is not None:
        raise ClipreelError(f"X-CLIP cannot be built on this model: {why}. Use a standard open_clip ViT (e.g. ViT-B-16).")


# ---------------------------------------------------------------------------------------------
# The full model
# ---------------------------------------------------------------------------------------------


@dataclass
class XCLIPConfig(JsonConfig):
    """Everything besides the CLIP model and the class names needed to rebuild a full X-CLIP
    (METHODS.md 2.1 defaults). The widths come from the CLIP model."""

    frames: int  # T, fixed by the MIT positional embedding
    mit_layers: int = 1
    mit_heads: int | None = None  # None = E // 64
    prompt_layers: int = 2
    prompt_heads: int | None = None  # None = E // 64
    prompt_alpha: float = 0.1
    drop_path_rate: float = 0.0  # X-CLIP's MODEL.DROP_PATH_RATE (default 0)
    gradient_checkpointing: bool = False  # trade compute for memory (X-CLIP: L/14-336)
    new_module_lr_scale: float = 10.0  # learning rate of the new modules / that of the CLIP weights (X-CLIP: 10)


class XCLIP(nn.Module):
    """X-CLIP on raw frames: ``forward(frames (B, T, 3, S, S))`` -> logits against the class names.

    Trainable: the whole vision tower (CLIP weights fine-tuned, plus the message modules), the
    MIT and the prompt generator. Frozen: the text tower (shared with ``clip_model``, not
    copied, not saved) and ``logit_scale``. ``set_classnames`` switches the classes (zero-shot,
    base-to-novel) without touching the trained weights.
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
        self.tokenizer = tokenizer
        self.visual = XCLIPVideoEncoder(clip_model.visual, config.drop_path_rate, config.gradient_checkpointing)
        self.visual.requires_grad_(True)
        reference = self.visual.proj
        self.head = XCLIPHead(
            XCLIPHeadConfig(
                embed_dim=self.visual.embed_dim,
                visual_width=self.visual.width,
                frames=config.frames,
                mit_layers=config.mit_layers,
                mit_heads=config.mit_heads,
                prompt_layers=config.prompt_layers,
                prompt_heads=config.prompt_heads,
                prompt_alpha=config.prompt_alpha,
            )
        ).to(device=reference.device, dtype=reference.dtype)
        # The CLIP model's temperature, frozen (a buffer of the head, saved with it). Copied as a
        # tensor rather than through XCLIPHeadConfig.logit_scale so a meta-device model builds too.
        with torch.no_grad():
            self.head.logit_scale.copy_(clip_model.logit_scale.detach().reshape(()))
        self.text_encoder = FrozenTextEncoder(clip_model)
        self.set_classnames(classnames)

    # -- classes -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_class_names(self, classnames: Sequence[str]) -> torch.Tensor:
        """``encode_text`` of the bare class names (X-CLIP's template "{}") -> (K, E), not normalised."""
        encoder = self.text_encoder
        texts = [readable_classname(name) for name in classnames]
        token_ids = self.tokenizer(texts).to(encoder.token_embedding.weight.device)  # (K, C)
        x = encoder.token_embedding(token_ids) + encoder.positional_embedding  # (K, C, width)
        x = encoder.transformer(x, attn_mask=encoder.attn_mask)  # (K, C, width)
        x = encoder.ln_final(x)
        pooled = text_global_pool(x, token_ids, encoder.pool_type, eos_token_id=encoder.eos_id)  # (K, width)
        return encoder.project(pooled).float()  # (K, E)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify among these classes: cache their text embeddings (not saved; recomputed on load)."""
        if len(classnames) == 0:
            raise ClipreelError("X-CLIP: no class names given; pass the label map's class names.")
        self.classnames = list(classnames)
        embeds = self.encode_class_names(self.classnames).to(self.visual.proj.device)
        self.register_buffer("class_text_embeds", embeds, persistent=False)  # (K, E)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames (B, T, 3, S, S), normalised (ImageNet mean/std for X-CLIP) ->
        ``logits`` (B, K), ``video_embeds`` (B, E) from the MIT, ``frame_embeds`` (B, T, E)."""
        if frames.dim() == 5 and frames.shape[1] != self.config.frames:
            raise ClipreelError(
                f"X-CLIP was built for {self.config.frames} frames per clip (the MIT positional "
                f"embedding fixes T) but got {frames.shape[1]}; sample {self.config.frames} frames."
            )
        frame_embeds, patch_tokens = self.visual(frames)  # (B, T, E), (B, T, L-1, D)
        video_embeds = self.head.mit(frame_embeds)  # (B, E)
        context = self.head.visual_context(patch_tokens)  # (B, L-1, E)
        text = self.class_text_embeds.to(video_embeds.dtype)
        text = text.expand(video_embeds.shape[0], -1, -1)  # (B, K, E)
        text = text + self.head.prompts_generator(text, context)  # (B, K, E): video-specific classes
        logits = cosine_logits(video_embeds, text, self.head.logit_scale)  # (B, K)
        return {"logits": logits, "video_embeds": video_embeds, "frame_embeds": frame_embeds}

    # -- what trains ---------------------------------------------------------------------------

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything that trains: the vision tower, the MIT, the prompts."""
        return [(name, param) for name, param in self.named_parameters() if param.requires_grad]

    def trainable_parameter_count(self) -> int:
        return sum(param.numel() for _, param in self.trainable_named_parameters())

    def parameter_groups(self, lr: float, weight_decay: float = 0.001) -> list[dict]:
        """AdamW parameter groups, as X-CLIP: CLIP weights at ``lr``, the new modules (names with
        ``message_``, ``mit`` or ``prompts``) at ``new_module_lr_scale`` (10) x ``lr``; no weight decay on 1-D parameters,
        biases and positional embeddings. Each group carries a ``name`` for logging."""
        groups: dict[str, dict] = {}
        for name, param in self.trainable_named_parameters():
            is_new = any(keyword in name for keyword in NEW_MODULE_KEYWORDS)
            no_decay = exempt_from_weight_decay(name, param)
            group_name = ("new" if is_new else "clip") + ("_no_decay" if no_decay else "")
            if group_name not in groups:
                groups[group_name] = {
                    "name": group_name,
                    "params": [],
                    "lr": lr * self.config.new_module_lr_scale if is_new else lr,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                }
            groups[group_name]["params"].append(param)
        return list(groups.values())
