"""EVL head: reference parameter count and checkpoint keys, the frozen q/k recomputation against
real open_clip blocks, the binned relative-offset read-out against a naive gather, and save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer
from safetensors.torch import load_file, save_file

from clipreel.errors import ClipreelError
from clipreel.heads.evl import (
    EVLConfig,
    EVLHead,
    FrozenQK,
    TemporalCrossAttention,
    load_reference_state_dict,
    qk_weights_from_open_clip_blocks,
    trainable_parameter_count,
)

WIDTH, HEADS, LAYERS, FRAMES, GRID, CLASSES = 64, 2, 3, 4, 7, 5
TOKENS = 1 + GRID * GRID


def tiny_config(**overrides) -> EVLConfig:
    values = dict(
        width=WIDTH, heads=HEADS, layers=LAYERS, frames=FRAMES, grid=GRID, num_classes=CLASSES,
        mlp_dropout=0.0, cls_dropout=0.0,
    )
    values.update(overrides)
    return EVLConfig(**values)


def random_open_clip_blocks(count: int) -> list[ResidualAttentionBlock]:
    """Real open_clip blocks with non-trivial ln_1 affine weights (the default is ones/zeros)."""
    blocks = []
    for _ in range(count):
        block = ResidualAttentionBlock(d_model=WIDTH, n_head=HEADS, batch_first=True).eval()
        with torch.no_grad():
            block.ln_1.weight.normal_(1.0, 0.2)
            block.ln_1.bias.normal_(0.0, 0.2)
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
    cfg = tiny_config(**overrides)
    qk_weights = qk_weights_from_open_clip_blocks(random_open_clip_blocks(cfg.layers))
    head = EVLHead(cfg, qk_weights if cfg.temporal_cross_attention else None)
    fill_zero_initialised_parameters(head)
    return head


def tiny_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.randn(batch, FRAMES, LAYERS, TOKENS, WIDTH)
    block_inputs = torch.randn(batch, FRAMES, LAYERS, TOKENS, WIDTH)
    return features, block_inputs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- sizes and init


def test_reference_b16_parameter_count_and_frames_growth():
    head_8 = EVLHead(EVLConfig(width=768, heads=12, layers=4, frames=8, grid=14, num_classes=400))
    head_16 = EVLHead(EVLConfig(width=768, heads=12, layers=4, frames=16, grid=14, num_classes=400))
    assert trainable_parameter_count(head_8) == 33_183_376
    assert trainable_parameter_count(head_16) - trainable_parameter_count(head_8) == 4 * 8 * 768
    # The frozen q/k weights are buffers: saved, never trained.
    assert "qk.in_proj_weight" in head_8.state_dict()
    assert all(not name.startswith("qk.") for name, _ in head_8.named_parameters())


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
    features, block_inputs = tiny_inputs(batch=3)
    features_fp16, block_inputs_fp16 = features.half(), block_inputs.half()
    kept = features_fp16.clone()
    logits = head(features_fp16, block_inputs_fp16)  # the cache stores fp16
    assert logits.shape == (3, CLASSES)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert torch.equal(features_fp16, kept)  # the temporal modules add out of place

    kept = features.clone()
    head(features, block_inputs)  # fp32 input: no cast copy shields it
    assert torch.equal(features, kept)

    q, k = head.qk(block_inputs)
    assert q.shape == k.shape == (3, FRAMES, LAYERS, TOKENS, HEADS, WIDTH // HEADS)


def test_wrong_input_shape_and_unset_qk_raise_clear_errors():
    head = tiny_head()
    features, block_inputs = tiny_inputs()
    with pytest.raises(ClipreelError, match="expected"):
        head(features[:, :2], block_inputs[:, :2])  # 2 frames into a 4-frame head
    with pytest.raises(ClipreelError, match="never set"):
        EVLHead(tiny_config())(features, block_inputs)
    two_blocks = qk_weights_from_open_clip_blocks(random_open_clip_blocks(2))
    with pytest.raises(ClipreelError, match=r"has shape \(2, 64\).*layers K=3"):
        EVLHead(tiny_config(), two_blocks)  # q/k of 2 blocks for a 3-layer decoder


def test_gradient_reaches_every_trainable_parameter_and_no_frozen_weight():
    head = tiny_head().train()
    features, block_inputs = tiny_inputs()
    frozen_before = {name: buffer.clone() for name, buffer in head.qk.named_buffers()}
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)

    loss = F.cross_entropy(head(features, block_inputs), torch.tensor([1, 3]))
    loss.backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    optimizer.step()

    for name, buffer in head.qk.named_buffers():
        assert buffer.grad is None and not buffer.requires_grad, name
        assert torch.equal(buffer, frozen_before[name]), name


def test_runs_under_autocast():
    head = tiny_head()
    features, block_inputs = tiny_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features.half(), block_inputs.half())
    assert logits.shape == (2, CLASSES) and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert head.decoder.cross_attention[0].w1.grad is not None


# --------------------------------------------------------------------------- frozen q/k


def test_frozen_qk_equals_the_q_k_of_real_open_clip_blocks():
    blocks = random_open_clip_blocks(2)
    frozen_qk = FrozenQK(layers=2, width=WIDTH, qk_weights=qk_weights_from_open_clip_blocks(blocks))
    batch, frames, head_width = 2, 3, WIDTH // HEADS
    block_inputs = torch.randn(batch, frames, 2, TOKENS, WIDTH)
    q, k = frozen_qk(block_inputs)  # (B, T, K, L, H, Dh)

    for i, block in enumerate(blocks):
        x = block_inputs[:, :, i].reshape(batch * frames, TOKENS, WIDTH)
        with torch.no_grad():
            normed = block.ln_1(x)
            q_rows, k_rows, v_rows = block.attn.in_proj_weight.chunk(3)
            q_bias, k_bias, v_bias = block.attn.in_proj_bias.chunk(3)
            expected_q = F.linear(normed, q_rows, q_bias).view(batch, frames, TOKENS, HEADS, head_width)
            expected_k = F.linear(normed, k_rows, k_bias).view(batch, frames, TOKENS, HEADS, head_width)
            torch.testing.assert_close(q[:, :, i], expected_q, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(k[:, :, i], expected_k, rtol=1e-5, atol=1e-5)

            # These q/k are the ones the block's own MultiheadAttention uses: finishing the
            # attention with them reproduces the block's attention output.
            def per_head(t):  # (B*T, L, H, Dh) -> (B*T, H, L, Dh)
                return t.reshape(batch * frames, TOKENS, HEADS, head_width).transpose(1, 2)

            v = per_head(F.linear(normed, v_rows, v_bias))
            mixed = F.scaled_dot_product_attention(per_head(q[:, :, i]), per_head(k[:, :, i]), v)
            ours = block.attn.out_proj(mixed.transpose(1, 2).reshape(batch * frames, TOKENS, WIDTH))
            torch.testing.assert_close(ours, block.attention(normed), rtol=1e-4, atol=1e-5)


def test_forward_from_block_inputs_equals_forward_with_q_k_captured_from_a_live_backbone():
    """Run a real open_clip transformer on frame tokens, capture what the extraction stage stores
    (each tapped block's input and output) and the q/k its attention computes, and check that the
    head gives the same logits from either."""
    backbone = Transformer(width=WIDTH, layers=LAYERS + 1, heads=HEADS).eval()
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

    def per_video(per_block):  # K x (B*T, L, X) -> (B, T, K, L, X)
        stacked = torch.stack(per_block, dim=1)
        return stacked.view(batch, FRAMES, *stacked.shape[1:])

    live_q, live_k = [], []
    for block, normed in zip(tapped, attention_inputs):  # normed = ln_1(input), as the block ran it
        q_rows, k_rows, _ = block.attn.in_proj_weight.chunk(3)
        q_bias, k_bias, _ = block.attn.in_proj_bias.chunk(3)
        live_q.append(F.linear(normed, q_rows, q_bias).view(-1, TOKENS, HEADS, head_width))
        live_k.append(F.linear(normed, k_rows, k_bias).view(-1, TOKENS, HEADS, head_width))

    head = EVLHead(tiny_config(), qk_weights_from_open_clip_blocks(tapped)).eval()
    fill_zero_initialised_parameters(head)
    features = per_video(block_outputs)
    with torch.no_grad():
        from_cache = head(features, per_video(block_inputs))
        from_live = head.forward_qk(features, per_video(live_q), per_video(live_k))
        without_cross_attention = head.forward_qk(
            features, torch.zeros_like(per_video(live_q)), torch.zeros_like(per_video(live_k))
        )
    torch.testing.assert_close(from_cache, from_live, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(from_cache, without_cross_attention, atol=1e-3)  # q/k do matter


# --------------------------------------------------------------------------- cross-attention


def naive_relative_offset_read(attention: torch.Tensor, table: torch.Tensor, grid: int) -> torch.Tensor:
    """attention (..., N, N) x table (S, D) -> (..., N, D) by gathering the table to (N, N, D)."""
    patches = grid * grid
    index = torch.empty(patches, patches, dtype=torch.long)
    for query in range(patches):
        for key in range(patches):
            row_offset = query // grid - key // grid  # query minus key, as the reference
            col_offset = query % grid - key % grid
            index[query, key] = (row_offset + grid - 1) * (2 * grid - 1) + (col_offset + grid - 1)
    return torch.einsum("...qk,qkd->...qd", attention, table[index])


def naive_temporal_cross_attention(q, k, w1, w2, grid):
    """The reference module written loop by loop: q, k (B, T, L, H, Dh) -> (B, T, L, D)."""
    batch, frames, tokens, _, head_width = q.shape
    out = torch.zeros(batch, frames, tokens, w1.shape[1])
    for t in range(frames):
        for other, table in ((t - 1, w1), (t + 1, w2)):
            if 0 <= other < frames:
                scores = torch.einsum("bqhd,bkhd->bhqk", q[:, t, 1:], k[:, other, 1:]) / head_width**0.5
                attention = scores.softmax(dim=-1).mean(dim=1)  # (B, N, N)
                out[:, t, 1:] += naive_relative_offset_read(attention, table, grid)
    return out


def test_binned_offset_read_equals_naive_gather_values_and_table_gradient():
    grid, width = 4, 6
    cross = TemporalCrossAttention(grid, width)
    with torch.no_grad():
        cross.w1.normal_()
    attention = torch.randn(2, 3, grid * grid, grid * grid).softmax(dim=-1)

    binned = cross.offset_bins(attention) @ cross.w1
    binned.square().sum().backward()
    binned_grad = cross.w1.grad.clone()
    cross.w1.grad = None
    naive = naive_relative_offset_read(attention, cross.w1, grid)
    naive.square().sum().backward()

    torch.testing.assert_close(binned, naive)
    torch.testing.assert_close(binned_grad, cross.w1.grad)


def test_temporal_cross_attention_module_equals_loop_reference():
    grid, width, heads, frames = 3, 8, 2, 4
    cross = TemporalCrossAttention(grid, width)
    with torch.no_grad():
        cross.w1.normal_()
        cross.w2.normal_()
    q = torch.randn(2, frames, 1 + grid * grid, heads, width // heads)
    k = torch.randn(2, frames, 1 + grid * grid, heads, width // heads)
    expected = naive_temporal_cross_attention(q, k, cross.w1.detach(), cross.w2.detach(), grid)
    torch.testing.assert_close(cross(q, k), expected)


def test_reversing_frames_changes_output_only_with_temporal_modules():
    features, block_inputs = tiny_inputs()
    reversed_features, reversed_inputs = features.flip(1), block_inputs.flip(1)

    cross_only = tiny_head(temporal_conv=False, temporal_pos_embed=False).eval()
    with torch.no_grad():
        assert not torch.allclose(
            cross_only(features, block_inputs), cross_only(reversed_features, reversed_inputs), atol=1e-4
        )

    no_temporal = tiny_head(
        temporal_conv=False, temporal_pos_embed=False, temporal_cross_attention=False
    ).eval()
    assert not hasattr(no_temporal, "qk")
    with torch.no_grad():
        torch.testing.assert_close(
            no_temporal(features), no_temporal(reversed_features), rtol=1e-5, atol=1e-5
        )


# --------------------------------------------------------------------------- checkpoints


def reference_checkpoint_shapes(width, frames, grid, classes, layers=4) -> dict[str, tuple]:
    """The key layout of an official EVL checkpoint, written out from METHODS.md 7.1."""
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


def test_reference_layout_checkpoint_loads_strictly():
    cfg = tiny_config(layers=4)
    qk_weights = qk_weights_from_open_clip_blocks(random_open_clip_blocks(4))
    head = EVLHead(cfg, qk_weights)
    checkpoint = random_checkpoint(reference_checkpoint_shapes(WIDTH, FRAMES, GRID, CLASSES))

    load_reference_state_dict(head, {"model": checkpoint, "next_step": 10})

    loaded = head.state_dict()
    for key, value in checkpoint.items():
        assert torch.equal(loaded[key.removeprefix("module.")], value), key
    torch.testing.assert_close(head.qk.in_proj_weight, qk_weights["in_proj_weight"])  # kept


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
    features, block_inputs = tiny_inputs()
    path = tmp_path / "head.safetensors"
    save_file(head.state_dict(), str(path))

    rebuilt = EVLHead(EVLConfig.from_dict(head.cfg.to_dict())).eval()  # no qk weights given
    rebuilt.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        assert torch.equal(head(features, block_inputs), rebuilt(features, block_inputs))
