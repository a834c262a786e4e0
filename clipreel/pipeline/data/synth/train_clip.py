"""clipreel-synth: a tiny CLIP trained from scratch on the synthetic world's appearances.

There are no pretrained CLIP weights on an offline CPU machine, and a randomly initialised CLIP
knows nothing, so zero-shot recognition and the text-side methods (prompt learning) would have
nothing real to work with. This module trains the `clipreel-synth` model (the clipreel-tiny
architecture: 112 px, patch 16, width 64, 6 image blocks, 2 text blocks) on single rendered
frames of the synthetic world, paired with captions that name the APPEARANCE only ("a red
circle", "a photo of a red circle." ...). It never sees a direction word, so it knows colour and
shape but nothing of motion: zero-shot tells the time-reversed pairs apart, while the two classes
of a pair (same appearance, opposite motion) are left for a temporal head to learn.

Data: every class of the first `appearances` pairs (both motions of the pair, so the appearance is
seen all along its trajectory), frames drawn with `render_clip` at the world's default 128 px and
put through the extraction preprocessing (`preprocess`, CLIP mean/std, 112 px). No video codec.
Each training step takes k frames (default 1) of every appearance and one caption per appearance
(a random template): the symmetric CLIP contrastive loss where a caption's positives are its k
frames (a soft target) and everything else shows another appearance, so no negative is false.
Frames are flipped at random (a flipped arrow is still an arrow).

Reproducible: the seed fixes the initial weights, the rendered frames and the sampling order, and
training runs on ONE torch thread (another thread count can change float sums, hence the weights).
The same seed and recipe give byte-identical weights.

    python -m clipreel.pipeline.data.synth.train_clip --out clipreel/weights/clipreel-synth.safetensors

writes the fp16 safetensors checkpoint and, next to it, a JSON sidecar (same stem) with the recipe,
the file's sha256 and the metrics measured on the saved (fp16) weights.

Measured for the shipped file (seed 0, 1200 steps, ~5.5 min on one shared core): on held-out frames
the colour is right 99% of the time but the shape only ~35% (8 shapes; the 64 appearances: 34%,
chance 1.6%) -- a patch-16 ViT this small learns a 2-patch-wide shape slowly from scratch. Colour
alone tells apart the pairs of any world up to 16 classes (each of its pairs has its own colour):
the default 8-class world scores 94-100% at the pair level.

May import: torch, open_clip, safetensors, clipreel.heads (clip, cache.zeroshot), clipreel.pipeline.data.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from clipreel.heads.cache.zeroshot import class_text_embeddings, templates_named
from clipreel.heads.clip import file_sha256, register_builtin_models
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
from clipreel.pipeline.data.synth.world import (
    MAX_CLASSES,
    SynthConfig,
    render_clip,
    synth_class,
)

MODEL_NAME = "clipreel-synth"
DEFAULT_STEPS = 1200
# Ways to say what a frame shows; "{}" is the appearance, e.g. "red circle". The first gives the
# world's own caption ("a red circle"). None names a direction: motion must stay unknown here.
CAPTION_TEMPLATES = (
    "a {}",
    "{}",
    "a photo of a {}.",
    "a picture of a {}.",
    "a video of a {}.",
    "a clip of a {}.",
    "footage of a {}.",
    "a {} moving.",
    "a {} on a plain background.",
    "a {} shape.",
)
DEFAULT_WORLD_CLASSES = SynthConfig().classes  # what `clipreel synth` and the demo make by default
EVAL_VIDEO_FRAMES = 8  # frames per held-out video of the default-world check
TRAIN_SEED_STREAM, HELD_OUT_SEED_STREAM = 0, 1  # clip seeds are (seed, stream, class_id, clip)


@dataclass(frozen=True)
class SynthClipRecipe:
    """Everything besides the seed and the step count that decides the trained weights."""

    appearances: int = MAX_CLASSES // 2  # pairs 0..n-1 (pair k has appearance k); 4 = the default world's
    clips_per_class: int = 12  # training clips rendered per class (~460 MB of fp16 frames in all)
    frames_per_clip: int = 4  # spread over the clip's trajectory
    render_size: int = SynthConfig().size  # rendered frame size; preprocessing resizes to the model's
    eval_clips_per_class: int = 2  # held-out clips (fresh seeds) per class for the metrics
    learning_rate: float = 2e-3
    weight_decay: float = 0.05  # on matrices only (not on gains, biases, class token, logit scale)
    frames_per_step: int = 1  # k frames of every appearance in each step, all against its one caption
    warmup_steps: int = 100  # linear warm-up, then cosine decay to zero
    flips: bool = True  # random horizontal / vertical flips of training frames (a shape keeps its name)
    eval_every: int = 200  # steps between held-out accuracy checks in the log
    threads: int = 1  # torch threads while training; part of the recipe since it can change the sums

    def __post_init__(self) -> None:
        if not 2 <= self.appearances <= MAX_CLASSES // 2:
            raise ValueError(f"appearances = {self.appearances}: choose 2..{MAX_CLASSES // 2}")
        if min(self.clips_per_class, self.eval_clips_per_class, self.frames_per_step) < 1:
            raise ValueError("clips_per_class, eval_clips_per_class and frames_per_step must be at least 1")
        if self.frames_per_clip < 4:
            raise ValueError(f"frames_per_clip = {self.frames_per_clip}: the renderer needs at least 4")


def appearance_phrase(pair: int) -> str:
    """What pair `pair` looks like, without an article: "red circle"."""
    spec = synth_class(2 * pair)
    return f"{spec.colour} {spec.shape}"


def render_appearance_frames(
    appearances: int, clips_per_class: int, frames_per_clip: int, size: int, seed: tuple[int, ...],
    preprocess_cfg: PreprocessConfig,
) -> torch.Tensor:
    """Preprocessed frames of both classes of pairs 0..appearances-1 -> (A, M, 3, S, S) float16.

    M = 2 classes x clips_per_class x frames_per_clip; clip i of class c is drawn from the seed
    (*seed, c, i). fp16 halves the memory of the frame pool (~460 MB for the default recipe).
    """
    world = SynthConfig(classes=MAX_CLASSES, frames=frames_per_clip, size=size)
    per_appearance = []
    for pair in range(appearances):
        clips = [
            render_clip(class_id, (*seed, class_id, clip), world)  # (T, H, W, 3) uint8
            for class_id in (2 * pair, 2 * pair + 1)
            for clip in range(clips_per_class)
        ]
        frames = torch.cat([preprocess(clip, preprocess_cfg)[0] for clip in clips])  # (M, 3, S, S)
        per_appearance.append(frames.half())
    return torch.stack(per_appearance)  # (A, M, 3, S, S)


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP loss for A captions (A, E) and k frames of each (A * k, E), frames grouped by caption.

    Each frame has one positive caption; each caption has k positive frames (a uniform soft target
    over them). Every other pair shows another appearance, so no negative is a false one.
    """
    appearances = text_embeds.shape[0]
    frames_each = image_embeds.shape[0] // appearances
    image = F.normalize(image_embeds, dim=-1)
    text = F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp() * image @ text.t()  # (A * k, A): frame i against caption j
    caption_of_frame = torch.arange(appearances).repeat_interleave(frames_each)  # (A * k,)
    frames_of_caption = F.one_hot(caption_of_frame, appearances).t().float() / frames_each  # (A, A * k)
    return (F.cross_entropy(logits, caption_of_frame) + F.cross_entropy(logits.t(), frames_of_caption)) / 2


