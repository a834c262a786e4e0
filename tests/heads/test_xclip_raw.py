"""Full X-CLIP on raw frames: cross-frame communication vision tower, MIT, prompts, training groups."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipreel.errors import ClipreelError
from clipreel.heads.layers import DropPath, encode_texts, patch_stem, trainable_parameter_count, trainable_parameters
from clipreel.heads.raw.xclip import XCLIP, CrossFrameBlock, XCLIPConfig, XCLIPVideoEncoder

CLASSNAMES = ["juggling_balls", "riding a bike", "swimming"]
FRAMES = 3
SIZE = 112  # the tiny ViT's image size


def tiny_xclip(tiny_clip, seed: int = 0, **options) -> XCLIP:
    """A full X-CLIP on the tiny CLIP; the seed fixes the new modules' random init."""
    model, tokenizer = tiny_clip
    torch.manual_seed(seed)
    return XCLIP(model, tokenizer, CLASSNAMES, XCLIPConfig(frames=FRAMES, mit_heads=2, prompt_heads=4, **options))


def random_frames(batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, FRAMES, 3, SIZE, SIZE, generator=generator)  # (B, T, 3, S, S)


def message_parameters(encoder: XCLIPVideoEncoder) -> list[torch.nn.Parameter]:
    """The parameters of the message modules of every block, found by module, not by name."""
    return [
        param
        for block in encoder.transformer.resblocks
        for module in (block.message_fc, block.message_ln, block.message_attn)
        for param in module.parameters()
    ]


