"""Raw-frame fine-tuning: each method's training-step throughput vs the raw-frame loaders'.

For ViFi-CLIP, bridge-and-prompt, X-CLIP and EZ-CLIP on one CPU process: clips/s of a full
training step (forward, the method's own loss, backward, AdamW) with ViT-B-16 at 224 (random
init, 8 frames), and clips/s of the raw-frame loaders (PyAV decode + video-consistent
augmentation) on synthetic 256 px videos: worker processes ("workers"), a Ray Data stream
("ray", local Ray) and a background thread ("device", here on the CPU), all measured in the same
run. The loader must not be the bottleneck: loader clips/s / step clips/s >= 1 for every method.

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

from clipreel.heads.clip import load_clip, register_builtin_models
from clipreel.heads.layers import trainable_parameters
from clipreel.heads.registry import create_method, list_methods
from clipreel.pipeline.data.augment import AugmentConfig
from clipreel.pipeline.data.frame_loaders import FrameLoading, frame_loader
from clipreel.pipeline.data.raw_frames import RawFrameDataset
from clipreel.pipeline.data.sampling import SamplingConfig
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.pipeline.raycluster import ensure_ray

CLASSNAMES = ["red circle moving left", "red circle moving right", "green square growing", "green square shrinking"]


def step_clips_per_s(method: str, model_name: str, frames: int, size: int, batch: int, steps: int) -> tuple[float, int]:
    """Clips/s of full training steps (after one warm-up step), and the trainable parameter count."""
    clip, _ = load_clip(model_name, "none")
    model, _ = create_method(method, clip, open_clip.get_tokenizer(model_name), CLASSNAMES, frames, {})
    parameters = list(trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    clips = torch.randn(batch, frames, 3, size, size)
    labels = torch.arange(batch) % len(CLASSNAMES)
    model.train()
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        optimizer.zero_grad()
        model.loss(model(clips), labels, label_smoothing=0.1).backward()
        optimizer.step()
    return batch * steps / (time.perf_counter() - started), sum(p.numel() for p in parameters)


def loader_clips_per_s(videos_csv: Path, loading: FrameLoading, frames: int, size: int, batch: int,
                       batches: int) -> float:
    """Clips/s delivered by a raw-frame loader (decode + augmentation), after a first batch (start-up) untimed."""
    rows = read_sources(str(videos_csv))
    dataset = RawFrameDataset(rows, SamplingConfig(policy="tsn", frames=frames), AugmentConfig(image_size=size),
                              train=True, seed=0, decoder=loading.decoder, device=loading.device)
    loader = frame_loader(dataset, batch, loading, shuffle=True, seed=0, drop_last=True)
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
    parser.add_argument("--workers", type=int, default=2, help="decode workers (processes, or Ray tasks)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    register_builtin_models()
    size = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]

    work = Path(tempfile.mkdtemp(prefix="clipreel-bench-finetune-"))
    loadings = {
        "workers": FrameLoading("pyav", "workers", "cpu", workers=args.workers),
        "ray": FrameLoading("pyav", "ray", "cpu", workers=args.workers),
        "device": FrameLoading("pyav", "device", "cpu"),
    }
    try:
        videos_csv = make_world(work / "world", SynthConfig(classes=4, videos_per_class=8, frames=64, size=256))
        ensure_ray()
        # 12 batches of 2: half the 32 videos, so no loader reaches its epoch's end
        loaders = {name: loader_clips_per_s(videos_csv, loading, args.frames, size, args.batch, batches=12)
                   for name, loading in loadings.items()}
        steps = {method: step_clips_per_s(method, args.model, args.frames, size, args.batch, args.steps)
                 for method in list_methods()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    fastest_step = max(rate for rate, _ in steps.values())
    print(f"model {args.model} at {size} px, {args.frames} frames, batch {args.batch}, CPU")
    for name, rate in loaders.items():
        print(f"raw-frame loader {name:8s} ({args.workers} workers): {rate:8.2f} clips/s")
    for method, (rate, trainable) in steps.items():
        print(f"{method:7s} training step: {rate:8.3f} clips/s   trainable {trainable:,}   "
              f"loader(workers)/step {loaders['workers'] / rate:8.1f}")
    for name, rate in loaders.items():
        print(f"RESULT raw_loader_{name}_clips_per_s {rate:.2f}")
    for method, (rate, _) in steps.items():
        print(f"RESULT finetune_{method}_clips_per_s {rate:.3f}")
    for name, rate in loaders.items():
        print(f"RESULT loader_{name}_vs_fastest_step {rate / fastest_step:.1f}")


if __name__ == "__main__":
    main()
