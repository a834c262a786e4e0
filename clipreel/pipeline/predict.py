"""`clipreel predict`: what happens in these videos? Class probabilities per video, from any run.

    clipreel predict cooking.mp4 dog.mp4 --run runs/xclip-k400 --classes "cooking,walking the dog" --top 3

The recipe, top to bottom:

1. The predictor (`predictor_for`), from what `--run` holds:
   - a cache head (`clipreel train`, or an imported EVL): decode -> the frozen backbone's taps
     (`heads.taps.Backbone`, the CLIP the head's store was extracted with) -> the head, in one
     process, without a store;
   - a raw-frame method (`clipreel finetune`, or an imported X-CLIP / ViFi-CLIP / EZ-CLIP): decode
     -> the method's model;
   - no run: zero-shot CLIP (`--model`, `--pretrained`): frame-mean embeddings against the class
     names in templates (the `zeroshot` head).
   Runs that score against class text take any class list (`--classes`); closed-set runs (EVL,
   linear, MLP) refuse one that is not their own.
2. How each video becomes clips (`ClipRecipe`): the run's own test sampling and preprocessing (an
   imported run's reference test, a store's extraction settings), with the user's overrides
   (--frames, --sampling, --views, --crops, --short-side); --start/--end sample inside one segment.
3. Every video: probe, sample, decode (PyAV on CPUs, DALI on a GPU), preprocess (in a background
   thread, one video ahead), then the predictor on its V x C clips; its probabilities are the mean
   softmax over the clips, its raw scores the mean logits. A missing, corrupt or undecodable video
   gets its own error and the others are still predicted.

The result holds every class's probability and raw score per video, in class order; `write_json`
writes it. Nothing is printed here: the CLI prints the tables.

May import: torch, numpy, open_clip, clipreel.errors, clipreel.devices, clipreel.heads, clipreel.stores,
clipreel.pipeline (data, models, evaluate, training). What only a run or a video list needs (stores.runs,
models, evaluate, data.sources: they bring pandas and zarr) is imported inside the functions that read
them, so that zero-shot CLIP on video files starts without it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import open_clip
import torch
from torch import nn

from clipreel.config import DEFAULT_MODEL
from clipreel.devices import resolve_device
from clipreel.errors import ClipreelError
from clipreel.heads.clip import TextModel
from clipreel.heads.registry import head_entry, list_heads, rebuild_head
from clipreel.heads.taps import Backbone, BackboneConfig
from clipreel.pipeline.data.class_lists import ClassList, read_class_list
from clipreel.pipeline.data.decode import choose_decoder, make_decoder, probe
from clipreel.pipeline.data.prefetch import read_ahead
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
from clipreel.pipeline.data.sampling import POLICIES, SamplingConfig, segment_indices
from clipreel.pipeline.training.loop import mixed_precision

if TYPE_CHECKING:
    from clipreel.stores.runs import Run

DEFAULT_TOP = 5
ZERO_SHOT_FRAMES = 8


@dataclass
class PredictConfig:
    """Everything `clipreel predict` needs. None means "the run's own setting"."""

    videos: list[str] = field(default_factory=list)  # video files
    video_list: str | None = None  # a video list (anything `extract --videos` reads; start,end columns honoured)
    run: str | None = None  # a run directory; without it, zero-shot CLIP of `model` / `pretrained`
    model: str = DEFAULT_MODEL  # zero-shot CLIP: the open_clip model
    pretrained: str = "default"  # zero-shot CLIP: its weights
    template: str = "ensemble"  # zero-shot CLIP: the template set, or one literal template
    classes: str | None = None  # "a,b,c" or a class list file; default: the run's classes
    top: int = DEFAULT_TOP
    frames: int | None = None
    sampling: str | None = None  # tsn, dense or uniform
    stride: int | None = None  # dense sampling's stride
    views: int | None = None
    crops: int | None = None
    short_side: int | None = None  # resize the short side to this before the centre crop
    start: float | None = None  # seconds: sample inside [start, end] of every video
    end: float | None = None
    json: str | None = None  # write every class's probability and raw score here
    store_checkpoint: str | None = None  # a cache-head run whose store came from a local checkpoint file
    trust_checkpoint_code: bool = False  # let a non-OpenAI TorchScript checkpoint run its code
    decoder: str = "auto"
    device: str = "auto"


@dataclass
class VideoPrediction:
    """One video's answer: probabilities and raw scores (K,) in class order, or why there is none."""

    path: str
    start: float | None = None
    end: float | None = None
    probabilities: list[float] | None = None
    scores: list[float] | None = None
    error: str | None = None

    def top(self, classnames: Sequence[str], k: int) -> list[tuple[str, float]]:
        """The k most probable classes, best first (ties: the lower class index first)."""
        order = np.argsort(-np.asarray(self.probabilities), kind="stable")[:k]
        return [(classnames[index], float(self.probabilities[index])) for index in order]


