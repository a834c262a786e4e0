"""EZ-CLIP on the tiny open_clip model: shapes, exactness at init, what trains, losses, saving."""

from __future__ import annotations

import logging
import math

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from clipreel.errors import ClipreelError
from clipreel.heads.layers import FrozenCLIP, trainable_parameter_count, trainable_parameters
from clipreel.heads.raw.ezclip import (
    EZCLIP,
    EZCLIPConfig,
    contrastive_kl_loss,
    motion_loss,
    reference_key,
    same_label_matrix,
)

FRAMES = 4
IMAGE_SIZE = 112  # clipreel-tiny


def _frames(batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)  # (B, T, 3, S, S)


def _model(tiny_clip, seed: int = 0, **options) -> EZCLIP:
    torch.manual_seed(seed)
    return EZCLIP(FrozenCLIP(*tiny_clip), EZCLIPConfig(frames=FRAMES, **options)).eval()


def _randomise_trainables(model: EZCLIP, seed: int) -> None:
    """Give the prompts and both adapter layers non-trivial values (fc2 starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainable_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def test_shapes(tiny_clip):
    clip_model, tokenizer = tiny_clip
    model = _model(tiny_clip)
    with torch.no_grad():
        out = model(_frames(batch=3))
        text = model.encode_text(tokenizer(["a red circle", "a blue square"]))
        logits = model.logits(out["video_embeds"], text)
    embed_dim = clip_model.visual.output_dim
    assert out["frame_embeds"].shape == (3, FRAMES, embed_dim)
    assert out["video_embeds"].shape == (3, embed_dim)
    assert torch.allclose(out["video_embeds"], out["frame_embeds"].mean(dim=1))
    assert text.shape == (2, embed_dim)
    assert logits.shape == (3, 2)
    assert logits.abs().max() <= clip_model.logit_scale.exp() + 1e-4  # a scaled cosine


def test_wrong_frame_count_is_refused(tiny_clip):
    model = _model(tiny_clip)
    with pytest.raises(ClipreelError, match="sample 4 frames"):
        model(torch.zeros(1, FRAMES + 1, 3, IMAGE_SIZE, IMAGE_SIZE))


def test_without_prompts_the_fresh_model_is_plain_clip(tiny_clip):
    """Adapters start as the identity: with prompts off, both towers equal open_clip's exactly."""
    clip_model, tokenizer = tiny_clip
    model = _model(tiny_clip, use_prompts=False)
    frames = _frames()
    token_ids = tokenizer(["a red circle moving left", "a green triangle"])
    with torch.no_grad():
        ours = model(frames)["frame_embeds"].flatten(0, 1)  # (B*T, E)
        plain = clip_model.encode_image(frames.flatten(0, 1))
        assert torch.equal(ours, plain)
        assert torch.equal(model.encode_text(token_ids), clip_model.encode_text(token_ids))


def test_the_prompt_token_changes_the_output_even_at_zero(tiny_clip):
    """With P = 0 the prompt is still the frame mean attended across frames, and it is attended to."""
    clip_model, _ = tiny_clip
    model = _model(tiny_clip)
    with torch.no_grad():
        model.T_prompt_embeddings.zero_()
        frames = _frames()
        ours = model(frames)["frame_embeds"].flatten(0, 1)
        plain = clip_model.encode_image(frames.flatten(0, 1))
    assert ours.shape == plain.shape
    assert (ours - plain).abs().max() > 1e-4


def test_frame_order_matters_only_through_the_prompts(tiny_clip):
    frames = _frames()
    reversed_frames = frames.flip(1)
    model = _model(tiny_clip)
    with torch.no_grad():
        # Zero prompts: nothing tells the frames apart, so order cannot matter.
        model.T_prompt_embeddings.zero_()
        forward_order = model(frames)["video_embeds"]
        backward_order = model(reversed_frames)["video_embeds"]
        assert torch.allclose(forward_order, backward_order, atol=1e-5)
        # Per-frame prompts: the same frames in another order give another video.
        _randomise_trainables(model, seed=1)
        forward_order = model(frames)["video_embeds"]
        backward_order = model(reversed_frames)["video_embeds"]
    assert (forward_order - backward_order).abs().max() > 1e-3


