"""ViFi-CLIP's bridge-and-prompt stage on the tiny open_clip model (real towers, CPU)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from clipreel.errors import ClipreelError
from clipreel.heads.clip import load_clip
from clipreel.heads.layers import trainable_parameter_count, trainable_parameters
from clipreel.heads.raw.bridge_prompt import BridgePrompt, BridgePromptConfig

CLASSNAMES = ["dog", "playing_guitar", "riding a horse"]
LABELS = torch.tensor([0, 2])
TINY_WIDTH = 64  # vision and text width of clipreel-tiny
TINY_BRIDGE = BridgePromptConfig(n_ctx_vision=3, n_ctx_text=5, depth_vision=3, depth_text=2)


def tiny_frames(batch: int = 2, num_frames: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(batch, num_frames, 3, 112, 112, generator=generator)  # (B, T, 3, S, S)


def test_bridge_shapes_and_only_the_prompts_train(tiny_clip, fresh_tiny_clip, one_training_step):
    _, tokenizer = tiny_clip
    clip_model = fresh_tiny_clip()
    clip_before = {name: param.detach().clone() for name, param in clip_model.named_parameters()}
    torch.manual_seed(0)
    bridge = BridgePrompt(clip_model, tokenizer, CLASSNAMES, TINY_BRIDGE)

    trainable = trainable_parameters(bridge)
    assert set(trainable) == {
        "image_encoder.ctx",
        "image_encoder.deep_ctx.0",
        "image_encoder.deep_ctx.1",
        "prompt_learner.ctx",
        "prompt_learner.deep_ctx.0",
    }
    assert trainable_parameter_count(bridge) == 3 * TINY_WIDTH * 3 + 5 * TINY_WIDTH * 2

    frames = tiny_frames()
    out = bridge(frames)
    assert out["frame_embeds"].shape == (2, 3, TINY_WIDTH)
    assert out["video_embeds"].shape == (2, TINY_WIDTH)
    assert bridge.prompt_learner().shape == (3, TINY_WIDTH)
    assert out["logits"].shape == (2, 3)

    one_training_step(bridge, frames, LABELS)
    assert not bridge.image_encoder.clip.training  # the frozen CLIP stays in eval mode
    assert not bridge.prompt_learner.clip.model.training
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in clip_model.named_parameters():
        assert param.grad is None, name
        assert torch.equal(param, clip_before[name]), name


def test_bridge_vision_path_is_open_clip_with_prompts_appended_before_ln_pre(tiny_clip, fresh_tiny_clip):
    reference, tokenizer = tiny_clip
    torch.manual_seed(0)
    config = BridgePromptConfig(n_ctx_vision=4, n_ctx_text=5, depth_vision=1, depth_text=1)
    bridge = BridgePrompt(fresh_tiny_clip(), tokenizer, CLASSNAMES, config)
    images = tiny_frames()[0]  # (T, 3, S, S)
    visual = reference.visual
    with torch.no_grad():
        tokens = visual._embeds(images)  # (T, L, W): ln_pre(cls + patches + positions)
        prompts = visual.ln_pre(bridge.image_encoder.ctx).expand(len(images), -1, -1)  # (T, 4, W)
        x = visual.transformer(torch.cat([tokens, prompts], dim=1))  # (T, L + 4, W)
        expected = visual.ln_post(x[:, 0]) @ visual.proj  # (T, E)
        ours = bridge.image_encoder(images)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours, reference.encode_image(images), atol=1e-3)  # prompts are attended


def test_bridge_deep_vision_prompt_replaces_the_last_tokens_before_the_layer(tiny_clip, fresh_tiny_clip):
    """Set to what layer 0 outputs at the prompt positions, the layer-1 prompt changes nothing."""
    _, tokenizer = tiny_clip
    torch.manual_seed(0)
    shallow = BridgePrompt(
        fresh_tiny_clip(),
        tokenizer,
        CLASSNAMES,
        BridgePromptConfig(n_ctx_vision=4, n_ctx_text=5, depth_vision=1, depth_text=1),
    )
    deep = BridgePrompt(
        fresh_tiny_clip(),
        tokenizer,
        CLASSNAMES,
        BridgePromptConfig(n_ctx_vision=4, n_ctx_text=5, depth_vision=2, depth_text=1),
    )
    image = tiny_frames()[0, :1]  # one frame: its prompt outputs are what the shared deep prompt copies
    visual = shallow.image_encoder.clip.model.visual
    with torch.no_grad():
        deep.image_encoder.ctx.copy_(shallow.image_encoder.ctx)
        x = torch.cat([visual._embeds(image), visual.ln_pre(shallow.image_encoder.ctx)[None]], dim=1)
        after_layer0 = visual.transformer.resblocks[0](x)  # (1, L + 4, W)
        deep.image_encoder.deep_ctx[0].copy_(after_layer0[0, -4:])
        torch.testing.assert_close(deep.image_encoder(image), shallow.image_encoder(image), rtol=1e-5, atol=1e-5)

        deep.image_encoder.deep_ctx[0].normal_(std=0.02)
        assert not torch.allclose(deep.image_encoder(image), shallow.image_encoder(image), atol=1e-3)


def test_bridge_save_load_round_trip_holds_only_the_prompts(tiny_clip, tmp_path, fresh_tiny_clip,
                                                              one_training_step):
    _, tokenizer = tiny_clip
    torch.manual_seed(0)
    bridge = BridgePrompt(fresh_tiny_clip(), tokenizer, CLASSNAMES, TINY_BRIDGE)
    frames = tiny_frames()
    one_training_step(bridge, frames, LABELS)
    state = bridge.state_dict()
    assert set(state) == set(trainable_parameters(bridge)) | {"logit_scale"}

    save_file(state, tmp_path / "prompts.safetensors")
    torch.manual_seed(1)  # different random prompts, replaced by the loaded ones
    reloaded = BridgePrompt(fresh_tiny_clip(), tokenizer, CLASSNAMES, TINY_BRIDGE)
    reloaded.load_state_dict(load_file(tmp_path / "prompts.safetensors"))
    bridge.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(frames)["logits"], bridge(frames)["logits"])


def test_bridge_refuses_depth_beyond_the_towers(tiny_clip, fresh_tiny_clip):
    _, tokenizer = tiny_clip
    with pytest.raises(ClipreelError, match="depth_vision 7"):
        BridgePrompt(fresh_tiny_clip(), tokenizer, CLASSNAMES, BridgePromptConfig(n_ctx_text=5, depth_vision=7))
    with pytest.raises(ClipreelError, match="deep_depth 3"):
        BridgePrompt(
            fresh_tiny_clip(), tokenizer, CLASSNAMES, BridgePromptConfig(n_ctx_text=5, depth_vision=2, depth_text=3)
        )
    with pytest.raises(ClipreelError, match="n_ctx_vision"):
        BridgePromptConfig(n_ctx_vision=0)


def test_parameter_counts_for_vit_b_16():
    """ViFi-CLIP's prompts: n_ctx * (768 + 512) per layer, for `depth` layers of both towers."""
    clip_model, _ = load_clip("ViT-B-16", "none")
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    assert trainable_parameter_count(BridgePrompt(clip_model, tokenizer, CLASSNAMES)) == 16 * (768 + 512) * 9
    assert trainable_parameter_count(
        BridgePrompt(clip_model, tokenizer, CLASSNAMES, BridgePromptConfig.few_shot())) == 10 * (768 + 512) * 12


