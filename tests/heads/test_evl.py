"""EVL head: reference parameter count and checkpoint keys, the cross-frame attention maps against
real open_clip blocks and a live open_clip transformer, the folded decoder attention against the
plain one, the row-window offset-table read against a naive gather, and save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer
from safetensors.torch import load_file, save_file

from clipreel.errors import ClipreelError
from clipreel.heads.cache.evl import (
    DecoderAttention,
    EVLConfig,
    EVLHead,
    TemporalCrossAttention,
    convolve_along_frames,
    load_reference_state_dict,
)
from clipreel.heads.cache.inputs import decode_field
from clipreel.heads.layers import trainable_parameter_count
from clipreel.heads.taps import (
    adjacent_frame_attention,
    cross_frame_attention_from_inputs,
    qk_from_block_inputs,
    qk_weights_from_open_clip_blocks,
)
from clipreel.pipeline.data.store_codes import as_code_tensor, encode_field

WIDTH, HEADS, LAYERS, FRAMES, GRID, CLASSES = 64, 2, 3, 4, 7, 5
PATCHES = GRID * GRID
TOKENS = 1 + PATCHES


def tiny_config(**overrides) -> EVLConfig:
    values = {
        "width": WIDTH, "heads": HEADS, "layers": LAYERS, "frames": FRAMES, "grid": GRID,
        "num_classes": CLASSES, "mlp_dropout": 0.0, "cls_dropout": 0.0,
    }
    return EVLConfig(**{**values, **overrides})


def random_open_clip_blocks(count: int) -> list[ResidualAttentionBlock]:
    """Real open_clip blocks with non-trivial ln_1 affine weights (the default is ones/zeros)."""
    blocks = []
    for _ in range(count):
        block = ResidualAttentionBlock(d_model=WIDTH, n_head=HEADS, batch_first=True).eval()
        with torch.no_grad():
            block.ln_1.weight.normal_(1.0, 0.2)
            block.ln_1.bias.normal_(0.0, 0.2)
            block.attn.in_proj_weight.mul_(4.0)  # sharper attention maps than the default init
            block.attn.in_proj_bias.normal_(0.0, 0.1)
        blocks.append(block)
    return blocks


def fill_zero_initialised_parameters(head: EVLHead) -> None:
    """The reference zero-initialises cls_token, temporal_pos_embed and w1/w2; give them values so
    every temporal module actually changes the output."""
    with torch.no_grad():
        head.decoder.cls_token.normal_(0.0, 0.5)
        for embed in getattr(head.decoder, "temporal_pos_embed", []):
            embed.normal_(0.0, 0.5)
        for cross in getattr(head.decoder, "cross_attention", []):
            cross.w1.normal_(0.0, 0.5)
            cross.w2.normal_(0.0, 0.5)


def tiny_head(**overrides) -> EVLHead:
    head = EVLHead(tiny_config(**overrides))
    fill_zero_initialised_parameters(head)
    return head


def tiny_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """features (B, T, K, L, D) and the attention maps (B, 2, T-1, K, P, P) of real open_clip
    blocks run on random block inputs, as extraction writes them."""
    features = torch.randn(batch, FRAMES, LAYERS, TOKENS, WIDTH)
    block_inputs = torch.randn(batch, FRAMES, LAYERS, TOKENS, WIDTH)
    qk_weights = qk_weights_from_open_clip_blocks(random_open_clip_blocks(LAYERS))
    return features, cross_frame_attention_from_inputs(block_inputs, qk_weights)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- sizes, keys and init


def reference_checkpoint_shapes(width, frames, grid, classes, layers=4) -> dict[str, tuple]:
    """The key layout of an official EVL checkpoint (`ckpt['model']` of the reference `main.py`), written out."""
    offsets = (2 * grid - 1) ** 2
    shapes = {"module.decoder.cls_token": (width,)}
    for i in range(layers):
        layer = f"module.decoder.decoder_layers.{i}"
        for name in ("q", "k", "v", "out"):
            shapes[f"{layer}.attn.{name}_proj.weight"] = (width, width)
            shapes[f"{layer}.attn.{name}_proj.bias"] = (width,)
        shapes[f"{layer}.mlp.fc1.weight"] = (4 * width, width)
        shapes[f"{layer}.mlp.fc1.bias"] = (4 * width,)
        shapes[f"{layer}.mlp.fc2.weight"] = (width, 4 * width)
        shapes[f"{layer}.mlp.fc2.bias"] = (width,)
        for norm in ("norm1", "norm2", "norm3"):
            shapes[f"{layer}.{norm}.weight"] = (width,)
            shapes[f"{layer}.{norm}.bias"] = (width,)
        shapes[f"module.decoder.temporal_conv.{i}.weight"] = (width, 1, 3)
        shapes[f"module.decoder.temporal_conv.{i}.bias"] = (width,)
        shapes[f"module.decoder.temporal_pos_embed.{i}"] = (frames, width)
        shapes[f"module.decoder.cross_attention.{i}.w1"] = (offsets, width)
        shapes[f"module.decoder.cross_attention.{i}.w2"] = (offsets, width)
    shapes["module.proj.0.weight"] = (width,)
    shapes["module.proj.0.bias"] = (width,)
    shapes["module.proj.2.weight"] = (classes, width)
    shapes["module.proj.2.bias"] = (classes,)
    return shapes


def random_checkpoint(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {key: torch.randn(shape) for key, shape in shapes.items()}


def test_reference_b16_parameter_count_keys_and_frames_growth():
    head_8 = EVLHead(EVLConfig(width=768, heads=12, layers=4, frames=8, grid=14, num_classes=400))
    head_16 = EVLHead(EVLConfig(width=768, heads=12, layers=4, frames=16, grid=14, num_classes=400))
    assert trainable_parameter_count(head_8) == 33_183_376
    assert trainable_parameter_count(head_16) - trainable_parameter_count(head_8) == 4 * 8 * 768
    # The state dict is exactly the reference layout: no frozen backbone weights or buffers.
    own = {key: tuple(value.shape) for key, value in head_8.state_dict().items()}
    reference = {
        key.removeprefix("module."): shape
        for key, shape in reference_checkpoint_shapes(768, 8, 14, 400).items()
    }
    assert own == reference


def test_initialisation_follows_the_reference():
    head = EVLHead(tiny_config())
    decoder = head.decoder
    assert torch.count_nonzero(decoder.cls_token) == 0
    for i in range(LAYERS):
        assert torch.count_nonzero(decoder.temporal_pos_embed[i]) == 0
        assert torch.count_nonzero(decoder.cross_attention[i].w1) == 0
        assert torch.count_nonzero(decoder.cross_attention[i].w2) == 0
        layer = decoder.decoder_layers[i]
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear = getattr(layer.attn, name)
            assert torch.count_nonzero(linear.bias) == 0
            xavier_bound = (6 / (WIDTH + WIDTH)) ** 0.5
            assert linear.weight.abs().max() <= xavier_bound
        for linear in (layer.mlp.fc1, layer.mlp.fc2):
            assert 0 < linear.bias.abs().max() < 1e-4


def test_config_json_round_trip_and_unknown_keys():
    cfg = tiny_config(temporal_conv=False)
    assert EVLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ClipreelError, match="unknown keys"):
        EVLConfig.from_dict({**cfg.to_dict(), "frame": 8})


# --------------------------------------------------------------------------- forward / backward


def test_forward_shapes_dtype_and_inputs_untouched():
    head = tiny_head().eval()
    features, attention = tiny_inputs(batch=3)
    assert attention.shape == (3, 2, FRAMES - 1, LAYERS, PATCHES, PATCHES)
    features_fp16, attention_fp16 = features.half(), attention.half()
    kept = features_fp16.clone(), attention_fp16.clone()
    logits = head({"tokens": features_fp16, "attention": attention_fp16})  # the cache stores fp16
    assert logits.shape == (3, CLASSES)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert torch.equal(features_fp16, kept[0]) and torch.equal(attention_fp16, kept[1])

    kept = features.clone(), attention.clone()
    head({"tokens": features, "attention": attention})  # fp32 input: no cast copy shields it
    assert torch.equal(features, kept[0]) and torch.equal(attention, kept[1])


@pytest.mark.parametrize("dtype", ["int8", "float8"])
def test_a_batch_of_8bit_codes_gives_the_logits_of_its_values(dtype):
    head = tiny_head().eval()
    features, attention = tiny_inputs(batch=3)
    attention = attention / attention.sum(-1, keepdim=True)  # softmax rows, as stored
    batch, values = {}, {}
    for field, tensor in (("tokens", features), ("attention", attention)):
        codes, scales = encode_field(field, tensor, dtype)
        batch[field], batch[f"{field}_scale"] = as_code_tensor(codes, dtype, field), scales
        values[field] = decode_field(field, batch[field], scales, torch.float32)
    kept = {name: tensor.clone() for name, tensor in batch.items()}
    from_codes = head(batch)
    torch.testing.assert_close(from_codes, head(values), rtol=0, atol=0)  # the head decodes exactly this
    assert all(torch.equal(batch[name].view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else batch[name],
                           tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor)
               for name, tensor in kept.items())  # the codes are read, never changed


def test_wrong_inputs_raise_clear_errors():
    head = tiny_head()
    features, attention = tiny_inputs()
    with pytest.raises(ClipreelError, match=r"features of shape .*expected \(B, T, K, L, D\)"):
        head({"tokens": features[:, :2], "attention": attention})  # 2 frames into a 4-frame head
    with pytest.raises(ClipreelError, match="needs the adjacent-frame attention maps"):
        head({"tokens": features})
    with pytest.raises(ClipreelError, match=r"attention of shape .*expected \(B, 2, T-1, K, P, P\)"):
        head({"tokens": features, "attention": attention[:, :, :, :2]})  # 2 blocks' maps, 3 decoder layers

    two_blocks = qk_weights_from_open_clip_blocks(random_open_clip_blocks(2))
    block_inputs = torch.randn(1, FRAMES, LAYERS, TOKENS, WIDTH)
    with pytest.raises(ClipreelError, match=r"has shape \(2, 64\).*K=3 blocks"):
        cross_frame_attention_from_inputs(block_inputs, two_blocks)
    with pytest.raises(ClipreelError, match=r"lacks \['num_heads'\]"):
        qk_from_block_inputs(block_inputs[:, :, :2], {k: v for k, v in two_blocks.items() if k != "num_heads"})


def test_gradient_reaches_every_trainable_parameter():
    head = tiny_head().train()
    features, attention = tiny_inputs()
    loss = F.cross_entropy(head({"tokens": features, "attention": attention}), torch.tensor([1, 3]))
    loss.backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        if name.endswith("attn.k_proj.bias"):
            # The softmax ignores a shift that is constant over the keys: the key bias has a zero
            # gradient in exact arithmetic, in the reference as here (but it is in the graph, so
            # optimizers and weight decay see it as in the reference).
            assert parameter.grad.abs().max() < 1e-6, name
        else:
            assert parameter.grad.abs().sum() > 0, name


def test_runs_under_autocast():
    head = tiny_head()
    features, attention = tiny_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head({"tokens": features.half(), "attention": attention.half()})
    assert logits.shape == (2, CLASSES) and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert head.decoder.cross_attention[0].w1.grad is not None


# --------------------------------------------------------------------------- attention maps


def test_attention_maps_equal_those_of_real_open_clip_blocks():
    blocks = random_open_clip_blocks(2)
    qk_weights = qk_weights_from_open_clip_blocks(blocks)
    batch, frames, head_width = 2, 3, WIDTH // HEADS
    block_inputs = torch.randn(batch, frames, 2, TOKENS, WIDTH)
    q, k = qk_from_block_inputs(block_inputs, qk_weights)
    assert q.shape == k.shape == (batch, frames, 2, HEADS, PATCHES, head_width)
    attention = adjacent_frame_attention(q, k)
    assert attention.shape == (batch, 2, frames - 1, 2, PATCHES, PATCHES)
    assert attention.dtype == torch.float32
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(batch, 2, frames - 1, 2, PATCHES))

    with torch.no_grad():
        for i, block in enumerate(blocks):
            normed = block.ln_1(block_inputs[:, :, i, 1:])  # (B, T, P, D): patch tokens only
            # q/k: the block's own ln_1 and the q/k rows of its in_proj.
            q_rows, k_rows, _ = block.attn.in_proj_weight.chunk(3)
            q_bias, k_bias, _ = block.attn.in_proj_bias.chunk(3)
            expected_q = F.linear(normed, q_rows, q_bias).view(batch, frames, PATCHES, HEADS, head_width)
            expected_k = F.linear(normed, k_rows, k_bias).view(batch, frames, PATCHES, HEADS, head_width)
            torch.testing.assert_close(q[:, :, i], expected_q.transpose(2, 3), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(k[:, :, i], expected_k.transpose(2, 3), rtol=1e-5, atol=1e-5)

            # The maps: the block's own MultiheadAttention, frame t's patches attending to an
            # adjacent frame's patches, head-averaged weights.
            for t in range(1, frames):
                _, backward = block.attn(
                    normed[:, t], normed[:, t - 1], normed[:, t - 1], need_weights=True, average_attn_weights=True
                )
                torch.testing.assert_close(attention[:, 0, t - 1, i], backward, rtol=1e-4, atol=1e-6)
            for t in range(frames - 1):
                _, forward = block.attn(
                    normed[:, t], normed[:, t + 1], normed[:, t + 1], need_weights=True, average_attn_weights=True
                )
                torch.testing.assert_close(attention[:, 1, t, i], forward, rtol=1e-4, atol=1e-6)

    # The one-block-at-a-time convenience gives the same maps, from numpy weights (as the
    # backbone and the store hand them out) and fp16 inputs (as a cache would hold them).
    numpy_weights = {
        name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in qk_weights.items()
    }
    torch.testing.assert_close(cross_frame_attention_from_inputs(block_inputs, numpy_weights), attention)
    from_fp16 = cross_frame_attention_from_inputs(block_inputs.half(), qk_weights)
    torch.testing.assert_close(from_fp16, attention, rtol=0, atol=2e-3)


def test_head_fed_from_the_cache_equals_the_head_on_a_live_backbone():
    """Run a real open_clip transformer on frame tokens; capture what extraction stores (each
    tapped block's input and output) and the normalised tokens its attention really saw. The head
    gives the same logits from maps computed on the live q/k as from the stored maps."""
    backbone = Transformer(width=WIDTH, layers=LAYERS + 1, heads=HEADS).eval()
    with torch.no_grad():
        for block in backbone.resblocks:
            block.attn.in_proj_weight.mul_(4.0)
    tapped = list(backbone.resblocks[1:])  # feature blocks 1..3; block 0's output feeds block 1
    block_inputs, block_outputs, attention_inputs = [], [], []
    hooks = []
    for block in tapped:
        hooks.append(block.register_forward_pre_hook(lambda m, args: block_inputs.append(args[0])))
        hooks.append(block.register_forward_hook(lambda m, args, out: block_outputs.append(out)))
        hooks.append(block.attn.register_forward_pre_hook(lambda m, args: attention_inputs.append(args[0])))

    batch, head_width = 2, WIDTH // HEADS
    tokens = torch.randn(batch * FRAMES, TOKENS, WIDTH)
    with torch.no_grad():
        backbone(tokens)
    for hook in hooks:
        hook.remove()

    def per_video(per_block):  # K x (B*T, ...) -> (B, T, K, ...)
        stacked = torch.stack(per_block, dim=1)
        return stacked.view(batch, FRAMES, *stacked.shape[1:])

    live_q, live_k = [], []
    for block, normed in zip(tapped, attention_inputs):  # normed = ln_1(input), as the block ran it
        q_rows, k_rows, _ = block.attn.in_proj_weight.chunk(3)
        q_bias, k_bias, _ = block.attn.in_proj_bias.chunk(3)
        patches = normed[:, 1:]  # (B*T, P, D)
        live_q.append(F.linear(patches, q_rows, q_bias).view(-1, PATCHES, HEADS, head_width).transpose(1, 2))
        live_k.append(F.linear(patches, k_rows, k_bias).view(-1, PATCHES, HEADS, head_width).transpose(1, 2))
    live_attention = adjacent_frame_attention(per_video(live_q), per_video(live_k))

    features = per_video(block_outputs)  # (B, T, K, L, D)
    stored_attention = cross_frame_attention_from_inputs(
        per_video(block_inputs), qk_weights_from_open_clip_blocks(tapped)
    )
    head = tiny_head().eval()
    with torch.no_grad():
        from_live = head({"tokens": features, "attention": live_attention})
        from_cache = head({"tokens": features, "attention": stored_attention})
        from_fp16_cache = head({"tokens": features.half(), "attention": stored_attention.half()})
        shuffled = cross_frame_attention_from_inputs(  # frames out of order: maps of another video
            per_video(block_inputs)[:, [2, 0, 3, 1]], qk_weights_from_open_clip_blocks(tapped)
        )
        from_shuffled_maps = head({"tokens": features, "attention": shuffled})
    torch.testing.assert_close(from_cache, from_live, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_fp16_cache, from_live, rtol=0, atol=1e-3)  # fp16 storage: ~1e-4 off
    assert not torch.allclose(from_cache, from_shuffled_maps, atol=1e-3)  # the maps do matter


# --------------------------------------------------------------------------- decoder attention


def plain_decoder_attention(attention: DecoderAttention, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """The reference computation: project the memory to keys and values, then attend."""
    batch, width = query.shape[0], query.shape[-1]

    def split_heads(x: torch.Tensor) -> torch.Tensor:  # (B, n, D) -> (B, H, n, Dh)
        return x.view(batch, -1, attention.heads, width // attention.heads).transpose(1, 2)

    q = split_heads(attention.q_proj(query))
    k = split_heads(attention.k_proj(memory))
    v = split_heads(attention.v_proj(memory))
    mixed = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, Dh)
    return attention.out_proj(mixed.transpose(1, 2).reshape(batch, -1, width))


@pytest.mark.parametrize("queries", [1, 3])
def test_folded_decoder_attention_equals_the_plain_one_values_and_gradients(queries):
    attention = DecoderAttention(WIDTH, heads=4)
    with torch.no_grad():
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
            linear.bias.normal_(0.0, 0.5)  # the reference init zeroes them; the fold must not rely on it
    query = torch.randn(2, queries, WIDTH, requires_grad=True)
    memory = torch.randn(2, 37, WIDTH, requires_grad=True)
    upstream = torch.randn(2, queries, WIDTH)

    def values_and_grads(forward):
        out = forward(attention, query, memory)
        tensors = [query, memory, *attention.parameters()]
        return out, torch.autograd.grad(out, tensors, upstream)

    folded, folded_grads = values_and_grads(lambda module, q, m: module(q, m))
    plain, plain_grads = values_and_grads(plain_decoder_attention)
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
    for got, expected in zip(folded_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- temporal modules


def test_temporal_conv_equals_the_reference_conv1d_values_and_gradients():
    conv = torch.nn.Conv1d(WIDTH, WIDTH, kernel_size=3, padding=1, groups=WIDTH)
    batch, frames = 2, 5
    frame_features = torch.randn(batch, frames, TOKENS, WIDTH)
    upstream = torch.randn(batch, frames, TOKENS, WIDTH)

    ours = convolve_along_frames(conv, frame_features)
    ours_grads = torch.autograd.grad(ours, list(conv.parameters()), upstream)
    along_time = frame_features.permute(0, 2, 3, 1).reshape(batch * TOKENS, WIDTH, frames)  # the reference layout
    reference = conv(along_time).view(batch, TOKENS, WIDTH, frames).permute(0, 3, 1, 2)
    reference_grads = torch.autograd.grad(reference, list(conv.parameters()), upstream)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def naive_relative_offset_read(attention: torch.Tensor, table: torch.Tensor, grid: int) -> torch.Tensor:
    """attention (..., P, P) x table (S, D) -> (..., P, D) by gathering the table to (P, P, D)."""
    patches = grid * grid
    index = torch.empty(patches, patches, dtype=torch.long)
    for query in range(patches):
        for key in range(patches):
            row_offset = query // grid - key // grid  # query minus key, as the reference
            col_offset = query % grid - key % grid
            index[query, key] = (row_offset + grid - 1) * (2 * grid - 1) + (col_offset + grid - 1)
    return torch.einsum("...qk,qkd->...qd", attention, table[index])


def loop_temporal_cross_attention(attention: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, grid: int):
    """The reference module written frame by frame: attention (B, 2, T-1, P, P) -> (B, T, L, D)."""
    batch, _, pairs, patches, _ = attention.shape
    frames = pairs + 1
    updates = []
    for t in range(frames):
        update = torch.zeros(batch, patches, w1.shape[1])
        if t >= 1:  # frame t's queries on frame t-1's keys, through w1
            update = update + naive_relative_offset_read(attention[:, 0, t - 1], w1, grid)
        if t <= frames - 2:  # frame t's queries on frame t+1's keys, through w2
            update = update + naive_relative_offset_read(attention[:, 1, t], w2, grid)
        updates.append(F.pad(update, (0, 0, 1, 0)))  # zero CLS row
    return torch.stack(updates, dim=1)


@pytest.mark.parametrize("grid, frames", [(3, 4), (4, 2), (14, 3)])  # 14: the ViT-B/16 grid at 224 px
def test_temporal_cross_attention_equals_naive_gather_values_and_table_gradients(grid, frames):
    width = 6
    cross = TemporalCrossAttention(grid, width)
    with torch.no_grad():
        cross.w1.normal_()
        cross.w2.normal_()
    attention = torch.randn(2, 2, frames - 1, grid * grid, grid * grid).softmax(dim=-1)
    upstream = torch.randn(2, frames, 1 + grid * grid, width)

    ours = cross(attention)
    ours_grads = torch.autograd.grad(ours, [cross.w1, cross.w2], upstream)
    naive = loop_temporal_cross_attention(attention, cross.w1, cross.w2, grid)
    naive_grads = torch.autograd.grad(naive, [cross.w1, cross.w2], upstream)
    torch.testing.assert_close(ours, naive)
    for got, expected in zip(ours_grads, naive_grads):
        torch.testing.assert_close(got, expected)


def test_reversing_frames_changes_output_only_with_temporal_modules():
    features = torch.randn(2, FRAMES, LAYERS, TOKENS, WIDTH)
    block_inputs = torch.randn(2, FRAMES, LAYERS, TOKENS, WIDTH)
    qk_weights = qk_weights_from_open_clip_blocks(random_open_clip_blocks(LAYERS))
    attention = cross_frame_attention_from_inputs(block_inputs, qk_weights)
    reversed_attention = cross_frame_attention_from_inputs(block_inputs.flip(1), qk_weights)

    cross_only = tiny_head(temporal_conv=False, temporal_pos_embed=False).eval()
    with torch.no_grad():
        assert not torch.allclose(
            cross_only({"tokens": features, "attention": attention}),
            cross_only({"tokens": features.flip(1), "attention": reversed_attention}),
            atol=1e-4,
        )

    no_temporal = tiny_head(
        temporal_conv=False, temporal_pos_embed=False, temporal_cross_attention=False
    ).eval()
    assert not hasattr(no_temporal.decoder, "cross_attention")
    with torch.no_grad():
        torch.testing.assert_close(
            no_temporal({"tokens": features}), no_temporal({"tokens": features.flip(1)}), rtol=1e-5, atol=1e-5
        )


# --------------------------------------------------------------------------- checkpoints


def test_reference_layout_checkpoint_loads_strictly():
    head = EVLHead(tiny_config(layers=4))
    checkpoint = random_checkpoint(reference_checkpoint_shapes(WIDTH, FRAMES, GRID, CLASSES))
    checkpoint["module.backbone.blocks.0.attn.q_proj.weight"] = torch.randn(WIDTH, WIDTH)  # dropped

    load_reference_state_dict(head, {"model": checkpoint, "next_step": 10})

    loaded = head.state_dict()
    assert len(loaded) == len(checkpoint) - 1
    for key, value in checkpoint.items():
        if not key.startswith("module.backbone."):
            assert torch.equal(loaded[key.removeprefix("module.")], value), key


def test_mismatched_reference_checkpoint_fails_clearly():
    head = EVLHead(tiny_config(layers=4))
    sixteen_frames = random_checkpoint(reference_checkpoint_shapes(WIDTH, 16, GRID, CLASSES))
    expected_message = r"temporal_pos_embed\.0: checkpoint \(16, 64\) vs head \(4, 64\)"
    with pytest.raises(ClipreelError, match=expected_message):
        load_reference_state_dict(head, sixteen_frames)

    other_classes = random_checkpoint(reference_checkpoint_shapes(WIDTH, FRAMES, GRID, 400))
    with pytest.raises(ClipreelError, match=r"proj\.2\.weight"):
        load_reference_state_dict(head, other_classes)

    without_conv = {
        key: value
        for key, value in random_checkpoint(reference_checkpoint_shapes(WIDTH, FRAMES, GRID, CLASSES)).items()
        if "temporal_conv" not in key
    }
    with pytest.raises(ClipreelError, match="missing keys"):
        load_reference_state_dict(head, without_conv)


def test_safetensors_round_trip_gives_identical_logits(tmp_path):
    head = tiny_head().eval()
    features, attention = tiny_inputs()
    path = tmp_path / "head.safetensors"
    save_file(head.state_dict(), str(path))

    rebuilt = EVLHead(EVLConfig.from_dict(head.cfg.to_dict())).eval()
    rebuilt.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        batch = {"tokens": features, "attention": attention}
        assert torch.equal(head(batch), rebuilt(batch))
