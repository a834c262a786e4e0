"""Extraction efficiency: `clipreel extract` vs the backbone forward alone, on the same videos and model.

Measured side by side in one run (these machines are noisy):
  1. the backbone alone: ViT-B-16 (random init) forward of 8 preprocessed frames per video, frames
     decoded beforehand, in this process with all cores and with one (the better one counts), through
     `Backbone.forward_clips`, i.e. including EVL's cross-frame attention maps that the store keeps;
  2. the whole job: `clipreel extract` as a subprocess (in its own process up to 32 videos, else
     local Ray: decode -> actors -> Zarr), with `--pretrained none` (seeded random weights) or,
     with --weights file, a local weights file (the model's random weights written once into the
     work folder: what a user's checkpoint costs to load).
     Each video's `done` chunk file is written last, so its mtime is that video's completion time:
     start-up = first completion - command start; steady-state throughput = the videos after the
     first batch / the time from the first batch to the last video. The start-up is split in three:
     until extract's own code starts (the process, the CLI and the extract module's imports: the
     command's summary gives the seconds from there to the first stored video), until the store is
     created (its zarr.json: torch and open_clip imported, the list read, the model built), and
     until the first video is stored (decode, forward, write). A Ray job starts Ray before it
     creates the store.
Prints a table, then `RESULT` lines: pipeline efficiency (steady-state extract videos/s over the
backbone-alone videos/s), start-up seconds (and its three parts), videos/s, bytes stored per video.

With --url, only this: extraction into that object-store URL and into a local folder, side by
side (the local one first, then the remote one, then each once more in the other order), each measured
from `clipreel extract`'s own summary in the same way: videos after the first stored one / the
seconds after it. RESULT extract_remote_vs_local is the ratio of those throughputs. `--url moto`
starts an S3 server (moto) on 127.0.0.1 for the run.

    python bench/extract.py                      # ViT-B-16 at 224, 8 frames, 32 videos
    python bench/extract.py --model clipreel-tiny --videos 40   # a quick run
    python bench/extract.py --videos 10 --runner ray             # a small job through Ray all the same
    python bench/extract.py --videos 10 --weights file           # the model's weights from a local file
    python bench/extract.py --url moto --videos 16              # local folder vs S3 on loopback
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from local_weights import write_weights_file
from moto_server import start_moto


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


def run_extract(videos_csv: Path, store: Path, model: str, frames: int, workers: int | None, batch_size: int,
                runner: str = "auto", dtype: str = "float16", pretrained: str = "none") -> dict:
    """Run `clipreel extract` as a user would; completion times come from the done chunks' mtimes."""
    command = [sys.executable, "-m", "clipreel", "extract", "--videos", str(videos_csv), "--out", str(store),
               "--model", model, "--pretrained", pretrained, "--frames", str(frames), "--batch-size", str(batch_size),
               "--runner", runner, "--dtype", dtype, "--no-progress"]
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
    summary_startup = float(re.search(r"\(([\d.]+) to the first stored video\)", finished.stdout)[1])
    extract_began = first - summary_startup
    store_created = (store / "zarr.json").stat().st_mtime
    after_first_batch = [t for t in done_times if t > first + 0.5]
    steady = (len(after_first_batch) / (after_first_batch[-1] - first)) if len(after_first_batch) >= 2 else float("nan")
    data_bytes = sum(p.stat().st_size for name in ("tokens", "embeds", "attention", "frame_indices", "tokens_scale",
                                                   "attention_scale") if (store / name).exists()
                     for p in (store / name).rglob("*") if p.is_file() and p.name != "zarr.json")
    return {
        "videos": len(done_times),
        "startup_s": first - started,
        "to_extract_s": extract_began - started,
        "to_store_s": store_created - extract_began,
        "to_first_video_s": first - store_created,
        "total_s": ended - started,
        "steady_videos_per_s": steady,
        "bytes_per_video": data_bytes / len(done_times),
    }