def random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each (N, 3, S, S) image left-right and/or upside-down, each with probability 1/2."""
    flip_x, flip_y = torch.rand(2, images.shape[0], 1, 1, 1, generator=generator) < 0.5
    images = torch.where(flip_x, images.flip(-1), images)
    return torch.where(flip_y, images.flip(-2), images)


@torch.no_grad()
def encode_frames(model: torch.nn.Module, frames: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, S, S) preprocessed frames (any float dtype) -> (N, E) image embeddings, float32."""
    return torch.cat([model.encode_image(chunk.float()) for chunk in frames.split(batch_size)])


@torch.no_grad()
def appearance_accuracy(model: torch.nn.Module, tokenizer, frames: torch.Tensor) -> float:
    """Zero-shot top-1 per frame among the appearances' captions ("a red circle").

    frames: (A, M, 3, S, S), frames[a] all of appearance a.
    """
    appearances, per_appearance = frames.shape[:2]
    captions = [f"a {appearance_phrase(pair)}" for pair in range(appearances)]
    text = class_text_embeddings(model, tokenizer, captions, ["{}"])  # (A, E), normalised
    image = F.normalize(encode_frames(model, frames.flatten(0, 1)), dim=-1)  # (A * M, E)
    predicted = (image @ text.t()).argmax(dim=1)
    truth = torch.arange(appearances).repeat_interleave(per_appearance)
    return float((predicted == truth).float().mean())


