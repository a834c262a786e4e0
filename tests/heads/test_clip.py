"""The frozen open_clip backbone: block taps, q/k weights, checkpoint loading, provenance.

Everything runs the real tiny open_clip ViT (clipreel-tiny: 112 px, patch 16, width 64,
6 blocks, 2 heads) on CPU; checkpoints are real files in tmp_path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import socket
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from cli_runs import run_in_this_process
from safetensors.torch import save_file

from clipreel.errors import ClipreelError
from clipreel.heads.checkpoints import read_state_dict
from clipreel.heads.clip import (
    MODEL_CONFIG_DIR,
    NORMS,
    load_clip,
    register_builtin_models,
    resolve_model_name,
)
from clipreel.heads.taps import Backbone, BackboneConfig, parse_layers, tapped_blocks

TINY = "clipreel-tiny"
TINY_BLOCKS = 6
TINY_SIZE = 112
TINY_TOKENS = (112 // 16) ** 2 + 1  # 49 patches + CLS


def tiny_backbone(**overrides) -> Backbone:
    register_builtin_models()
    return Backbone(BackboneConfig(**{"model": TINY, "pretrained": "none", **overrides}))


@pytest.fixture
def frames() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, TINY_SIZE, TINY_SIZE, generator=generator)  # (F, 3, S, S)


def tower_walk(visual, frames: torch.Tensor) -> dict[int, torch.Tensor]:
    """Our own pass through the image tower: {block: output (F, L, D)}, -1 = ln_pre output."""
    with torch.no_grad():
        patches = visual.conv1(frames).flatten(2).transpose(1, 2)  # (F, g*g, D), row-major
        cls = visual.class_embedding.expand(frames.shape[0], 1, -1)  # (F, 1, D)
        x = visual.ln_pre(torch.cat([cls, patches], dim=1) + visual.positional_embedding)
        outputs = {-1: x}
        for index, block in enumerate(visual.transformer.resblocks):
            x = block(x)
            outputs[index] = x
    return outputs


def test_register_builtin_models_is_idempotent():
    first = register_builtin_models()
    second = register_builtin_models()
    assert first == second
    assert TINY in first
    assert open_clip.list_models().count(TINY) == 1


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("4", (2, 3, 4, 5)),
        ("1", (5,)),
        ("6", (0, 1, 2, 3, 4, 5)),
        ("3,1", (1, 3)),
        ("-1,-2", (4, 5)),
        ("-1", (5,)),
        ("0,", (0,)),
        (" 0 , 5 ", (0, 5)),
    ],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, TINY_BLOCKS) == expected


@pytest.mark.parametrize("spec", ["0", "7", "6,", "-7", "a,b", "", "2,2", "-1,5", "1.5"])
def test_parse_layers_rejects(spec):
    with pytest.raises(ClipreelError, match="--layers"):
        parse_layers(spec, TINY_BLOCKS)


def test_tapped_blocks_add_each_feature_blocks_input():
    assert tapped_blocks((2, 3, 4, 5)) == (1, 2, 3, 4, 5)
    assert tapped_blocks((0, 3)) == (-1, 0, 2, 3)
    assert tapped_blocks((5, 1)) == (0, 1, 4, 5)


@pytest.mark.parametrize(
    "layers, feature, stored",
    [("4", (2, 3, 4, 5), (1, 2, 3, 4, 5)), ("0,3", (0, 3), (-1, 0, 2, 3))],
)
def test_forward_shapes(frames, layers, feature, stored):
    backbone = tiny_backbone(layers=layers)
    assert backbone.feature_blocks == feature
    assert backbone.tapped_blocks == stored
    tokens, embeds = backbone.forward(frames)
    assert tokens.shape == (3, len(stored), TINY_TOKENS, 64)  # (F, K_s, L, D)
    assert embeds.shape == (3, 64)  # (F, E)
    assert tokens.dtype == embeds.dtype == torch.float32
    assert (backbone.tokens, backbone.width, backbone.embed_dim) == (TINY_TOKENS, 64, 64)
    assert (backbone.num_blocks, backbone.num_heads, backbone.image_size) == (TINY_BLOCKS, 2, TINY_SIZE)


@pytest.mark.parametrize("layers", ["4", "0,3"])
def test_tokens_and_embeds_match_an_independent_pass(frames, layers):
    backbone = tiny_backbone(layers=layers)
    tokens, embeds = backbone.forward(frames)
    expected = tower_walk(backbone.visual, frames)
    for k, block in enumerate(backbone.tapped_blocks):
        torch.testing.assert_close(tokens[:, k], expected[block])
    with torch.no_grad():
        torch.testing.assert_close(embeds, backbone.clip.encode_image(frames, normalize=False))


def test_qk_weights_recompute_the_real_attention(frames):
    backbone = tiny_backbone(layers="0,3")  # block 0's input is the ln_pre output (block -1)
    blocks = backbone.visual.transformer.resblocks
    attention_inputs = {}  # feature block -> ln_1(block input) as its attention received it

    def saver(block):
        return lambda module, args: attention_inputs.__setitem__(block, args[0])

    hooks = [blocks[block].attn.register_forward_pre_hook(saver(block)) for block in backbone.feature_blocks]
    try:
        tokens, _ = backbone.forward(frames)
    finally:
        for hook in hooks:
            hook.remove()

    weights = backbone.qk_weights()
    width, heads = backbone.width, int(weights["num_heads"])
    head_width = width // heads
    assert weights["in_proj_weight"].shape == (2, 2 * width, width)
    for k, block in enumerate(backbone.feature_blocks):
        block_input = tokens[:, backbone.tapped_blocks.index(block - 1)]  # (F, L, D)
        normed = F.layer_norm(
            block_input,
            (width,),
            torch.from_numpy(weights["ln_weight"][k]),
            torch.from_numpy(weights["ln_bias"][k]),
            eps=float(weights["ln_eps"]),
        )
        torch.testing.assert_close(normed, attention_inputs[block])

        projected = normed @ torch.from_numpy(weights["in_proj_weight"][k]).T
        projected = projected + torch.from_numpy(weights["in_proj_bias"][k])  # (F, L, 2D)
        q, key = projected.split(width, dim=-1)
        q = q.unflatten(-1, (heads, head_width)).transpose(1, 2)  # (F, H, L, D/H)
        key = key.unflatten(-1, (heads, head_width)).transpose(1, 2)
        recomputed = torch.softmax(q @ key.transpose(-1, -2) / head_width**0.5, dim=-1)  # (F, H, L, L)

        real_input = attention_inputs[block]
        with torch.no_grad():
            _, real = blocks[block].attn(
                real_input, real_input, real_input, need_weights=True, average_attn_weights=False
            )
        torch.testing.assert_close(recomputed, real)


def _reference_weights() -> dict[str, torch.Tensor]:
    register_builtin_models()
    model, sha256 = load_clip(TINY, "none")
    assert sha256 is None
    return {key: value.contiguous() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["safetensors", "state_dict_pt", "training_checkpoint_pth"])
def test_local_checkpoint_loads_identical_weights(tmp_path, kind):
    weights = _reference_weights()
    if kind == "safetensors":
        path = tmp_path / "tiny.safetensors"
        save_file(weights, path)
    elif kind == "state_dict_pt":
        path = tmp_path / "tiny.pt"
        torch.save(weights, path)
    else:  # as a DDP training run saves it
        path = tmp_path / "epoch_3.pth"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)

    backbone = tiny_backbone(pretrained=str(path))
    loaded = backbone.clip.state_dict()
    assert loaded.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key
    assert backbone.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert backbone.provenance()["pretrained"] == path.name
    assert all(not parameter.requires_grad for parameter in backbone.clip.parameters())
    assert not backbone.clip.training


def _text_config_variant(tmp_path, **text_cfg) -> str:
    """A tiny model config with these text settings, as a config file; returns its registered name."""
    config = json.loads((MODEL_CONFIG_DIR / f"{TINY}.json").read_text())
    config["text_cfg"].update(text_cfg)
    path = tmp_path / "TinyText.json"
    path.write_text(json.dumps({**config, "custom_text": True}))  # CustomTextCLIP: the mask lives in .text
    return resolve_model_name(str(path))


@pytest.mark.parametrize("variant", ["clip", "custom_text", "fp16_checkpoint"])
def test_checkpoint_loads_without_random_init_bit_identical_to_build_and_load(tmp_path, frames, variant):
    """Loading a file builds the model on the meta device and takes the file's tensors: the weights,
    every buffer (the causal text masks rebuilt) and the outputs equal open_clip's build + load, bit for bit."""
    register_builtin_models()
    name = _text_config_variant(tmp_path) if variant == "custom_text" else TINY
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        source = open_clip.create_model(name)
    weights = {key: value.contiguous() for key, value in source.state_dict().items()}
    if variant == "fp16_checkpoint":  # as OpenAI's releases keep them: the model stays float32
        weights = {key: value.half() if value.is_floating_point() else value for key, value in weights.items()}
    path = tmp_path / "weights.safetensors"
    save_file(weights, path)

    reference = open_clip.create_model(name).eval().requires_grad_(False)  # load_clip's model is frozen
    reference.load_state_dict(weights)
    rng_before = torch.random.get_rng_state()
    loaded, _ = load_clip(name, str(path))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # nothing was randomly initialised

    expected_tensors = dict(reference.named_parameters()) | dict(reference.named_buffers())
    loaded_tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert loaded_tensors.keys() == expected_tensors.keys()
    assert any(key.endswith("attn_mask") for key in loaded_tensors)  # non-persistent: not in the file
    for key, expected in expected_tensors.items():
        value = loaded_tensors[key]
        assert value.device.type == "cpu" and value.dtype == expected.dtype and value.is_contiguous(), key
        assert torch.equal(value, expected), key
    text = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(frames), reference.encode_image(frames))
        assert torch.equal(loaded.encode_text(text), reference.encode_text(text))
    assert not loaded.training and not any(parameter.requires_grad for parameter in loaded.parameters())


