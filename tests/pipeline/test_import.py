"""`clipreel import` end to end: checkpoints in the reference repositories' layouts, built from clipreel's
own models at tiny sizes (clipreel-tiny with QuickGELU, as OpenAI's CLIPs), written to disk, imported
through the CLI, then `predict` (and `eval`) on real encoded videos give the source model's scores.
Also: refusals that name the keys, pickles that would run code, and `export` of a ViFi-CLIP import.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import types

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
from safetensors.torch import save_file
from typer.testing import CliRunner

from clipreel.cli import app
from clipreel.errors import ClipreelError
from clipreel.heads.cache.evl import EVLConfig, EVLHead
from clipreel.heads.clip import register_builtin_models
from clipreel.heads.taps import Backbone, BackboneConfig
from clipreel.pipeline.data.decode import PyAVDecoder, probe
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
from clipreel.pipeline.data.sampling import SamplingConfig, sample_indices

runner = CliRunner()
MODEL = "clipreel-tiny"  # width 64, 2 heads per tower (not OpenAI's width / 64): --model supplies the heads
CLASSES = ["playing_guitar", "riding a horse", "juggling"]
FRAMES = 8


@pytest.fixture(scope="module")
def tokenizer():
    register_builtin_models()
    return open_clip.get_tokenizer(MODEL)


def tiny_clip(seed: int) -> torch.nn.Module:
    """A seeded random clipreel-tiny with QuickGELU (an OpenAI-style CLIP), frozen, in eval mode."""
    register_builtin_models()
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL, force_quick_gelu=True)
    model.requires_grad_(False)
    return model.eval()


def clips_of(video, sampling: SamplingConfig, cfg: PreprocessConfig, first: int = 0, count: int | None = None) -> torch.Tensor:
    """A video as a method's test reads it: (V * C, T, 3, S, S), view-major; frames first..first+count."""
    info = probe(video)
    indices = sample_indices(count or info.num_frames - first, sampling, str(video)) + first  # (V, T)
    frames = PyAVDecoder().read(video, indices.reshape(-1), info)
    crops = preprocess(frames, cfg)  # (C, V*T, 3, S, S)
    return crops.unflatten(1, (sampling.views, sampling.frames)).transpose(0, 1).flatten(0, 1)


def invoke(*args: str):
    """Run a clipreel command in this process; user-fixable problems come back as the exception."""
    return runner.invoke(app, [str(arg) for arg in args])


def predicted(run, videos, tmp_path, *extra) -> dict:
    """`clipreel predict` of the videos (with the run, or zero-shot CLIP with run None) -> its JSON."""
    out = tmp_path / f"predict-{len(list(tmp_path.iterdir()))}.json"
    result = invoke("predict", *videos, *(["--run", run] if run is not None else []), "--json", out, *extra)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(out.read_text())


def expected_scores(logits: torch.Tensor) -> tuple[list[float], list[float]]:
    """(probabilities, raw scores) of one video from its clips' logits (N, K): mean softmax, mean logits."""
    return torch.softmax(logits, dim=-1).mean(0).tolist(), logits.mean(0).tolist()


def assert_scores(video_json: dict, logits: torch.Tensor, tolerance: float = 1e-5) -> None:
    probabilities, scores = expected_scores(logits)
    np.testing.assert_allclose(video_json["scores"], scores, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(video_json["probabilities"], probabilities, rtol=tolerance, atol=tolerance)


def classes_file(tmp_path, names=CLASSES) -> str:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(names) + "\n")
    return str(path)


IMAGENET = PreprocessConfig.from_norm("imagenet", image_size=112)
CLIP_NORM = PreprocessConfig.from_norm("clip", image_size=112)


# ------------------------------------------------------------------------------------------- EVL


@pytest.fixture(scope="module")
def evl_files(tmp_path_factory):
    """The frozen CLIP as an OpenAI-layout state dict (with the archive's entries) and a random EVL
    decoder saved as EVL's checkpoint.py does: {"model": module.*, "optimizer", "next_step"}."""
    folder = tmp_path_factory.mktemp("evl")
    torch.save(openai_state_dict(tiny_clip(seed=1), image_size=112), folder / "ViT-tiny.pt")
    torch.manual_seed(2)
    head = EVLHead(EVLConfig(width=64, heads=2, layers=2, frames=FRAMES, grid=7, num_classes=len(CLASSES))).eval()
    randomise(head, seed=3)
    torch.save({"model": {"module." + key: value for key, value in head.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 4e-4, "params": [0]}]}, "next_step": 50000},
               folder / "k400_tiny_8f_dec2x64.pth")
    return folder, head