@torch.no_grad()
def default_world_pair_accuracy(
    model: torch.nn.Module, tokenizer, classnames: list[str], templates: str, clips_per_class: int,
    seed: tuple[int, ...], preprocess_cfg: PreprocessConfig,
) -> float:
    """Video-level zero-shot on fresh clips of the default 8-class world, scored at the pair level.

    `classnames[c]` names class c (a caption, or a label name such as "red circle moving left");
    a prediction counts when it picks either class of the true pair, since appearance cannot tell
    the two apart. Chance is 1 / 4.
    """
    world = SynthConfig(classes=DEFAULT_WORLD_CLASSES, frames=EVAL_VIDEO_FRAMES)
    class_embeds = class_text_embeddings(model, tokenizer, classnames, templates_named(templates))  # (K, E)
    videos, labels = [], []
    for class_id in range(DEFAULT_WORLD_CLASSES):
        for clip in range(clips_per_class):
            frames = preprocess(render_clip(class_id, (*seed, class_id, clip), world), preprocess_cfg)[0]
            videos.append(encode_frames(model, frames))  # (T, E)
            labels.append(class_id)
    video_embeds = F.normalize(torch.stack(videos).mean(dim=1), dim=-1)  # (B, E): the frame mean
    predicted = (video_embeds @ class_embeds.t()).argmax(dim=1)  # the zero-shot classifier's argmax
    return float((predicted // 2 == torch.tensor(labels) // 2).float().mean())


def _optimizer(model: torch.nn.Module, recipe: SynthClipRecipe, steps: int):
    """AdamW with weight decay on matrices only, linear warm-up then cosine decay (per step)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": recipe.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
        betas=(0.9, 0.98),  # CLIP's
        eps=1e-6,
    )

    def lr_factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, steps - recipe.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def train_synth_clip(
    out: Path, seed: int = 0, steps: int = DEFAULT_STEPS, recipe: SynthClipRecipe | None = None
) -> dict:
    """Train clipreel-synth from random init, save it to `out` (fp16 safetensors) plus `out`.json.

    Returns the metrics, measured on the saved fp16 weights with held-out frames (fresh seeds):
    appearance_accuracy (frame-level, among all trained appearances' captions), the default
    world's pair accuracy with its captions and with its label names through the "ensemble"
    templates, the per-step training losses, the held-out accuracy curve, and the seconds spent
    rendering and training.
    """
    recipe = recipe or SynthClipRecipe()
    out = Path(out)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
            metrics = _train(out, seed, steps, recipe)
    finally:
        torch.set_num_threads(previous_threads)
    return metrics


def _train(out: Path, seed: int, steps: int, recipe: SynthClipRecipe) -> dict:
    """The body of `train_synth_clip`, inside its thread count and RNG fork."""
    register_builtin_models()
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    preprocess_cfg = PreprocessConfig.from_norm("clip", image_size=model.visual.image_size[0])

    started = time.perf_counter()
    render = (recipe.appearances, recipe.clips_per_class, recipe.frames_per_clip, recipe.render_size)
    train_frames = render_appearance_frames(*render, (seed, TRAIN_SEED_STREAM), preprocess_cfg)  # (A, M, 3, S, S)
    held_out = (recipe.appearances, recipe.eval_clips_per_class, recipe.frames_per_clip, recipe.render_size)
    held_out_frames = render_appearance_frames(*held_out, (seed, HELD_OUT_SEED_STREAM), preprocess_cfg)
    render_seconds = time.perf_counter() - started
    training_started = time.perf_counter()

    appearances, frames_per_appearance = train_frames.shape[:2]
    phrases = [appearance_phrase(pair) for pair in range(appearances)]
    caption_tokens = torch.stack(
        [tokenizer([template.format(phrase) for template in CAPTION_TEMPLATES]) for phrase in phrases]
    )  # (A, templates, C)
    sampler = torch.Generator().manual_seed(seed)
    optimizer, schedule = _optimizer(model, recipe, steps)
    every_appearance = torch.arange(appearances)

    model.train()
    losses, eval_curve = [], []
    for step in range(steps):
        frame_choice = torch.randint(
            frames_per_appearance, (appearances, recipe.frames_per_step), generator=sampler
        )  # (A, k)
        template_choice = torch.randint(len(CAPTION_TEMPLATES), (appearances,), generator=sampler)
        images = train_frames[every_appearance[:, None], frame_choice].flatten(0, 1).float()  # (A * k, 3, S, S)
        if recipe.flips:
            images = random_flips(images, sampler)
        texts = caption_tokens[every_appearance, template_choice]  # (A, C)
        loss = contrastive_loss(model.encode_image(images), model.encode_text(texts), model.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as CLIP: temperature at least 0.01
        losses.append(loss.item())
        if (step + 1) % recipe.eval_every == 0 or step + 1 == steps:
            model.eval()
            accuracy = appearance_accuracy(model, tokenizer, held_out_frames)
            model.train()
            eval_curve.append([step + 1, round(accuracy, 4)])
            recent = sum(losses[-recipe.eval_every :]) / len(losses[-recipe.eval_every :])
            print(
                f"step {step + 1}/{steps}  loss {recent:.4f}  held-out appearance acc {accuracy:.3f}  "
                f"logit scale {model.logit_scale.exp().item():.1f}  {time.perf_counter() - training_started:.0f} s",
                flush=True,
            )
    train_seconds = time.perf_counter() - training_started

    # Save in fp16, then measure the weights as shipped (the fp16 values, loaded back to fp32).
    state = {key: value.detach().half().contiguous() for key, value in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    # One metadata entry only: safetensors writes several in random order, and the same training
    # must give the same file (and sha256). The recipe goes into the sidecar instead.
    save_file(state, out, metadata={"format": "pt"})
    out.chmod(0o644)  # safetensors writes through a private (0600) temporary file; ship it readable
    model.load_state_dict(state)
    model.eval()
    world_eval = (recipe.eval_clips_per_class, (seed, HELD_OUT_SEED_STREAM), preprocess_cfg)
    captions = [synth_class(class_id).caption for class_id in range(DEFAULT_WORLD_CLASSES)]
    label_names = [synth_class(class_id).name for class_id in range(DEFAULT_WORLD_CLASSES)]
    metrics = {
        "appearance_accuracy": appearance_accuracy(model, tokenizer, held_out_frames),
        "default_world_pair_accuracy": default_world_pair_accuracy(model, tokenizer, captions, "none", *world_eval),
        "default_world_pair_accuracy_label_names_ensemble": default_world_pair_accuracy(
            model, tokenizer, label_names, "ensemble", *world_eval
        ),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "render_seconds": round(render_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "eval_curve": eval_curve,
        "losses": [round(loss, 4) for loss in losses],
    }
    sidecar = {
        "model": MODEL_NAME,
        "file": out.name,
        "sha256": file_sha256(out),
        "seed": seed,
        "steps": steps,
        "recipe": asdict(recipe),
        "caption_templates": list(CAPTION_TEMPLATES),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "trained_by": "clipreel.pipeline.data.synth.train_clip.train_synth_clip (python -m clipreel.pipeline.data.synth.train_clip)",
        "preprocess": preprocess_cfg.to_dict(),
        "metrics": metrics,
    }
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8")
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Command line: train with the default recipe and print the metrics."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the .safetensors file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--appearances", type=int, default=SynthClipRecipe.appearances)
    parser.add_argument("--clips-per-class", type=int, default=SynthClipRecipe.clips_per_class)
    args = parser.parse_args(argv)
    recipe = SynthClipRecipe(appearances=args.appearances, clips_per_class=args.clips_per_class)
    metrics = train_synth_clip(args.out, seed=args.seed, steps=args.steps, recipe=recipe)
    summary = {key: value for key, value in metrics.items() if key != "losses"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
