"""Raw-frame fine-tuning: each method's training-step throughput vs the raw-frame loader's.

For ViFi-CLIP, bridge-and-prompt, X-CLIP and EZ-CLIP on one CPU process: clips/s of a full
training step (forward, loss, backward, AdamW) with ViT-B-16 at 224 (random init, 8 frames),
and clips/s of `raw_frame_loader` (PyAV decode in worker processes + video-consistent
augmentation) on synthetic 256 px videos, measured in the same run. The loader must not be the
bottleneck: loader clips/s / step clips/s >= 1 for every method.

    python bench/finetune.py                 # ViT-B-16, batch 2, 2 timed steps per method
    python bench/finetune.py --model clipreel-tiny --steps 5   # a quick run
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from clipreel.heads.ezclip import EZCLIP, EZCLIPConfig, motion_loss
from clipreel.heads.vifi import BridgePrompt, BridgePromptConfig, ViFiCLIP, ViFiConfig
from clipreel.heads.xclip_cct import XCLIP, XCLIPConfig
from clipreel.pipeline.backbone import load_clip, register_builtin_models
from clipreel.pipeline.frame_loaders import raw_frame_loader
from clipreel.pipeline.frames import AugmentConfig, RawFrameDataset
from clipreel.pipeline.sampling import SamplingConfig
from clipreel.pipeline.sources import read_sources
from clipreel.pipeline.synth import SynthConfig, make_world

CLASSNAMES = ["red circle moving left", "red circle moving right", "green square growing", "green square shrinking"]


def build(method: str, model_name: str, frames: int):
    """The method's model on a fresh CLIP, and the parameters its optimizer updates."""
    clip, _ = load_clip(model_name, "none")
    tokenizer = open_clip.get_tokenizer(model_name)
    if method == "vifi":
        model = ViFiCLIP(clip, tokenizer, CLASSNAMES, ViFiConfig())
        return model, list(model.trainable_parameters().values())
    if method == "prompt":
        depth = min(BridgePromptConfig().depth_vision, len(clip.visual.transformer.resblocks), clip.transformer.layers)
        model = BridgePrompt(clip, tokenizer, CLASSNAMES, BridgePromptConfig(depth_vision=depth, depth_text=depth))
        return model, list(model.trainable_parameters().values())
    if method == "xclip":
        model = XCLIP(clip, tokenizer, CLASSNAMES, XCLIPConfig(frames=frames))
        return model, [param for _, param in model.trainable_named_parameters()]
    model = EZCLIP(clip, EZCLIPConfig(frames=frames))
    model.class_tokens = tokenizer(CLASSNAMES)
    return model, [param for _, param in model.trainable_parameters()]


def loss_of(method: str, model, clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The method's training loss on a batch (EZ-CLIP: cross-entropy on class texts + motion loss)."""
    if method != "ezclip":
        return F.cross_entropy(model(clips)["logits"], labels, label_smoothing=0.1)
    out = model(clips)
    logits = model.logits(out["video_embeds"], model.encode_text(model.class_tokens))
    return F.cross_entropy(logits, labels) + motion_loss(out["frame_embeds"])


def step_clips_per_s(method: str, model_name: str, frames: int, size: int, batch: int, steps: int) -> tuple[float, int]:
    """Clips/s of full training steps (after one warm-up step), and the trainable parameter count."""
    model, parameters = build(method, model_name, frames)
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    clips = torch.randn(batch, frames, 3, size, size)
    labels = torch.arange(batch) % len(CLASSNAMES)
    model.train()
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        optimizer.zero_grad()
        loss_of(method, model, clips, labels).backward()
        optimizer.step()
    return batch * steps / (time.perf_counter() - started), sum(p.numel() for p in parameters)


def loader_clips_per_s(videos_csv: Path, frames: int, size: int, batch: int, workers: int, batches: int) -> float:
    """Clips/s delivered by raw_frame_loader (decode + augmentation in worker processes)."""
    rows = read_sources(str(videos_csv))
    dataset = RawFrameDataset(rows, SamplingConfig(policy="tsn", frames=frames), AugmentConfig(image_size=size),
                              train=True, seed=0)
    loader = raw_frame_loader(dataset, batch_size=batch, workers=workers, shuffle=True, seed=0, drop_last=True)
    iterator = iter(loader)
    next(iterator)  # workers started and warm
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="clips per training step and per loader batch")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per method")
    parser.add_argument("--workers", type=int, default=2, help="loader decode workers")
    args = parser.parse_args()
    torch.set_num_threads(2)
    register_builtin_models()
    size = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]

    work = Path(tempfile.mkdtemp(prefix="clipreel-bench-finetune-"))
    try:
        videos_csv = make_world(work / "world", SynthConfig(classes=4, videos_per_class=6, frames=64, size=256))
        loader_rate = loader_clips_per_s(videos_csv, args.frames, size, args.batch, args.workers, batches=8)
        steps = {method: step_clips_per_s(method, args.model, args.frames, size, args.batch, args.steps)
                 for method in ("vifi", "prompt", "xclip", "ezclip")}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"model {args.model} at {size} px, {args.frames} frames, batch {args.batch}, CPU")
    print(f"raw-frame loader ({args.workers} workers): {loader_rate:8.2f} clips/s")
    for method, (rate, trainable) in steps.items():
        print(f"{method:7s} training step: {rate:8.3f} clips/s   trainable {trainable:,}   loader/step {loader_rate / rate:8.1f}")
    print(f"RESULT raw_loader_clips_per_s {loader_rate:.2f}")
    for method, (rate, _) in steps.items():
        print(f"RESULT finetune_{method}_clips_per_s {rate:.3f}")
    print(f"RESULT loader_vs_fastest_step {loader_rate / max(rate for rate, _ in steps.values()):.1f}")


if __name__ == "__main__":
    main()