@pytest.mark.slow
def test_evl_import_predicts_the_source_scores_and_eval_accepts_a_store_of_the_same_clip(
        evl_files, encoded_videos, tmp_path, ray_local):
    folder, head = evl_files
    run = tmp_path / "evl-run"
    result = invoke("import", folder / "k400_tiny_8f_dec2x64.pth", "--method", "evl", "--clip", folder / "ViT-tiny.pt",
                    "--classes", classes_file(tmp_path), "--model", MODEL, "--out", run)
    assert result.exit_code == 0, (result.output, result.exception)
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "evl" and config["imported"]["facts"]["feature_blocks"] == [4, 5]

    # The source: the frozen CLIP's last two blocks -> the decoder, on EVL's test clips (dense x16, 3 views).
    backbone = Backbone(BackboneConfig(model=MODEL, pretrained=str(folder / "ViT-tiny.pt"), layers="2"))
    sampling = SamplingConfig(policy="dense", frames=FRAMES, stride=16, views=3)
    answer = predicted(run, encoded_videos[:2], tmp_path)
    assert answer["classnames"] == CLASSES and answer["clips"]["sampling"]["policy"] == "dense"
    for video, video_json in zip(encoded_videos[:2], answer["videos"]):
        features = backbone.forward_clips(clips_of(video, sampling, CLIP_NORM))
        with torch.no_grad():
            logits = head({"tokens": features.tokens, "attention": features.attention})  # (3, K)
        assert_scores(video_json, logits)

    # A closed-set run refuses other classes.
    refused = invoke("predict", encoded_videos[0], "--run", run, "--classes", "cat,dog")
    assert isinstance(refused.exception, ClipreelError) and "closed-set evl run" in str(refused.exception)

    # A store extracted from the same CLIP file with the same --model is accepted by eval.
    listing = tmp_path / "videos.csv"
    listing.write_text("path,label,label_name,split\n" + "".join(
        f"{video},{index},{CLASSES[index]},test\n" for index, video in enumerate(encoded_videos)))
    store = tmp_path / "features.zarr"
    extracted = invoke("extract", "--videos", listing, "--out", store, "--model", MODEL, "--pretrained",
                       folder / "ViT-tiny.pt", "--frames", FRAMES, "--sampling", "dense", "--stride", 16, "--views", 3,
                       "--layers", 2, "--norm", "clip", "--no-progress")
    assert extracted.exit_code == 0, extracted.output
    scored = invoke("eval", run, "--store", store, "--split", "test", "--report", tmp_path / "eval.json")
    assert scored.exit_code == 0, (scored.output, scored.exception)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n"] == 3 and report["views"] == 3

    # Training starts from the imported decoder (same head, classes and features).
    further = tmp_path / "evl-further"
    trained = invoke("train", "evl", "--store", store, "--out", further, "--split", "test", "--val-split", "",
                     "--epochs", 1, "--start", run, "--no-progress")
    assert trained.exit_code == 0, (trained.output, trained.exception)


def test_evl_refusals_name_the_tensors_and_the_keys(evl_files, tmp_path):
    folder, _ = evl_files
    checkpoint, base = folder / "k400_tiny_8f_dec2x64.pth", folder / "ViT-tiny.pt"
    four = classes_file(tmp_path, CLASSES + ["dog"])
    result = invoke("import", checkpoint, "--method", "evl", "--clip", base, "--classes", four, "--model", MODEL,
                    "--out", tmp_path / "run")
    assert isinstance(result.exception, ClipreelError)
    assert "--classes 4 contradicts the checkpoint: proj.2.weight has shape (3, 64)" in str(result.exception)
    result = invoke("import", checkpoint, "--method", "evl", "--clip", base, "--classes", classes_file(tmp_path),
                    "--model", MODEL, "--frames", 16, "--out", tmp_path / "run")
    assert "decoder.temporal_pos_embed.0 has shape (8, 64)" in str(result.exception)
    result = invoke("import", checkpoint, "--method", "evl", "--classes", classes_file(tmp_path), "--out", tmp_path / "run")
    assert "--clip is needed for --method evl" in str(result.exception)

    damaged = torch.load(checkpoint, weights_only=True)
    del damaged["model"]["module.decoder.decoder_layers.1.norm3.bias"]
    damaged["model"]["module.decoder.temporal_conv.0.weight"] = torch.zeros(64, 1, 5)
    torch.save(damaged, tmp_path / "damaged.pth")
    result = invoke("import", tmp_path / "damaged.pth", "--method", "evl", "--clip", base, "--classes",
                    classes_file(tmp_path), "--model", MODEL, "--out", tmp_path / "run")
    message = str(result.exception)
    assert "decoder.decoder_layers.1.norm3.bias" in message.split("missing")[1]
    assert "decoder.temporal_conv.0.weight (64, 1, 5) (expected (64, 1, 3))" in message
    assert not (tmp_path / "run").exists()


