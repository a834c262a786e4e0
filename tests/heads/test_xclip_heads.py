"""X-CLIP cache heads: MIT and the video-specific prompt generator."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipreel.errors import ClipreelError
from clipreel.heads.cache.xclip import (
    CrossAttention,
    MITConfig,
    MITHead,
    MITHeadConfig,
    MultiFrameIntegration,
    PromptGeneratorConfig,
    XCLIPHead,
    XCLIPHeadConfig,
)
from clipreel.heads.layers import FrozenCLIP, encode_texts, trainable_parameter_count

CLASSNAMES = ["juggling balls", "riding a bike", "swimming"]
FRAMES = 4
PATCHES = 49  # (112 / 16) ** 2 for the tiny ViT


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def frozen_clip(tiny_clip):
    return FrozenCLIP(*tiny_clip)


@pytest.fixture(scope="module")
def vit_b16_head():
    """The head at ViT-B/16 dimensions, on a meta-device CLIP (no weights needed to count or name parameters)."""
    clip = open_clip.create_model("ViT-B-16", device="meta")
    torch.manual_seed(0)
    config = XCLIPHeadConfig(embed_dim=512, visual_width=768, frames=8)
    return XCLIPHead(config, FrozenCLIP(clip, open_clip.get_tokenizer("ViT-B-16")), ["a", "b"])


def tiny_config(tiny_clip) -> XCLIPHeadConfig:
    model, _ = tiny_clip
    return XCLIPHeadConfig(
        embed_dim=model.text_projection.shape[1],
        visual_width=model.visual.transformer.width,
        frames=FRAMES,
        mit_heads=2,
        prompt_heads=4,
        logit_scale=float(model.logit_scale),
    )


def cache_batch(config: XCLIPHeadConfig, batch: int = 2, seed: int = 1) -> dict:
    """What the feature cache hands the head: fp16 embeds (B, T, E) and the last block's tokens
    (B, T, 1, 1 + N, D), CLS first."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, config.frames, config.embed_dim, generator=generator).half()
    tokens = torch.randn(batch, config.frames, 1, 1 + PATCHES, config.visual_width, generator=generator).half()
    return {"embeds": embeds, "tokens": tokens}


def test_mit_parameter_count_vit_b16():
    mit = MultiFrameIntegration(MITConfig(embed_dim=512, frames=8))
    assert mit.config.num_heads == 8
    assert count(mit) == 3_156_480


def test_prompt_generator_parameter_counts_vit_b16(vit_b16_head):
    head = vit_b16_head
    assert count(head.prompts_generator) == 6_303_232
    assert count(head.prompts_visual_ln) + head.prompts_visual_proj.numel() == 394_752
    assert trainable_parameter_count(head) == 3_156_480 + 6_303_232 + 394_752
    assert head.prompts_generator.config.num_heads == 8


