"""EVL: the temporal decoder of "Frozen CLIP Models are Efficient Video Learners" (ECCV 2022).

This is the reference architecture of OpenGVLab/efficient-video-recognition (`model.py`,
`vision_transformer.py`), rebuilt to train from the feature cache instead of a live backbone:

    features   (B, T, K, L, D)          outputs of the K tapped CLIP blocks, shallow -> deep
    attention  (B, 2, T-1, K, P, P)     head-averaged attention maps between adjacent frames

L = 1 + P tokens per frame (CLS first, then the P = g*g patches row-major on a g x g grid).

The temporal cross-attention only ever uses, per tapped block, the softmax attention of one
frame's patch queries on an adjacent frame's patch keys, averaged over the block's heads. Those
maps depend only on the frozen backbone, so extraction computes them once
(`cross_frame_attention_from_inputs`) and the store keeps them:
    attention[:, 0, t-1]  frame t's queries vs frame t-1's keys, t = 1..T-1   (table w1)
    attention[:, 1, t]    frame t's queries vs frame t+1's keys, t = 0..T-2   (table w2)
each a softmax over keys of q.k / sqrt(D/H), then the mean over the H heads. For ViT-B/16 at
8 frames that is 4.3 MB per video in fp16 (q/k themselves would be 19 MB).

For each decoder layer i (consuming tapped block i):
    F = features[:, :, i]                              # (B, T, L, D)
    F = F + temporal_conv_i(F)                         # depthwise conv along T, kernel 3
    F = F + temporal_pos_embed_i                       # (T, D), broadcast over tokens
    F = F + cross_attention_i(attention[:, :, :, i])   # offset tables read through the maps
    x = decoder_layer_i(x, F.flatten(T, L))            # one learned query, pre-norm
logits = proj(x)                                       # LayerNorm, Dropout, Linear

Module and parameter names reproduce the official checkpoint keys (the reference `model.py`) without
the DDP `module.` prefix: the head's state dict is exactly the reference keys (`decoder.*`, `proj.*`),
so `load_reference_state_dict` is a strict load.

Relative-offset sign convention (checked against the reference `TemporalCrossAttention`): the
table row of a (query patch, key patch) pair is
    (q_row - k_row + g - 1) * (2g - 1) + (q_col - k_col + g - 1)
i.e. query minus key.

May import: torch, clipreel.errors, clipreel.config, clipreel.heads (layers, registry, cache.inputs).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipreel.config import POSITIVE, PROBABILITY, SIZE, JsonConfig, ranged
from clipreel.errors import ClipreelError
from clipreel.heads.cache.inputs import block_values
from clipreel.heads.layers import check_class_count
from clipreel.heads.registry import HeadEntry, Recipe, register_head


@dataclass
class EVLConfig(JsonConfig):
    """Hyper-parameters of the EVL head; the defaults are the reference ViT-B/16, 8-frame model."""

    width: int = ranged(768, SIZE)  # D, the CLIP ViT width (the decoder runs at the same width)
    heads: int = ranged(12, SIZE)  # attention heads of the decoder layers
    layers: int = ranged(4, SIZE)  # decoder layers = number of tapped feature blocks K
    frames: int = ranged(8, SIZE)  # T, baked into temporal_pos_embed
    grid: int = ranged(14, SIZE)  # g, patches per side (224 px / patch 16)
    num_classes: int = ranged(400, SIZE)
    mlp_factor: float = ranged(4.0, POSITIVE)
    mlp_dropout: float = ranged(0.5, PROBABILITY)
    cls_dropout: float = ranged(0.5, PROBABILITY)
    temporal_conv: bool = True
    temporal_pos_embed: bool = True
    temporal_cross_attention: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width % self.heads != 0:
            raise ClipreelError(
                f"EVL config: width {self.width} is not divisible by heads {self.heads}; "
                "choose heads that divide the width (12 for ViT-B, 16 for ViT-L)."
            )

    @property
    def patches(self) -> int:
        """P, patch tokens per frame: g*g."""
        return self.grid * self.grid

    @property
    def tokens(self) -> int:
        """L, tokens per frame: the CLS token plus g*g patches."""
        return 1 + self.patches


# --------------------------------------------------------------------------- temporal modules


def convolve_along_frames(conv: nn.Conv1d, frame_features: torch.Tensor) -> torch.Tensor:
    """The reference temporal conv, a depthwise `Conv1d(D, D, 3, padding=1, groups=D)` run along
    T for every token: frame_features (B, T, L, D) -> (B, T, L, D).

    Computed as the equivalent (3, 1)-kernel Conv2d over (B, D, T, L) in channels-last layout,
    which is the memory of (B, T, L, D) as it is, so no transpose is copied (4x faster forward +
    backward than transposing to the (B*L, D, T) layout Conv1d wants, measured at B/16 dims).
    """
    channels_last = frame_features.permute(0, 3, 1, 2)  # (B, D, T, L), a view
    convolved = F.conv2d(
        channels_last, conv.weight.unsqueeze(-1), conv.bias, padding=(1, 0), groups=conv.groups
    )  # (B, D, T, L), channels-last
    return convolved.permute(0, 2, 3, 1)  # (B, T, L, D)


class TemporalCrossAttention(nn.Module):
    """Adjacent-frame attention maps read out through learned relative-offset tables.

    Frame t's head-averaged attention on frame t-1's patches weights the table `w1` ((2g-1)^2, D)
    by the 2-D offset of each (query, key) pair; the result is added to frame t's patches
    (t = 1..T-1). `w2` does the same with frame t+1 (t = 0..T-2). The CLS token gets zero.

    How the tables are read, exactly and without a (P, P, D) gather: view a table as a
    (2g-1) x (2g-1) grid of D-vectors. Query patch (qr, qc) and key patch (kr, kc) read cell
    (qr - kr + g - 1, qc - kc + g - 1): the g x g cells at rows qr .. qr+g-1 and columns
    qc .. qc+g-1. So a block of c neighbouring queries of one grid row (columns cb*c .. cb*c+c-1)
    reads only a window of g table rows x (g + c - 1) table columns. Per block, each query's map
    row is copied into its own bins over that window (each (query, key) pair has its own bin: a
    copy, no sums) and the bins are multiplied by the window. Both maps of a frame go into one
    row of bins, [backward map | forward map], against [w1 window ; w2 window], so one batched
    matmul over the g*g/c blocks, (B*T*c, 2g(g+c-1)) @ (2g(g+c-1), D), yields every frame's
    update (frame 0 has no backward map and frame T-1 no forward map: those bins stay zero).
    c = g/2 for even g (c = g for odd g): the bins are then 70% non-zero for g=14, against 27%
    when binning into all (2g-1)^2 offsets.

    Measured per block (both maps, forward + backward, B=4, T=8, g=14, D=768, 1 thread): dense
    (2g-1)^2 bins 169 ms, one window per query row (c = g) 123 ms, c = g/2 106-115 ms. A sparse
    CSR or COO matmul, or a gathered g x g window per query, was slower than dense bins.
    The maps come from the frozen backbone and carry no gradient.
    """

    def __init__(self, grid: int, width: int):
        super().__init__()
        self.grid = grid
        span = 2 * grid - 1
        self.w1 = nn.Parameter(torch.zeros(span * span, width))
        self.w2 = nn.Parameter(torch.zeros(span * span, width))
        self.block = grid // 2 if grid % 2 == 0 else grid  # c, query columns sharing one window
        self.window_cols = grid + self.block - 1
        blocks_per_row = grid // self.block
        # Index buffers, rebuilt here and not saved. In the bins of a block, laid out
        # (query column in the block cc, map slot, window row, window column), the pair
        # (cc, key row kr, key column kc) of map `slot` lands at window row g-1-kr and window
        # column cc-kc+g-1 (its table column minus the block's first table column cb*c).
        query_col = torch.arange(self.block).view(-1, 1, 1)
        key_row = torch.arange(grid).view(1, -1, 1)
        key_col = torch.arange(grid).view(1, 1, -1)
        bin_position = torch.stack(
            [
                ((query_col * 2 + slot) * grid + (grid - 1 - key_row)) * self.window_cols
                + (query_col - key_col + grid - 1)
                for slot in (0, 1)
            ]
        )
        self.register_buffer("bin_position", bin_position.flatten(1), persistent=False)  # (2, c*g*g)
        # Row of [w1; w2] ((2 (2g-1)^2, D)) behind each window cell, laid out (query row qr,
        # block cb, slot, window row i, window column j): table cell (qr + i, cb*c + j).
        query_row = torch.arange(grid).view(-1, 1, 1, 1, 1)
        block = torch.arange(blocks_per_row).view(1, -1, 1, 1, 1)
        slot = torch.arange(2).view(1, 1, -1, 1, 1)
        window_row = torch.arange(grid).view(1, 1, 1, -1, 1)
        window_col = torch.arange(self.window_cols).view(1, 1, 1, 1, -1)
        table_row = slot * span * span + (query_row + window_row) * span + block * self.block + window_col
        self.register_buffer("window_rows", table_row.flatten(), persistent=False)

    def offset_bins(self, attention: torch.Tensor) -> torch.Tensor:
        """attention (B, 2, T-1, P, P) -> bins (g*g/c, B*T*c, 2*g*(g+c-1)): batches (query row,
        block), rows (video, frame, query column in the block), columns (slot, window row,
        window column)."""
        grid, block = self.grid, self.block
        blocks_per_row = grid // block
        batch, _, pairs, patches, _ = attention.shape
        frames = pairs + 1
        maps = attention.reshape(batch, 2, pairs, grid, blocks_per_row, block * patches)
        maps = maps.permute(1, 3, 4, 0, 2, 5)  # (2, qr, cb, B, T-1, cc*kr*kc)
        bins = attention.new_zeros(grid, blocks_per_row, batch, frames, block * 2 * grid * self.window_cols)
        bins[:, :, :, 1:].index_copy_(-1, self.bin_position[0], maps[0])  # frames 1..T-1: backward maps
        bins[:, :, :, :-1].index_copy_(-1, self.bin_position[1], maps[1])  # frames 0..T-2: forward maps
        return bins.view(grid * blocks_per_row, batch * frames * block, 2 * grid * self.window_cols)

    def table_windows(self) -> torch.Tensor:
        """(g*g/c, 2*g*(g+c-1), D): each block's window of w1, then of w2."""
        tables = torch.cat([self.w1, self.w2])  # (2 (2g-1)^2, D)
        windows = tables.index_select(0, self.window_rows)
        return windows.view(self.grid * (self.grid // self.block), -1, tables.shape[-1])

    def forward(self, attention: torch.Tensor) -> torch.Tensor:
        """attention (B, 2, T-1, P, P), the two maps of one block -> the update (B, T, L, D)
        to add to that block's tokens."""
        grid, block = self.grid, self.block
        batch, _, pairs, patches, _ = attention.shape
        frames = pairs + 1
        out = torch.bmm(self.offset_bins(attention), self.table_windows())  # (qr*cb, B*T*cc, D)
        width = out.shape[-1]
        out = out.view(grid, grid // block, batch, frames, block, width).permute(2, 3, 0, 1, 4, 5)
        update = out.new_zeros(batch, frames, 1 + patches, width)  # the CLS row stays zero
        update[:, :, 1:].view(batch, frames, grid, grid // block, block, width).copy_(out)
        return update  # (B, T, L, D)


# --------------------------------------------------------------------------- decoder


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x * sigmoid(1.702 x), used by the reference decoder MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DecoderAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (the reference `Attention`),
    computed with the key and value projections folded out of the memory.

    The decoder has one query and T*L = 1576 memory tokens, so projecting the memory to keys and
    values (O(T*L*D^2)) is nearly all the work. Per head h, with y_j the memory tokens:
        q_h . (Wk_h y_j + bk_h) = (Wk_h^T q_h) . y_j + q_h . bk_h
        sum_j a_hj (Wv_h y_j + bv_h) = Wv_h (sum_j a_hj y_j) + bv_h          (sum_j a_hj = 1)
    so the logits come from one D-vector per head against the raw memory, the heads pool the raw
    memory, and only the H pooled vectors are projected: O(T*L*D*H). Exact, with the same
    parameters (names, shapes, init) as the reference, so checkpoints load unchanged.
    """

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
        batch, queries, width = query.shape
        heads, head_width = self.heads, width // self.heads
        q = self.q_proj(query).view(batch, queries, heads, head_width) * head_width**-0.5  # (B, Q, H, Dh)
        key_weight = self.k_proj.weight.view(heads, head_width, width)  # (H, Dh, D)
        value_weight = self.v_proj.weight.view(heads, head_width, width)  # (H, Dh, D)

        folded_query = torch.einsum("bqhe,hed->bhqd", q, key_weight).reshape(batch, heads * queries, width)
        # Memory-major logits (B, M, H*Q): the memory gradients then come out in the memory's own
        # layout (a transposed (B, D, M) gradient costs a strided copy the size of the memory).
        logits = memory @ folded_query.transpose(1, 2)  # (B, M, H*Q)
        # q_h . bk_h is constant over the memory, so the softmax ignores it; adding it keeps
        # k_proj.bias in the graph with its (zero) gradient, as in the reference, so optimizers
        # and distributed data parallel see every parameter used.
        key_bias_term = torch.einsum("bqhe,he->bhq", q, self.k_proj.bias.view(heads, head_width))  # (B, H, Q)
        weights = (logits + key_bias_term.reshape(batch, 1, heads * queries)).softmax(dim=1)  # (B, M, H*Q)
        pooled = (weights.transpose(1, 2) @ memory).view(batch, heads, queries, width)  # (B, H, Q, D)
        values = torch.einsum("bhqd,hed->bqhe", pooled, value_weight)  # (B, Q, H, Dh)
        values = values + self.v_proj.bias.view(heads, head_width)
        return self.out_proj(values.reshape(batch, queries, width))


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

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """batch["tokens"] (B, T, K, L, D), batch["attention"] (B, 2, T-1, K, P, P) (with cross-attention)
        -> (B, D). Each feature block is read as it is used, in the decoder's dtype: cast, or decoded
        from a store's 8-bit codes where the batch carries their scales (inputs.block_values)."""
        count, frames, _, tokens, width = batch["tokens"].shape
        dtype = self.cls_token.dtype
        x = self.cls_token.view(1, 1, width).expand(count, 1, width)  # (B, 1, D)
        for i, layer in enumerate(self.decoder_layers):
            frame_features = block_values(batch, "tokens", i, dtype)  # (B, T, L, D); never modified in place
            if self.cfg.temporal_conv:
                frame_features = frame_features + convolve_along_frames(self.temporal_conv[i], frame_features)
            if self.cfg.temporal_pos_embed:
                # Broadcast over tokens through an expanded (T, L, D) view: the gradient is then a
                # sum over B and a sum over L, measured 4x (B=4) to 24x (B=16) faster than the
                # single sum over dims (0, 2) that a (1, T, 1, D) broadcast gets.
                position = self.temporal_pos_embed[i].view(frames, 1, width).expand(frames, tokens, width)
                frame_features = frame_features + position
            if self.cfg.temporal_cross_attention:
                maps = block_values(batch, "attention", i, dtype)  # (B, 2, T-1, P, P)
                frame_features = frame_features + self.cross_attention[i](maps)
            x = layer(x, frame_features.flatten(1, 2))  # memory (B, T*L, D)
        return x[:, 0]


class EVLHead(nn.Module):
    """EVL decoder + classifier (LayerNorm, Dropout, Linear), fed from the feature cache."""

    def __init__(self, cfg: EVLConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = EVLDecoder(cfg)
        self.proj = nn.Sequential(
            nn.LayerNorm(cfg.width),
            nn.Dropout(cfg.cls_dropout),
            nn.Linear(cfg.width, cfg.num_classes),
        )

    def _check_shape(self, tensor: torch.Tensor, name: str, layout: str, expected: tuple, sizes: str) -> None:
        if tensor.dim() != len(expected) + 1 or tuple(tensor.shape[1:]) != expected:
            raise ClipreelError(
                f"EVL head got {name} of shape {tuple(tensor.shape)}, expected {layout} = "
                f"(B, {', '.join(map(str, expected))}) from its config ({sizes}): build the head "
                "from the store's layout, or re-extract with matching settings."
            )

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """A closed set: the head classifies among exactly the classes it was made for."""
        check_class_count(self.cfg.num_classes, classnames, "an EVL head")

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """batch["tokens"] (B, T, K, L, D), batch["attention"] (B, 2, T-1, K, P, P) -> logits (B, num_classes).

        Any float dtype is accepted (the cache stores fp16), and a store's 8-bit codes with their
        `tokens_scale`/`attention_scale`; inputs are cast or decoded to the head's dtype and never
        modified. The attention maps (see `cross_frame_attention_from_inputs`) are required with
        the temporal cross-attention and ignored without it.
        """
        cfg = self.cfg
        features, attention = batch["tokens"], batch.get("attention")
        self._check_shape(
            features, "features", "(B, T, K, L, D)",
            (cfg.frames, cfg.layers, cfg.tokens, cfg.width), "frames, layers, 1 + grid^2, width",
        )
        if not cfg.temporal_cross_attention:
            return self.proj(self.decoder(batch))
        if attention is None:
            raise ClipreelError(
                "the EVL head with temporal cross-attention needs the adjacent-frame attention maps "
                "(B, 2, T-1, K, P, P): read them from the store (extracted with attention maps) or "
                "compute them with cross_frame_attention_from_inputs."
            )
        self._check_shape(
            attention, "attention", "(B, 2, T-1, K, P, P)",
            (2, cfg.frames - 1, cfg.layers, cfg.patches, cfg.patches), "2, frames - 1, layers, grid^2, grid^2",
        )
        return self.proj(self.decoder(batch))  # (B, num_classes)


# --------------------------------------------------------------------------- reference checkpoints


def load_reference_state_dict(head: EVLHead, state_dict: Mapping) -> None:
    """Load an official EVL checkpoint (`ckpt['model']`, or the whole checkpoint dict) into `head`.

    Strips the DDP `module.` prefix, drops backbone keys (present only in fine-tuned-backbone
    runs) and loads strictly. Raises ClipreelError naming every missing, unexpected or
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
    missing = sorted(set(own) - set(reference))
    unexpected = sorted(set(reference) - set(own))
    mismatched = [
        f"{key}: checkpoint {tuple(reference[key].shape)} vs head {tuple(own[key].shape)}"
        for key in sorted(set(own) & set(reference))
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
    head.load_state_dict(reference, strict=True)


# --------------------------------------------------------------------------- registration


def store_sizes(layout, provenance: Mapping, num_classes: int, text_model=None) -> dict:
    """The config values the store fixes: width, heads, blocks, frames, grid (and the class count)."""
    grid = math.isqrt(layout.tokens - 1)
    if grid * grid != layout.tokens - 1:
        raise ClipreelError(
            f"the store's frames have {layout.tokens} tokens, not 1 + a square grid of patches: "
            "EVL needs a square ViT (CLS + g*g patches)."
        )
    if layout.frames < 2:
        raise ClipreelError("EVL models time: extract at least 2 frames per view (--frames 8).")
    if "num_heads" not in provenance:
        raise ClipreelError("the store's provenance has no num_heads; re-extract it with `clipreel extract`.")
    return {
        "width": layout.width,
        "heads": int(provenance["num_heads"]),
        "layers": layout.layers,
        "frames": layout.frames,
        "grid": grid,
        "num_classes": num_classes,
    }


register_head(HeadEntry(
    name="evl",
    summary="EVL temporal decoder over the tokens of every feature block",
    config_class=EVLConfig,
    head_class=EVLHead,
    reads=("tokens", "attention"),
    blocks="all",
    scores_text=False,
    trains=True,
    # EVL's recipe (its configs): AdamW 4e-4, weight decay 0.05 on every parameter, no warmup, cosine.
    recipe=Recipe(lr=4e-4, weight_decay=0.05, warmup_epochs=0),
    store_sizes=store_sizes,
))
