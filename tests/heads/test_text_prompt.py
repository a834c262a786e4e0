"""Text prompt learning (CoOp / ViFi-CLIP) against the frozen tiny open_clip text tower."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipreel.errors import ClipreelError
from clipreel.heads.cache.text_prompt import (
    PromptedClassifier,
    TextPromptConfig,
    TextPromptLearner,
)
from clipreel.heads.layers import FrozenCLIP

CLASSNAMES = ["dog", "playing_guitar", "riding a horse"]


def reference_text_embeds(model, tokenizer, texts) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(tokenizer(texts))


def photo_prompt_config(deep_depth: int = 1) -> TextPromptConfig:
    return TextPromptConfig(n_ctx=4, ctx_init="a photo of a", deep_depth=deep_depth)


def test_ctx_from_a_photo_of_a_reproduces_encode_text(tiny_clip):
    model, tokenizer = tiny_clip
    learner = TextPromptLearner(FrozenCLIP(model, tokenizer), CLASSNAMES, photo_prompt_config())
    with torch.no_grad():
        ours = learner()
    expected = reference_text_embeds(
        model, tokenizer, ["a photo of a dog.", "a photo of a playing guitar.", "a photo of a riding a horse."]
    )
    assert ours.shape == expected.shape == (3, 64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_deep_prompt_replaces_the_ctx_positions_before_layer_one(tiny_clip):
    """Set to what layer 0 outputs at positions 1..n_ctx, the deep prompt changes nothing.

    Under the causal mask those positions only see [SOS] and the ctx, so they are the same for
    every class; any other deep prompt must change the output.
    """
    model, tokenizer = tiny_clip
    learner = TextPromptLearner(FrozenCLIP(model, tokenizer), CLASSNAMES, photo_prompt_config(deep_depth=2))
    with torch.no_grad():
        token_ids = tokenizer(["a photo of a dog."])
        x = model.token_embedding(token_ids) + model.positional_embedding  # (1, C, W)
        after_layer0 = model.transformer.resblocks[0](x, attn_mask=model.attn_mask)
        learner.deep_ctx[0].copy_(after_layer0[0, 1:5])
        expected = reference_text_embeds(
            model, tokenizer, ["a photo of a dog.", "a photo of a playing guitar.", "a photo of a riding a horse."]
        )
        torch.testing.assert_close(learner(), expected, rtol=1e-5, atol=1e-5)

        learner.deep_ctx[0].normal_(std=0.02)
        assert not torch.allclose(learner(), expected, atol=1e-3)


def test_gradients_reach_the_prompts_and_nothing_frozen(tiny_clip):
    model, tokenizer = tiny_clip
    torch.manual_seed(1)
    config = TextPromptConfig(n_ctx=6, deep_depth=2)
    classifier = PromptedClassifier(config, FrozenCLIP(model, tokenizer), CLASSNAMES)
    classifier.train()
    assert not classifier.prompt_learner.clip.model.transformer.training  # frozen tower stays in eval

    embeds = torch.randn(5, 4, 64).half()  # (B, T, E) as the cache stores them
    logits = classifier({"embeds": embeds})
    assert logits.shape == (5, 3)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1])).backward()

    trainable = {name: p for name, p in classifier.named_parameters() if p.requires_grad}
    assert set(trainable) == {"prompt_learner.ctx", "prompt_learner.deep_ctx.0"}
    assert sum(p.numel() for p in trainable.values()) == 6 * 64 * 2
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())
    assert not classifier.logit_scale.requires_grad
    assert classifier.logit_scale.item() == pytest.approx(model.logit_scale.item())


def test_saved_state_is_the_prompts_only_and_round_trips(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    torch.manual_seed(2)
    config = TextPromptConfig(n_ctx=5, deep_depth=2)
    classifier = PromptedClassifier(config, FrozenCLIP(model, tokenizer), CLASSNAMES).eval()
    state = classifier.state_dict()
    assert set(state) == {"prompt_learner.ctx", "prompt_learner.deep_ctx.0", "logit_scale"}
    save_file(state, tmp_path / "prompts.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))

    torch.manual_seed(3)  # different random prompts, overwritten by the load
    rebuilt_config = TextPromptConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    loaded = PromptedClassifier(rebuilt_config, FrozenCLIP(model, tokenizer), CLASSNAMES).eval()
    loaded.load_state_dict(load_file(tmp_path / "prompts.safetensors"))  # strict: nothing missing

    embeds = torch.randn(2, 4, 64)
    with torch.no_grad():
        assert torch.equal(classifier({"embeds": embeds}), loaded({"embeds": embeds}))


def test_set_classnames_rescores_with_the_same_prompts(tiny_clip):
    model, tokenizer = tiny_clip
    torch.manual_seed(4)
    classifier = PromptedClassifier(TextPromptConfig(n_ctx=8), FrozenCLIP(model, tokenizer), CLASSNAMES).eval()
    embeds = torch.randn(2, 4, 64)
    with torch.no_grad():
        before = classifier({"embeds": embeds})
        classifier.set_classnames(["cat", "dog"])
        after = classifier({"embeds": embeds})
    assert after.shape == (2, 2)
    torch.testing.assert_close(after[:, 1], before[:, 0])  # "dog" scores the same


def test_prompt_count_at_vit_b16_text_width():
    """ViFi-CLIP base-to-novel text prompts: n_ctx 16, depth 9 at width 512 -> 73,728 parameters."""
    torch.manual_seed(5)
    model = open_clip.CLIP(
        embed_dim=512,
        vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=1, head_width=32),
        text_cfg=dict(width=512, heads=8, layers=12),
    )
    learner = TextPromptLearner(FrozenCLIP(model, open_clip.get_tokenizer("ViT-B-16")), ["dog"],
                                TextPromptConfig(deep_depth=9))
    trainable = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    assert trainable == 16 * 512 * 9 == 73_728
    with torch.no_grad():
        assert learner().shape == (1, 512)


def test_bad_prompt_configs_are_refused(tiny_clip):
    model, tokenizer = tiny_clip
    with pytest.raises(ClipreelError, match="4 tokens"):
        TextPromptLearner(FrozenCLIP(model, tokenizer), CLASSNAMES,
                          TextPromptConfig(n_ctx=3, ctx_init="a photo of a"))
    with pytest.raises(ClipreelError, match="deep_depth"):
        TextPromptLearner(FrozenCLIP(model, tokenizer), CLASSNAMES, TextPromptConfig(n_ctx=4, deep_depth=3))
    with pytest.raises(ClipreelError, match="class_token_position"):
        TextPromptConfig(class_token_position="middle")