@dataclass
class Predictions:
    """What `predict` returns."""

    classnames: list[str]
    videos: list[VideoPrediction]
    source: str  # what predicted: the run directory, or the zero-shot CLIP
    clips: dict  # how each video became clips (sampling, views, crops, preprocessing)
    startup_seconds: float  # until the model was ready
    seconds: float  # all of it

    @property
    def failed(self) -> list[VideoPrediction]:
        return [video for video in self.videos if video.error is not None]

    def to_json(self) -> dict:
        return {"source": self.source, "classnames": self.classnames, "clips": self.clips,
                "videos": [asdict(video) for video in self.videos],
                "startup_seconds": self.startup_seconds, "seconds": self.seconds}


# --------------------------------------------------------------------------- how videos become clips


@dataclass(frozen=True)
class ClipRecipe:
    """How one video becomes the model's clips: which frames, and which pixels."""

    sampling: SamplingConfig  # policy, T frames, stride, V views (test: no randomness)
    preprocess: PreprocessConfig  # S, mean/std, C crops, short side

    def describe(self) -> dict:
        return {"sampling": self.sampling.to_dict(), "preprocess": self.preprocess.to_dict()}


def _recipe(sampling: SamplingConfig, preprocess_cfg: PreprocessConfig, cfg: PredictConfig) -> ClipRecipe:
    """The run's recipe with the user's overrides put in (each checked by its config)."""
    if cfg.sampling is not None and cfg.sampling not in POLICIES:
        raise ClipreelError(f"--sampling {cfg.sampling!r}: choose one of {', '.join(POLICIES)}")
    sampling = SamplingConfig(
        policy=cfg.sampling or sampling.policy, frames=cfg.frames or sampling.frames,
        stride=cfg.stride or sampling.stride, views=cfg.views or sampling.views,
    )
    values = preprocess_cfg.to_dict()
    values.update(crops=cfg.crops or preprocess_cfg.crops,
                  short_side=cfg.short_side if cfg.short_side is not None else preprocess_cfg.short_side)
    return ClipRecipe(sampling, PreprocessConfig.from_dict(values))


# --------------------------------------------------------------------------- predictors


@dataclass
class Predictor:
    """A model that scores clips (N, T, 3, S, S) -> logits (N, K) among `classnames`, and its clip recipe."""

    score: Callable[[torch.Tensor], torch.Tensor]
    classnames: list[str]
    recipe: ClipRecipe
    source: str
    fixed_frames: int | None = None  # T the model needs (None: any)


def predictor_for(cfg: PredictConfig, device: torch.device) -> Predictor:
    """The predictor of `cfg.run` (or zero-shot CLIP), classifying among `cfg.classes` or the run's classes."""
    classes = read_class_list(cfg.classes) if cfg.classes is not None else None
    if cfg.run is None:
        return _zero_shot_predictor(cfg, classes, device)
    from clipreel.pipeline.models import RUN_KIND_PREFIX
    from clipreel.stores.runs import load_run

    run = load_run(cfg.run)
    if run.kind.startswith(RUN_KIND_PREFIX):
        return _method_predictor(run, cfg, classes, device)
    if run.kind in list_heads():
        return _cache_head_predictor(run, cfg, classes, device)
    raise ClipreelError(f"{cfg.run} is a {run.kind!r} run, which predict does not know")


