"""Feature taps of a frozen open_clip ViT, and EVL's cross-frame attention maps.

`Backbone` runs a standard open_clip ViT on normalised frames and returns, per frame, the tokens
(CLS first, then the patches row-major) of a few residual blocks plus the projected embedding,
through open_clip's `forward_intermediates`: no `forward()` is edited.

Which blocks are tapped: the FEATURE blocks a head reads (`--layers`, default the last four), and
also the block just before each of them. EVL's temporal cross-attention needs each feature block's
attention q/k; they are recomputed from the INPUT of each feature block (= the output of the
block before it; block -1 is the output of ln_pre) with that block's frozen `ln_1` and the q/k
rows of `in_proj`, and turned into the head-averaged adjacent-frame attention maps the store
keeps (`cross_frame_attention_from_inputs`).

May import: torch, open_clip, clipreel.errors, clipreel.config, clipreel.devices, clipreel.heads (clip, layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from clipreel.config import DEFAULT_MODEL
from clipreel.devices import resolve_device
from clipreel.errors import ClipreelError
from clipreel.heads.clip import (
    NORMS,
    load_clip,
    register_model_config,
    resolve_model_name,
    user_model_config,
)
from clipreel.heads.layers import check_standard_block, check_standard_vit

TOKEN_LAYOUT = "cls+patches, row-major, outputs of the feature blocks"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # name -> autocast dtype


@dataclass
class BackboneConfig:
    """Which model, which weights, which blocks to tap, and where and how to run it."""

    model: str = DEFAULT_MODEL  # an open_clip model name or config file (NAME.json)
    pretrained: str = "openai"  # an open_clip tag, a local checkpoint file, or "none" (random init)
    layers: str = "4"  # "4" = the last four blocks; "3,7,11" or "-1,-2" = explicit block indices
    norm: str | None = None  # "clip" | "imagenet"; None = the model's own statistics
    device: str = "cpu"
    precision: str = "auto"  # auto = fp32 on CPU, bf16 autocast on CUDA; or "fp32", "bf16", "fp16"
    # The open_clip config of a model that came from a JSON file, registered as `model` first:
    # a Backbone fills it in its own config, so that a copy built elsewhere needs no file.
    model_config: dict | None = None
    trust_checkpoint_code: bool = False  # let a non-OpenAI TorchScript checkpoint run its code


def parse_layers(spec: str, num_blocks: int) -> tuple[int, ...]:
    """`--layers` -> sorted absolute block indices.

    A single non-negative number N means the last N blocks ("4" -> 8..11 of 12). A comma list
    means block indices, negative ones counted from the end ("3,7,11", "-1,-2"; one block: "7,").
    A single negative number is one index ("-1" = the last block).
    """
    text = str(spec).strip()
    hint = (
        f"use N for the last N blocks, or block indices such as '3,7,11' or '-1,-2' "
        f"(one block: '7,'); this model has {num_blocks} blocks, 0..{num_blocks - 1}"
    )
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]  # the trailing comma of a one-block list
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        raise ClipreelError(f"--layers {spec!r} is not a number or a list of numbers: {hint}") from None

    if "," not in text and numbers[0] >= 0:
        count = numbers[0]
        if not 1 <= count <= num_blocks:
            raise ClipreelError(f"--layers {spec!r}: cannot take the last {count} blocks: {hint}")
        return tuple(range(num_blocks - count, num_blocks))

    blocks = []
    for number in numbers:
        if not -num_blocks <= number < num_blocks:
            raise ClipreelError(f"--layers {spec!r}: block {number} does not exist: {hint}")
        blocks.append(number % num_blocks)
    if len(set(blocks)) != len(blocks):
        raise ClipreelError(f"--layers {spec!r} names the same block twice: {hint}")
    return tuple(sorted(blocks))


def tapped_blocks(feature_blocks) -> tuple[int, ...]:
    """The blocks whose outputs the backbone taps: each feature block and the one before it.

    The output of block b-1 is the input of feature block b, from which its attention q/k (and so
    EVL's cross-frame attention maps) are computed.

    Block -1 stands for the input of block 0 (the output of ln_pre).
    """
    return tuple(sorted(set(feature_blocks) | {block - 1 for block in feature_blocks}))


class ClipFeatures(NamedTuple):
    """One batch of clips as the feature store keeps it (see Backbone.forward_clips)."""

    tokens: torch.Tensor  # (B, T, K, L, D)
    embeds: torch.Tensor  # (B, T, E)
    attention: torch.Tensor | None  # (B, 2, T-1, K, P, P)


class Backbone:
    """A frozen open_clip ViT: tapped block tokens, frame embeddings, EVL's cross-frame attention.

    `forward` works on frames and returns the tokens of the tapped blocks (the feature blocks and
    their inputs); `forward_clips` works on clips and returns what the feature store keeps.

    Read-only facts: model_name, image_size (S), patch_size, num_blocks, width (D), num_heads,
    tokens (L, incl. CLS), embed_dim (E), feature_blocks, tapped_blocks, mean, std, device,
    autocast_dtype (None = plain fp32), checkpoint_sha256, config (as given, with `model` resolved
    to its open_clip name and `model_config` filled in).
    """

    def __init__(self, cfg: BackboneConfig):
        self.device = resolve_device(cfg.device)
        self.autocast_dtype = _resolve_autocast_dtype(cfg.precision, self.device)
        if cfg.model_config is not None:
            register_model_config(cfg.model, cfg.model_config)
        self.model_name = resolve_model_name(cfg.model)
        self.config = replace(cfg, model=self.model_name, model_config=user_model_config(self.model_name))
        self.clip, self.checkpoint_sha256 = load_clip(
            self.model_name, cfg.pretrained, self.device, trust_code=cfg.trust_checkpoint_code
        )
        self.visual = self.clip.visual
        check_standard_vit(self.visual, f"--model {self.model_name}", pooled_by_cls=False)

        blocks = self.visual.transformer.resblocks
        height, width = self.visual.image_size
        if height != width:
            raise ClipreelError(f"--model {self.model_name}: non-square input {height}x{width} is not supported.")
        grid_height, grid_width = self.visual.grid_size
        self.image_size = int(height)
        self.patch_size = int(self.visual.patch_size[0])
        self.num_blocks = len(blocks)
        self.width = int(self.visual.transformer.width)
        self.num_heads = int(blocks[0].attn.num_heads)
        self.tokens = grid_height * grid_width + 1
        self.embed_dim = int(self.visual.output_dim)
        self.quick_gelu = isinstance(blocks[0].mlp.gelu, QuickGELU)
        self.feature_blocks = parse_layers(cfg.layers, self.num_blocks)
        self.tapped_blocks = tapped_blocks(self.feature_blocks)
        self.mean, self.std = _resolve_norm(cfg.norm, self.clip)
        self._qk_weights: dict[str, torch.Tensor] | None = None  # on self.device, for forward_clips

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised frames (F, 3, S, S) -> tokens (F, K_s, L, D) and embeddings (F, E), float32.

        tokens[:, k] belongs to tapped_blocks[k]; each frame's tokens are CLS first, then the
        patches row-major. The embeddings are ln_post + proj of CLS, not L2-normalised. Both are
        returned on `self.device`.
        """
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected frames (F, 3, {self.image_size}, {self.image_size}), got {tuple(frames.shape)}"
            )
        frames = frames.to(self.device, dtype=torch.float32, non_blocking=True)
        block_outputs = [block for block in self.tapped_blocks if block >= 0]
        block_zero_inputs = []  # filled by the hook: [(F, L, D)]
        hook = None
        if -1 in self.tapped_blocks:
            hook = self.visual.transformer.resblocks[0].register_forward_pre_hook(
                lambda module, args: block_zero_inputs.append(args[0])
            )
        try:
            with torch.no_grad(), self._autocast():
                out = self.visual.forward_intermediates(
                    frames, indices=block_outputs, output_fmt="NLC", output_extra_tokens=True
                )
        finally:
            if hook is not None:
                hook.remove()
        # forward_intermediates splits each block output into the CLS token (F, 1, D) and the
        # patches (F, L-1, D), in block order.
        outputs = [
            torch.cat([cls, patches], dim=1)  # (F, L, D)
            for cls, patches in zip(out["image_intermediates_prefix"], out["image_intermediates"])
        ]
        tokens = torch.stack(block_zero_inputs + outputs, dim=1).float()  # (F, K_s, L, D)
        embeds = out["image_features"].float()  # (F, E)
        return tokens, embeds

    def forward_clips(self, clips: torch.Tensor) -> ClipFeatures:
        """Normalised clips (B, T, 3, S, S) -> what the feature store keeps for them.

        tokens (B, T, K, L, D): outputs of the feature blocks; embeds (B, T, E); attention
        (B, 2, T-1, K, P, P): EVL's head-averaged cross-frame attention maps of each feature block,
        computed from its input tokens with its frozen ln_1 + q/k projection (None when T == 1).
        All float32 on `self.device`.
        """
        batch, frames = clips.shape[:2]
        tapped, embeds = self.forward(clips.flatten(0, 1))  # (B*T, K_t, L, D), (B*T, E)
        tapped = tapped.unflatten(0, (batch, frames))  # (B, T, K_t, L, D)
        outputs = [self.tapped_blocks.index(block) for block in self.feature_blocks]
        attention = None
        if frames >= 2:
            if self._qk_weights is None:
                self._qk_weights = {name: torch.as_tensor(value, device=self.device)
                                    for name, value in self.qk_weights().items()}
            inputs = [self.tapped_blocks.index(block - 1) for block in self.feature_blocks]
            attention = cross_frame_attention_from_inputs(tapped[:, :, inputs], self._qk_weights)
        return ClipFeatures(tapped[:, :, outputs], embeds.unflatten(0, (batch, frames)), attention)

    def qk_weights(self) -> dict[str, np.ndarray]:
        """What recomputes each FEATURE block's attention q/k from its stored input, as float32.

        For feature block k with input tokens x (L, D) (= the stored tokens of block b-1):
            h = layer_norm(x, ln_weight[k], ln_bias[k], eps=ln_eps)
            q, k = split(h @ in_proj_weight[k].T + in_proj_bias[k], D)   # (L, D) each
        then view q, k as (L, num_heads, D/num_heads); the attention logits are q.k / sqrt(D/H)
        (q and k here are before that scaling).
        """
        blocks = [self.visual.transformer.resblocks[block] for block in self.feature_blocks]
        rows = 2 * self.width  # the q rows, then the k rows, of the packed q/k/v projection

        def stacked(tensors) -> np.ndarray:
            return torch.stack([tensor.detach().float().cpu() for tensor in tensors]).numpy()

        return {
            "ln_weight": stacked(block.ln_1.weight for block in blocks),  # (K, D)
            "ln_bias": stacked(block.ln_1.bias for block in blocks),  # (K, D)
            "in_proj_weight": stacked(block.attn.in_proj_weight[:rows] for block in blocks),  # (K, 2D, D)
            "in_proj_bias": stacked(block.attn.in_proj_bias[:rows] for block in blocks),  # (K, 2D)
            "ln_eps": np.array(blocks[0].ln_1.eps, dtype=np.float32),
            "num_heads": np.array(self.num_heads, dtype=np.int64),
        }

    def provenance(self) -> dict:
        """Everything that decides what the stored numbers mean, JSON-ready (lists, not tuples)."""
        pretrained = self.config.pretrained
        if Path(pretrained).expanduser().is_file():
            pretrained = Path(pretrained).name
        # A model from a config file is recorded with its config, which rebuilds it elsewhere.
        model_config = {"model_config": self.config.model_config} if self.config.model_config is not None else {}
        return {
            "model": self.model_name,
            **model_config,
            "pretrained": pretrained,
            "checkpoint_sha256": self.checkpoint_sha256,
            "activation": "quick_gelu" if self.quick_gelu else "gelu",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "width": self.width,
            "num_heads": self.num_heads,
            "tokens": self.tokens,
            "embed_dim": self.embed_dim,
            "num_blocks": self.num_blocks,
            "feature_blocks": list(self.feature_blocks),
            "norm": self.config.norm,
            "mean": list(self.mean),
            "std": list(self.std),
            "token_layout": TOKEN_LAYOUT,
            "precision": self.config.precision,
        }

    def _autocast(self):
        """Mixed precision around the forward when asked for (weights stay fp32)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)




def _resolve_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """auto = fp32 on CPU (bf16 is several times slower there), bf16 on CUDA (fp16 where bf16 is missing)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ClipreelError(f"precision {precision!r}: choose auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def _resolve_norm(norm: str | None, model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a named normalisation, or the model's own (CLIP statistics for CLIP weights)."""
    if norm is None:
        preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
        return tuple(map(float, preprocess_cfg["mean"])), tuple(map(float, preprocess_cfg["std"]))
    if norm not in NORMS:
        raise ClipreelError(f"norm {norm!r} is unknown: choose one of {', '.join(NORMS)}")
    mean, std = NORMS[norm]
    return tuple(mean), tuple(std)


# --------------------------------------------------------------------------- cross-frame attention maps
# These run once per video at extraction (or on a live backbone), never inside the trained head.

QK_WEIGHT_NAMES = ("ln_weight", "ln_bias", "in_proj_weight", "in_proj_bias", "ln_eps", "num_heads")


def qk_weights_from_open_clip_blocks(blocks: Sequence[nn.Module]) -> dict:
    """The frozen q/k weights of open_clip `ResidualAttentionBlock`s, in the dict the functions
    below take: ln_weight (K, D), ln_bias (K, D), in_proj_weight (K, 2D, D) (the q rows, then
    the k rows, of PyTorch's fused in_proj), in_proj_bias (K, 2D), ln_eps, num_heads.

    `blocks` are the tapped feature blocks in block order (shallow -> deep).
    """
    for block in blocks:
        check_standard_block(block, "EVL's cross-frame attention")
    width = blocks[0].attn.embed_dim
    return {
        "ln_weight": torch.stack([b.ln_1.weight.detach().float() for b in blocks]),  # (K, D)
        "ln_bias": torch.stack([b.ln_1.bias.detach().float() for b in blocks]),  # (K, D)
        "in_proj_weight": torch.stack(
            [b.attn.in_proj_weight.detach()[: 2 * width].float() for b in blocks]
        ),  # (K, 2D, D)
        "in_proj_bias": torch.stack(
            [b.attn.in_proj_bias.detach()[: 2 * width].float() for b in blocks]
        ),  # (K, 2D)
        "ln_eps": float(blocks[0].ln_1.eps),
        "num_heads": int(blocks[0].attn.num_heads),
    }


def _checked_qk_weights(qk_weights: Mapping, layers: int, width: int, device: torch.device) -> dict:
    """The q/k weights as float32 tensors on `device` (numpy or torch in), shapes checked."""
    missing = [name for name in QK_WEIGHT_NAMES if name not in qk_weights]
    if missing:
        raise ClipreelError(
            f"qk_weights lacks {missing}; see qk_weights_from_open_clip_blocks for the expected dict."
        )
    expected = {
        "ln_weight": (layers, width),
        "ln_bias": (layers, width),
        "in_proj_weight": (layers, 2 * width, width),
        "in_proj_bias": (layers, 2 * width),
    }
    checked = {}
    for name, shape in expected.items():
        values = torch.as_tensor(qk_weights[name], dtype=torch.float32, device=device)
        if tuple(values.shape) != shape:
            raise ClipreelError(
                f"qk_weights['{name}'] has shape {tuple(values.shape)}, expected {shape} for "
                f"block inputs with K={layers} blocks of width D={width}: pass the q/k weights of "
                "exactly the tapped feature blocks of the backbone that produced the inputs."
            )
        checked[name] = values
    num_heads = int(qk_weights["num_heads"])
    if num_heads <= 0 or width % num_heads != 0:
        raise ClipreelError(f"qk_weights num_heads={num_heads} does not divide the width {width}.")
    checked["num_heads"] = num_heads
    checked["ln_eps"] = float(qk_weights["ln_eps"])
    return checked


def _block_patch_qk(block_inputs: torch.Tensor, weights: dict, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tapped block `block`'s q, k for the patch tokens: block_inputs (B, T, L, D) ->
    q, k each (B, T, H, P, Dh), before the 1/sqrt(Dh) scaling."""
    batch, frames, _, width = block_inputs.shape
    heads = weights["num_heads"]
    patches = block_inputs[:, :, 1:].float()  # (B, T, P, D): the CLS query/key is never used
    normed = F.layer_norm(
        patches, (width,), weights["ln_weight"][block], weights["ln_bias"][block], weights["ln_eps"]
    )
    qk = F.linear(normed, weights["in_proj_weight"][block], weights["in_proj_bias"][block])  # (B, T, P, 2D)
    qk = qk.view(batch, frames, -1, 2, heads, width // heads)  # (B, T, P, 2, H, Dh)
    q, k = qk.permute(3, 0, 1, 4, 2, 5).unbind(0)  # (B, T, H, P, Dh) each
    return q, k


def _block_adjacent_frame_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q, k (B, T, H, P, Dh) of one block -> (B, 2, T-1, P, P): backward maps, then forward maps."""
    q = q.float() * q.shape[-1] ** -0.5  # scale the smaller tensor, not the (P, P) scores
    keys = k.float().transpose(-1, -2).contiguous()  # (B, T, H, Dh, P): one copy serves both maps
    backward = (q[:, 1:] @ keys[:, :-1]).softmax(dim=-1).mean(dim=2)  # (B, T-1, P, P)
    forward = (q[:, :-1] @ keys[:, 1:]).softmax(dim=-1).mean(dim=2)  # (B, T-1, P, P)
    return torch.stack([backward, forward], dim=1)


@torch.no_grad()
def qk_from_block_inputs(block_inputs: torch.Tensor, qk_weights: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """The tapped blocks' attention q, k for the PATCH tokens, recomputed from the blocks' inputs.

    block_inputs (B, T, K, L, D) (any float dtype); qk_weights as `qk_weights_from_open_clip_blocks`
    returns (numpy or torch values). Returns q, k, each (B, T, K, H, P, Dh) float32, before the
    1/sqrt(Dh) scaling: exactly what the blocks' own attention computes from ln_1(input).
    """
    layers, width = block_inputs.shape[2], block_inputs.shape[-1]
    weights = _checked_qk_weights(qk_weights, layers, width, block_inputs.device)
    per_block = [_block_patch_qk(block_inputs[:, :, i], weights, i) for i in range(layers)]
    q = torch.stack([q_i for q_i, _ in per_block], dim=2)  # (B, T, K, H, P, Dh)
    k = torch.stack([k_i for _, k_i in per_block], dim=2)
    return q, k


@torch.no_grad()
def adjacent_frame_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q, k (B, T, K, H, P, Dh) patch tokens -> attention (B, 2, T-1, K, P, P) float32.

    attention[:, 0, t-1] = softmax over frame t-1's keys of frame t's queries (t = 1..T-1) and
    attention[:, 1, t] = the same against frame t+1 (t = 0..T-2), each averaged over heads.
    Computed one block at a time to bound the (B, T-1, H, P, P) scores.
    """
    per_block = [_block_adjacent_frame_attention(q[:, :, i], k[:, :, i]) for i in range(q.shape[2])]
    return torch.stack(per_block, dim=3)  # (B, 2, T-1, K, P, P)


@torch.no_grad()
def cross_frame_attention_from_inputs(block_inputs: torch.Tensor, qk_weights: Mapping) -> torch.Tensor:
    """block_inputs (B, T, K, L, D) -> attention (B, 2, T-1, K, P, P) float32 (what the store keeps).

    `adjacent_frame_attention(*qk_from_block_inputs(...))`, one block at a time so that only one
    block's q/k and scores are alive at once.
    """
    batch, frames, layers, tokens, width = block_inputs.shape
    weights = _checked_qk_weights(qk_weights, layers, width, block_inputs.device)
    patches = tokens - 1
    attention = torch.empty(batch, 2, frames - 1, layers, patches, patches, device=block_inputs.device)
    for i in range(layers):
        q, k = _block_patch_qk(block_inputs[:, :, i], weights, i)  # (B, T, H, P, Dh) each
        attention[:, :, :, i] = _block_adjacent_frame_attention(q, k)
    return attention