class _RunsCode:
    """An object whose unpickling would run a shell command (what a malicious checkpoint carries)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(evl_files, tmp_path):
    folder, _ = evl_files
    checkpoint = torch.load(folder / "k400_tiny_8f_dec2x64.pth", weights_only=True)
    marker = tmp_path / "ran"
    checkpoint["config"] = _RunsCode(marker)
    torch.save(checkpoint, tmp_path / "evil.pth")
    result = invoke("import", tmp_path / "evil.pth", "--method", "evl", "--clip", folder / "ViT-tiny.pt",
                    "--classes", classes_file(tmp_path), "--model", MODEL, "--out", tmp_path / "run")
    assert isinstance(result.exception, ClipreelError)
    assert "its pickle refers to posix.system, which is neither a tensor nor a plain container" in str(result.exception)
    assert not marker.exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- X-CLIP

XCLIP_FRAMES = 4


def yacs_config(values: dict):
    """A yacs CfgNode as X-CLIP's epoch_saving pickles it (module yacs.config, class CfgNode, a dict
    subclass), made without yacs: a stand-in class under that name, removed again after the test saves it."""
    module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = CfgNode
    sys.modules.setdefault("yacs", types.ModuleType("yacs"))
    sys.modules["yacs.config"] = module
    return CfgNode({key: CfgNode(value) for key, value in values.items()})


@pytest.fixture(scope="module")
def xclip_files(tokenizer, tmp_path_factory):
    """A random X-CLIP saved as X-CLIP's epoch_saving does ({"model": the whole state dict, no module.}),
    and the same weights under transformers' key names in a save_pretrained-style folder."""
    from clipreel.heads.raw.xclip import XCLIP, XCLIPConfig

    folder = tmp_path_factory.mktemp("xclip")
    clip = tiny_clip(seed=4)
    torch.manual_seed(5)
    model = XCLIP(clip, tokenizer, CLASSES, XCLIPConfig(frames=XCLIP_FRAMES)).eval()
    randomise(model.visual, seed=6, scale=0.02)
    randomise(model.head, seed=7)
    official = xclip_official(model, clip)
    torch.save({**official, "config": yacs_config({"DATA": {"NUM_FRAMES": 4}})}, folder / "k400_tiny_4.pth")
    del sys.modules["yacs.config"], sys.modules["yacs"]  # nothing could import it when the file is read
    (folder / "xclip-tiny-hf").mkdir()
    save_file(xclip_hf_layout(official["model"]), str(folder / "xclip-tiny-hf" / "model.safetensors"))
    return folder, model