def _classes_for(run: Run, classes: ClassList | None, scores_text: bool) -> list[str]:
    """The classes a run predicts among: its own, or any list for a text-matching run."""
    if classes is None or classes.names == run.classnames:
        return list(run.classnames)
    if not scores_text:
        raise ClipreelError(
            f"{run.path} is a closed-set {run.kind} run: it classifies among its own {len(run.classnames)} classes "
            f"({', '.join(run.classnames[:5])}{' ...' if len(run.classnames) > 5 else ''}) and cannot score others; "
            "leave --classes out, or give exactly its class list"
        )
    return list(classes.names)


def _method_predictor(run: Run, cfg: PredictConfig, classes: ClassList | None, device: torch.device) -> Predictor:
    """A raw-frame method run (trained or imported): decode -> its model."""
    from clipreel.pipeline.evaluate import run_clip_plan
    from clipreel.pipeline.models import trained_method_model

    model = trained_method_model(run.path, device, cfg.trust_checkpoint_code)
    classnames = _classes_for(run, classes, scores_text=True)
    if classnames != run.classnames:
        if classes is not None and classes.descriptions and hasattr(model.config, "descriptions"):
            model.config.descriptions = {**model.config.descriptions, **classes.descriptions}
        model.set_classnames(classnames)
    config = run.head_config
    plan = run_clip_plan(run)
    preprocess_cfg = PreprocessConfig.from_norm(config["norm"], image_size=config["image_size"], crops=plan.crops)
    preprocess_cfg = PreprocessConfig.from_dict({**preprocess_cfg.to_dict(), "short_side": plan.short_side})
    fixed = config["method_config"].get("frames")  # X-CLIP's MIT and EZ-CLIP's prompts fix T

    def score(clips: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), mixed_precision(device):
            return model(clips)["logits"].float()  # (N, K)

    return Predictor(score, classnames, _recipe(plan.sampling, preprocess_cfg, cfg), str(run.path), fixed)


def _cache_head_predictor(run: Run, cfg: PredictConfig, classes: ClassList | None, device: torch.device) -> Predictor:
    """A cache-head run (trained or imported): decode -> the backbone's taps -> the head."""
    from clipreel.pipeline.models import trained_head

    entry = head_entry(run.kind)
    provenance = run.provenance
    feature_blocks = list(provenance["feature_blocks"])
    blocks = feature_blocks[-1:] if entry.blocks == "last" else feature_blocks
    layers = ",".join(str(block) for block in blocks) + ","
    backbone_record = (run.imported or {}).get("backbone")
    if backbone_record is not None:  # an imported EVL: the converted base CLIP kept in the run
        model_name, model_config = backbone_record["model"], backbone_record["model_config"]
        pretrained, expected_sha = str(run.path / backbone_record["clip_file"]), backbone_record["checkpoint_sha256"]
    else:
        model_name, model_config = provenance["model"], provenance.get("model_config")
        expected_sha = provenance.get("checkpoint_sha256")
        pretrained = cfg.store_checkpoint or str(provenance["pretrained"])
        names_a_file = expected_sha is not None and pretrained.lower() not in ("default", "none")
        if names_a_file and cfg.store_checkpoint is None:
            raise ClipreelError(
                f"{run.path} was trained on features of the local checkpoint {provenance['pretrained']!r}: pass that "
                "file with --store-checkpoint, so that predict computes the same features"
            )
    backbone = Backbone(BackboneConfig(model=model_name, pretrained=pretrained, layers=layers, device=str(device),
                                       model_config=model_config, trust_checkpoint_code=cfg.trust_checkpoint_code))
    if expected_sha is not None and backbone.checkpoint_sha256 != expected_sha:
        raise ClipreelError(f"{pretrained}: its sha256 is {str(backbone.checkpoint_sha256)[:12]}..., but the run's "
                            f"features came from a checkpoint with {expected_sha[:12]}...: give that checkpoint")
    text_model = None
    if entry.scores_text:
        text_model = TextModel(backbone.clip, open_clip.get_tokenizer(backbone.model_name), backbone.model_name)
    classnames = _classes_for(run, classes, entry.scores_text)
    head = trained_head(run, classnames, text_model).to(device)
    sampling = SamplingConfig.from_dict(provenance["sampling"]) if "sampling" in provenance else SamplingConfig(frames=provenance["frames"])
    sampling = SamplingConfig(policy=sampling.policy, frames=sampling.frames, stride=sampling.stride,
                              views=provenance.get("temporal_views", sampling.views))
    preprocess_cfg = PreprocessConfig.from_dict(provenance["preprocess"])
    record = (run.imported or {}).get("preprocessing")
    if record is not None and record["short_side"] != record["image_size"]:
        preprocess_cfg = PreprocessConfig.from_dict({**preprocess_cfg.to_dict(), "short_side": record["short_side"]})
    return Predictor(_tapped_scorer(backbone, head, entry.reads, device), classnames,
                     _recipe(sampling, preprocess_cfg, cfg), str(run.path), fixed_frames=provenance["frames"])