def test_the_temporal_embedding_trains_only_when_asked(tiny_clip):
    """Frozen zeros as shipped; trained, it tells frames apart by time even without prompts."""
    shipped = _model(tiny_clip)
    assert "temporal_embedding" not in trainable_parameters(shipped)
    model = _model(tiny_clip, train_temporal_embedding=True, use_prompts=False)
    trainable = trainable_parameters(model)
    width = model.clip.model.visual.transformer.width
    assert trainable["temporal_embedding"].shape == (1, FRAMES, width)
    assert trainable_parameter_count(model) == trainable_parameter_count(_model(tiny_clip, use_prompts=False)) + (
        FRAMES * width)
    frames = _frames()
    with torch.no_grad():
        assert torch.allclose(model(frames)["video_embeds"], model(frames.flip(1))["video_embeds"], atol=1e-5)
        model.temporal_embedding.normal_(std=0.5)
        assert (model(frames)["video_embeds"] - model(frames.flip(1))["video_embeds"]).abs().max() > 1e-3
    assert reference_key("temporal_embedding") == "visual.temporal_embedding"
    assert "temporal_embedding" in model.state_dict()  # saved with the run, loaded from EZ-CLIP checkpoints


def test_only_prompts_and_adapters_train(tiny_clip):
    clip_model, tokenizer = tiny_clip
    model = _model(tiny_clip).train()
    assert not model.clip.model.training  # the frozen CLIP stays in eval mode
    trainable = trainable_parameters(model)
    assert "T_prompt_embeddings" in trainable
    assert all(name.startswith(("T_prompt", "visual_adapters.", "text_adapters.")) for name in trainable)
    frozen_before = {name: value.clone() for name, value in clip_model.state_dict().items()}
    trainable_before = {name: param.detach().clone() for name, param in trainable.items()}

    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.2)
    labels = torch.tensor([0, 1])
    out = model(_frames())
    text = model.encode_text(tokenizer(["a red circle", "a blue square"]))[labels]  # (B, E): one text per video
    logits_per_video = model.logits(out["video_embeds"], text)
    same_label = same_label_matrix(labels)
    loss = contrastive_kl_loss(logits_per_video, logits_per_video.t(), same_label) + motion_loss(out["frame_embeds"])
    loss.backward()

    assert all(param.grad is None for param in clip_model.parameters())
    for name, param in trainable.items():
        assert param.grad is not None, name
    optimizer.step()
    for name, value in clip_model.state_dict().items():
        assert torch.equal(value, frozen_before[name]), name
    changed = [name for name, param in trainable.items() if not torch.equal(param, trainable_before[name])]
    assert set(changed) == set(trainable)


def test_motion_loss_on_hand_made_embeddings():
    # No change over time: C = V = 0, so the loss is 1.
    still = torch.ones(2, 5, 3)
    assert motion_loss(still).item() == pytest.approx(1.0)
    # One video, one dimension, e = [0, 2, 4]: the central differences with replicated edges are
    # (2-0)/2, (4-0)/2, (4-2)/2 -> C = 4/3; the unbiased variance of (0, 2, 4) is 4.
    ramp = torch.tensor([[[0.0], [2.0], [4.0]]])
    assert motion_loss(ramp).item() == pytest.approx(1.0 / (4 / 3 + 4 + 1))
    # Means over videos and dimensions: a still copy beside the ramp halves C and V.
    both = torch.cat([ramp, torch.zeros(1, 3, 1)], dim=0)  # (2, 3, 1)
    assert motion_loss(both).item() == pytest.approx(1.0 / (2 / 3 + 2 + 1))
    with pytest.raises(ValueError):
        motion_loss(torch.zeros(2, 1, 3))


def test_contrastive_kl_loss_on_a_tiny_case():
    same_label = same_label_matrix(torch.tensor([0, 1]))
    assert torch.equal(same_label, torch.eye(2))
    # Flat logits: each direction is element-mean KL(p || 1/2) times the batch size 2, where each
    # target row is softmax(10 * one-hot) = (big, small) in some order.
    big = math.exp(10) / (math.exp(10) + 1)
    small = 1 - big
    row_kl = big * math.log(big / 0.5) + small * math.log(small / 0.5)
    expected = 2 * (2 * row_kl) / 4
    flat = torch.zeros(2, 2)
    assert contrastive_kl_loss(flat, flat, same_label).item() == pytest.approx(expected, rel=1e-5)
    # Logits that agree with the labels cost less than logits that contradict them.
    agree = 10 * torch.eye(2)
    assert contrastive_kl_loss(agree, agree.t(), same_label) < contrastive_kl_loss(flat, flat, same_label)
    contradict = agree.flip(1)
    assert contrastive_kl_loss(contradict, contradict.t(), same_label) > contrastive_kl_loss(flat, flat, same_label)
    # Shared classes are all positives: two videos of class 0 and one of class 1.
    shared = same_label_matrix(torch.tensor([0, 0, 1]))
    assert shared.sum().item() == 5
    with pytest.raises(ValueError):
        contrastive_kl_loss(torch.zeros(3, 3), torch.zeros(3, 3), same_label)