def openai_layout_archive(path, frames: torch.Tensor) -> torch.nn.Module:
    """Write a TorchScript archive laid out like OpenAI's CLIP releases: a traced QuickGELU CLIP
    whose top module also holds input_resolution, context_length and vocab_size buffers.
    Returns the source model."""
    register_builtin_models()
    source = open_clip.create_model(TINY, force_quick_gelu=True).eval()
    for name, value in (("input_resolution", TINY_SIZE), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(source, name):  # open_clip keeps the last two as plain ints
            delattr(source, name)
        source.register_buffer(name, torch.tensor(value))
    text = torch.zeros(1, 77, dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(source, (frames[:1], text), check_trace=False)
    traced.save(str(path))
    return source


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_openai_torchscript_archive_loads_with_quick_gelu_without_running_it(tmp_path, frames):
    path = tmp_path / "ViT-tiny.pt"
    source = openai_layout_archive(path, frames)

    read = read_state_dict(path)  # no code of the archive runs
    scripted = torch.jit.load(path).state_dict()
    assert list(read) == list(scripted)  # the same names, in the same order
    for key, value in scripted.items():
        assert torch.equal(read[key], value), key

    backbone = tiny_backbone(pretrained=str(path))
    assert backbone.provenance()["activation"] == "quick_gelu"
    loaded = backbone.clip.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, source.state_dict()[key]), key
    _, embeds = backbone.forward(frames)
    with torch.no_grad():
        torch.testing.assert_close(embeds, source.encode_image(frames))


class MarkerOnLoad(torch.nn.Module):
    """A TorchScript module whose __setstate__ (run by torch.jit.load) creates the file at `marker`."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.touched = torch.zeros(1, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        self.weight = state[1]
        self.training = state[2]
        # A shared file mapping creates the file: proof that loading ran this code.
        self.touched = torch.from_file(self.marker, shared=True, size=1, dtype=torch.uint8)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_that_runs_code_at_load_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.pt"
    torch.jit.script(MarkerOnLoad(str(marker))).save(str(path))

    with pytest.raises(ClipreelError, match="--trust-checkpoint-code") as error:
        tiny_backbone(pretrained=str(path))
    assert "not an OpenAI CLIP archive" in str(error.value) and "__setstate__" in str(error.value)
    with pytest.raises(ClipreelError, match="--trust-checkpoint-code"):
        read_state_dict(path)
    assert not marker.exists()

    # Trusted, it is read by torch.jit.load, which runs the archive's code: the test file is real.
    assert list(read_state_dict(path, trust_code=True)) == ["weight"]
    assert marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_cli_refuses_the_archive_with_exit_2_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.pt"
    torch.jit.script(MarkerOnLoad(str(marker))).save(str(path))
    videos = tmp_path / "videos.csv"
    videos.write_text("path,label_name,split\na.mp4,one,test\nb.mp4,two,test\n")
    for name in ("a.mp4", "b.mp4"):  # the checkpoint is refused before any video is opened
        (tmp_path / name).touch()
    code = run_in_this_process("zeroshot", "--videos", videos, "--method", "vifi", "--model", TINY,
                               "--pretrained", path)
    assert code == 2
    err = capsys.readouterr().err
    assert "--trust-checkpoint-code" in err and "Traceback" not in err
    assert not marker.exists()


def test_checkpoint_of_another_model_is_refused(tmp_path):
    weights = _reference_weights()
    weights.pop("visual.proj")
    path = tmp_path / "broken.safetensors"
    save_file(weights, path)
    with pytest.raises(ClipreelError, match="does not hold weights for model clipreel-tiny"):
        tiny_backbone(pretrained=str(path))


def test_unreadable_or_missing_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ClipreelError, match="cannot read it as a checkpoint"):
        tiny_backbone(pretrained=str(junk))
    with pytest.raises(ClipreelError, match="no such file"):
        tiny_backbone(pretrained=str(tmp_path / "missing.safetensors"))


def test_tag_without_weights_for_the_model_points_to_a_local_file():
    with pytest.raises(ClipreelError, match="--pretrained /path/to/checkpoint") as error:
        tiny_backbone(pretrained="openai")
    assert "--pretrained none" in str(error.value)


def _hub_reachable() -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return True
    except OSError:
        return False


@pytest.mark.timeout(60)
@pytest.mark.skipif(_hub_reachable(), reason="needs an offline machine (would download ViT-B-16)")
def test_tag_download_offline_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ClipreelError, match="not reachable") as error:
        Backbone(BackboneConfig(model="ViT-B-16", pretrained="openai"))
    assert "--pretrained /path/to/checkpoint" in str(error.value)


def test_unknown_model_lists_close_and_builtin_names():
    register_builtin_models()
    with pytest.raises(ClipreelError, match="ViT-B-16") as error:
        Backbone(BackboneConfig(model="ViT-B-61", pretrained="none"))
    assert TINY in str(error.value)


def test_openai_style_model_names_are_accepted():
    assert resolve_model_name("ViT-B/16") == "ViT-B-16"
    assert resolve_model_name(TINY) == TINY


@pytest.mark.parametrize(
    "name, vision_cfg",
    [
        ("test-tiny-resnet", {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}),
        (
            "test-tiny-attnpool",
            {
                "image_size": 32,
                "layers": 1,
                "width": 32,
                "head_width": 16,
                "patch_size": 16,
                "attentional_pool": True,
                "attn_pooler_queries": 4,
                "attn_pooler_heads": 2,
            },
        ),
    ],
)
def test_non_standard_image_towers_are_refused(tmp_path, name, vision_cfg):
    config = {
        "embed_dim": 32,
        "vision_cfg": vision_cfg,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    with pytest.raises(ClipreelError, match="standard open_clip ViT"):
        Backbone(BackboneConfig(model=name, pretrained="none"))


def test_norm_choices():
    assert (tiny_backbone().mean, tiny_backbone().std) == NORMS["clip"]
    imagenet = tiny_backbone(norm="imagenet")
    assert (imagenet.mean, imagenet.std) == NORMS["imagenet"]
    with pytest.raises(ClipreelError, match="norm"):
        tiny_backbone(norm="kinetics")


def test_bf16_autocast_on_cpu_stays_close_to_fp32(frames):
    reference = tiny_backbone(layers="2")
    mixed = tiny_backbone(layers="2", precision="bf16")
    mixed.clip.load_state_dict(reference.clip.state_dict())
    assert mixed.autocast_dtype == torch.bfloat16 and reference.autocast_dtype is None
    tokens, embeds = reference.forward(frames)
    mixed_tokens, mixed_embeds = mixed.forward(frames)
    assert mixed_tokens.dtype == torch.float32
    assert (mixed_tokens - tokens).norm() / tokens.norm() < 0.05
    assert (mixed_embeds - embeds).norm() / embeds.norm() < 0.05


def test_bad_precision_device_and_frames(frames):
    with pytest.raises(ClipreelError, match="precision"):
        tiny_backbone(precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ClipreelError, match="no CUDA GPU"):
            tiny_backbone(device="cuda")
    with pytest.raises(ValueError, match="expected frames"):
        tiny_backbone().forward(frames[:, :, :64, :64])


def test_provenance_is_complete_and_json_ready(tmp_path):
    backbone = tiny_backbone(layers="0,3", norm="imagenet")
    provenance = json.loads(json.dumps(backbone.provenance()))
    assert provenance == backbone.provenance()  # lists, not tuples: survives a JSON round trip
    assert provenance["model"] == TINY
    assert provenance["pretrained"] == "none"
    assert provenance["checkpoint_sha256"] is None
    assert provenance["activation"] == "gelu"
    assert provenance["image_size"] == TINY_SIZE and provenance["patch_size"] == 16
    assert provenance["width"] == 64 and provenance["num_heads"] == 2
    assert provenance["tokens"] == TINY_TOKENS and provenance["embed_dim"] == 64
    assert provenance["num_blocks"] == TINY_BLOCKS
    assert provenance["feature_blocks"] == [0, 3]
    assert provenance["norm"] == "imagenet"
    assert (tuple(provenance["mean"]), tuple(provenance["std"])) == NORMS["imagenet"]
    assert provenance["token_layout"].startswith("cls+patches")
    assert provenance["precision"] == "auto"


def test_random_init_is_the_same_in_every_process():
    """Extraction actors each build their own model: with pretrained='none' they must agree."""
    first, _ = load_clip("clipreel-tiny", "none")
    torch.manual_seed(1234)
    second, _ = load_clip("clipreel-tiny", "none")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


# --- Built-in weights: --pretrained default (clipreel-synth ships its checkpoint in the package) ---
# (imports of this section kept here so that it appends cleanly; they may move to the top)
from safetensors.torch import load_file

from clipreel.heads import clip as backbone_module
from clipreel.heads.clip import builtin_weights, default_pretrained, file_sha256

SYNTH = "clipreel-synth"


def test_default_loads_the_shipped_synth_weights():
    shipped = builtin_weights(SYNTH)
    model, sha256 = load_clip(SYNTH, "default")
    assert sha256 == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert not model.training
    assert all(not parameter.requires_grad for parameter in model.parameters())
    saved = load_file(shipped)  # fp16 on disk, fp32 in the model
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value.float()), key

    random_model, random_sha256 = load_clip(SYNTH, "none")
    assert random_sha256 is None
    assert not torch.equal(random_model.visual.proj, model.visual.proj)


def test_backbone_with_default_weights_records_their_hash():
    backbone = Backbone(BackboneConfig(model=SYNTH, pretrained="default", layers="2"))
    assert backbone.checkpoint_sha256 == file_sha256(builtin_weights(SYNTH))


def test_default_means_openai_for_models_without_built_in_weights():
    assert builtin_weights("ViT-B-16") is None
    assert default_pretrained("ViT-B-16") == "openai"  # resolved only: nothing is downloaded


def test_default_without_built_in_weights_or_openai_tag_explains_the_choices():
    with pytest.raises(ClipreelError, match="no built-in weights and no 'openai' tag") as error:
        load_clip(TINY, "default")
    assert "--pretrained none" in str(error.value)
    assert SYNTH in str(error.value)


def test_missing_built_in_file_says_how_to_rebuild_it(monkeypatch):
    monkeypatch.setitem(backbone_module.BUILTIN_WEIGHTS, TINY, "not-shipped.safetensors")
    with pytest.raises(ClipreelError, match="missing from this installation") as error:
        load_clip(TINY, "default")
    assert "python -m clipreel.pipeline.data.synth.train_clip" in str(error.value)


# --- Models defined by an open_clip config file (--model path/to/NAME.json) ---


def small_config(layers: int = 3) -> dict:
    """clipreel-tiny's config with fewer image blocks."""
    config = json.loads((MODEL_CONFIG_DIR / f"{TINY}.json").read_text())
    config["vision_cfg"]["layers"] = layers
    return config


def test_a_config_file_names_a_model_by_its_content(tmp_path):
    path = tmp_path / "MyViT.json"
    path.write_text(json.dumps(small_config()))
    name = resolve_model_name(str(path))
    assert re.fullmatch(r"MyViT-[0-9a-f]{8}", name)
    assert name in open_clip.list_models()
    same = tmp_path / "elsewhere" / "MyViT.json"
    same.parent.mkdir()
    same.write_text(json.dumps(small_config(), indent=4))  # same content, other spelling
    assert resolve_model_name(str(same)) == name
    other = tmp_path / "other" / "MyViT.json"
    other.parent.mkdir()
    other.write_text(json.dumps(small_config(layers=2)))
    assert resolve_model_name(str(other)) not in (name, TINY)

    backbone = Backbone(BackboneConfig(model=str(path), pretrained="none", layers="2"))
    assert backbone.num_blocks == 3
    provenance = backbone.provenance()
    assert provenance["model"] == name and provenance["model_config"] == small_config()
    assert backbone.config.model == name and backbone.config.model_config == small_config()
    assert "model_config" not in tiny_backbone().provenance()  # named models record their name only


def test_a_store_or_actor_rebuilds_a_config_model_without_the_file(tmp_path):
    """What a store's provenance and an extraction actor's config carry is enough, in a new process."""
    path = tmp_path / "MyViT.json"
    path.write_text(json.dumps(small_config()))
    backbone = Backbone(BackboneConfig(model=str(path), pretrained="none", layers="2"))
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps({"config": dataclasses.asdict(backbone.config), "provenance": backbone.provenance()}))
    path.unlink()
    script = (
        "import json, sys, torch\n"
        "from clipreel.heads.clip import load_text_model\n"
        "from clipreel.heads.taps import Backbone, BackboneConfig\n"
        "recorded = json.load(open(sys.argv[1]))\n"
        "backbone = Backbone(BackboneConfig(**recorded['config']))\n"
        "text = load_text_model(recorded['provenance'])\n"
        "print(backbone.num_blocks, backbone.model_name, text.model_name, len(text.clip.visual.transformer.resblocks))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(recorded)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", backbone.model_name, backbone.model_name, "3"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "not valid JSON (line 1, column 2"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "not an open_clip model config"),
        (json.dumps({"embed_dim": 64, "vision_cfg": {}}).encode(), "it lacks text_cfg"),
        (json.dumps({**small_config(), "embed_dim": "64"}).encode(), "embed_dim must be a positive whole number"),
        (json.dumps({**small_config(), "text_cfg": [64]}).encode(), "text_cfg must be an object"),
        (
            json.dumps({**small_config(), "vision_cfg": {**small_config()["vision_cfg"], "layerz": 2}}).encode(),
            "vision_cfg has settings open_clip does not know: layerz",
        ),
    ],
    ids=["syntax", "encoding", "list", "missing-key", "embed-dim", "text-cfg", "unknown-setting"],
)
def test_a_file_that_is_not_a_model_config_is_refused_clearly(tmp_path, content, message):
    path = tmp_path / "Broken.json"
    path.write_bytes(content)
    with pytest.raises(ClipreelError, match=re.escape(message)) as error:
        resolve_model_name(str(path))
    assert str(path) in str(error.value)


def test_cli_exits_2_for_a_bad_or_missing_config_file(tmp_path, capsys):
    videos = tmp_path / "videos.csv"
    videos.write_text("path,label_name,split\na.mp4,one,test\nb.mp4,two,test\n")
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).touch()
    broken = tmp_path / "Broken.json"
    broken.write_text('{"embed_dim": 64}')
    for model, message in ((broken, "not an open_clip model config"), (tmp_path / "Missing.json", "no such file")):
        code = run_in_this_process("zeroshot", "--videos", videos, "--method", "vifi", "--model", model)
        err = capsys.readouterr().err
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err
