"""Raw-frame fine-tuning learns on the synthetic world (slow: a minute or two per run on 2 CPUs).

Each method is trained on real H.264 videos with the tiny CLIP and scored on held-out test videos
against its own zero-shot start (`zero_shot_raw`: the untrained method model on the same split).

- Frame order. The colour world ("red circle turning blue" / "blue circle turning red", its twin
  played backwards): every frame shows how far the change has gone and the twins' names differ in
  colour words, so a temporal model has something to read. X-CLIP (MIT over the frame embeddings,
  new modules at 100x the CLIP rate: the tiny model's few steps need 1e-2 there) and EZ-CLIP (with
  its per-frame temporal embedding trained, `train_temporal_embedding`) separate the twins; ViFi-CLIP
  and bridge-and-prompt pool frames by their mean, so a clip and its reversal score the same and
  they cannot. Colour augmentation is off (the classes are colours) and so is the flip.
- Appearance. ViFi-CLIP fine-tuned from a random CLIP ("none", zero-shot 0.2) learns the classes'
  appearance, up to the frame-mean ceiling of 0.5 on the 4-class motion world; bridge-and-prompt on a
  32-class world (where clipreel-synth names appearances poorly) beats its random-context start.

Measured on the 2-core VM (seed 0; seed 1 in brackets), test top-1 from zero-shot to trained: X-CLIP
0.60 -> 1.00 [0.65 -> 1.00]; EZ-CLIP 0.45 -> 1.00 [0.55 -> 0.95]; ViFi-CLIP from random 0.2 -> 0.5
[0.2 -> 0.35]; bridge-and-prompt 0.19 -> 0.30 [0.19 -> 0.30]. X-CLIP and ViFi-CLIP read 4 frames per
clip, the others 8: with 4, EZ-CLIP reached 0.70 [0.70] (6 frames: 1.00 [0.90]) and bridge-and-prompt
0.16 -> 0.23 [0.23 -> 0.20], while X-CLIP and ViFi-CLIP gave what they give with 8, in half the time.
What EZ-CLIP does with its temporal embedding frozen, as shipped: its only order path, the per-frame
prompts mixed by the frozen attention, moved a clip's video embedding 0.1% from its reversal's, and
no run separated twins (heads/raw/ezclip.py). X-CLIP on the motion world: its text tower is frozen and
clipreel-synth gives the twins' names nearly the same embedding (cosine 0.995-0.9999), so it cannot
tell them apart there whatever it learns from the frames.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipreel.pipeline.data.augment import AugmentConfig
from clipreel.pipeline.data.frame_loaders import raw_frame_loader
from clipreel.pipeline.data.raw_frames import RawFrameDataset
from clipreel.pipeline.data.sampling import SamplingConfig
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.pipeline.evaluate import eval_rows, evaluate_raw_run, zero_shot_raw
from clipreel.pipeline.finetune import FinetuneConfig, run_finetune
from clipreel.pipeline.scoring import predict_raw

pytestmark = pytest.mark.slow

MODEL = "clipreel-synth"
KEEP_COLOUR_AND_SIDES = {"flip": 0.0, "color_jitter": 0.0, "grayscale": 0.0}


@pytest.fixture(scope="module")
def colour_world(tmp_path_factory):
    """videos.csv of 2 colour-change pairs x 25 videos (16 frames, 64 px): 60 train, 20 val, 20 test."""
    world = SynthConfig(classes=4, videos_per_class=25, frames=16, size=64, motions=("colour",))
    return str(make_world(tmp_path_factory.mktemp("colour"), world))


@pytest.fixture(scope="module")
def motion_world(tmp_path_factory):
    """The default world's first 2 pairs (moving left/right, up/down) x 25 videos."""
    return str(make_world(tmp_path_factory.mktemp("motion"), SynthConfig(classes=4, videos_per_class=25, frames=16,
                                                                          size=64)))


def _train(world, out, method, frames, **settings):
    config = {"method": method, "videos": world, "out": str(out), "model": MODEL, "frames": frames, "workers": 0,
              "batch_size": 8, "val_split": None, **settings}
    return run_finetune(FinetuneConfig(**config), progress=False)