def test_state_dict_names_and_shapes_follow_the_released_checkpoints(vit_b16_head):
    shapes = {name: tuple(t.shape) for name, t in vit_b16_head.state_dict().items()}
    expected = {
        "mit.positional_embedding": (1, 8, 512),
        "mit.resblocks.0.attn.in_proj_weight": (1536, 512),
        "mit.resblocks.0.attn.in_proj_bias": (1536,),
        "mit.resblocks.0.attn.out_proj.weight": (512, 512),
        "mit.resblocks.0.ln_1.weight": (512,),
        "mit.resblocks.0.ln_2.bias": (512,),
        "mit.resblocks.0.mlp.c_fc.weight": (2048, 512),
        "mit.resblocks.0.mlp.c_proj.weight": (512, 2048),
        "prompts_visual_ln.weight": (768,),
        "prompts_visual_proj": (768, 512),
        "prompts_generator.norm.weight": (512,),
        "prompts_generator.alpha": (512,),
        "prompts_generator.decoder.1.norm1.weight": (512,),
        "prompts_generator.decoder.1.norm3.bias": (512,),
        "prompts_generator.decoder.0.cross_attn.q_proj.weight": (512, 512),
        "prompts_generator.decoder.0.cross_attn.k_proj.weight": (512, 512),
        "prompts_generator.decoder.0.cross_attn.v_proj.weight": (512, 512),
        "prompts_generator.decoder.0.cross_attn.proj.bias": (512,),
        "prompts_generator.decoder.1.mlp.0.weight": (2048, 512),
        "prompts_generator.decoder.1.mlp.3.weight": (512, 2048),
        "logit_scale": (),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    assert "prompts_generator.decoder.0.cross_attn.q_proj.bias" not in shapes  # no bias, as X-CLIP


def test_prompt_generator_heads_follow_the_width():
    assert PromptGeneratorConfig(embed_dim=768, visual_width=1024).num_heads == 12  # L/14, as X-CLIP
    assert PromptGeneratorConfig(embed_dim=64, visual_width=64).num_heads == 1
    assert PromptGeneratorConfig(embed_dim=60, visual_width=64, heads=8).num_heads == 6
    assert PromptGeneratorConfig(embed_dim=64, visual_width=64, heads=8).num_heads == 8


def test_cross_attention_equals_torch_multihead_attention():
    """The generator's attention (separate bias-free q/k/v) computes what nn.MultiheadAttention does."""
    torch.manual_seed(12)
    attention = CrossAttention(dim=64, heads=4).eval()
    reference = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(
            torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        )
        reference.in_proj_bias.zero_()
        reference.out_proj.load_state_dict(attention.proj.state_dict())
        text, visual = torch.randn(2, 3, 64), torch.randn(2, 10, 64)
        expected, _ = reference(text, visual, visual, need_weights=False)
        torch.testing.assert_close(attention(text, visual), expected)


def test_xclip_forward_shapes_and_gradients(tiny_clip, frozen_clip):
    torch.manual_seed(2)
    head = XCLIPHead(tiny_config(tiny_clip), frozen_clip, CLASSNAMES)
    model, tokenizer = tiny_clip
    # The class texts are X-CLIP's: encode_text of the bare class names, not normalised.
    torch.testing.assert_close(head.class_text_embeds, encode_texts(model, tokenizer, CLASSNAMES))
    logits = head(cache_batch(head.config))
    assert logits.shape == (2, len(CLASSNAMES))
    assert logits.dtype == torch.float32

    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    for name, param in head.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert "logit_scale" not in dict(head.named_parameters())
    assert not head.logit_scale.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_mit_head_forward_and_gradients(tiny_clip, frozen_clip):
    model, _ = tiny_clip
    torch.manual_seed(3)
    head = MITHead(MITHeadConfig(embed_dim=64, frames=FRAMES, logit_scale=float(model.logit_scale)), frozen_clip,
                   CLASSNAMES)
    logits = head(cache_batch(tiny_config(tiny_clip), batch=3))
    assert logits.shape == (3, len(CLASSNAMES))
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, param in head.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert not head.logit_scale.requires_grad


def test_xclip_save_load_round_trip(tiny_clip, frozen_clip, tmp_path):
    torch.manual_seed(4)
    head = XCLIPHead(tiny_config(tiny_clip), frozen_clip, CLASSNAMES).eval()
    assert not [key for key in head.state_dict() if key.startswith("clip.")]  # the frozen CLIP is not saved
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(head.config.to_dict()))

    torch.manual_seed(5)  # a different initialisation, overwritten by the load
    config = XCLIPHeadConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    loaded = XCLIPHead(config, frozen_clip, CLASSNAMES).eval()
    loaded.load_state_dict(load_file(tmp_path / "head.safetensors"))

    batch = cache_batch(config)
    with torch.no_grad():
        assert torch.equal(head(batch), loaded(batch))


