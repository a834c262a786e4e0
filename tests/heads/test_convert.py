"""Checkpoint converters: official EVL, X-CLIP (original and transformers' layout), ViFi-CLIP and
EZ-CLIP checkpoints built from clipreel's own models at tiny sizes, under the official key names,
written to disk, read back, imported, and run on the same real video file as the source model.
Also: refusals that name the keys and tensors, and ViFi-CLIP's export to open_clip.
"""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from reference_checkpoints import (
    ezclip_official,
    openai_state_dict,
    randomise,
    round_to_fp16,
    vifi_official,
    xclip_hf_layout,
    xclip_official,
)

from clipreel.errors import ClipreelError
from clipreel.heads.cache.evl import EVLConfig, EVLHead
from clipreel.heads.convert.clip_layout import build_clip
from clipreel.heads.convert.common import Imported, UserChoices
from clipreel.heads.convert.evl import convert_evl
from clipreel.heads.convert.export import export_open_clip
from clipreel.heads.convert.ezclip import convert_ezclip
from clipreel.heads.convert.vifi import convert_vifi
from clipreel.heads.convert.xclip import convert_xclip
from clipreel.heads.convert.xclip_hf import convert_xclip_hf
from clipreel.heads.raw.xclip import XCLIP, XCLIPConfig
from clipreel.heads.taps import Backbone, BackboneConfig
from clipreel.pipeline.data.decode.probe import probe
from clipreel.pipeline.data.decode.pyav import PyAVDecoder
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
from clipreel.pipeline.data.sampling import SamplingConfig, sample_indices
from clipreel.pipeline.data.synth.videofile import write_video

# A tiny OpenAI-style CLIP: QuickGELU and width / 64 heads in both towers, as every reference
# repository builds its CLIP, so that no --model is needed to import it.
TINY = "convert-tiny"
TINY_CONFIG = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
CLASSNAMES = ["playing_guitar", "riding a horse", "juggling", "dog"]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """A folder of open_clip model configs, registered with open_clip: the tiny CLIP and each import's."""
    folder = tmp_path_factory.mktemp("model-configs")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)
    return folder


def register(folder, name: str, config: dict) -> str:
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return name


@pytest.fixture(scope="module")
def tokenizer(configs):
    return open_clip.get_tokenizer(TINY)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A real H.264 file: 48 frames of 72x96 with a bar that moves and a colour that changes."""
    rows, cols = np.mgrid[0:72, 0:96]
    frames = []
    for t in range(48):
        image = np.zeros((72, 96, 3), dtype=np.uint8)
        image[..., 0] = (cols * 2 + t * 5) % 256
        image[..., 1] = (rows * 3) % 256
        image[..., 2] = 40 + 4 * t
        image[:, (2 * t) % 96 : (2 * t) % 96 + 8] = 255
        frames.append(image)
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", np.stack(frames))


def clips_of(video, record) -> torch.Tensor:
    """The video as a method's evaluation reads it: (views * crops, T, 3, S, S), from the import's record."""
    info = probe(video)
    sampling = SamplingConfig(policy=record.sampling, frames=record.frames, stride=record.stride or 1, views=record.views)
    indices = sample_indices(info.num_frames, sampling, "clip")  # (V, T)
    frames = PyAVDecoder().read(video, indices.reshape(-1), info)  # (V*T, H, W, 3)
    pixels = preprocess(frames, PreprocessConfig(image_size=record.image_size, mean=record.mean, std=record.std, crops=record.crops))
    crops = pixels.shape[0]
    pixels = pixels.unflatten(1, (record.views, record.frames))  # (C, V, T, 3, S, S)
    return pixels.transpose(0, 1).reshape(record.views * crops, record.frames, *pixels.shape[-3:])


def tiny_clip(seed: int) -> torch.nn.Module:
    """A seeded random tiny CLIP (both towers), frozen, in eval mode."""
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY)
    model.requires_grad_(False)
    return model.eval()


def saved_and_loaded(obj, path):
    """Through a real file, as a user's checkpoint arrives (tensors and plain containers only)."""
    torch.save(obj, path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------- EVL

EVL_FRAMES, EVL_LAYERS, EVL_CLASSES = 8, 2, 5


@pytest.fixture(scope="module")
def evl_source(configs, tmp_path_factory):
    """The source EVL: a frozen tiny CLIP (saved as an OpenAI-layout state dict, archive metadata
    included) and a random EVL head saved as the official checkpoint (`model`, `module.` keys)."""
    folder = tmp_path_factory.mktemp("evl")
    clip = tiny_clip(seed=1)
    torch.save(openai_state_dict(clip, image_size=64), folder / "base.pt")
    torch.manual_seed(2)
    head = EVLHead(EVLConfig(width=128, heads=2, layers=EVL_LAYERS, frames=EVL_FRAMES, grid=4, num_classes=EVL_CLASSES)).eval()
    randomise(head, seed=3)
    official = {
        "model": {"module." + key: value for key, value in head.state_dict().items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 4e-4, "params": [0, 1]}]},
        "next_step": 50000,
    }
    torch.save(official, folder / "k400_tiny_8f.pth")
    backbone = Backbone(BackboneConfig(model=TINY, pretrained=str(folder / "base.pt"), layers=str(EVL_LAYERS)))
    return folder, backbone, head