def extract_summary(videos_csv: Path, out: str, model: str, frames: int, workers: int | None, batch_size: int,
                    storage_options: list[str]) -> dict:
    """Run `clipreel extract` into `out` (a folder or URL); its throughput after the first stored video."""
    command = [sys.executable, "-m", "clipreel", "extract", "--videos", str(videos_csv), "--out", out,
               "--model", model, "--pretrained", "none", "--frames", str(frames), "--batch-size", str(batch_size),
               "--no-progress", *[f"--storage-option={item}" for item in storage_options]]
    if workers:
        command += ["--workers", str(workers)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        sys.exit(f"extract into {out} failed:\n{finished.stdout}\n{finished.stderr}")
    done = int(re.search(r"done\s+(\d+)", finished.stdout)[1])
    seconds, startup = (float(value) for value in re.search(r"seconds\s+([\d.]+) \(([\d.]+) to the first", finished.stdout).groups())
    return {"videos": done, "total_s": seconds, "startup_s": startup, "videos_per_s": (done - 1) / (seconds - startup)}


def compare_remote(videos_csv: Path, work: Path, url: str, args, storage_options: list[str]) -> None:
    """Extraction into `url` against into a local folder, alternating, two runs each."""
    runs: dict[str, list[dict]] = {"local": [], "remote": []}
    for order in (("local", "remote"), ("remote", "local")):
        for kind in order:
            out = str(work / f"{kind}-{uuid.uuid4().hex[:6]}.zarr") if kind == "local" else f"{url}/bench-{uuid.uuid4().hex[:8]}.zarr"
            runs[kind].append(extract_summary(videos_csv, out, args.model, args.frames, args.workers, args.batch_size,
                                              storage_options if kind == "remote" else []))
    for kind, results in runs.items():
        for result in results:
            print(f"extract into {kind:<6}: {result['videos_per_s']:7.3f} videos/s after the first "
                  f"(start-up {result['startup_s']:.1f} s, total {result['total_s']:.1f} s)")
    local = sum(result["videos_per_s"] for result in runs["local"]) / 2
    remote = sum(result["videos_per_s"] for result in runs["remote"]) / 2
    print(f"RESULT extract_remote_vs_local {remote / local:.3f}")
    print(f"RESULT extract_local_videos_per_s {local:.3f}")
    print(f"RESULT extract_remote_videos_per_s {remote:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2, help="extract --batch-size (videos per forward)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="synthetic video side in pixels")
    parser.add_argument("--workers", type=int, default=None, help="extract --workers (default: its own)")
    parser.add_argument("--runner", default="auto", help="extract --runner: auto, process or ray")
    parser.add_argument("--dtype", default="float16", help="extract --dtype: float16, int8 or float8")
    parser.add_argument("--weights", choices=("none", "file"), default="none",
                        help="extract --pretrained none, or a local weights file of the model")
    parser.add_argument("--url", default=None, help="also extract into this object-store URL prefix ('moto': an S3 "
                                                    "server started on 127.0.0.1), against a local folder")
    parser.add_argument("--storage-option", action="append", default=[], help="key=value for --url, repeatable")
    args = parser.parse_args()

    from clipreel.pipeline.data.synth.world import SynthConfig, make_world

    cores = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="clipreel-bench-extract-"))
    server = None
    try:
        classes = 4
        world_csv = make_world(work / "world", SynthConfig(
            classes=classes, videos_per_class=-(-args.videos // classes), frames=32, size=args.size))
        header, *rows = world_csv.read_text().splitlines()
        videos_csv = world_csv.with_name("bench-videos.csv")  # exactly --videos of them (paths relative to it)
        videos_csv.write_text("\n".join([header, *rows[: args.videos]]) + "\n")
        if args.url:  # only the local-versus-remote comparison
            url = args.url
            if url == "moto":
                server, url = start_moto()
            print(f"model {args.model}, {args.frames} frames, {args.videos} videos of {args.size} px")
            compare_remote(videos_csv, work, url, args, args.storage_option)
            return
        alone_all_cores = backbone_alone(videos_csv, args.model, args.frames, threads=cores)
        alone_one_thread = backbone_alone(videos_csv, args.model, args.frames, threads=1)
        pretrained = str(write_weights_file(args.model, work)) if args.weights == "file" else "none"
        extract = run_extract(videos_csv, work / "f.zarr", args.model, args.frames, args.workers, args.batch_size,
                              args.runner, args.dtype, pretrained)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if server is not None:
            server.kill()
            server.wait()

    best_alone = max(alone_all_cores, alone_one_thread)
    efficiency = extract["steady_videos_per_s"] / best_alone
    print(f"model {args.model} (weights: {args.weights}), {args.frames} frames, {extract['videos']} videos of "
          f"{args.size} px, --runner {args.runner}, --dtype {args.dtype}")
    print(f"backbone alone, {cores} threads   : {alone_all_cores:8.3f} videos/s")
    print(f"backbone alone, 1 thread    : {alone_one_thread:8.3f} videos/s")
    print(f"extract steady state        : {extract['steady_videos_per_s']:8.3f} videos/s")
    print(f"extract start-up            : {extract['startup_s']:8.1f} s (command to first stored video)")
    print(f"  to extract's start        : {extract['to_extract_s']:8.1f} s (process, CLI and extract module imports)")
    print(f"  to the store's creation   : {extract['to_store_s']:8.1f} s (torch and open_clip imports, list, model; "
          "a Ray job: Ray's start)")
    print(f"  to the first stored video : {extract['to_first_video_s']:8.1f} s (decode, forward, write)")
    print(f"extract total               : {extract['total_s']:8.1f} s")
    print(f"bytes stored per video      : {extract['bytes_per_video'] / 1e6:8.2f} MB")
    print(f"RESULT extract_efficiency {efficiency:.3f}")
    print(f"RESULT extract_startup_s {extract['startup_s']:.1f}")
    print(f"RESULT extract_startup_cli_s {extract['to_extract_s']:.1f}")
    print(f"RESULT extract_startup_store_s {extract['to_store_s']:.1f}")
    print(f"RESULT extract_startup_first_video_s {extract['to_first_video_s']:.1f}")
    print(f"RESULT extract_videos_per_s {extract['steady_videos_per_s']:.3f}")
    print(f"RESULT extract_bytes_per_video {extract['bytes_per_video']:.0f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