def test_save_and_load_round_trip(tiny_clip, tmp_path):
    _, tokenizer = tiny_clip
    model = _model(tiny_clip)
    _randomise_trainables(model, seed=2)
    state = model.state_dict()
    assert not any(key.startswith("clip.") for key in state)  # the frozen CLIP is not saved
    path = tmp_path / "ezclip.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))

    rebuilt = _model(tiny_clip, seed=5)  # another random init
    rebuilt.load_state_dict(load_file(str(path)))
    frames = _frames()
    token_ids = tokenizer(["a red circle"])
    with torch.no_grad():
        assert torch.equal(rebuilt(frames)["frame_embeds"], model(frames)["frame_embeds"])
        assert torch.equal(rebuilt.encode_text(token_ids), model.encode_text(token_ids))


def test_reference_checkpoint_keys_load(tiny_clip):
    """A checkpoint laid out as EZ-CLIP saves it (CLIP keys + renamed additions) reproduces the model."""
    clip_model, _ = tiny_clip
    source = _model(tiny_clip)
    _randomise_trainables(source, seed=3)
    checkpoint = dict(clip_model.state_dict())
    checkpoint.update({reference_key(name): value for name, value in source.state_dict().items()})
    assert "visual.transformer.T_prompt_embeddings" in checkpoint
    assert "visual.transformer.resblocks.0.Adapter.D_fc1.weight" in checkpoint
    assert "transformer.resblocks.1.Adapter.D_fc2.bias" in checkpoint

    target = _model(tiny_clip, seed=7)
    target.load_reference_state_dict(checkpoint)
    frames = _frames()
    with torch.no_grad():
        assert torch.equal(target(frames)["video_embeds"], source(frames)["video_embeds"])
    del checkpoint["visual.transformer.T_prompt_embeddings"]
    with pytest.raises(ClipreelError, match="lacks"):
        target.load_reference_state_dict(checkpoint)


def test_config_round_trip_and_validation():
    config = EZCLIPConfig(frames=16, deep_prompts=False)
    assert EZCLIPConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ClipreelError):
        EZCLIPConfig(drop_path=1.5)
    with pytest.raises(ClipreelError):
        EZCLIPConfig(frames=0)


def test_shallow_prompts_have_one_layer(tiny_clip):
    model = _model(tiny_clip, deep_prompts=False)
    assert model.T_prompt_embeddings.shape == (1, FRAMES, model.clip.model.visual.transformer.width)
    with torch.no_grad():
        assert model(_frames())["video_embeds"].isfinite().all()


def test_vit_b16_trainable_count_and_reference_shapes():
    """EZ-CLIP at ViT-B/16, 8 frames: 73,728 prompts + 3,550,464 visual + 1,580,544 text adapter parameters."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that no weights were loaded: on purpose
    try:
        clip_model = open_clip.create_model("ViT-B-16", pretrained=None)
    finally:
        root.setLevel(level)
    model = EZCLIP(FrozenCLIP(clip_model, open_clip.get_tokenizer("ViT-B-16")), EZCLIPConfig(frames=8))
    assert trainable_parameter_count(model) == 5_204_736
    shapes = {reference_key(name): tuple(value.shape) for name, value in model.state_dict().items()}
    assert shapes["visual.transformer.T_prompt_embeddings"] == (12, 8, 768)
    assert shapes["visual.temporal_embedding"] == (1, 8, 768)
    assert shapes["visual.transformer.resblocks.11.Adapter.D_fc1.weight"] == (192, 768)
    assert shapes["visual.transformer.resblocks.11.Adapter.D_fc2.weight"] == (768, 192)
    assert shapes["transformer.resblocks.11.Adapter.D_fc1.weight"] == (128, 512)
    assert shapes["transformer.resblocks.11.Adapter.D_fc2.bias"] == (512,)


def test_descriptions_and_a_fixed_score_scale(tiny_clip):
    """EZ-CLIP's test.py: class texts are descriptions tokenized as they are, scores 100 * cosine."""
    from clipreel.heads.raw.ezclip import EZCLIPClassifier

    clip_model, tokenizer = tiny_clip
    descriptions = {"riding_horse": "A rider sits on a galloping horse."}
    config = EZCLIPConfig(frames=FRAMES, descriptions=descriptions, score_scale=100.0)
    torch.manual_seed(0)
    model = EZCLIPClassifier(clip_model, tokenizer, ["riding_horse", "playing_guitar"], config).eval()
    assert torch.equal(model.token_ids, tokenizer(["A rider sits on a galloping horse.", "playing guitar"]))
    with torch.no_grad():
        out = model(_frames())
        text = model.ezclip.encode_text(model.token_ids)
    cosine = torch.nn.functional.normalize(out["video_embeds"], dim=-1) @ torch.nn.functional.normalize(text, dim=-1).t()
    torch.testing.assert_close(out["logits"], 100.0 * cosine, rtol=1e-6, atol=1e-6)
    assert EZCLIPConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ClipreelError, match="score_scale"):
        EZCLIPConfig(score_scale=0.0)
