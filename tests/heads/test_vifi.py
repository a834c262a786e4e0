"""ViFi-CLIP fine-tuning on the tiny open_clip model (real towers, CPU)."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipreel.errors import ClipreelError
from clipreel.heads.clip import load_clip
from clipreel.heads.layers import trainable_parameter_count, trainable_parameters
from clipreel.heads.raw.vifi import ViFiCLIP, ViFiConfig

CLASSNAMES = ["dog", "playing_guitar", "riding a horse"]
PHOTO_TEXTS = ["a photo of a dog.", "a photo of a playing guitar.", "a photo of a riding a horse."]
LABELS = torch.tensor([0, 2])
TINY_WIDTH = 64  # vision and text width of clipreel-tiny


def tiny_frames(batch: int = 2, num_frames: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(batch, num_frames, 3, 112, 112, generator=generator)  # (B, T, 3, S, S)


def test_vifi_at_init_is_clip_frame_mean_against_photo_prompts(tiny_clip, fresh_tiny_clip):
    reference, tokenizer = tiny_clip
    vifi = ViFiCLIP(fresh_tiny_clip(), tokenizer, CLASSNAMES)
    frames = tiny_frames()
    with torch.no_grad():
        out = vifi(frames)
        expected_frames = reference.encode_image(frames.flatten(0, 1)).view(2, 3, -1)  # (B, T, E)
        expected_text = reference.encode_text(tokenizer(PHOTO_TEXTS))  # (K, E)
    assert out["frame_embeds"].shape == (2, 3, TINY_WIDTH)
    assert torch.equal(out["frame_embeds"], expected_frames)
    assert torch.equal(out["video_embeds"], expected_frames.mean(dim=1))
    # Not bit-equal: with the towers' parameters requiring grad, nn.MultiheadAttention leaves its fused
    # inference kernel for the composite one (measured here: differences up to 1.4e-6).
    torch.testing.assert_close(vifi.encode_classes(), expected_text, rtol=1e-5, atol=1e-5)
    expected_logits = reference.logit_scale.exp() * (
        F.normalize(expected_frames.mean(dim=1), dim=-1) @ F.normalize(expected_text, dim=-1).t()
    )
    assert out["logits"].shape == (2, 3)
    torch.testing.assert_close(out["logits"], expected_logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("variant", "trained_prefixes"),
    [
        (
            "both",
            (
                "clip.visual.",
                "clip.transformer.",
                "clip.positional_embedding",
                "clip.ln_final.",
                "clip.text_projection",
                "clip.logit_scale",
            ),
        ),
        ("image", ("clip.visual.",)),
        ("text", ("clip.transformer.", "clip.positional_embedding", "clip.ln_final.", "clip.text_projection")),
    ],
)
def test_vifi_variant_decides_what_trains_and_the_rest_stays_bit_identical(tiny_clip, variant, trained_prefixes,
                                                                           fresh_tiny_clip, one_training_step):
    _, tokenizer = tiny_clip
    torch.manual_seed(0)
    vifi = ViFiCLIP(fresh_tiny_clip(), tokenizer, CLASSNAMES, ViFiConfig(variant=variant))
    before = {name: param.detach().clone() for name, param in vifi.named_parameters()}
    trainable = trainable_parameters(vifi)

    assert set(trainable) == {name for name in before if name.startswith(trained_prefixes)}
    assert "clip.token_embedding.weight" not in trainable
    assert trainable_parameter_count(vifi) == sum(before[name].numel() for name in trainable)

    one_training_step(vifi, tiny_frames(), LABELS)
    for name, param in vifi.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            assert not torch.equal(param, before[name]), name
        else:
            assert param.grad is None, name
            assert torch.equal(param, before[name]), name


def test_vifi_config_refuses_unknown_variant_and_templates_without_slot():
    with pytest.raises(ClipreelError, match="variant"):
        ViFiConfig(variant="video")
    with pytest.raises(ClipreelError, match="template"):
        ViFiConfig(template="a photo.")
    assert ViFiConfig.from_dict(ViFiConfig(variant="text").to_dict()) == ViFiConfig(variant="text")


def test_vifi_save_load_round_trip_and_bridge_to_a_standard_clip_checkpoint(tiny_clip, tmp_path, fresh_tiny_clip,
                                                                            one_training_step):
    _, tokenizer = tiny_clip
    torch.manual_seed(0)
    vifi = ViFiCLIP(fresh_tiny_clip(), tokenizer, CLASSNAMES)
    frames = tiny_frames()
    one_training_step(vifi, frames, LABELS)
    vifi.eval()
    with torch.no_grad():
        trained_logits = vifi(frames)["logits"]

    save_file(vifi.state_dict(), tmp_path / "vifi.safetensors")
    reloaded = ViFiCLIP(fresh_tiny_clip(), tokenizer, CLASSNAMES)
    reloaded.load_state_dict(load_file(tmp_path / "vifi.safetensors"))
    with torch.no_grad():
        assert torch.equal(reloaded(frames)["logits"], trained_logits)

    # The fine-tuned CLIP alone, as an ordinary checkpoint that load_clip reads (the "bridge").
    save_file(vifi.clip.state_dict(), tmp_path / "vifi-clip.safetensors")
    fine_tuned, sha256 = load_clip("clipreel-tiny", str(tmp_path / "vifi-clip.safetensors"))
    assert sha256 is not None
    with torch.no_grad():
        expected = vifi.clip.encode_image(frames[0])
        assert torch.equal(fine_tuned.encode_image(frames[0]), expected)


def test_vifi_set_classnames_changes_the_classes(tiny_clip, fresh_tiny_clip):
    _, tokenizer = tiny_clip
    vifi = ViFiCLIP(fresh_tiny_clip(), tokenizer, CLASSNAMES)
    vifi.set_classnames(["cat", "jumping"])
    with torch.no_grad():
        assert vifi(tiny_frames())["logits"].shape == (2, 2)
        expected = vifi.clip.encode_text(tokenizer(["a photo of a cat.", "a photo of a jumping."]))
        assert torch.equal(vifi.encode_classes(), expected)


def test_parameter_count_for_vit_b_16():
    """ViFi-CLIP trains all of CLIP but the token table: about 124.3M parameters."""
    clip_model, _ = load_clip("ViT-B-16", "none")
    vifi = ViFiCLIP(clip_model, open_clip.get_tokenizer("ViT-B-16"), CLASSNAMES)
    total = sum(param.numel() for param in clip_model.parameters())
    assert trainable_parameter_count(vifi) == total - clip_model.token_embedding.weight.numel()
    assert round(trainable_parameter_count(vifi) / 1e6, 1) == 124.3