def test_xclip_import_predicts_the_source_scores_with_any_classes(xclip_files, encoded_videos, tmp_path):
    folder, source = xclip_files
    run = tmp_path / "xclip-run"
    result = invoke("import", folder / "k400_tiny_4.pth", "--method", "xclip", "--classes", classes_file(tmp_path),
                    "--model", MODEL, "--out", run)
    assert result.exit_code == 0, (result.output, result.exception)  # its yacs config skipped, unread
    # X-CLIP's test: TSN segment centres, 4 clips x 3 crops, ImageNet statistics.
    sampling = SamplingConfig(frames=XCLIP_FRAMES, views=4)
    crops = PreprocessConfig.from_norm("imagenet", image_size=112, crops=3)
    answer = predicted(run, encoded_videos[:1], tmp_path)
    assert answer["clips"]["sampling"]["views"] == 4 and answer["clips"]["preprocess"]["crops"] == 3
    with torch.no_grad():
        assert_scores(answer["videos"][0], source(clips_of(encoded_videos[0], sampling, crops))["logits"])

    # A text-matching run takes any class list; --views/--crops override the reference test.
    others = ["cooking", "walking_the_dog"]
    answer = predicted(run, encoded_videos[:1], tmp_path, "--classes", ",".join(others), "--views", 1, "--crops", 1)
    source.set_classnames(others)
    with torch.no_grad():
        logits = source(clips_of(encoded_videos[0], SamplingConfig(frames=XCLIP_FRAMES), IMAGENET))["logits"]
    source.set_classnames(CLASSES)
    assert answer["classnames"] == others
    assert_scores(answer["videos"][0], logits)

    # eval on a video list uses the recorded test by default.
    listing = tmp_path / "videos.csv"
    listing.write_text("path,label,label_name,split\n" + "".join(
        f"{video},{index},{CLASSES[index]},test\n" for index, video in enumerate(encoded_videos)))
    scored = invoke("eval", run, "--videos", listing, "--split", "test", "--workers", 0)
    assert scored.exit_code == 0, (scored.output, scored.exception)
    report = json.loads((run / "eval-test.json").read_text())
    assert report["n"] == 3 and report["views"] == 4 and report["crops"] == 3


def test_xclip_in_transformers_layout_imports_to_the_same_scores(xclip_files, encoded_videos, tmp_path):
    folder, source = xclip_files
    run = tmp_path / "xclip-hf-run"
    result = invoke("import", folder / "xclip-tiny-hf", "--method", "xclip", "--classes", classes_file(tmp_path),
                    "--model", MODEL, "--out", run)
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((run / "config.json").read_text())["imported"]["layout"] == "transformers"
    answer = predicted(run, encoded_videos[:1], tmp_path, "--views", 1, "--crops", 1)
    with torch.no_grad():
        logits = source(clips_of(encoded_videos[0], SamplingConfig(frames=XCLIP_FRAMES), IMAGENET))["logits"]
    assert_scores(answer["videos"][0], logits)


@pytest.mark.slow
def test_an_imported_xclip_trains_further_and_is_rebuilt_from_its_import(xclip_files, encoded_videos, tmp_path):
    folder, source = xclip_files
    run = tmp_path / "xclip-run"
    invoke("import", folder / "k400_tiny_4.pth", "--method", "xclip", "--classes", classes_file(tmp_path),
           "--model", MODEL, "--out", run)
    name = json.loads((run / "config.json").read_text())["head"]["model"]
    listing = tmp_path / "videos.csv"
    listing.write_text("path,label,label_name,split\n" + "".join(
        f"{video},{index},{CLASSES[index]},train\n" for index, video in enumerate(encoded_videos)))
    wrong = invoke("finetune", "xclip", "--videos", listing, "--out", tmp_path / "x", "--pretrained", run, "--model",
                   name, "--frames", 8)
    assert "--frames 8" in str(wrong.exception) and "pass --frames 4" in str(wrong.exception)
    further = tmp_path / "xclip-further"
    tuned = invoke("finetune", "xclip", "--videos", listing, "--out", further, "--pretrained", run, "--model", name,
                   "--frames", XCLIP_FRAMES, "--epochs", 1, "--lr", 1e-3, "--workers", 0, "--no-progress")
    assert tuned.exit_code == 0, (tuned.output, tuned.exception)
    from clipreel.pipeline.models import trained_method_model

    started, trained = trained_method_model(run), trained_method_model(further)
    weights = {key: value for key, value in trained.state_dict().items()}
    changed = [key for key, value in started.state_dict().items() if not torch.equal(value, weights[key])]
    assert changed and all(key.startswith(("visual.", "head.")) for key in changed)
    # The frozen text tower is the import's: the class texts embed as they did.
    torch.testing.assert_close(trained.head.class_text_embeds, started.head.class_text_embeds, rtol=0, atol=0)


def test_xclip_refuses_frames_that_contradict_the_checkpoint(xclip_files, tmp_path):
    folder, _ = xclip_files
    result = invoke("import", folder / "k400_tiny_4.pth", "--method", "xclip", "--classes", classes_file(tmp_path),
                    "--model", MODEL, "--frames", 8, "--out", tmp_path / "run")
    assert "--frames 8 contradicts the checkpoint: mit.positional_embedding has shape (1, 4, 64)" in str(result.exception)