def _pair_accuracy(model, world: str, norm: str, frames: int) -> float:
    """On the test split: how often the true class outscores its time-reversed twin (chance 0.5)."""
    rows = eval_rows(read_sources(world), world, "test", model.classnames)
    dataset = RawFrameDataset(rows, SamplingConfig(frames=frames), AugmentConfig(image_size=112, norm=norm),
                              train=False)
    probabilities, labels, _ = predict_raw(model, raw_frame_loader(dataset, 8, 0, shuffle=False), torch.device("cpu"))
    twins = labels ^ 1  # classes 2k and 2k+1 are each other's reversal
    rows = np.arange(len(labels))
    return float((probabilities[rows, labels] > probabilities[rows, twins]).mean())


@pytest.mark.parametrize("method, frames, settings, norm", [
    ("xclip", 4, {"lr": 1e-4, "options": {"new_module_lr_scale": 100}}, "imagenet"),
    ("ezclip", 8, {"lr": 3e-3, "options": {"train_temporal_embedding": True}}, "clip"),
])
def test_temporal_methods_separate_time_reversed_twins(colour_world, tmp_path, method, frames, settings, norm):
    start = zero_shot_raw(method, colour_world, "test", MODEL, frames=frames, options=settings["options"], workers=0)
    trained = _train(colour_world, tmp_path / "run", method, frames, epochs=25, augment=KEEP_COLOUR_AND_SIDES,
                     **settings)
    scores = evaluate_raw_run(tmp_path / "run", colour_world, "test", workers=0)
    # Measured: zero-shot 0.45-0.65, trained 0.95-1.0 (seeds 0, 1). Appearance alone tops out at 0.5 here.
    assert scores["top1"] >= 0.8 and scores["top1"] >= start["top1"] + 0.3
    assert _pair_accuracy(trained.model, colour_world, norm, frames) >= 0.8


def test_frame_mean_methods_score_a_clip_and_its_reversal_alike(motion_world, tmp_path):
    """ViFi-CLIP from a random CLIP learns appearance (beats its zero-shot start), but its frame-mean
    pooling cannot see order: a clip and the same clip backwards get the same scores."""
    frames = 4
    start = zero_shot_raw("vifi", motion_world, "test", MODEL, "none", frames=frames, workers=0)
    trained = _train(motion_world, tmp_path / "run", "vifi", frames, pretrained="none", epochs=15, lr=1e-4,
                     val_split="val")
    scores = evaluate_raw_run(tmp_path / "run", motion_world, "test", workers=0)
    # Measured: 0.2 -> 0.5 (seed 0) and 0.2 -> 0.35 (seed 1); 0.5 is the ceiling of frame-mean pooling.
    assert scores["top1"] >= start["top1"] + 0.1

    clips = torch.randn(3, frames, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        forward, backward = trained.model(clips)["logits"], trained.model(clips.flip(1))["logits"]
    torch.testing.assert_close(forward, backward, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def appearance_world(tmp_path_factory):
    """32 classes x 8 videos: 128 train, 64 test. clipreel-synth's zero-shot names few of them right."""
    return str(make_world(tmp_path_factory.mktemp("appearance"), SynthConfig(classes=32, videos_per_class=8,
                                                                              frames=16, size=64)))


def test_bridge_and_prompt_beats_its_zero_shot_start(appearance_world, tmp_path):
    start = zero_shot_raw("prompt", appearance_world, "test", MODEL, frames=8, workers=0)
    _train(appearance_world, tmp_path / "run", "prompt", 8, epochs=10, augment={"color_jitter": 0.0, "grayscale": 0.0})
    scores = evaluate_raw_run(tmp_path / "run", appearance_world, "test", workers=0)
    # Measured: 0.19 (random context vectors) -> 0.30 after 10 epochs at the few-shot rate 8e-3 (seeds 0
    # and 1). With colour jitter and grayscale on, the colours clipreel-synth knows the classes by are
    # washed out: 0.31 with seed 0 but 0.14 with seed 1.
    assert scores["top1"] >= start["top1"] + 0.06