def test_config_from_json_refuses_unknown_keys(tiny_clip):
    values = tiny_config(tiny_clip).to_dict() | {"mit_layer": 2}
    with pytest.raises(ClipreelError, match="mit_layer"):
        XCLIPHeadConfig.from_dict(values)


def test_mit_head_save_load_round_trip(frozen_clip, tmp_path):
    torch.manual_seed(6)
    head = MITHead(MITHeadConfig(embed_dim=64, frames=FRAMES, layers=2), frozen_clip, CLASSNAMES).eval()
    save_file(head.state_dict(), tmp_path / "mit.safetensors")
    torch.manual_seed(7)
    loaded = MITHead(MITHeadConfig.from_dict(head.config.to_dict()), frozen_clip, CLASSNAMES).eval()
    loaded.load_state_dict(load_file(tmp_path / "mit.safetensors"))
    batch = {"embeds": torch.randn(2, FRAMES, 64)}
    with torch.no_grad():
        assert torch.equal(head(batch), loaded(batch))
        loaded.set_classnames(["swimming", "riding a bike"])  # other classes: the same texts score the same
        torch.testing.assert_close(loaded(batch), head(batch)[:, [2, 1]])


def test_mit_is_frame_order_sensitive_through_its_positional_embedding():
    torch.manual_seed(8)
    mit = MultiFrameIntegration(MITConfig(embed_dim=64, frames=FRAMES)).eval()
    embeds = torch.randn(2, FRAMES, 64)
    reversed_frames = embeds.flip(dims=[1])
    with torch.no_grad():
        mit.positional_embedding.copy_(torch.randn(1, FRAMES, 64))
        assert not torch.allclose(mit(embeds), mit(reversed_frames), atol=1e-4)
        mit.positional_embedding.zero_()  # without it, attention + mean cannot see the order
        torch.testing.assert_close(mit(embeds), mit(reversed_frames))


def test_mit_adds_the_input_back_and_averages_frames():
    """With its blocks silenced (zero output projections) MIT is mean_T(2 * x + pos)."""
    torch.manual_seed(9)
    mit = MultiFrameIntegration(MITConfig(embed_dim=64, frames=FRAMES)).eval()
    with torch.no_grad():
        for block in mit.resblocks:
            for linear in (block.attn.out_proj, block.mlp.c_proj):
                linear.weight.zero_()
                linear.bias.zero_()
        embeds = torch.randn(3, FRAMES, 64)
        expected = (2 * embeds + mit.positional_embedding).mean(dim=1)
        torch.testing.assert_close(mit(embeds), expected)


def test_xclip_without_prompt_offset_equals_mit_head(tiny_clip, frozen_clip):
    """alpha = 0 switches the prompt generator off: X-CLIP then scores like the MIT-only head."""
    torch.manual_seed(10)
    config = tiny_config(tiny_clip)
    xclip = XCLIPHead(config, frozen_clip, CLASSNAMES).eval()
    mit_config = MITHeadConfig(config.embed_dim, config.frames, heads=config.mit_heads, logit_scale=config.logit_scale)
    mit_head = MITHead(mit_config, frozen_clip, CLASSNAMES).eval()
    mit_head.mit.load_state_dict(xclip.mit.state_dict())
    batch = cache_batch(config)
    with torch.no_grad():
        prompted = xclip(batch)
        xclip.prompts_generator.alpha.zero_()
        unprompted = xclip(batch)
        torch.testing.assert_close(unprompted, mit_head(batch))
    assert not torch.allclose(prompted, unprompted)


def test_prompted_text_depends_on_the_video_patches(tiny_clip, frozen_clip):
    torch.manual_seed(11)
    head = XCLIPHead(tiny_config(tiny_clip), frozen_clip, CLASSNAMES).eval()
    batch = cache_batch(head.config, seed=1)
    other_patches = {**batch, "tokens": cache_batch(head.config, seed=2)["tokens"]}
    with torch.no_grad():
        logits = head(batch)
        logits_other = head(other_patches)
    assert not torch.allclose(logits, logits_other)