# ------------------------------------------------------------------------------------------- ViFi-CLIP

@pytest.fixture(scope="module")
def vifi_files(tokenizer, tmp_path_factory):
    """A ViFi-tuned CLIP saved as ViFi-CLIP's fine-tuned checkpoint; the base CLIP whose token table it lacks."""
    folder = tmp_path_factory.mktemp("vifi")
    base = tiny_clip(seed=8)
    torch.save(openai_state_dict(base, image_size=112), folder / "ViT-tiny.pt")
    tuned = tiny_clip(seed=8)
    randomise(tuned, seed=9, scale=0.02)
    with torch.no_grad():
        tuned.token_embedding.weight.copy_(base.token_embedding.weight)  # ViFi-CLIP never trains the token table
    texts = tokenizer([f"a photo of a {name}." for name in CLASSES])
    embeddings = tuned.token_embedding(texts).half().float()
    torch.save(vifi_official(tuned, {"prompt_learner.complete_text_embeddings": embeddings}), folder / "vifi_k400.pth")
    return folder, tuned


def test_vifi_import_predicts_with_vifis_conventions_and_exports_to_open_clip(vifi_files, encoded_videos, tokenizer, tmp_path):
    from clipreel.heads.raw.vifi import ViFiCLIP, ViFiConfig

    folder, tuned = vifi_files
    run = tmp_path / "vifi-run"
    result = invoke("import", folder / "vifi_k400.pth", "--method", "vifi", "--clip", folder / "ViT-tiny.pt",
                    "--classes", classes_file(tmp_path), "--model", MODEL, "--frames", FRAMES, "--out", run)
    assert result.exit_code == 0, (result.output, result.exception)

    # ViFi-CLIP's computation: the fp16-rounded token table, class names verbatim ("playing_guitar").
    reference_clip = tiny_clip(seed=0)
    reference_clip.load_state_dict(tuned.state_dict())
    with torch.no_grad():
        reference_clip.token_embedding.weight.copy_(tuned.token_embedding.weight.half().float())
    reference = ViFiCLIP(reference_clip, tokenizer, CLASSES, ViFiConfig(verbatim_classnames=True)).eval()
    # ViFi-CLIP's test: short side 256 / 224 of the crop (here 128), one centre crop, TSN centres.
    resized = PreprocessConfig.from_dict({**IMAGENET.to_dict(), "short_side": 128})
    answer = predicted(run, encoded_videos[:2], tmp_path)
    assert answer["clips"]["preprocess"]["short_side"] == 128
    for video, video_json in zip(encoded_videos[:2], answer["videos"]):
        with torch.no_grad():
            assert_scores(video_json, reference(clips_of(video, SamplingConfig(frames=FRAMES), resized))["logits"])

    # export -> open_clip.create_model(NAME, pretrained=FILE) gives the run's frame embeddings.
    exported = invoke("export", run, "--out", tmp_path / "vifi-tiny.safetensors")
    assert exported.exit_code == 0, (exported.output, exported.exception)
    open_clip.add_model_config(tmp_path / "vifi-tiny.json")
    plain = open_clip.create_model("vifi-tiny", pretrained=str(tmp_path / "vifi-tiny.safetensors")).eval()
    clips = clips_of(encoded_videos[0], SamplingConfig(frames=FRAMES), resized)
    with torch.no_grad():
        frames = plain.encode_image(clips.flatten(0, 1)).view(1, FRAMES, -1)
        torch.testing.assert_close(frames, reference(clips)["frame_embeds"], rtol=1e-5, atol=1e-5)

    # --pretrained accepts the exported file: zero-shot predict with it.
    answer = predicted(None, encoded_videos[:1], tmp_path, "--model", "vifi-tiny", "--pretrained",
                       tmp_path / "vifi-tiny.safetensors", "--classes", ",".join(CLASSES), "--frames", FRAMES,
                       "--template", "a photo of a {}.")
    assert len(answer["videos"][0]["probabilities"]) == len(CLASSES)