def test_forward_shapes_and_clip_stem(tiny_clip):
    model, _ = tiny_clip
    xclip = tiny_xclip(tiny_clip).eval()
    frames = random_frames()
    with torch.no_grad():
        out = xclip(frames)
        frame_embeds, patch_tokens = xclip.visual(frames)
        stem = xclip.visual.ln_pre(patch_stem(xclip.visual, frames[:, 0]))
        clip_stem = model.visual._embeds(frames[:, 0])
    embed_dim, width = model.text_projection.shape[1], model.visual.transformer.width
    assert out["logits"].shape == (2, len(CLASSNAMES))
    assert out["video_embeds"].shape == (2, embed_dim)
    assert out["frame_embeds"].shape == (2, FRAMES, embed_dim)
    assert frame_embeds.shape == (2, FRAMES, embed_dim)
    assert patch_tokens.shape == (2, FRAMES, (SIZE // 16) ** 2, width)
    assert torch.isfinite(out["logits"]).all()
    # The stem (patchify, CLS, positions, ln_pre) is CLIP's own.
    torch.testing.assert_close(stem, clip_stem)
    # Class texts are X-CLIP's: encode_text of the bare class names (underscores read as spaces).
    expected = encode_texts(model, tiny_clip[1], [name.replace("_", " ") for name in CLASSNAMES])
    torch.testing.assert_close(xclip.head.class_text_embeds, expected)


def test_message_tokens_carry_information_across_frames_but_not_across_videos(tiny_clip):
    model, _ = tiny_clip
    encoder = tiny_xclip(tiny_clip).visual.eval()
    frames = random_frames()
    changed_frame_1 = frames.clone()
    changed_frame_1[0, 1] = torch.randn(3, SIZE, SIZE)  # video 0, frame 1 only
    with torch.no_grad():
        before, _ = encoder(frames)  # (B, T, E)
        after, _ = encoder(changed_frame_1)
        clip_before = model.encode_image(frames[0, :1])
        clip_after = model.encode_image(changed_frame_1[0, :1])
    # Plain CLIP sees frame 0 alone: nothing about frame 1 can reach it.
    torch.testing.assert_close(clip_before, clip_after)
    # X-CLIP: frame 0 of video 0 reads frame 1 through the message tokens ...
    assert (before[0, 0] - after[0, 0]).abs().max() > 1e-4
    # ... while the other video of the batch is untouched.
    torch.testing.assert_close(before[1], after[1])


def test_new_module_sizes_at_vit_b16():
    """X-CLIP at ViT-B/16: 2.95M message parameters per block, 35.45M for 12 blocks, 45.31M new in
    all (with MIT and prompt generator, T=8), 86.19M CLIP visual, about 131.5M trainable."""
    # A meta-device ViT-B/16: real shapes and names, no memory and no init time.
    clip = open_clip.create_model("ViT-B-16", device="meta")
    xclip = XCLIP(clip, open_clip.get_tokenizer("ViT-B-16"), ["a", "b"], XCLIPConfig(frames=8))
    width = 768
    blocks = xclip.visual.transformer.resblocks
    per_block = sum(p.numel() for p in blocks[0].parameters()) - sum(
        p.numel() for p in clip.visual.transformer.resblocks[0].parameters()
    )
    # message_fc (D*D + D) + message_ln (2D) + message_attn in_proj (3D*D + 3D) and out_proj (D*D + D)
    assert per_block == 5 * width * width + 7 * width
    assert round(per_block / 1e6, 2) == 2.95
    messages = sum(p.numel() for p in message_parameters(xclip.visual))
    assert len(blocks) == 12 and messages == 12 * per_block
    assert round(messages / 1e6, 2) == 35.45
    new = sum(p.numel() for group in xclip.parameter_groups(1.0, 0.0) if group["lr"] == 10.0 for p in group["params"])
    assert round(new / 1e6, 2) == 45.31
    clip_visual = sum(p.numel() for p in clip.visual.parameters())
    assert round(clip_visual / 1e6, 2) == 86.19
    assert trainable_parameter_count(xclip) == clip_visual + new
    assert round(trainable_parameter_count(xclip) / 1e6, 1) == 131.5


def test_parameter_groups(tiny_clip):
    xclip = tiny_xclip(tiny_clip)
    lr = 1e-3
    groups = xclip.parameter_groups(lr, weight_decay=0.001)
    fast = {id(p) for group in groups if group["lr"] == pytest.approx(10 * lr) for p in group["params"]}
    slow = {id(p) for group in groups if group["lr"] == pytest.approx(lr) for p in group["params"]}
    # 10x: exactly the message modules, the MIT and the prompt generator (found by module).
    head_parameters = {id(p) for p in xclip.head.parameters() if p.requires_grad}
    new_modules = {id(p) for p in message_parameters(xclip.visual)} | head_parameters
    assert fast == new_modules
    # 1x: every other vision-tower weight; the frozen CLIP (text tower) is in no group.
    assert slow == {id(p) for p in xclip.visual.parameters()} - new_modules
    assert not {id(p) for p in xclip.head.clip.parameters()} & (fast | slow)
    assert sum(len(group["params"]) for group in groups) == len(fast | slow)  # each parameter once
    assert trainable_parameter_count(xclip) == sum(p.numel() for g in groups for p in g["params"])
    names = {id(p): name for name, p in xclip.named_parameters()}
    assert "head.mit.positional_embedding" in names.values()
    assert "visual.transformer.resblocks.0.message_attn.in_proj_weight" in names.values()

    # Another ratio of the new modules' rate to the CLIP weights' (the tiny models learn at 100x).
    faster = tiny_xclip(tiny_clip, new_module_lr_scale=100.0).parameter_groups(lr, 0.001)
    assert {group["name"]: group["lr"] for group in faster} == pytest.approx(
        {group["name"]: group["lr"] * (10 if group["name"] == "new" else 1) for group in groups})


def test_training_moves_the_vision_tower_and_keeps_the_text_tower_frozen(tiny_clip):
    model, _ = tiny_clip
    xclip = tiny_xclip(tiny_clip).train()
    text_before = {name: p.detach().clone() for name, p in xclip.head.clip.named_parameters()}
    clip_visual_before = {name: p.detach().clone() for name, p in model.visual.named_parameters()}
    visual_before = {name: p.detach().clone() for name, p in xclip.visual.named_parameters()}
    logit_scale_before = xclip.head.logit_scale.clone()
    optimizer = torch.optim.AdamW(xclip.parameter_groups(1e-3, 0.001), betas=(0.9, 0.98), eps=1e-8)
    frames, labels = random_frames(), torch.tensor([0, 2])
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(xclip(frames)["logits"], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in xclip.head.clip.named_parameters():
        assert not param.requires_grad and param.grad is None
        assert torch.equal(param, text_before[name]), name
    assert torch.equal(xclip.head.logit_scale, logit_scale_before)
    # The CLIP weights of the vision tower train (in X-CLIP's own copy: the CLIP model is untouched).
    for name in ("conv1.weight", "transformer.resblocks.0.attn.in_proj_weight", "proj"):
        assert not torch.equal(dict(xclip.visual.named_parameters())[name], visual_before[name]), name
    for name, param in model.visual.named_parameters():
        assert torch.equal(param, clip_visual_before[name]) and not param.requires_grad


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(tiny_clip):
    xclip = tiny_xclip(tiny_clip).train()
    frames, labels = random_frames(), torch.tensor([1, 0])

    def outputs_and_grads():
        xclip.zero_grad()
        logits = xclip(frames)["logits"]
        F.cross_entropy(logits, labels).backward()
        return logits.detach(), {name: p.grad.clone() for name, p in trainable_parameters(xclip).items()}

    plain_logits, plain_grads = outputs_and_grads()
    xclip.visual.transformer.gradient_checkpointing = True
    checkpointed_logits, checkpointed_grads = outputs_and_grads()
    torch.testing.assert_close(checkpointed_logits, plain_logits)
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=name)


def test_save_load_round_trip(tiny_clip, tmp_path):
    xclip = tiny_xclip(tiny_clip, seed=0).eval()
    with torch.no_grad():  # move the weights away from their init so the round trip means something
        for param in xclip.visual.parameters():
            param.add_(0.01 * torch.randn_like(param))
    state = xclip.state_dict()
    # Saved: the fine-tuned vision tower and the new modules; not the frozen text tower or class texts.
    assert not [key for key in state if key.startswith("head.clip.") or key.endswith("class_text_embeds")]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(xclip.config.to_dict()))

    config = XCLIPConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    rebuilt = XCLIP(tiny_clip[0], tiny_clip[1], CLASSNAMES, config)  # a different random init
    rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"))
    rebuilt.eval()
    frames = random_frames()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(frames)["logits"], xclip(frames)["logits"])


