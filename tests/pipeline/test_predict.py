"""`clipreel predict` end to end on real encoded videos: zero-shot CLIP, a cache-head run (decode ->
backbone taps -> head, no store), a raw-frame method run; a corrupt and a missing file among good
ones; --start/--end. Imported runs are predicted in test_import.py.
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from clipreel.cli import app
from clipreel.errors import ClipreelError
from clipreel.heads.clip import load_clip, register_builtin_models
from clipreel.heads.taps import Backbone, BackboneConfig
from clipreel.pipeline.data.decode import PyAVDecoder, probe
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
from clipreel.pipeline.data.sampling import SamplingConfig, sample_indices
from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.pipeline.models import trained_head, trained_method_model
from clipreel.stores.runs import load_run

runner = CliRunner()
MODEL = "clipreel-synth"
CLASSES = ["red circle", "green square", "blue triangle"]


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def clip_pixels(video, sampling: SamplingConfig, cfg: PreprocessConfig, first: int = 0, count: int | None = None):
    """(V * C, T, 3, S, S) clips of a video, sampled among frames first..first+count."""
    info = probe(video)
    indices = sample_indices(count or info.num_frames - first, sampling, str(video)) + first
    crops = preprocess(PyAVDecoder().read(video, indices.reshape(-1), info), cfg)
    return crops.unflatten(1, (sampling.views, sampling.frames)).transpose(0, 1).flatten(0, 1)


def assert_scores(video_json: dict, logits: torch.Tensor, tolerance: float = 1e-5) -> None:
    np.testing.assert_allclose(video_json["scores"], logits.mean(0).tolist(), rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(video_json["probabilities"], torch.softmax(logits, -1).mean(0).tolist(),
                               rtol=tolerance, atol=tolerance)


def zero_shot_logits(clips: torch.Tensor, classes, template: str) -> torch.Tensor:
    """CLIP's zero-shot score by hand: exp(logit_scale) * cos(frame-mean image embedding, class text)."""
    register_builtin_models()
    clip, _ = load_clip(MODEL, "default")
    tokenizer = open_clip.get_tokenizer(MODEL)
    with torch.no_grad():
        frames = clip.encode_image(clips.flatten(0, 1)).unflatten(0, clips.shape[:2])  # (N, T, E)
        text = F.normalize(clip.encode_text(tokenizer([template.format(name) for name in classes])), dim=-1)
        video = F.normalize(frames.mean(dim=1), dim=-1)
        return clip.logit_scale.exp() * video @ text.t()