@pytest.mark.slow
def test_training_starts_from_an_imported_vifi_clip(vifi_files, encoded_videos, tmp_path):
    """Bridge and prompt on top of an imported ViFi-CLIP (ViFi-CLIP's bridge), then eval of that run."""
    folder, _ = vifi_files
    run = tmp_path / "vifi-run"
    result = invoke("import", folder / "vifi_k400.pth", "--method", "vifi", "--clip", folder / "ViT-tiny.pt",
                    "--classes", classes_file(tmp_path), "--model", MODEL, "--frames", 4, "--out", run)
    assert result.exit_code == 0, (result.output, result.exception)
    name = json.loads((run / "config.json").read_text())["head"]["model"]
    assert f"--pretrained {run} --model {name}" in " ".join(result.output.split())
    listing = tmp_path / "videos.csv"
    listing.write_text("path,label,label_name,split\n" + "".join(
        f"{video},{index},{CLASSES[index]},train\n" for index, video in enumerate(encoded_videos)))
    wrong = invoke("finetune", "prompt", "--videos", listing, "--out", tmp_path / "x", "--pretrained", run)
    assert isinstance(wrong.exception, ClipreelError) and f"pass --model {name}" in str(wrong.exception)
    prompted = tmp_path / "prompt-run"
    tuned = invoke("finetune", "prompt", "--videos", listing, "--out", prompted, "--pretrained", run, "--model", name,
                   "--epochs", 1, "--frames", 4, "--workers", 0, "--no-progress")
    assert tuned.exit_code == 0, (tuned.output, tuned.exception)
    scored = invoke("eval", prompted, "--videos", listing, "--split", "train", "--workers", 0)
    assert scored.exit_code == 0, (scored.output, scored.exception)
    assert json.loads((prompted / "eval-train.json").read_text())["n"] == 3


def test_export_refuses_methods_that_are_not_a_plain_clip(xclip_files, evl_files, tmp_path):
    folder, _ = xclip_files
    invoke("import", folder / "k400_tiny_4.pth", "--method", "xclip", "--classes", classes_file(tmp_path),
           "--model", MODEL, "--out", tmp_path / "xclip-run")
    result = invoke("export", tmp_path / "xclip-run", "--out", tmp_path / "x.safetensors")
    assert isinstance(result.exception, ClipreelError) and "message tokens" in str(result.exception)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.fixture(scope="module")
def bridge_files(tokenizer, vifi_files, tmp_path_factory):
    """Bridge-and-prompt over the ViFi-tuned CLIP, saved as ViFi-CLIP's prompted checkpoint."""
    from clipreel.heads.raw.bridge_prompt import BridgePrompt, BridgePromptConfig

    folder = tmp_path_factory.mktemp("bridge")
    _, tuned = vifi_files
    clip = tiny_clip(seed=0)
    clip.load_state_dict(tuned.state_dict())
    with torch.no_grad():
        clip.token_embedding.weight.copy_(clip.token_embedding.weight.half().float())
    torch.manual_seed(11)
    config = BridgePromptConfig(n_ctx_vision=2, n_ctx_text=3, depth_vision=3, depth_text=2, ctx_init=None, fp16_prompts=True)
    model = BridgePrompt(clip, tokenizer, CLASSES, config).eval()
    randomise(model.image_encoder, seed=12)
    randomise(model.prompt_learner, seed=13)
    prompts = {"image_encoder.VPT": model.image_encoder.ctx.detach().clone(),
               "prompt_learner.ctx": model.prompt_learner.ctx.detach().clone(),
               "prompt_learner.token_prefix": model.prompt_learner.token_prefix.clone(),
               "prompt_learner.token_suffix": model.prompt_learner.token_suffix.clone()}
    for i, deep in enumerate(model.image_encoder.deep_ctx):
        prompts[f"image_encoder.transformer.resblocks.{i + 1}.VPT_shallow"] = deep.detach().clone()
    for i, deep in enumerate(model.prompt_learner.deep_ctx):
        prompts[f"text_encoder.transformer.resblocks.{i + 1}.VPT_shallow"] = deep.detach().clone()
    torch.save(vifi_official(clip, prompts), folder / "vifi_prompted.pth")
    return folder, model


