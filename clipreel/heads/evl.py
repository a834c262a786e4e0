"""EVL: the temporal decoder of "Frozen CLIP Models are Efficient Video Learners" (ECCV 2022).

This is the reference architecture of OpenGVLab/efficient-video-recognition (`model.py`,
`vision_transformer.py`), rebuilt to train from the feature cache instead of a live backbone:

    features      (B, T, K, L, D)  outputs of the K tapped CLIP blocks, shallow -> deep
    block_inputs  (B, T, K, L, D)  the inputs of those same blocks (the previous block's output)

L = 1 + g*g tokens per frame (CLS first, then the patches row-major on a g x g grid). The
temporal cross-attention needs each tapped block's attention q/k. Storing them would triple the
cache, so `FrozenQK` recomputes them from the block inputs with the block's frozen `ln_1` and the
q/k rows of its `in_proj` (one LayerNorm and one linear map per token).

For each decoder layer i (consuming tapped block i):
    F = features[:, :, i]                              # (B, T, L, D)
    F = F + temporal_conv_i(F)                         # depthwise conv along T, kernel 3
    F = F + temporal_pos_embed_i                       # (T, D), broadcast over tokens
    F = F + cross_attention_i(q_i, k_i)                # frame t <-> t-1 and t+1, patches only
    x = decoder_layer_i(x, F.flatten(T, L))            # one learned query, pre-norm
logits = proj(x)                                       # LayerNorm, Dropout, Linear

Module and parameter names reproduce the official checkpoint keys (METHODS.md 7.1) without the
DDP `module.` prefix, so `load_reference_state_dict` loads a released checkpoint strictly.

State dict layout of a clipreel head: the reference keys (`decoder.*`, `proj.*`) plus the frozen
q/k weights under `qk.*` (`qk.ln_weight`, `qk.ln_bias`, `qk.in_proj_weight`, `qk.in_proj_bias`,
`qk.ln_eps`, `qk.num_heads`). They are buffers, not parameters: never trained, but saved with the
head so that a saved head runs from the cache without the backbone.

Relative-offset sign convention (checked against the reference `TemporalCrossAttention`): the
table row of a (query patch, key patch) pair is
    (q_row - k_row + g - 1) * (2g - 1) + (q_col - k_col + g - 1)
i.e. query minus key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipreel.errors import ClipreelError
from clipreel.heads.config import HeadConfig


@dataclass
class EVLConfig(HeadConfig):
    """Hyper-parameters of the EVL head; the defaults are the reference ViT-B/16, 8-frame model."""

    width: int = 768  # D, the CLIP ViT width (the decoder runs at the same width)
    heads: int = 12  # attention heads of the decoder layers
    layers: int = 4  # decoder layers = number of tapped feature blocks K
    frames: int = 8  # T, baked into temporal_pos_embed
    grid: int = 14  # g, patches per side (224 px / patch 16)
    num_classes: int = 400
    mlp_factor: float = 4.0
    mlp_dropout: float = 0.5
    cls_dropout: float = 0.5
    temporal_conv: bool = True
    temporal_pos_embed: bool = True
    temporal_cross_attention: bool = True

    def __post_init__(self) -> None:
        if self.width % self.heads != 0:
            raise ClipreelError(
                f"EVL config: width {self.width} is not divisible by heads {self.heads}; "
                "choose heads that divide the width (12 for ViT-B, 16 for ViT-L)."
            )

    @property
    def tokens(self) -> int:
        """L, tokens per frame: the CLS token plus g*g patches."""
        return 1 + self.grid * self.grid


def trainable_parameter_count(module: nn.Module) -> int:
    """Number of scalars that an optimizer would update (buffers and frozen parameters excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- frozen q/k


def qk_weights_from_open_clip_blocks(blocks: Sequence[nn.Module]) -> dict:
    """The frozen q/k weights `FrozenQK` needs, taken from open_clip `ResidualAttentionBlock`s.

    `blocks` are the tapped feature blocks in block order (shallow -> deep). Only the q and k rows
    (the first 2D rows of PyTorch's fused `in_proj`) are kept.
    """
    for index, block in enumerate(blocks):
        if not hasattr(block, "ln_1") or not hasattr(getattr(block, "attn", None), "in_proj_weight"):
            raise ClipreelError(
                f"block {index} ({type(block).__name__}) has no `ln_1` + `attn.in_proj_weight`: "
                "EVL needs open_clip's standard ResidualAttentionBlock (a fused-qkv ViT)."
            )
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


class FrozenQK(nn.Module):
    """Recomputes the attention q/k of the K tapped CLIP blocks from their inputs.

    Holds each block's frozen `ln_1` and the q/k rows of its `in_proj` as buffers, so they are
    saved with the head but never trained. `num_heads == 0` marks weights that were never set
    (a head built without `qk_weights`, waiting for `load_state_dict`).
    """

    def __init__(self, layers: int, width: int, qk_weights: Mapping | None = None):
        super().__init__()
        self.layers = layers
        self.width = width
        self.register_buffer("ln_weight", torch.ones(layers, width))
        self.register_buffer("ln_bias", torch.zeros(layers, width))
        self.register_buffer("in_proj_weight", torch.zeros(layers, 2 * width, width))
        self.register_buffer("in_proj_bias", torch.zeros(layers, 2 * width))
        self.register_buffer("ln_eps", torch.tensor(1e-5))
        self.register_buffer("num_heads", torch.tensor(0, dtype=torch.long))
        if qk_weights is not None:
            self.set_weights(qk_weights)

    @property
    def is_set(self) -> bool:
        return int(self.num_heads) > 0

    @torch.no_grad()
    def set_weights(self, qk_weights: Mapping) -> None:
        """Copy in a dict with ln_weight (K, D), ln_bias (K, D), in_proj_weight (K, 2D, D),
        in_proj_bias (K, 2D), ln_eps (float) and num_heads (int)."""
        expected = {
            "ln_weight": (self.layers, self.width),
            "ln_bias": (self.layers, self.width),
            "in_proj_weight": (self.layers, 2 * self.width, self.width),
            "in_proj_bias": (self.layers, 2 * self.width),
        }
        missing = sorted({*expected, "ln_eps", "num_heads"} - set(qk_weights))
        if missing:
            raise ClipreelError(
                f"qk_weights lacks {missing}; see qk_weights_from_open_clip_blocks for the expected dict."
            )
        for name, shape in expected.items():
            got = tuple(qk_weights[name].shape)
            if got != shape:
                raise ClipreelError(
                    f"qk_weights['{name}'] has shape {got}, the head expects {shape} "
                    f"(layers K={self.layers}, width D={self.width}): build the head with the "
                    "config of the store's backbone and tapped blocks."
                )
            getattr(self, name).copy_(qk_weights[name])
        num_heads = int(qk_weights["num_heads"])
        if num_heads <= 0 or self.width % num_heads != 0:
            raise ClipreelError(f"qk_weights num_heads={num_heads} does not divide width {self.width}.")
        self.ln_eps.fill_(float(qk_weights["ln_eps"]))
        self.num_heads.fill_(num_heads)

    @torch.no_grad()
    def forward(self, block_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_inputs (B, T, K, L, D) -> q, k, each (B, T, K, L, H, D/H), before 1/sqrt scaling."""
        if not self.is_set:
            raise ClipreelError(
                "the EVL head's frozen q/k weights were never set: build it with "
                "qk_weights=... (from the store's backbone) or load a saved head's state dict."
            )
        batch, frames, layers, tokens, width = block_inputs.shape
        heads = int(self.num_heads)
        eps = float(self.ln_eps)
        block_inputs = block_inputs.to(self.ln_weight.dtype)
        queries, keys = [], []
        for i in range(layers):
            normed = F.layer_norm(block_inputs[:, :, i], (width,), self.ln_weight[i], self.ln_bias[i], eps)
            qk = F.linear(normed, self.in_proj_weight[i], self.in_proj_bias[i])  # (B, T, L, 2D)
            q, k = qk.chunk(2, dim=-1)  # (B, T, L, D) each
            queries.append(q.reshape(batch, frames, tokens, heads, width // heads))
            keys.append(k.reshape(batch, frames, tokens, heads, width // heads))
        return torch.stack(queries, dim=2), torch.stack(keys, dim=2)  # (B, T, K, L, H, D/H)


# --------------------------------------------------------------------------- temporal modules


def relative_offset_index(grid: int) -> torch.Tensor:
    """(N, N) long, N = grid*grid: the offset-table row of each (query patch, key patch) pair.

    Row = (q_row - k_row + g - 1) * (2g - 1) + (q_col - k_col + g - 1), as the reference.
    """
    patch = torch.arange(grid * grid)
    rows, cols = patch // grid, patch % grid
    row_offset = rows[:, None] - rows[None, :] + grid - 1  # (N, N), in [0, 2g-2]
    col_offset = cols[:, None] - cols[None, :] + grid - 1
    return row_offset * (2 * grid - 1) + col_offset


class TemporalCrossAttention(nn.Module):
    """Patch-to-patch attention between adjacent frames, read out through relative-offset tables.

    For frame t, the head-averaged attention of its patch queries on frame t-1's patch keys
    weights the table `w1` ((2g-1)^2, D) by the 2-D offset of each (query, key) pair; the result
    is added to frame t (t = 1..T-1). `w2` does the same with frame t+1, added to t = 0..T-2.
    The CLS token gets zero.

    Efficiency: instead of gathering the table into an (N, N, D) tensor (118 MB for g=14), each
    attention map row is scattered into its S = (2g-1)^2 offset bins (the offsets of one query
    are all distinct, so this is a copy, not a sum) and the (N, S) bin map is multiplied by the
    (S, D) table. The attention map comes from frozen q/k, so it carries no gradient; the only
    backward work is (S, N) @ (N, D) for the table.
    """

    def __init__(self, grid: int, width: int):
        super().__init__()
        self.grid = grid
        offsets = (2 * grid - 1) ** 2
        self.w1 = nn.Parameter(torch.zeros(offsets, width))
        self.w2 = nn.Parameter(torch.zeros(offsets, width))
        patches = grid * grid
        # Flat position of pair (q, k) in a (N, S) bin map: q * S + offset(q, k). Not saved.
        bin_position = torch.arange(patches)[:, None] * offsets + relative_offset_index(grid)
        self.register_buffer("bin_position", bin_position.flatten(), persistent=False)  # (N*N,)

    def offset_bins(self, attention: torch.Tensor) -> torch.Tensor:
        """attention (..., N, N) -> (..., N, S): each query's weights moved to their offset bins."""
        *lead, patches, _ = attention.shape
        offsets = (2 * self.grid - 1) ** 2
        bins = attention.new_zeros(*lead, patches * offsets)
        bins = bins.index_copy(-1, self.bin_position, attention.flatten(-2))
        return bins.view(*lead, patches, offsets)

    def read_table(self, q: torch.Tensor, k: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """q, k (B, T', N, H, Dh) patch tokens of paired frames -> (B, T', N, D)."""
        q = q.transpose(2, 3)  # (B, T', H, N, Dh)
        k = k.transpose(2, 3)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, T', H, N, N)
        attention = scores.softmax(dim=-1).mean(dim=2)  # (B, T', N, N), averaged over heads
        return self.offset_bins(attention) @ table  # (B, T', N, S) @ (S, D) -> (B, T', N, D)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q, k (B, T, L, H, Dh) of one block -> the update (B, T, L, D) to add to its output."""
        q, k = q[:, :, 1:], k[:, :, 1:]  # drop CLS: (B, T, N, H, Dh)
        backward = self.read_table(q[:, 1:], k[:, :-1], self.w1)  # frames 1..T-1 look at t-1
        forward = self.read_table(q[:, :-1], k[:, 1:], self.w2)  # frames 0..T-2 look at t+1
        # Pad along T to line each up with its frames, then pad a zero CLS row in front.
        update = F.pad(backward, (0, 0, 0, 0, 1, 0)) + F.pad(forward, (0, 0, 0, 0, 0, 1))  # (B, T, N, D)
        return F.pad(update, (0, 0, 1, 0))  # (B, T, L, D)


# --------------------------------------------------------------------------- decoder


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x * sigmoid(1.702 x), used by the reference decoder MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DecoderAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (the reference `Attention`)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """query (B, Q, D) attends to memory (B, M, D) -> (B, Q, D)."""
        batch, width = query.shape[0], query.shape[-1]
        head_width = width // self.heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # (B, n, D) -> (B, H, n, Dh)
            return x.view(batch, -1, self.heads, head_width).transpose(1, 2)

        q = split_heads(self.q_proj(query))
        k = split_heads(self.k_proj(memory))
        v = split_heads(self.v_proj(memory))
        mixed = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, Dh), scale 1/sqrt(Dh)
        return self.out_proj(mixed.transpose(1, 2).reshape(batch, -1, width))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: x += attn(norm1(x), norm3(F)); x += mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, mlp_factor: float, mlp_dropout: float):
        super().__init__()
        self.attn = DecoderAttention(width, heads)
        hidden = round(mlp_factor * width)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(width, hidden),
                act=QuickGELU(),
                dropout=nn.Dropout(mlp_dropout),
                fc2=nn.Linear(hidden, width),
            )
        )
        for linear in (self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)
        self.norm1 = nn.LayerNorm(width)  # the query
        self.norm2 = nn.LayerNorm(width)  # before the MLP
        self.norm3 = nn.LayerNorm(width)  # the memory (frame tokens)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x (B, 1, D), memory (B, T*L, D) -> (B, 1, D)."""
        x = x + self.attn(self.norm1(x), self.norm3(memory))
        return x + self.mlp(self.norm2(x))


