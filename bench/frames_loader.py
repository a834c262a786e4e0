"""Throughput of the raw-frame loader: training clips per second out of `raw_frame_loader`.

    python bench/frames_loader.py                 # 2 workers, 256 px synthetic H.264 videos, 8 frames at 224
    python bench/frames_loader.py --workers 0     # decode and augment in this process

It writes a synthetic world (real H.264 files) into a temporary folder, then runs the training
loader (random TSN offsets, multi-scale crop, flip, colour jitter, grayscale, normalise) over it.
The first epoch warms up (worker start, page cache) and is not timed; the next epochs are. The
consumer does nothing, so this is the loader's ceiling. It ends with a RESULT line and removes its
temporary files.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from clipreel.pipeline.frame_loaders import raw_frame_loader
from clipreel.pipeline.frames import AugmentConfig, RawFrameDataset
from clipreel.pipeline.sampling import SamplingConfig
from clipreel.pipeline.sources import read_sources
from clipreel.pipeline.synth import SynthConfig, make_world


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--videos", type=int, default=16, help="videos in the synthetic world")
    parser.add_argument("--video-frames", type=int, default=64, help="frames per synthetic video")
    parser.add_argument("--video-size", type=int, default=256, help="synthetic video width = height")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs")
    parser.add_argument("--dir", default=None, help="parent folder for the temporary videos")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="clipreel-bench-frames-", dir=args.dir))
    try:
        world = SynthConfig(classes=2, videos_per_class=args.videos // 2, frames=args.video_frames, size=args.video_size)
        manifest = read_sources(make_world(folder, world))
        dataset = RawFrameDataset(
            manifest, SamplingConfig(frames=args.frames), AugmentConfig(image_size=args.image_size), train=True
        )
        loader = raw_frame_loader(dataset, batch_size=args.batch, workers=args.workers, shuffle=True, seed=0)
        dataset.set_epoch(0)
        for _ in loader:  # warm-up epoch: worker start-up, page cache
            pass
        clips = 0
        start = time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            dataset.set_epoch(epoch)
            for batch in loader:
                clips += len(batch["label"])
        elapsed = time.perf_counter() - start
        print(
            f"{clips} clips of {args.frames} x {args.image_size} px from {args.video_size} px videos, "
            f"{args.workers} workers: {elapsed:.2f} s"
        )
        print(f"RESULT raw_loader_clips_per_s {clips / elapsed:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
