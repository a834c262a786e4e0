"""Zero-shot CLIP classification (template ensembles) and the baseline heads."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipreel.errors import ClipreelError
from clipreel.heads.cache.baselines import (
    FrameMeanMLP,
    FrameMeanMLPConfig,
    LinearProbe,
    LinearProbeConfig,
)
from clipreel.heads.cache.zeroshot import (
    TEMPLATES,
    ZeroShotClassifier,
    ZeroShotConfig,
    class_text_embeddings,
    templates_named,
)
from clipreel.heads.layers import FrozenCLIP, encode_texts, trainable_parameter_count

CLASSNAMES = ["archery", "playing_guitar", "surfing water", "tai chi"]


def zero_shot_classifier(tiny_clip, classnames, templates: str) -> ZeroShotClassifier:
    model, tokenizer = tiny_clip
    config = ZeroShotConfig(embed_dim=64, num_classes=len(classnames), templates=templates,
                            logit_scale=float(model.logit_scale))
    return ZeroShotClassifier(config, FrozenCLIP(model, tokenizer), classnames)


def test_every_template_has_one_slot_for_the_class_name():
    for name, templates in TEMPLATES.items():
        assert templates, name
        for template in templates:
            assert template.count("{}") == 1, template
    assert len(TEMPLATES["ensemble"]) > len(TEMPLATES["video"]) > 1
    assert templates_named("a clip of {}.") == ["a clip of {}."]  # one literal template
    with pytest.raises(ClipreelError, match="neither a template set"):
        templates_named("cinema")


def test_single_bare_template_is_the_normalised_encode_text(tiny_clip):
    model, tokenizer = tiny_clip
    embeds = class_text_embeddings(model, tokenizer, CLASSNAMES, ["{}"])
    with torch.no_grad():
        direct = model.encode_text(tokenizer(["archery", "playing guitar", "surfing water", "tai chi"]))
    torch.testing.assert_close(embeds, F.normalize(direct, dim=-1))


def test_template_ensemble_is_the_normalised_mean_of_per_template_embeddings(tiny_clip):
    model, tokenizer = tiny_clip
    templates = templates_named("video")
    ensemble = class_text_embeddings(model, tokenizer, CLASSNAMES, templates)
    assert ensemble.shape == (len(CLASSNAMES), 64)
    torch.testing.assert_close(ensemble.norm(dim=-1), torch.ones(len(CLASSNAMES)))

    per_template = torch.stack([class_text_embeddings(model, tokenizer, CLASSNAMES, [t]) for t in templates])
    torch.testing.assert_close(ensemble, F.normalize(per_template.mean(dim=0), dim=-1))
    assert not torch.allclose(ensemble, per_template[0], atol=1e-4)  # the templates do differ


def test_encode_texts_batches_give_the_same_embeddings(tiny_clip):
    model, tokenizer = tiny_clip
    texts = [f"a video of {name}." for name in CLASSNAMES] + ["a cat."]
    torch.testing.assert_close(
        encode_texts(model, tokenizer, texts, batch_size=2), encode_texts(model, tokenizer, texts)
    )


def encoded_with_positions(model, tokenizer, texts) -> tuple[torch.Tensor, list[int]]:
    """encode_texts of `texts`, and how many positions the text transformer ran on per call."""
    positions = []
    hook = model.transformer.register_forward_pre_hook(lambda module, args: positions.append(args[0].shape[1]))
    try:
        return encode_texts(model, tokenizer, texts), positions
    finally:
        hook.remove()


def test_encode_texts_runs_up_to_the_last_end_of_text_and_equals_encode_text(tiny_clip, fresh_tiny_clip):
    """Only the positions up to the batch's last end-of-text token run, and the embeddings are open_clip's
    encode_text over all 77: short and long texts, token id 0 ("!") inside a text, "argmax" and "eos"
    pooling; a CLIP pooling another way ("last") runs all 77."""
    model, tokenizer = tiny_clip
    short = ["a cat.", "wow! a video of a person playing guitar!"]
    full = " ".join(["word"] * 90)  # fills all 77 positions
    assert (tokenizer(short)[1] == 0).sum() > 2  # "!" is token 0, as the padding is
    end_of_text = int(tokenizer(short).max())
    last_end = int(tokenizer(short).argmax(dim=-1).max()) + 1
    assert last_end < 20

    eos_pooled = fresh_tiny_clip()
    eos_pooled.text_pool_type, eos_pooled.text_eos_id = "eos", end_of_text
    last_pooled = fresh_tiny_clip()
    last_pooled.text_pool_type = "last"
    cases = [(model, short, last_end), (model, [*short, full], 77), (eos_pooled, short, last_end), (last_pooled, short, 77)]
    for clip_model, texts, positions_run in cases:
        embeds, positions = encoded_with_positions(clip_model, tokenizer, texts)
        with torch.no_grad():
            expected = clip_model.encode_text(tokenizer(texts))
        torch.testing.assert_close(embeds, expected, rtol=1e-5, atol=1e-6)
        assert positions == [positions_run], clip_model.text_pool_type


def test_zero_shot_logits_equal_a_direct_computation(tiny_clip):
    model, tokenizer = tiny_clip
    classifier = zero_shot_classifier(tiny_clip, CLASSNAMES, "photo")
    assert trainable_parameter_count(classifier) == 0

    embeds = torch.randn(3, 5, 64).half()  # (B, T, E) as the cache stores them
    with torch.no_grad():
        texts = model.encode_text(tokenizer([f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES]))
    video = F.normalize(embeds.float().mean(dim=1), dim=-1)
    expected = model.logit_scale.exp() * video @ F.normalize(texts, dim=-1).t()
    torch.testing.assert_close(classifier({"embeds": embeds}), expected.detach())


def test_zero_shot_classifier_saves_its_temperature_alone_and_takes_any_classes(tiny_clip, tmp_path):
    classifier = zero_shot_classifier(tiny_clip, CLASSNAMES, "ensemble")
    assert set(classifier.state_dict()) == {"logit_scale"}  # class texts are recomputed, the CLIP is not saved
    save_file(classifier.state_dict(), tmp_path / "zeroshot.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(classifier.config.to_dict()))

    config = ZeroShotConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    loaded = ZeroShotClassifier(config, FrozenCLIP(*tiny_clip), CLASSNAMES)
    loaded.load_state_dict(load_file(tmp_path / "zeroshot.safetensors"))
    embeds = torch.randn(2, 5, 64)
    assert torch.equal(classifier({"embeds": embeds}), loaded({"embeds": embeds}))

    loaded.set_classnames(CLASSNAMES[:2])
    assert loaded.config.num_classes == 2
    torch.testing.assert_close(loaded({"embeds": embeds}), classifier({"embeds": embeds})[:, :2])


@pytest.mark.parametrize(
    "head_class, config",
    [
        (LinearProbe, LinearProbeConfig(embed_dim=64, num_classes=4)),
        (FrameMeanMLP, FrameMeanMLPConfig(embed_dim=64, num_classes=4, hidden=32)),
    ],
    ids=["linear_probe", "frame_mean_mlp"],
)
def test_baseline_heads_train_save_and_ignore_frame_order(head_class, config, tmp_path):
    torch.manual_seed(1)
    head = head_class(config)
    embeds = torch.randn(6, 5, 64).half()
    head.train()
    logits = head({"embeds": embeds})
    assert logits.shape == (6, 4)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name

    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head({"embeds": embeds}), head({"embeds": embeds.flip(dims=[1])}))  # frame means

    save_file(head.state_dict(), tmp_path / "head.safetensors")
    loaded = head_class(type(config).from_dict(json.loads(json.dumps(config.to_dict())))).eval()
    loaded.load_state_dict(load_file(tmp_path / "head.safetensors"))
    with torch.no_grad():
        assert torch.equal(head({"embeds": embeds}), loaded({"embeds": embeds}))
    with pytest.raises(ClipreelError, match="made for 4 classes cannot classify 3"):
        loaded.set_classnames(["a", "b", "c"])


def test_linear_probe_equals_the_mean_of_per_frame_logits():
    torch.manual_seed(2)
    probe = LinearProbe(LinearProbeConfig(embed_dim=64, num_classes=4))
    embeds = torch.randn(3, 5, 64)
    with torch.no_grad():
        per_frame = probe.linear(F.normalize(embeds, dim=-1))  # (B, T, K)
        torch.testing.assert_close(probe({"embeds": embeds}), per_frame.mean(dim=1))