def test_zero_shot_clip_with_a_corrupt_and_a_missing_file_among_good_ones(encoded_videos, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    out = tmp_path / "answer.json"
    result = invoke("predict", encoded_videos[0], bad, tmp_path / "missing.mp4", encoded_videos[1], "--model", MODEL,
                    "--classes", ",".join(CLASSES), "--template", "a video of {}.", "--top", 2, "--json", out)
    assert result.exit_code == 1, (result.output, result.exception)
    answer = json.loads(out.read_text())
    assert [video["error"] is None for video in answer["videos"]] == [True, False, False, True]
    assert "bad.mp4" in answer["videos"][1]["error"] and "missing.mp4: no such file" in answer["videos"][2]["error"]
    assert "bad.mp4" in result.output and "2 video(s) failed" in result.output
    norm = PreprocessConfig(image_size=112)  # clipreel-synth: 112 pixels, CLIP statistics
    for index in (0, 3):
        video = answer["videos"][index]
        clips = clip_pixels(video["path"], SamplingConfig(frames=8), norm)
        assert_scores(video, zero_shot_logits(clips, CLASSES, "a video of {}."))
        top = max(range(len(CLASSES)), key=lambda k: video["probabilities"][k])
        assert CLASSES[top] in result.output


def test_start_and_end_sample_inside_the_segment(encoded_videos, tmp_path):
    out = tmp_path / "segment.json"
    result = invoke("predict", encoded_videos[2], "--model", MODEL, "--classes", ",".join(CLASSES), "--template",
                    "a video of {}.", "--start", 0.8, "--end", 1.6, "--frames", 4, "--json", out)
    assert result.exit_code == 0, (result.output, result.exception)
    video = json.loads(out.read_text())["videos"][0]
    assert (video["start"], video["end"]) == (0.8, 1.6)
    # 25 fps: frames 20..39; TSN centres of 4 segments of 5 frames.
    clips = clip_pixels(encoded_videos[2], SamplingConfig(frames=4), PreprocessConfig(image_size=112), first=20, count=20)
    assert_scores(video, zero_shot_logits(clips, CLASSES, "a video of {}."))
    whole = clip_pixels(encoded_videos[2], SamplingConfig(frames=4), PreprocessConfig(image_size=112))
    assert not np.allclose(video["scores"], zero_shot_logits(whole, CLASSES, "a video of {}.").mean(0).tolist())

    late = invoke("predict", encoded_videos[2], "--model", MODEL, "--classes", "a,b", "--start", 30)
    assert late.exit_code == 1 and "after the video's end (1.92 s)" in late.output
    backwards = invoke("predict", encoded_videos[2], "--model", MODEL, "--classes", "a,b", "--start", 2, "--end", 1)
    assert isinstance(backwards.exception, ClipreelError) and "--end > --start" in str(backwards.exception)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic world: 4 classes x 4 videos (2 train, 1 val, 1 test each, per the world's split)."""
    return make_world(tmp_path_factory.mktemp("world"), SynthConfig(classes=4, videos_per_class=4, frames=16, size=64, seed=3))


@pytest.mark.slow
def test_a_cache_head_run_predicts_from_frames_without_a_store(ray_local, world, encoded_videos, tmp_path):
    store, run = tmp_path / "features.zarr", tmp_path / "linear"
    extracted = invoke("extract", "--videos", world, "--out", store, "--model", MODEL, "--frames", 4, "--layers", 1,
                       "--no-progress")
    assert extracted.exit_code == 0, extracted.output
    trained = invoke("train", "linear", "--store", store, "--out", run, "--epochs", 2, "--no-progress")
    assert trained.exit_code == 0, (trained.output, trained.exception)

    out = tmp_path / "answer.json"
    result = invoke("predict", *encoded_videos[:2], "--run", run, "--json", out)
    assert result.exit_code == 0, (result.output, result.exception)
    answer = json.loads(out.read_text())
    loaded = load_run(run)
    assert answer["classnames"] == loaded.classnames
    backbone = Backbone(BackboneConfig(model=MODEL, pretrained="default", layers="1"))
    head = trained_head(loaded)
    for video, video_json in zip(encoded_videos[:2], answer["videos"]):
        features = backbone.forward_clips(clip_pixels(video, SamplingConfig(frames=4), PreprocessConfig(image_size=112)))
        with torch.no_grad():
            assert_scores(video_json, head({"embeds": features.embeds}))

    refused = invoke("predict", encoded_videos[0], "--run", run, "--classes", "cat,dog")
    assert isinstance(refused.exception, ClipreelError) and "closed-set linear run" in str(refused.exception)


@pytest.mark.slow
def test_a_raw_frame_run_predicts_with_its_model_and_any_classes(world, encoded_videos, tmp_path):
    run = tmp_path / "vifi"
    tuned = invoke("finetune", "vifi", "--videos", world, "--out", run, "--model", MODEL, "--epochs", 1, "--frames", 4,
                   "--lr", 1e-5, "--workers", 0, "--no-progress")
    assert tuned.exit_code == 0, (tuned.output, tuned.exception)
    out = tmp_path / "answer.json"
    result = invoke("predict", encoded_videos[0], "--run", run, "--classes", ",".join(CLASSES), "--json", out)
    assert result.exit_code == 0, (result.output, result.exception)
    model = trained_method_model(run)
    model.set_classnames(CLASSES)
    clips = clip_pixels(encoded_videos[0], SamplingConfig(frames=4), PreprocessConfig.from_norm("imagenet", 112))
    with torch.no_grad():
        assert_scores(json.loads(out.read_text())["videos"][0], model(clips)["logits"])

    # A ViFi-CLIP run trained here exports to open_clip as well.
    exported = invoke("export", run, "--out", tmp_path / "vifi-synth.safetensors")
    assert exported.exit_code == 0, (exported.output, exported.exception)
    open_clip.add_model_config(tmp_path / "vifi-synth.json")
    plain = open_clip.create_model("vifi-synth", pretrained=str(tmp_path / "vifi-synth.safetensors")).eval()
    with torch.no_grad():
        frames = plain.encode_image(clips.flatten(0, 1)).unflatten(0, clips.shape[:2])
        torch.testing.assert_close(frames, model(clips)["frame_embeds"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_start_end_columns_of_a_list_sample_inside_segments_in_predict_and_extract(ray_local, encoded_videos, tmp_path):
    """The same file twice, as two segments: two videos of their own; predict and extract sample inside each."""
    from clipreel.stores.features import FeatureStore

    listing = tmp_path / "segments.csv"
    listing.write_text("path,label_name,start,end,split\n"
                       f"{encoded_videos[2]},a,0.8,1.6,test\n{encoded_videos[2]},b,0,0.4,test\n{encoded_videos[0]},a,,,test\n")
    out = tmp_path / "answer.json"
    result = invoke("predict", "--videos", listing, "--model", MODEL, "--classes", ",".join(CLASSES), "--template",
                    "a video of {}.", "--frames", 4, "--json", out)
    assert result.exit_code == 0, (result.output, result.exception)
    videos = json.loads(out.read_text())["videos"]
    assert [(video["start"], video["end"]) for video in videos] == [(0.8, 1.6), (0.0, 0.4), (None, None)]
    norm = PreprocessConfig(image_size=112)
    segment = clip_pixels(encoded_videos[2], SamplingConfig(frames=4), norm, first=20, count=20)
    assert_scores(videos[0], zero_shot_logits(segment, CLASSES, "a video of {}."))

    store = tmp_path / "segments.zarr"
    extracted = invoke("extract", "--videos", listing, "--out", store, "--model", MODEL, "--frames", 4, "--layers", 1,
                       "--no-progress")
    assert extracted.exit_code == 0, extracted.output
    features = FeatureStore.open(store)
    manifest = features.manifest()
    assert [video_id.rsplit("/", 1)[-1] for video_id in manifest["video_id"][:2]] == ["clip2_0.8-1.6", "clip2_0-0.4"]
    indices = features.read([0, 1, 2], fields=("frame_indices",))["frame_indices"]  # (3, V, T)
    # 25 fps: frames 20..39 and 0..9, TSN segment centres; the third video is whole (48 frames).
    assert indices[0, 0].tolist() == [22, 27, 32, 37]
    assert indices[1, 0].tolist() == [1, 3, 6, 8]
    assert indices[2, 0].tolist() == [6, 18, 30, 42]