def evl_logits(backbone: Backbone, head: EVLHead, clips: torch.Tensor) -> torch.Tensor:
    features = backbone.forward_clips(clips)
    with torch.no_grad():
        return head({"tokens": features.tokens, "attention": features.attention})


def load_evl(folder):
    checkpoint = torch.load(folder / "k400_tiny_8f.pth", map_location="cpu", weights_only=True)
    base = torch.load(folder / "base.pt", map_location="cpu", weights_only=True)
    return checkpoint, base


def test_evl_import_gives_the_source_logits_on_a_video(evl_source, configs, video, tmp_path):
    folder, source_backbone, source_head = evl_source
    imported = convert_evl(*load_evl(folder))

    assert imported.method == "evl"
    assert imported.facts["frames"] == EVL_FRAMES and imported.facts["num_classes"] == EVL_CLASSES
    assert imported.facts["feature_blocks"] == [1, 2] and imported.facts["grid"] == 4
    record = imported.preprocessing
    assert (record.norm, record.sampling, record.stride, record.views, record.crops) == ("clip", "dense", 16, 3, 1)

    name = register(configs, "convert-evl-imported", imported.clip_config)
    torch.save(imported.clip_state_dict, tmp_path / "backbone.pt")
    backbone = Backbone(BackboneConfig(model=name, pretrained=str(tmp_path / "backbone.pt"), layers=str(imported.method_config["layers"])))
    head = EVLHead(EVLConfig(**imported.method_config)).eval()
    head.load_state_dict(imported.state_dict, strict=True)

    clips = clips_of(video, record)  # (3 views, 8, 3, 64, 64)
    expected = evl_logits(source_backbone, source_head, clips)
    assert expected.shape == (3, EVL_CLASSES)
    torch.testing.assert_close(evl_logits(backbone, head, clips), expected, rtol=0, atol=0)


def test_evl_refuses_frames_and_classes_that_contradict_the_tensors(evl_source):
    folder = evl_source[0]
    with pytest.raises(ClipreelError, match=r"--frames 16 .*decoder\.temporal_pos_embed\.0 has shape \(8, 128\)"):
        convert_evl(*load_evl(folder), UserChoices(frames=16))
    with pytest.raises(ClipreelError, match=r"--classes 400 .*proj\.2\.weight has shape \(5, 128\)"):
        convert_evl(*load_evl(folder), UserChoices(num_classes=400))
    with pytest.raises(ClipreelError, match=r"--model clipreel-tiny contradicts .*embed_dim 64 \(the checkpoint: 128"):
        convert_evl(*load_evl(folder), UserChoices(model="clipreel-tiny"))
    assert convert_evl(*load_evl(folder), UserChoices(frames=8, num_classes=5, model=TINY)).facts["heads_from"] == f"--model {TINY}"


