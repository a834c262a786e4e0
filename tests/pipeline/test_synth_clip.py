"""clipreel-synth: the shipped tiny CLIP knows the synthetic world's appearances; its training
script runs end to end, learns, and is reproducible.

The shipped weights are the real file in clipreel/weights; frames are really rendered with the
synthetic world's renderer and preprocessed as extraction does.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from clipreel.heads.cache.zeroshot import ZeroShotClassifier, ZeroShotConfig
from clipreel.heads.clip import builtin_weights, file_sha256, load_clip
from clipreel.heads.layers import FrozenCLIP
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
from clipreel.pipeline.data.synth.train_clip import (
    CAPTION_TEMPLATES,
    MODEL_NAME,
    SynthClipRecipe,
    train_synth_clip,
)
from clipreel.pipeline.data.synth.world import (
    MOTION_PAIRS,
    SynthConfig,
    render_clip,
    synth_class,
)

DEFAULT_WORLD = SynthConfig()  # 8 classes = 4 time-reversed pairs, 128 px frames
CLIPS_PER_CLASS = 3
FRAMES_PER_CLIP = 8
# Measured: 1.00 with the captions and with the label names + templates, on 4 sets of 24 fresh
# clips; chance at the pair level is 0.25.
MIN_PAIR_ACCURACY = 0.8


@pytest.fixture(scope="module")
def shipped_model():
    model, _ = load_clip(MODEL_NAME, "default")
    return model, open_clip.get_tokenizer(MODEL_NAME)


@pytest.fixture(scope="module")
def fresh_world_clips(shipped_model):
    """Per-frame embeddings (B, T, E) of new clips of the default world's classes, and their labels (B,)."""
    model, _ = shipped_model
    world = SynthConfig(classes=DEFAULT_WORLD.classes, frames=FRAMES_PER_CLIP, size=DEFAULT_WORLD.size)
    preprocess_cfg = PreprocessConfig.from_norm("clip", image_size=model.visual.image_size[0])
    videos, labels = [], []
    for class_id in range(world.classes):
        for clip in range(CLIPS_PER_CLASS):
            frames = render_clip(class_id, (424242, class_id, clip), world)  # (T, H, W, 3) uint8, unseen seeds
            with torch.no_grad():
                videos.append(model.encode_image(preprocess(frames, preprocess_cfg)[0]))  # (T, E)
            labels.append(class_id)
    return torch.stack(videos), torch.tensor(labels)


def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: str) -> ZeroShotClassifier:
    """The zero-shot cache head of `clipreel zeroshot`, on the shipped CLIP."""
    config = ZeroShotConfig(embed_dim=model.visual.output_dim, num_classes=len(classnames), templates=templates,
                            logit_scale=float(model.logit_scale))
    return ZeroShotClassifier(config, FrozenCLIP(model, tokenizer), classnames)


def pair_accuracy(classifier: ZeroShotClassifier, embeds: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 counted at the pair level: either class of the true time-reversed pair is right."""
    predicted = classifier({"embeds": embeds}).argmax(dim=1)
    return float((predicted // 2 == labels // 2).float().mean())


def test_zero_shot_recognises_appearance_from_captions(shipped_model, fresh_world_clips):
    model, tokenizer = shipped_model
    captions = [synth_class(class_id).caption for class_id in range(DEFAULT_WORLD.classes)]  # "a red circle"
    classifier = zero_shot_classifier(model, tokenizer, captions, templates="none")
    assert pair_accuracy(classifier, *fresh_world_clips) > MIN_PAIR_ACCURACY


def test_zero_shot_with_label_names_and_template_ensemble(shipped_model, fresh_world_clips):
    """What `clipreel zeroshot` does: label names ("red circle moving left") in the CLIP templates.

    The direction words were never trained, so they must not drown the appearance."""
    model, tokenizer = shipped_model
    names = [synth_class(class_id).name for class_id in range(DEFAULT_WORLD.classes)]
    classifier = zero_shot_classifier(model, tokenizer, names, templates="ensemble")
    assert pair_accuracy(classifier, *fresh_world_clips) > MIN_PAIR_ACCURACY


def test_shipped_sidecar_matches_the_shipped_file():
    weights = builtin_weights(MODEL_NAME)
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    assert sidecar["sha256"] == file_sha256(weights)
    assert sidecar["model"] == MODEL_NAME
    assert sidecar["metrics"]["default_world_pair_accuracy"] > MIN_PAIR_ACCURACY


def test_captions_never_name_a_direction():
    """The model must not learn motion: no template carries a motion word of the world."""
    motion_words = {word for pair in MOTION_PAIRS for motion in pair for word in motion.split() if word != "moving"}
    for template in CAPTION_TEMPLATES:
        assert not motion_words & set(template.replace(".", " ").split()), template


# The default world's 4 appearances, 4 frames of each per step: from random init the loss leaves
# its plateau (ln 4 + ln 4 / 2 with the 4-frame soft target) after ~25 steps.
TINY_RECIPE = SynthClipRecipe(
    appearances=4, clips_per_class=1, eval_clips_per_class=1, frames_per_step=4, learning_rate=3e-3,
    warmup_steps=3, eval_every=1000,
)
TINY_STEPS = 40


def test_training_learns_and_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "synth.safetensors"
    metrics = train_synth_clip(out, seed=3, steps=TINY_STEPS, recipe=TINY_RECIPE)

    losses = metrics["losses"]
    assert len(losses) == TINY_STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)

    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["sha256"] == file_sha256(out)
    assert sidecar["seed"] == 3 and sidecar["steps"] == TINY_STEPS
    assert sidecar["recipe"]["appearances"] == TINY_RECIPE.appearances
    assert sidecar["metrics"]["appearance_accuracy"] == metrics["appearance_accuracy"]

    model, sha256 = load_clip(MODEL_NAME, str(out))  # the backbone's own loader takes the file
    assert sha256 == sidecar["sha256"]
    assert all(value.dtype == torch.float32 for value in model.state_dict().values())


def test_training_is_deterministic(tmp_path):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    torch.manual_seed(1)  # the caller's RNG state must not matter
    train_synth_clip(first, seed=5, steps=8, recipe=TINY_RECIPE)
    torch.manual_seed(2)
    train_synth_clip(second, seed=5, steps=8, recipe=TINY_RECIPE)
    assert first.read_bytes() == second.read_bytes()
    other_seed = tmp_path / "other.safetensors"
    train_synth_clip(other_seed, seed=6, steps=8, recipe=TINY_RECIPE)
    assert other_seed.read_bytes() != first.read_bytes()
