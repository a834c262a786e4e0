"""Throughput of a raw-frame loader, and how much memory the Ray Data stream holds at most.

    python bench/frames_loader.py                      # worker processes, 256 px H.264 videos, 8 frames at 224
    python bench/frames_loader.py --loader ray         # the Ray Data stream (local Ray), plus its memory
    python bench/frames_loader.py --workers 0          # decode and augment in this process

It writes a synthetic world (real H.264 files) into a temporary folder, then runs the training
loader (random TSN offsets, multi-scale crop, flip, colour jitter, grayscale, normalise) over it.
The first epoch warms up (worker start, page cache) and is not timed; the next epochs are. The
consumer does nothing, so this is the loader's ceiling.

With --loader ray a last epoch is read by a slow consumer (--consumer-seconds per batch, like a
training step) while the object store's use (/dev/shm, where Ray keeps it on Linux) is sampled:
the peak stays near the stream's budget of a few batches per task, however many videos the epoch
has, because Ray Data stops decoding ahead when the budget is used. It ends with RESULT lines and
removes its temporary files.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from clipreel.pipeline.data.augment import AugmentConfig
from clipreel.pipeline.data.frame_loaders import FrameLoading, frame_loader
from clipreel.pipeline.data.raw_frames import RawFrameDataset
from clipreel.pipeline.data.sampling import SamplingConfig
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.pipeline.raycluster import ensure_ray

SHARED_MEMORY = "/dev/shm"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loader", default="workers", choices=("workers", "ray", "device"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--videos", type=int, default=16, help="videos in the synthetic world")
    parser.add_argument("--video-frames", type=int, default=64, help="frames per synthetic video")
    parser.add_argument("--video-size", type=int, default=256, help="synthetic video width = height")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs")
    parser.add_argument("--consumer-seconds", type=float, default=1.0, help="ray: the slow consumer's time per batch")
    parser.add_argument("--dir", default=None, help="parent folder for the temporary videos")
    return parser.parse_args()


def peak_shared_memory_while(consume) -> int:
    """Run `consume()` while sampling the used bytes of /dev/shm; the peak above the starting use."""
    start = shutil.disk_usage(SHARED_MEMORY).used
    peak, done = [start], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], shutil.disk_usage(SHARED_MEMORY).used)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        consume()
    finally:
        done.set()
        sampler.join()
    return peak[0] - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="clipreel-bench-frames-", dir=args.dir))
    try:
        world = SynthConfig(classes=2, videos_per_class=args.videos // 2, frames=args.video_frames, size=args.video_size)
        manifest = read_sources(make_world(folder, world))
        loading = FrameLoading("pyav", args.loader, "cpu", workers=args.workers)
        dataset = RawFrameDataset(
            manifest, SamplingConfig(frames=args.frames), AugmentConfig(image_size=args.image_size), train=True
        )
        if args.loader == "ray":
            ensure_ray()
        loader = frame_loader(dataset, args.batch, loading, shuffle=True, seed=0)
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
            f"{args.loader} loader, {args.workers} workers: {elapsed:.2f} s"
        )
        print(f"RESULT raw_loader_{args.loader}_clips_per_s {clips / elapsed:.2f}")
        if args.loader == "ray":
            dataset.set_epoch(args.epochs + 1)

            def slow_epoch() -> None:
                for _ in loader:
                    time.sleep(args.consumer_seconds)

            peak = peak_shared_memory_while(slow_epoch)
            epoch_bytes = len(dataset) * dataset.item_nbytes()
            print(f"slow consumer ({args.consumer_seconds} s per batch): object store peak {peak / 1e6:.1f} MB "
                  f"for an epoch of {epoch_bytes / 1e6:.1f} MB of clips")
            print(f"RESULT ray_stream_peak_object_store_mb {peak / 1e6:.1f}")
            print(f"RESULT ray_stream_epoch_clips_mb {epoch_bytes / 1e6:.1f}")
            print(f"RESULT ray_stream_peak_vs_epoch {peak / epoch_bytes:.3f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