def _zero_shot_predictor(cfg: PredictConfig, classes: ClassList | None, device: torch.device) -> Predictor:
    """Plain zero-shot CLIP: frame-mean embeddings against the class names in templates."""
    if classes is None:
        raise ClipreelError("predict without --run is zero-shot CLIP: give the classes to choose among with --classes "
                            "('a,b,c' or a class list file)")
    backbone = Backbone(BackboneConfig(model=cfg.model, pretrained=cfg.pretrained, layers="1", device=str(device),
                                       trust_checkpoint_code=cfg.trust_checkpoint_code))
    name = backbone.model_name
    text_model = TextModel(backbone.clip, open_clip.get_tokenizer(name), name)
    config = {"embed_dim": backbone.embed_dim, "num_classes": len(classes.names), "templates": cfg.template,
              "logit_scale": float(backbone.clip.logit_scale.detach())}
    head = rebuild_head("zeroshot", config, classes.names, text_model).to(device).eval()
    sampling = SamplingConfig(frames=ZERO_SHOT_FRAMES)
    preprocess_cfg = PreprocessConfig(image_size=backbone.image_size, mean=backbone.mean, std=backbone.std)
    return Predictor(_tapped_scorer(backbone, head, ("embeds",), device), list(classes.names),
                     _recipe(sampling, preprocess_cfg, cfg), f"zero-shot {name} ({cfg.pretrained})")


def _tapped_scorer(backbone: Backbone, head: nn.Module, reads: Sequence[str], device: torch.device):
    """clips (N, T, 3, S, S) -> the backbone's taps, as a store batch holds them -> the head's logits (N, K)."""
    head.eval()

    def score(clips: torch.Tensor) -> torch.Tensor:
        if "attention" in reads:  # EVL: the cross-frame attention maps too
            features = backbone.forward_clips(clips)  # tokens (N, T, K, L, D), embeds (N, T, E), attention
            batch = {"tokens": features.tokens, "embeds": features.embeds, "attention": features.attention}
        else:
            tokens, embeds = backbone.forward(clips.flatten(0, 1))  # (N*T, K_t, L, D), (N*T, E)
            outputs = [backbone.tapped_blocks.index(block) for block in backbone.feature_blocks]
            batch = {"tokens": tokens[:, outputs].unflatten(0, clips.shape[:2]), "embeds": embeds.unflatten(0, clips.shape[:2])}
        with torch.no_grad(), mixed_precision(device):
            return head({name: batch[name] for name in reads}).float()  # (N, K)

    return score


# --------------------------------------------------------------------------- the videos


@dataclass(frozen=True)
class VideoJob:
    """A video to predict, and the segment to sample inside (seconds; None: the whole video)."""

    path: str
    start: float | None = None
    end: float | None = None