def test_evl_refuses_a_damaged_checkpoint_naming_every_key(evl_source):
    checkpoint, base = load_evl(evl_source[0])
    weights = checkpoint["model"]
    del weights["module.decoder.decoder_layers.1.norm3.bias"]
    weights["module.decoder.temporal_conv.0.weight"] = torch.zeros(128, 1, 5)
    weights["module.decoder.extra_query"] = torch.zeros(128)
    with pytest.raises(ClipreelError) as refusal:
        convert_evl(checkpoint, base)
    message = str(refusal.value)
    assert "decoder.decoder_layers.1.norm3.bias" in message.split("missing")[1]
    assert "decoder.temporal_conv.0.weight (128, 1, 5) (expected (128, 1, 3))" in message
    assert "decoder.extra_query" in message.split("unexpected")[1]


def test_evl_refuses_a_base_clip_of_another_width(evl_source):
    checkpoint, _ = load_evl(evl_source[0])
    other = open_clip.create_model("clipreel-tiny").state_dict()  # width 64
    with pytest.raises(ClipreelError, match=r"decoder\.cls_token has width 128, but the --clip image tower has width 64"):
        convert_evl(checkpoint, other)


# ------------------------------------------------------------------------------------------- X-CLIP

XCLIP_FRAMES = 4


@pytest.fixture(scope="module")
def xclip_source(configs, tokenizer, tmp_path_factory):
    clip = tiny_clip(seed=4)
    torch.manual_seed(5)
    model = XCLIP(clip, tokenizer, CLASSNAMES, XCLIPConfig(frames=XCLIP_FRAMES)).eval()
    randomise(model.visual, seed=6, scale=0.02)
    randomise(model.head, seed=7)
    path = tmp_path_factory.mktemp("xclip") / "k400_tiny.pth"
    torch.save(xclip_official(model, clip), path)
    return path, model


def build_xclip(imported: Imported, tokenizer) -> XCLIP:
    clip = build_clip(imported.clip_config, imported.clip_state_dict)
    model = XCLIP(clip, tokenizer, CLASSNAMES, XCLIPConfig(**imported.method_config)).eval()
    model.load_state_dict(imported.state_dict, strict=True)
    return model


def test_xclip_import_gives_the_source_logits_on_a_video(xclip_source, tokenizer, video):
    path, source = xclip_source
    imported = convert_xclip(torch.load(path, map_location="cpu", weights_only=True))
    assert imported.method == "xclip" and imported.facts["frames"] == XCLIP_FRAMES
    record = imported.preprocessing
    assert (record.norm, record.sampling, record.views, record.crops) == ("imagenet", "tsn", 4, 3)
    model = build_xclip(imported, tokenizer)
    clips = clips_of(video, record)  # (12, T, 3, S, S)
    with torch.no_grad():
        expected = source(clips)["logits"]
        torch.testing.assert_close(model(clips)["logits"], expected, rtol=1e-6, atol=1e-6)
    assert expected.shape == (12, len(CLASSNAMES))


def test_xclip_refuses_contradictions_and_damage_naming_tensors(xclip_source):
    path = xclip_source[0]
    with pytest.raises(ClipreelError, match=r"--frames 8 .*mit\.positional_embedding has shape \(1, 4, 128\)"):
        convert_xclip(torch.load(path, weights_only=True), UserChoices(frames=8))
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["model"]["visual.transformer.resblocks.2.message_attn.in_proj_bias"]
    checkpoint["model"]["prompts_generator.decoder.1.cross_attn.q_proj.weight"] = torch.zeros(128, 64)
    with pytest.raises(ClipreelError) as refusal:
        convert_xclip(checkpoint)
    message = str(refusal.value)
    assert "visual.transformer.resblocks.2.message_attn.in_proj_bias" in message
    assert "prompts_generator.decoder.1.cross_attn.q_proj.weight (128, 64) (expected (128, 128))" in message


# ------------------------------------------------------------------------------------------- X-CLIP, transformers' layout