def test_fp16_prompts_round_the_vision_and_deep_text_prompts_as_they_are_used(tiny_clip, fresh_tiny_clip, one_training_step):
    """ViFi-CLIP's forward casts its vision prompts and deep text prompts with .half(), not the text ctx:
    with fp16_prompts the model computes what a model holding those rounded values computes, and still trains."""
    _, tokenizer = tiny_clip
    torch.manual_seed(1)
    rounding = BridgePrompt(fresh_tiny_clip(), tokenizer, CLASSNAMES,
                            BridgePromptConfig(**{**TINY_BRIDGE.to_dict(), "fp16_prompts": True})).eval()
    with torch.no_grad():
        for param in rounding.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 1e-3)  # values off the fp16 grid
    rounded = BridgePrompt(fresh_tiny_clip(), tokenizer, CLASSNAMES, TINY_BRIDGE).eval()
    rounded.load_state_dict(rounding.state_dict())
    with torch.no_grad():
        for prompt in [rounded.image_encoder.ctx, *rounded.image_encoder.deep_ctx, *rounded.prompt_learner.deep_ctx]:
            prompt.copy_(prompt.half().float())
    unrounded = BridgePrompt(fresh_tiny_clip(), tokenizer, CLASSNAMES, TINY_BRIDGE).eval()
    unrounded.load_state_dict(rounding.state_dict())
    frames = tiny_frames()
    with torch.no_grad():
        expected = rounded(frames)["logits"]
        torch.testing.assert_close(rounding(frames)["logits"], expected, rtol=0, atol=0)
        assert not torch.equal(unrounded(frames)["logits"], expected)
    one_training_step(rounding, frames, LABELS)
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in trainable_parameters(rounding).values())
