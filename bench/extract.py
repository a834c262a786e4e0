"""Extraction efficiency: `clipreel extract` vs the backbone forward alone, on the same videos and model.

Measured side by side in one run (these machines are noisy):
  1. the backbone alone: ViT-B-16 (random init) forward of 8 preprocessed frames per video, frames
     decoded beforehand, in this process with all cores and with one (the better one counts), through
     `Backbone.forward_clips`, i.e. including EVL's cross-frame attention maps that the store keeps;
  2. the whole job: `clipreel extract` as a subprocess (local Ray, decode -> actors -> Zarr).
     Each video's `done` chunk file is written last, so its mtime is that video's completion time:
     start-up = first completion - command start; steady-state throughput = the videos after the
     first batch / the time from the first batch to the last video.
Prints a table, then `RESULT` lines: pipeline efficiency (steady-state extract videos/s over the
backbone-alone videos/s), start-up seconds, videos/s, bytes stored per video.

    python bench/extract.py                      # ViT-B-16 at 224, 8 frames, 32 videos
    python bench/extract.py --model clipreel-tiny --videos 40   # a quick run
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def backbone_alone(videos_csv: Path, model: str, frames: int, threads: int) -> float:
    """Videos/s of Backbone.forward alone on frames decoded and preprocessed beforehand."""
    from clipreel.heads.clip import register_builtin_models
    from clipreel.heads.taps import Backbone, BackboneConfig
    from clipreel.pipeline.data.decode import PyAVDecoder, probe
    from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
    from clipreel.pipeline.data.sampling import SamplingConfig, sample_indices
    from clipreel.pipeline.data.sources import read_sources

    torch.set_num_threads(threads)
    register_builtin_models()
    backbone = Backbone(BackboneConfig(model=model, pretrained="none"))
    config = PreprocessConfig(image_size=backbone.image_size, mean=backbone.mean, std=backbone.std)
    sampling = SamplingConfig(policy="tsn", frames=frames)
    clips = []
    for row in read_sources(str(videos_csv)).itertuples():
        indices = sample_indices(probe(row.path).num_frames, sampling, key=row.video_id)
        clips.append(preprocess(PyAVDecoder().read(row.path, indices.reshape(-1)), config)[0])
    backbone.forward_clips(clips[0][None])  # warm-up
    started = time.perf_counter()
    for clip in clips:
        backbone.forward_clips(clip[None])  # (1, T, 3, S, S): tokens, embeds and attention maps
    return len(clips) / (time.perf_counter() - started)


def run_extract(videos_csv: Path, store: Path, model: str, frames: int, workers: int | None, batch_size: int) -> dict:
    """Run `clipreel extract` as a user would; completion times come from the done chunks' mtimes."""
    command = [sys.executable, "-m", "clipreel", "extract", "--videos", str(videos_csv), "--out", str(store),
               "--model", model, "--pretrained", "none", "--frames", str(frames), "--batch-size", str(batch_size),
               "--no-progress"]
    if workers:
        command += ["--workers", str(workers)]
    started = time.time()
    finished = subprocess.run(command, capture_output=True, text=True)
    ended = time.time()
    if finished.returncode != 0:
        sys.exit(f"extract failed:\n{finished.stdout}\n{finished.stderr}")
    done_times = sorted(p.stat().st_mtime for p in (store / "done").rglob("*")
                        if p.is_file() and p.name != "zarr.json")
    first = done_times[0]
    after_first_batch = [t for t in done_times if t > first + 0.5]
    steady = (len(after_first_batch) / (after_first_batch[-1] - first)) if len(after_first_batch) >= 2 else float("nan")
    data_bytes = sum(p.stat().st_size for name in ("tokens", "embeds", "attention", "frame_indices")
                     for p in (store / name).rglob("*") if p.is_file() and p.name != "zarr.json")
    return {
        "videos": len(done_times),
        "startup_s": first - started,
        "total_s": ended - started,
        "steady_videos_per_s": steady,
        "bytes_per_video": data_bytes / len(done_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2, help="extract --batch-size (videos per forward)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="synthetic video side in pixels")
    parser.add_argument("--workers", type=int, default=None, help="extract --workers (default: its own)")
    args = parser.parse_args()

    from clipreel.pipeline.data.synth.world import SynthConfig, make_world

    cores = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="clipreel-bench-extract-"))
    try:
        classes = 4
        videos_csv = make_world(work / "world", SynthConfig(
            classes=classes, videos_per_class=max(1, args.videos // classes), frames=32, size=args.size))
        alone_all_cores = backbone_alone(videos_csv, args.model, args.frames, threads=cores)
        alone_one_thread = backbone_alone(videos_csv, args.model, args.frames, threads=1)
        extract = run_extract(videos_csv, work / "f.zarr", args.model, args.frames, args.workers, args.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best_alone = max(alone_all_cores, alone_one_thread)
    efficiency = extract["steady_videos_per_s"] / best_alone
    print(f"model {args.model}, {args.frames} frames, {extract['videos']} videos of {args.size} px")
    print(f"backbone alone, {cores} threads   : {alone_all_cores:8.3f} videos/s")
    print(f"backbone alone, 1 thread    : {alone_one_thread:8.3f} videos/s")
    print(f"extract steady state        : {extract['steady_videos_per_s']:8.3f} videos/s")
    print(f"extract start-up            : {extract['startup_s']:8.1f} s (command to first stored video)")
    print(f"extract total               : {extract['total_s']:8.1f} s")
    print(f"bytes stored per video      : {extract['bytes_per_video'] / 1e6:8.2f} MB")
    print(f"RESULT extract_efficiency {efficiency:.3f}")
    print(f"RESULT extract_startup_s {extract['startup_s']:.1f}")
    print(f"RESULT extract_videos_per_s {extract['steady_videos_per_s']:.3f}")
    print(f"RESULT extract_bytes_per_video {extract['bytes_per_video']:.0f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