class EVLDecoder(nn.Module):
    """The reference `decoder`: a learned query refined by one decoder layer per tapped block."""

    def __init__(self, cfg: EVLConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.decoder_layers = nn.ModuleList(
            [DecoderLayer(width, cfg.heads, cfg.mlp_factor, cfg.mlp_dropout) for _ in range(cfg.layers)]
        )
        if cfg.temporal_conv:
            self.temporal_conv = nn.ModuleList(
                [
                    nn.Conv1d(width, width, kernel_size=3, stride=1, padding=1, groups=width)
                    for _ in range(cfg.layers)
                ]
            )
        if cfg.temporal_pos_embed:
            self.temporal_pos_embed = nn.ParameterList(
                [nn.Parameter(torch.zeros(cfg.frames, width)) for _ in range(cfg.layers)]
            )
        if cfg.temporal_cross_attention:
            self.cross_attention = nn.ModuleList(
                [TemporalCrossAttention(cfg.grid, width) for _ in range(cfg.layers)]
            )
        self.cls_token = nn.Parameter(torch.zeros(width))

    def forward(
        self, features: torch.Tensor, q: torch.Tensor | None = None, k: torch.Tensor | None = None
    ) -> torch.Tensor:
        """features (B, T, K, L, D); q, k (B, T, K, L, H, Dh) or None without cross-attention -> (B, D)."""
        batch, frames, _, tokens, width = features.shape
        x = self.cls_token.view(1, 1, width).expand(batch, 1, width)  # (B, 1, D)
        for i, layer in enumerate(self.decoder_layers):
            frame_features = features[:, :, i]  # (B, T, L, D)
            if self.cfg.temporal_conv:
                along_time = frame_features.permute(0, 2, 3, 1).reshape(batch * tokens, width, frames)
                convolved = self.temporal_conv[i](along_time)  # (B*L, D, T)
                convolved = convolved.view(batch, tokens, width, frames).permute(0, 3, 1, 2)  # (B, T, L, D)
                frame_features = frame_features + convolved
            if self.cfg.temporal_pos_embed:
                frame_features = frame_features + self.temporal_pos_embed[i].view(1, frames, 1, width)
            if self.cfg.temporal_cross_attention:
                frame_features = frame_features + self.cross_attention[i](q[:, :, i], k[:, :, i])
            x = layer(x, frame_features.flatten(1, 2))  # memory (B, T*L, D)
        return x[:, 0]


class EVLHead(nn.Module):
    """EVL decoder + classifier (LayerNorm, Dropout, Linear), fed from the feature cache."""

    def __init__(self, cfg: EVLConfig, qk_weights: Mapping | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.temporal_cross_attention:
            self.qk = FrozenQK(cfg.layers, cfg.width, qk_weights)
        self.decoder = EVLDecoder(cfg)
        self.proj = nn.Sequential(
            nn.LayerNorm(cfg.width),
            nn.Dropout(cfg.cls_dropout),
            nn.Linear(cfg.width, cfg.num_classes),
        )

    def _check_features(self, features: torch.Tensor, name: str) -> None:
        cfg = self.cfg
        expected = (cfg.frames, cfg.layers, cfg.tokens, cfg.width)
        if features.dim() != 5 or tuple(features.shape[1:]) != expected:
            raise ClipreelError(
                f"EVL head got {name} of shape {tuple(features.shape)}, expected (B, T, K, L, D) = "
                f"(B, {', '.join(map(str, expected))}) from its config (frames, layers, 1 + grid^2, "
                "width): build the head from the store's layout, or re-extract with matching settings."
            )

    def forward(self, features: torch.Tensor, block_inputs: torch.Tensor | None = None) -> torch.Tensor:
        """features, block_inputs (B, T, K, L, D) -> logits (B, num_classes).

        Any float dtype is accepted (the cache stores fp16); inputs are cast to the head's dtype.

        block_inputs are only needed (and only read) when the temporal cross-attention is on.
        """
        if not self.cfg.temporal_cross_attention:
            return self.forward_qk(features)
        if block_inputs is None:
            raise ClipreelError(
                "the EVL head with temporal cross-attention needs block_inputs (B, T, K, L, D)."
            )
        self._check_features(block_inputs, "block_inputs")
        q, k = self.qk(block_inputs)
        return self.forward_qk(features, q, k)

    def forward_qk(
        self, features: torch.Tensor, q: torch.Tensor | None = None, k: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Like `forward`, with the tapped blocks' q/k given directly, each (B, T, K, L, H, Dh),
        e.g. captured from a live backbone."""
        self._check_features(features, "features")
        dtype = self.proj[2].weight.dtype
        features = features.to(dtype)
        if self.cfg.temporal_cross_attention:
            if q is None or k is None:
                raise ClipreelError(
                    "the EVL head with temporal cross-attention needs q and k (B, T, K, L, H, Dh)."
                )
            q, k = q.to(dtype), k.to(dtype)
        query = self.decoder(features, q, k)  # (B, D)
        return self.proj(query)  # (B, num_classes)


# --------------------------------------------------------------------------- reference checkpoints


def load_reference_state_dict(head: EVLHead, state_dict: Mapping) -> None:
    """Load an official EVL checkpoint (`ckpt['model']`, or the whole checkpoint dict) into `head`.

    Strips the DDP `module.` prefix, drops backbone keys (present only in fine-tuned-backbone
    runs), keeps the head's own frozen q/k buffers (they come from the CLIP backbone, not the
    checkpoint) and loads strictly. Raises ClipreelError naming every missing, unexpected or
    mis-shaped key.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    reference = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if not key.startswith("backbone."):
            reference[key] = value

    own = head.state_dict()
    expected_keys = {key for key in own if not key.startswith("qk.")}
    missing = sorted(expected_keys - set(reference))
    unexpected = sorted(set(reference) - expected_keys)
    mismatched = [
        f"{key}: checkpoint {tuple(reference[key].shape)} vs head {tuple(own[key].shape)}"
        for key in sorted(expected_keys & set(reference))
        if tuple(reference[key].shape) != tuple(own[key].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            problems.append("shape mismatches: " + "; ".join(mismatched))
        if missing:
            problems.append(f"missing keys: {missing}")
        if unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        raise ClipreelError(
            "the EVL checkpoint does not fit this head (" + " | ".join(problems) + "). "
            "Build the head with the checkpoint's settings: temporal_pos_embed is (frames, width), "
            "cross_attention.*.w1 is ((2*grid-1)^2, width), proj.2.weight is (num_classes, width), "
            "and the temporal_* flags decide which modules exist."
        )
    qk_buffers = {key: value for key, value in own.items() if key.startswith("qk.")}
    head.load_state_dict({**reference, **qk_buffers}, strict=True)