def test_xclip_round_trip_through_transformers_key_names(xclip_source, tokenizer, video, tmp_path):
    path, source = xclip_source
    official = torch.load(path, weights_only=True)["model"]
    hf_weights = xclip_hf_layout(official)
    hf_weights["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # saved by older transformers
    imported = convert_xclip_hf(saved_and_loaded(hf_weights, tmp_path / "pytorch_model.bin"))
    assert imported.facts["layout"] == "transformers" and imported.facts["frames"] == XCLIP_FRAMES
    clips = clips_of(video, imported.preprocessing)
    with torch.no_grad():
        torch.testing.assert_close(build_xclip(imported, tokenizer)(clips)["logits"], source(clips)["logits"], rtol=1e-6, atol=1e-6)


def test_xclip_hf_refusal_names_the_keys_of_the_file(xclip_source):
    hf_weights = xclip_hf_layout(torch.load(xclip_source[0], weights_only=True)["model"])
    del hf_weights["vision_model.encoder.layers.1.message_attn.k_proj.bias"]
    hf_weights["mit.encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(128, 127)
    with pytest.raises(ClipreelError) as refusal:
        convert_xclip_hf(hf_weights)
    message = str(refusal.value)
    assert "vision_model.encoder.layers.1.message_attn.k_proj.bias" in message.split("missing")[1]
    assert "mit.encoder.layers.0.self_attn.q_proj.weight (128, 127) (expected (128, 128))" in message


def test_xclip_hf_import_matches_transformers_own_model(tokenizer, video, tmp_path):
    """A tiny transformers XCLIPModel, saved by save_pretrained, imported, scores like transformers does."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    vision, text = TINY_CONFIG["vision_cfg"], TINY_CONFIG["text_cfg"]
    width, embed = vision["width"], TINY_CONFIG["embed_dim"]
    config = transformers.XCLIPConfig(
        text_config={"hidden_size": text["width"], "intermediate_size": 4 * text["width"], "num_hidden_layers": text["layers"],
                     "num_attention_heads": text["heads"]},
        vision_config={"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": vision["layers"],
                       "num_attention_heads": width // 64, "image_size": vision["image_size"], "patch_size": vision["patch_size"],
                       "num_frames": XCLIP_FRAMES, "mit_hidden_size": embed, "mit_intermediate_size": 4 * embed,
                       "mit_num_attention_heads": embed // 64},
        projection_dim=embed,
        prompt_num_attention_heads=embed // 64,
    )
    torch.manual_seed(8)
    hf_model = transformers.XCLIPModel(config).eval()
    hf_model.save_pretrained(tmp_path / "xclip-tiny")
    imported = convert_xclip_hf(load_file(tmp_path / "xclip-tiny" / "model.safetensors"))
    model = build_xclip(imported, tokenizer)

    clips = clips_of(video, imported.preprocessing)  # ImageNet-normalised, as XCLIPProcessor's output
    # CLIP's BPE ids (transformers' CLIPTokenizer gives the same ones) of the texts clipreel's XCLIP
    # encodes: the class names with underscores read as spaces.
    token_ids = tokenizer([name.replace("_", " ") for name in CLASSNAMES])
    with torch.no_grad():
        expected = hf_model(input_ids=token_ids, pixel_values=clips).logits_per_video
        torch.testing.assert_close(model(clips)["logits"], expected, rtol=1e-4, atol=1e-4)
    assert expected.shape == (12, len(CLASSNAMES))


# ------------------------------------------------------------------------------------------- ViFi-CLIP

def fine_tuned_clip(seed: int, fp16_token_table: bool) -> torch.nn.Module:
    """A tiny CLIP whose weights all moved away from the base (as ViFi-CLIP fine-tunes both towers)."""
    clip = tiny_clip(seed)
    randomise(clip, seed + 100, scale=0.02)
    if fp16_token_table:  # OpenAI's archives store fp16 weights
        clip.token_embedding.weight.data = clip.token_embedding.weight.data.half().float()
    return clip


def test_vifi_fine_tuned_import_gives_vifis_logits_with_its_fp16_token_table(configs, tokenizer, video, tmp_path):
    from clipreel.heads.raw.vifi import ViFiCLIP, ViFiConfig

    clip = fine_tuned_clip(seed=9, fp16_token_table=False)
    source = ViFiCLIP(clip, tokenizer, CLASSNAMES).eval()
    texts = tokenizer([f"a photo of a {name}." for name in CLASSNAMES])
    embeddings = clip.token_embedding(texts).half().float()  # ViFi-CLIP's complete_text_embeddings
    checkpoint = saved_and_loaded(vifi_official(clip, {"prompt_learner.complete_text_embeddings": embeddings}), tmp_path / "vifi.pth")
    base = saved_and_loaded({"state_dict": clip.state_dict()}, tmp_path / "base.pt")  # an open_clip checkpoint

    imported = convert_vifi(checkpoint, base)
    assert imported.method == "vifi" and imported.facts["trained_classes"] == len(CLASSNAMES)
    assert imported.facts["frames"] == 32 and imported.method_config["template"] == "a photo of a {}."
    record = imported.preprocessing
    assert (record.norm, record.sampling, record.views, record.crops, record.short_side) == ("imagenet", "tsn", 1, 1, 73)
    table = imported.clip_state_dict["token_embedding.weight"]
    assert torch.equal(table, clip.token_embedding.weight.half().float())
    assert not torch.equal(table, clip.token_embedding.weight)

    model = ViFiCLIP(build_clip(imported.clip_config, imported.clip_state_dict), tokenizer, CLASSNAMES, ViFiConfig(**imported.method_config))
    model.load_state_dict(imported.state_dict, strict=True)
    # ViFi-CLIP's own computation: class names verbatim, read through the fp16-rounded token table.
    reference_clip = fine_tuned_clip(seed=9, fp16_token_table=True)
    reference = ViFiCLIP(reference_clip, tokenizer, CLASSNAMES, ViFiConfig(verbatim_classnames=True)).eval()
    clips = clips_of(video, record)[:, :8]  # 8 of the 32 frames keep the test quick
    with torch.no_grad():
        logits = model.eval()(clips)["logits"]
        torch.testing.assert_close(logits, reference(clips)["logits"], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits, source(clips)["logits"], rtol=1e-5, atol=1e-5)


def test_vifi_class_texts_keep_underscores(configs, tokenizer):
    from clipreel.heads.raw.vifi import ViFiCLIP, ViFiConfig

    clip = tiny_clip(seed=9)
    imported = convert_vifi(vifi_official(clip, {}), clip.state_dict())
    config = ViFiConfig(**imported.method_config)
    assert config.verbatim_classnames
    model = ViFiCLIP(tiny_clip(seed=9), tokenizer, ["playing_guitar"], config)
    assert torch.equal(model.token_ids, tokenizer(["a photo of a playing_guitar."]))
    plain = ViFiCLIP(tiny_clip(seed=9), tokenizer, ["playing_guitar"])  # clipreel's own runs read underscores as spaces
    assert torch.equal(plain.token_ids, tokenizer(["a photo of a playing guitar."]))


BRIDGE = {"n_ctx_vision": 2, "n_ctx_text": 3, "depth_vision": 3, "depth_text": 2}


@pytest.fixture(scope="module")
def bridge_source(configs, tokenizer):
    """A bridge-and-prompt model over a ViFi-tuned tiny CLIP (OpenAI-style fp16 token table), random fp32 prompts."""
    from clipreel.heads.raw.bridge_prompt import BridgePrompt, BridgePromptConfig

    clip = fine_tuned_clip(seed=10, fp16_token_table=True)
    torch.manual_seed(11)
    model = BridgePrompt(clip, tokenizer, CLASSNAMES, BridgePromptConfig(**BRIDGE, ctx_init=None)).eval()
    randomise(model.image_encoder, seed=12)
    randomise(model.prompt_learner, seed=13)
    prompts = {
        "image_encoder.VPT": model.image_encoder.ctx.detach().clone(),
        "prompt_learner.ctx": model.prompt_learner.ctx.detach().clone(),
        "prompt_learner.token_prefix": model.prompt_learner.token_prefix.clone(),
        "prompt_learner.token_suffix": model.prompt_learner.token_suffix.clone(),
    }
    for i, deep in enumerate(model.image_encoder.deep_ctx):
        prompts[f"image_encoder.transformer.resblocks.{i + 1}.VPT_shallow"] = deep.detach().clone()
    for i, deep in enumerate(model.prompt_learner.deep_ctx):
        prompts[f"text_encoder.transformer.resblocks.{i + 1}.VPT_shallow"] = deep.detach().clone()
    return vifi_official(clip, prompts), clip, model


def test_bridge_and_prompt_import_uses_vifis_fp16_prompts(bridge_source, tokenizer, video, tmp_path):
    from clipreel.heads.raw.bridge_prompt import BridgePrompt, BridgePromptConfig

    official, clip, source = bridge_source
    imported = convert_vifi(saved_and_loaded(official, tmp_path / "prompted.pth"), clip.state_dict(), UserChoices(frames=8))
    assert imported.method == "prompt" and imported.facts["frames"] == 8
    assert {key: imported.method_config[key] for key in BRIDGE} == BRIDGE
    model = BridgePrompt(build_clip(imported.clip_config, imported.clip_state_dict), tokenizer, CLASSNAMES,
                         BridgePromptConfig(**imported.method_config)).eval()
    model.load_state_dict(imported.state_dict, strict=True)
    assert torch.equal(model.prompt_learner.ctx, source.prompt_learner.ctx)  # the text ctx is not halved

    clips = clips_of(video, imported.preprocessing)
    with torch.no_grad():
        unrounded = source(clips)["logits"]
        # ViFi-CLIP's forward: vision prompts and deep text prompts through .half().
        for prompt in [source.image_encoder.ctx, *source.image_encoder.deep_ctx, *source.prompt_learner.deep_ctx]:
            prompt.copy_(prompt.half().float())
        logits = model(clips)["logits"]
        torch.testing.assert_close(logits, source(clips)["logits"], rtol=1e-6, atol=1e-6)
        assert not torch.equal(logits, unrounded)


def test_vifi_refusals_name_the_keys(bridge_source):
    official, clip, _ = bridge_source
    base = dict(clip.state_dict())
    del base["token_embedding.weight"]
    with pytest.raises(ClipreelError, match="--clip holds no token_embedding.weight"):
        convert_vifi(official, base)
    damaged = {"model": dict(official["model"])}
    damaged["model"]["module.image_encoder.transformer.resblocks.2.VPT_shallow"] = torch.zeros(3, 128)
    del damaged["model"]["module.text_encoder.ln_final.bias"]
    damaged["model"]["module.text_encoder.transformer.resblocks.1.adapter.weight"] = torch.zeros(4)
    with pytest.raises(ClipreelError) as refusal:
        convert_vifi(damaged, clip.state_dict())
    message = str(refusal.value)
    assert "image_encoder.transformer.resblocks.2.VPT_shallow (3, 128) (expected (2, 128))" in message
    assert "text_encoder.ln_final.bias" in message.split("missing")[1]
    assert "text_encoder.transformer.resblocks.1.adapter.weight" in message.split("unexpected")[1]


# ------------------------------------------------------------------------------------------- export to open_clip


def test_vifi_export_loads_in_open_clip_and_gives_the_frame_embeddings(configs, tokenizer, video, tmp_path):
    from clipreel.heads.raw.vifi import ViFiCLIP

    clip = fine_tuned_clip(seed=14, fp16_token_table=True)
    run_model = ViFiCLIP(clip, tokenizer, CLASSNAMES).eval()
    config_path = export_open_clip("vifi", run_model.state_dict(), TINY_CONFIG, tmp_path / "vifi-tiny.safetensors")
    assert config_path == tmp_path / "vifi-tiny.json"

    open_clip.add_model_config(config_path)
    exported = open_clip.create_model("vifi-tiny", pretrained=str(tmp_path / "vifi-tiny.safetensors")).eval()
    clips = clips_of(video, convert_record_for(TINY_CONFIG))
    with torch.no_grad():
        expected = run_model(clips)["frame_embeds"]  # (B, T, E)
        frames = exported.encode_image(clips.flatten(0, 1)).view(expected.shape)
        torch.testing.assert_close(frames, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(exported.encode_text(run_model.token_ids), run_model.encode_classes(), rtol=1e-5, atol=1e-5)


def convert_record_for(clip_config: dict):
    """ViFi-CLIP's evaluation record for a CLIP of this config, at 8 frames."""
    from clipreel.heads.convert.common import Preprocessing

    size = clip_config["vision_cfg"]["image_size"]
    return Preprocessing.named("imagenet", image_size=size, short_side=size, crops=1, sampling="tsn", frames=8,
                               stride=None, views=1, view_scores="sum_softmax")


def test_export_refuses_methods_that_are_not_a_plain_clip_and_incomplete_weights(tmp_path):
    for method, reason in (("prompt", "prompt tokens"), ("xclip", "message tokens"), ("ezclip", "adapters"), ("evl", "decoder")):
        with pytest.raises(ClipreelError, match=reason):
            export_open_clip(method, {}, TINY_CONFIG, tmp_path / "x.safetensors")
    weights = {"clip." + key: value for key, value in tiny_clip(seed=15).state_dict().items()}
    del weights["clip.visual.ln_post.bias"]
    with pytest.raises(ClipreelError, match=r"missing \(1\): visual\.ln_post\.bias"):
        export_open_clip("vifi", weights, TINY_CONFIG, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------------- EZ-CLIP

EZ_FRAMES = 4
DESCRIPTIONS = ["a person strums a guitar", "a rider on a galloping horse", "someone tosses balls in the air", "a dog runs"]


@pytest.fixture(scope="module")
def ezclip_source(configs, tokenizer, tmp_path_factory):
    """EZ-CLIP over a tiny CLIP, trained prompts and adapters, every weight fp16-exact; saved as EZ-CLIP's
    training dict with fp16 tensors."""
    from clipreel.heads.raw.ezclip import EZCLIPClassifier, EZCLIPConfig

    clip = tiny_clip(seed=16)
    torch.manual_seed(17)
    model = EZCLIPClassifier(clip, tokenizer, DESCRIPTIONS, EZCLIPConfig(frames=EZ_FRAMES)).eval()
    randomise(model.ezclip, seed=18)
    round_to_fp16(clip, model)
    path = tmp_path_factory.mktemp("ezclip") / "k400_ezclip.pt"
    torch.save(ezclip_official(clip, model), path)
    return path, model


def test_ezclip_import_scores_100_cosine_like_ezclip(ezclip_source, tokenizer, video):
    from clipreel.heads.raw.ezclip import EZCLIPClassifier, EZCLIPConfig

    path, source = ezclip_source
    imported = convert_ezclip(torch.load(path, map_location="cpu", weights_only=True))
    assert imported.method == "ezclip" and imported.facts["frames"] == EZ_FRAMES
    assert imported.method_config["template"] == "{}" and imported.method_config["deep_prompts"]
    assert imported.method_config["score_scale"] == 100.0
    torch.testing.assert_close(imported.clip_state_dict["logit_scale"], source.ezclip.clip.model.logit_scale.detach(), rtol=0, atol=0)
    record = imported.preprocessing
    assert (record.norm, record.sampling, record.views, record.crops, record.short_side) == ("clip", "tsn", 1, 1, 73)

    model = EZCLIPClassifier(build_clip(imported.clip_config, imported.clip_state_dict), tokenizer, DESCRIPTIONS,
                             EZCLIPConfig(**imported.method_config)).eval()
    model.load_state_dict(imported.state_dict, strict=True)
    clips = clips_of(video, record)
    with torch.no_grad():
        reference = source(clips)
        # EZ-CLIP's test.py: softmax over 100 * cosine(video, class text).
        expected = 100.0 * F.normalize(reference["video_embeds"], dim=-1) @ F.normalize(source.ezclip.encode_text(source.token_ids), dim=-1).t()
        out = model(clips)
    torch.testing.assert_close(out["frame_embeds"], reference["frame_embeds"], rtol=0, atol=0)
    torch.testing.assert_close(out["logits"], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reference["logits"], expected, rtol=1e-3, atol=1e-3)  # CLIP's own temperature differs


def test_ezclip_refusals_name_the_tensors(ezclip_source):
    path = ezclip_source[0]
    with pytest.raises(ClipreelError, match=r"--frames 8 .*visual\.transformer\.T_prompt_embeddings has shape \(3, 4, 128\)"):
        convert_ezclip(torch.load(path, weights_only=True), UserChoices(frames=8))
    checkpoint = torch.load(path, weights_only=True)
    weights = checkpoint["model_state_dict"]
    weights["transformer.resblocks.1.Adapter.D_fc2.weight"] = torch.zeros(128, 16, dtype=torch.float16)
    weights["visual.transformer.resblocks.0.T_Adapter.D_fc1.weight"] = torch.zeros(32, 128, dtype=torch.float16)
    del weights["visual.temporal_embedding"]
    with pytest.raises(ClipreelError) as refusal:
        convert_ezclip(checkpoint)
    message = str(refusal.value)
    assert "transformer.resblocks.1.Adapter.D_fc2.weight (128, 16) (expected (128, 32))" in message
    assert "visual.temporal_embedding" in message.split("missing")[1]
    assert "visual.transformer.resblocks.0.T_Adapter.D_fc1.weight" in message.split("unexpected")[1]


# ------------------------------------------------------------------------------------------- shared pieces


def test_heads_come_from_model_where_no_tensor_fixes_them(evl_source, configs):
    config = json.loads(json.dumps(TINY_CONFIG))
    config["vision_cfg"]["head_width"] = 32
    config["text_cfg"]["heads"] = 4
    name = register(configs, "convert-tiny-narrow-heads", config)
    imported = convert_evl(*load_evl(evl_source[0]), UserChoices(model=name))
    assert imported.facts["heads"] == 4 and imported.method_config["heads"] == 4
    assert imported.clip_config["vision_cfg"]["head_width"] == 32 and imported.clip_config["text_cfg"]["heads"] == 4


def test_a_container_without_tensors_is_refused_naming_its_entries():
    from clipreel.heads.convert.common import unwrap_checkpoint

    with pytest.raises(ClipreelError, match="entries that are not tensors: config, epoch"):
        unwrap_checkpoint({"weights.pt": torch.zeros(1), "epoch": 3, "config": {"T": 8}}, "k400.pth")
    assert set(unwrap_checkpoint({"model": {"module.a": torch.zeros(1)}, "config": object()}, "k400.pth")) == {"a"}


def test_evl_at_the_released_vit_b16_sizes():
    """A k400_vitb16_8f_dec4x768 layout (meta tensors: shapes only) over open_clip's ViT-B-16: the
    decoder + head hold 33,183,376 parameters, the count of EVL's own modules, and the facts and the
    rebuilt CLIP are ViT-B/16's."""
    from clipreel.heads.convert.evl import evl_shapes

    shapes = evl_shapes(EVLConfig())
    assert sum(math.prod(shape) for shape in shapes.values()) == 33_183_376
    with torch.device("meta"):
        base = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-16")).state_dict()
    checkpoint = {"model": {"module." + key: torch.empty(shape, device="meta") for key, shape in shapes.items()}}
    imported = convert_evl(checkpoint, base, UserChoices(model="ViT-B-16", frames=8, num_classes=400))
    assert imported.facts["feature_blocks"] == [8, 9, 10, 11] and imported.facts["grid"] == 14
    assert imported.method_config["heads"] == 12
    reference = open_clip.get_model_config("ViT-B-16")
    assert imported.clip_config["vision_cfg"].items() >= {"width": 768, "layers": 12, "patch_size": 16, "image_size": 224}.items()
    assert imported.clip_config["text_cfg"].items() >= reference["text_cfg"].items()
    with pytest.raises(ClipreelError, match=r"vision_width 1024 \(the checkpoint: 768, from visual\.conv1\.weight"):
        convert_evl(checkpoint, base, UserChoices(model="ViT-L-14"))