def test_bridge_and_prompt_import_predicts_the_source_scores(bridge_files, vifi_files, encoded_videos, tmp_path):
    folder, source = bridge_files
    base = vifi_files[0] / "ViT-tiny.pt"
    result = invoke("import", folder / "vifi_prompted.pth", "--method", "vifi", "--clip", base, "--classes",
                    classes_file(tmp_path), "--model", MODEL, "--out", tmp_path / "run")
    assert "holds learned prompts" in str(result.exception) and "pass --method prompt" in str(result.exception)
    run = tmp_path / "prompt-run"
    result = invoke("import", folder / "vifi_prompted.pth", "--method", "prompt", "--clip", base, "--classes",
                    classes_file(tmp_path), "--model", MODEL, "--frames", FRAMES, "--out", run)
    assert result.exit_code == 0, (result.output, result.exception)
    resized = PreprocessConfig.from_dict({**IMAGENET.to_dict(), "short_side": 128})
    answer = predicted(run, encoded_videos[:1], tmp_path)
    with torch.no_grad():
        assert_scores(answer["videos"][0], source(clips_of(encoded_videos[0], SamplingConfig(frames=FRAMES), resized))["logits"])


# ------------------------------------------------------------------------------------------- EZ-CLIP

EZ_FRAMES = 4
DESCRIPTIONS = ["\n\nA person strums the strings of a guitar.", "A rider sits on a galloping horse.", "Balls fly up and down."]


@pytest.fixture(scope="module")
def ezclip_files(tokenizer, tmp_path_factory):
    """EZ-CLIP over a tiny CLIP, every weight fp16-exact, saved as its training dict in fp16; its
    class-description CSV (GPT_discription/*.csv layout)."""
    from clipreel.heads.raw.ezclip import EZCLIPClassifier, EZCLIPConfig

    folder = tmp_path_factory.mktemp("ezclip")
    clip = tiny_clip(seed=16)
    config = EZCLIPConfig(frames=EZ_FRAMES, descriptions=dict(zip(CLASSES, [" ".join(text.split()) for text in DESCRIPTIONS])),
                          score_scale=100.0)
    torch.manual_seed(17)
    model = EZCLIPClassifier(clip, tokenizer, CLASSES, config).eval()
    randomise(model.ezclip, seed=18)
    round_to_fp16(clip, model)
    torch.save(ezclip_official(clip, model), folder / "ezclip_k400.pt")
    with open(folder / "descriptions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["SNo", "Class Name", "GPT3 discription"])
        writer.writerows([index + 1, name, text] for index, (name, text) in enumerate(zip(CLASSES, DESCRIPTIONS)))
    return folder, model


def test_ezclip_import_scores_100_cosine_against_the_descriptions(ezclip_files, encoded_videos, tmp_path):
    folder, source = ezclip_files
    run = tmp_path / "ezclip-run"
    result = invoke("import", folder / "ezclip_k400.pt", "--method", "ezclip", "--classes", folder / "descriptions.csv",
                    "--model", MODEL, "--out", run)
    assert result.exit_code == 0, (result.output, result.exception)
    config = json.loads((run / "config.json").read_text())
    assert config["classnames"] == CLASSES
    assert config["head"]["method_config"]["descriptions"]["riding a horse"] == "A rider sits on a galloping horse."
    resized = PreprocessConfig.from_dict({**CLIP_NORM.to_dict(), "short_side": 128})
    answer = predicted(run, encoded_videos[:1], tmp_path)
    clips = clips_of(encoded_videos[0], SamplingConfig(frames=EZ_FRAMES), resized)
    with torch.no_grad():
        out = source(clips)
        text = source.ezclip.encode_text(source.token_ids)
    cosine = F.normalize(out["video_embeds"], dim=-1) @ F.normalize(text, dim=-1).t()
    assert_scores(answer["videos"][0], 100.0 * cosine, tolerance=1e-4)
    assert math.isclose(max(answer["videos"][0]["scores"]), 100.0 * float(cosine.max()), rel_tol=1e-4)

    # zero-shot transfer of the imported run to a list's own classes (its names stand in for descriptions)
    listing = tmp_path / "videos.csv"
    listing.write_text("path,label,label_name,split\n" + "".join(
        f"{video},{index},{name},test\n" for index, (video, name) in enumerate(zip(encoded_videos, ["a", "b", "c"]))))
    scored = invoke("zeroshot", "--videos", listing, "--run", run, "--split", "test", "--frames", EZ_FRAMES,
                    "--workers", 0, "--report", tmp_path / "zs.json")
    assert scored.exit_code == 0, (scored.output, scored.exception)
    assert json.loads((tmp_path / "zs.json").read_text())["n"] == 3