def videos_to_predict(cfg: PredictConfig) -> list[VideoJob]:
    """The videos of the command line and of --videos (a list's start,end columns give its segments)."""
    jobs = [VideoJob(str(path), cfg.start, cfg.end) for path in cfg.videos]
    if cfg.video_list is not None:
        from clipreel.pipeline.data.sources import read_sources

        listed = read_sources(cfg.video_list, skip_missing=True)
        for row in listed.itertuples():
            start = cfg.start if math.isnan(row.start) else float(row.start)
            end = cfg.end if math.isnan(row.end) else float(row.end)
            jobs.append(VideoJob(str(row.path), start, end))
    if not jobs:
        raise ClipreelError("predict: no videos; give video files, or a list with --videos")
    for job in jobs:
        _check_segment(job.start, job.end, job.path)
    return jobs


def _check_segment(start: float | None, end: float | None, where: str) -> None:
    """Refuse a segment that starts before the video or ends before it starts."""
    if start is not None and start < 0:
        raise ClipreelError(f"{where}: --start {start} is negative; give seconds from the start of the video")
    if start is not None and end is not None and end <= start:
        raise ClipreelError(f"{where}: the segment ends ({end} s) before it starts ({start} s); give --end > --start")


def _decoded(jobs: Sequence[VideoJob], recipe: ClipRecipe, decoder_name: str, device: torch.device
             ) -> Iterator[tuple[VideoJob, torch.Tensor | None, str | None]]:
    """(job, clips (V*C, T, 3, S, S) or None, error or None) for every job, in order."""
    decoder = make_decoder(decoder_name, str(device))
    views, frames = recipe.sampling.views, recipe.sampling.frames
    for job in jobs:
        try:
            info = probe(job.path)
            indices = segment_indices(info.num_frames, info.fps, job.start, job.end, recipe.sampling, job.path)  # (V, T)
            pixels = decoder.read(job.path, indices.reshape(-1), info)  # (V*T, H, W, 3) uint8
            crops = preprocess(pixels, recipe.preprocess, device=device)  # (C, V*T, 3, S, S)
            clips = crops.unflatten(1, (views, frames)).transpose(0, 1).flatten(0, 1)  # (V*C, T, 3, S, S), view-major
            yield job, clips, None
        except ClipreelError as error:
            yield job, None, str(error)
        except Exception as error:  # a decoder failing in a way it does not name: still only this video's
            yield job, None, f"{job.path}: cannot be decoded ({type(error).__name__}: {error})"


# --------------------------------------------------------------------------- the stage


def predict(cfg: PredictConfig) -> Predictions:
    """Class probabilities of every video (see the module docstring); failed videos carry their error."""
    started = time.perf_counter()
    if cfg.top < 1:
        raise ClipreelError(f"--top {cfg.top}: give at least 1")
    jobs = videos_to_predict(cfg)
    device = resolve_device(cfg.device)
    decoder_name = choose_decoder(cfg.decoder, str(device))
    predictor = predictor_for(cfg, device)
    recipe = predictor.recipe
    if predictor.fixed_frames is not None and recipe.sampling.frames != predictor.fixed_frames:
        raise ClipreelError(f"--frames {recipe.sampling.frames}: {predictor.source} works on {predictor.fixed_frames} "
                            f"frames per clip (fixed by its weights or its store); leave --frames out")
    startup = time.perf_counter() - started

    results = []
    for job, clips, error in read_ahead(_decoded(jobs, recipe, decoder_name, device), depth=1, name="clipreel-predict"):
        if error is not None:
            results.append(VideoPrediction(job.path, job.start, job.end, error=error))
            continue
        logits = predictor.score(clips)  # (V*C, K)
        probabilities = torch.softmax(logits, dim=-1).mean(dim=0)  # (K,)
        results.append(VideoPrediction(job.path, job.start, job.end, probabilities.tolist(),
                                       logits.mean(dim=0).tolist()))
    predictions = Predictions(predictor.classnames, results, predictor.source, recipe.describe(), startup,
                              time.perf_counter() - started)
    if cfg.json is not None:
        write_json(predictions, cfg.json)
    return predictions


def write_json(predictions: Predictions, path: str | os.PathLike) -> Path:
    """Every class's probability and raw score per video, in class order, as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(predictions.to_json(), indent=2) + "\n", encoding="utf-8")
    return path