def test_set_classnames_switches_classes(tiny_clip):
    xclip = tiny_xclip(tiny_clip).eval()
    xclip.set_classnames(["archery", "bowling"])
    with torch.no_grad():
        assert xclip(random_frames())["logits"].shape == (2, 2)
    with pytest.raises(ClipreelError, match="no class names"):
        xclip.set_classnames([])


def test_wrong_frame_count_or_size_is_refused(tiny_clip):
    xclip = tiny_xclip(tiny_clip).eval()
    with pytest.raises(ClipreelError, match="sample 3 frames"):
        xclip(torch.zeros(1, FRAMES + 1, 3, SIZE, SIZE))
    with pytest.raises(ClipreelError, match="image size 112"):
        xclip(torch.zeros(1, FRAMES, 3, 96, 96))


def test_cross_frame_block_refuses_other_blocks():
    with pytest.raises(ClipreelError, match="ResidualAttentionBlock"):
        CrossFrameBlock(torch.nn.Linear(4, 4))


def test_drop_path_drops_whole_samples_in_training_only():
    drop = DropPath(0.5)
    x = torch.ones(64, 5, 8)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    torch.manual_seed(0)
    out = drop(x)
    per_sample = out.flatten(1)
    # Each sample is either dropped (all 0) or kept and scaled by 1 / (1 - 0.5).
    assert all(bool((row == 0).all() or (row == 2).all()) for row in per_sample)
    assert 0 < int((per_sample[:, 0] == 0).sum()) < 64
