"""Prediction efficiency: `clipreel predict` vs the bare backbone forward, on the same videos and model.

Measured side by side in one run (these machines are noisy):
  1. the bare backbone: open_clip's `encode_image` of each video's 8 preprocessed frames (TSN
     segment centres), the frames decoded and preprocessed beforehand, in this process;
  2. the command: `clipreel predict VIDEO... --model M --pretrained W --classes ...` (zero-shot
     CLIP: decode with PyAV one video ahead, the backbone, the class texts) as a subprocess, W being
     `none` (seeded random weights) or, with --weights file, a local weights file (the model's random
     weights written once into a temporary folder: what a user's checkpoint costs to load). Its JSON
     reports its own start-up (model and class texts ready) and its total seconds, so the steady
     state is (videos) / (total - start-up). The JSON is written as predict returns, so its mtime
     splits the rest of the command's wall time: the process start (imports) before predict, and
     the exit (tables printed, interpreter shut down) after it.
Prints a table, then `RESULT` lines: efficiency (predict videos/s over bare-backbone videos/s; goal
>= 0.8), predict and backbone videos/s, start-up seconds (model), process start seconds (imports),
exit seconds, and the whole command's wall seconds.

    python bench/predict.py                              # ViT-B-16 at 224, 8 frames, 12 videos
    python bench/predict.py --weights file --videos 1    # one video, the weights from a local file
    python bench/predict.py --model clipreel-tiny --videos 24   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from local_weights import write_weights_file

CLASSES = "red circle,green square,blue triangle,yellow star"


def bare_backbone(paths: list[str], model: str, frames: int) -> float:
    """Videos/s of the CLIP's encode_image alone on frames decoded and preprocessed beforehand."""
    from clipreel.heads.clip import load_clip, register_builtin_models
    from clipreel.pipeline.data.decode import PyAVDecoder, probe
    from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
    from clipreel.pipeline.data.sampling import SamplingConfig, sample_indices

    register_builtin_models()
    clip, _ = load_clip(model, "none")
    size = int(clip.visual.image_size[0])
    config = PreprocessConfig(image_size=size)
    sampling = SamplingConfig(policy="tsn", frames=frames)
    clips = []
    for path in paths:
        info = probe(path)
        clips.append(preprocess(PyAVDecoder().read(path, sample_indices(info.num_frames, sampling, path).reshape(-1), info), config)[0])
    with torch.no_grad():
        clip.encode_image(clips[0])  # warm-up
        started = time.perf_counter()
        for frames_of_video in clips:
            clip.encode_image(frames_of_video)  # (T, 3, S, S) -> (T, E)
    return len(clips) / (time.perf_counter() - started)


def run_predict(paths: list[str], model: str, pretrained: str, frames: int, out: Path, threads: int) -> dict:
    """`clipreel predict` as a user runs it; its JSON gives its start-up and total seconds."""
    command = [sys.executable, "-m", "clipreel", "predict", *paths, "--model", model, "--pretrained", pretrained,
               "--classes", CLASSES, "--frames", str(frames), "--decoder", "pyav", "--device", "cpu",
               "--json", str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads, as in this process
    started = time.perf_counter()
    started_at = time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=environment)
    wall = time.perf_counter() - started
    answer = json.loads(out.read_text())
    predict_returned = out.stat().st_mtime - started_at
    steady = answer["seconds"] - answer["startup_seconds"]
    return {"videos_per_s": len(paths) / steady, "startup": answer["startup_seconds"],
            "process_start": predict_returned - answer["seconds"], "exit": wall - predict_returned, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides (1 is steadier on 2 cores)")
    parser.add_argument("--weights", choices=("none", "file"), default="none",
                        help="predict --pretrained none, or a local weights file of the model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from clipreel.pipeline.data.synth.world import SynthConfig, make_world

    with tempfile.TemporaryDirectory() as folder:
        world = make_world(Path(folder) / "world", SynthConfig(classes=4, videos_per_class=max(1, args.videos // 4),
                                                               frames=48, size=256, seed=0))
        paths = sorted(str(path) for path in (world.parent / "videos").rglob("*.mp4"))[: args.videos]
        pretrained = str(write_weights_file(args.model, Path(folder))) if args.weights == "file" else "none"
        predicted = run_predict(paths, args.model, pretrained, args.frames, Path(folder) / "answer.json", args.threads)
        backbone = bare_backbone(paths, args.model, args.frames)

    efficiency = predicted["videos_per_s"] / backbone
    print(f"{args.model} (weights: {args.weights}), {args.frames} frames, {len(paths)} videos (256 x 256 H.264), "
          f"PyAV, CPU, {torch.get_num_threads()} threads")
    print(f"  bare backbone (encode_image)   {backbone:8.3f} videos/s")
    print(f"  clipreel predict (steady)      {predicted['videos_per_s']:8.3f} videos/s")
    print(f"  efficiency                     {efficiency:8.3f}  (goal >= 0.8)")
    print(f"  predict start-up (model ready) {predicted['startup']:8.1f} s")
    print(f"  process start (imports)        {predicted['process_start']:8.1f} s")
    print(f"  exit (after predict returned)  {predicted['exit']:8.1f} s   (wall {predicted['wall']:.1f} s)")
    print(f"RESULT predict_efficiency {efficiency:.3f}")
    print(f"RESULT predict_videos_per_s {predicted['videos_per_s']:.3f}")
    print(f"RESULT backbone_videos_per_s {backbone:.3f}")
    print(f"RESULT predict_startup_s {predicted['startup']:.1f}")
    print(f"RESULT predict_process_start_s {predicted['process_start']:.1f}")
    print(f"RESULT predict_exit_s {predicted['exit']:.1f}")
    print(f"RESULT predict_wall_s {predicted['wall']:.1f}")


if __name__ == "__main__":
    main()
