"""One epoch of EVL training from the feature cache, against the same epoch on features held in memory
(the limit) and with a live frozen backbone.

    python bench/train_cache.py                  # ViT-B-16 at 224 (random init), 8 frames, 16 videos
    python bench/train_cache.py --small          # clipreel-tiny, a quick check of the script

Every side trains the same EVL head (ViT-B/16 sizes, 400 classes, built by heads.registry.create_head)
with the same AdamW, on the same videos and labels, one epoch in batches of --batch:

    cache   batches of tokens + attention maps stream out of the store (CacheLoader); the
            backbone never runs.
    int8    the same from an int8 store of the same features: the loader hands codes + scales,
            the head decodes each feature block as it uses it.
    memory  the same batches (the loader's epoch plan) sliced from float16 tensors read into memory
            before the epoch: no store, no loader thread. The limit the cache side aims at:
            RESULT cache_vs_memory = memory seconds / cache seconds (goal >= 0.9).
    live    the frozen backbone runs on every batch: Backbone.forward_clips on frames that are
            ALREADY decoded and preprocessed (held in memory), then the same head step. Real
            training would also decode and preprocess every epoch, so this is the generous
            comparison for the live side.

The stores are made first, from the same frames through the same Backbone.forward_clips (that is the
one-time extraction cost, reported but not part of any epoch). Each side runs in its own fresh
process so that its peak memory can be measured alone: the peak is the process's RSS high-water
mark during the epoch (VmHWM from /proc, reset after setup), which includes the resident
baseline after imports and setup (also reported: for the live side it holds the backbone and the
in-memory frames). torch runs on one thread (faster on the 2-core dev VM). The cache and memory
sides run --repeats times, alternating, and the medians count (the machine is shared and noisy).
Ends with RESULT lines; temporary files are removed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 400
SIDES = ("cache", "int8", "memory", "live")
STORES = {"cache": "features.zarr", "int8": "features-int8.zarr", "memory": "features.zarr", "live": "features.zarr"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--small", action="store_true", help="clipreel-tiny instead of ViT-B-16")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the cache, int8 and memory sides")
    parser.add_argument("--dir", default=None, help="parent folder for the temporary files")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser.parse_args()


def memory_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (resident high-water mark) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_memory() -> None:
    """Start a new high-water mark from the current RSS (Linux: clear_refs 5 resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def backbone_config(args):
    from clipreel.heads.taps import BackboneConfig

    return BackboneConfig(model="clipreel-tiny" if args.small else "ViT-B-16", pretrained="none", layers="4")


# --------------------------------------------------------------------------- preparation (parent)


def prepare(args, work: Path) -> float:
    """Random frames -> preprocessed clips (saved) -> the float16 and int8 feature stores. Returns the
    extraction seconds (the backbone and the float16 store)."""
    from clipreel.heads.taps import Backbone
    from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
    from clipreel.stores.features import FeatureStore, StoreLayout
    from clipreel.stores.manifest import new_manifest

    backbone = Backbone(backbone_config(args))
    config = PreprocessConfig(image_size=backbone.image_size, mean=backbone.mean, std=backbone.std)
    rng = np.random.default_rng(0)
    side = backbone.image_size + 32  # decoded frames a little larger than the crop
    clips = np.stack([
        preprocess(rng.integers(0, 256, (args.frames, side, side, 3), dtype=np.uint8), config)[0].numpy()
        for _ in range(args.videos)
    ])  # (N, T, 3, S, S) float32
    np.save(work / "clips.npy", clips)
    labels = rng.integers(0, NUM_CLASSES, args.videos)
    np.save(work / "labels.npy", labels)

    layout = StoreLayout(videos=args.videos, views=1, frames=args.frames, layers=len(backbone.feature_blocks),
                         tokens=backbone.tokens, width=backbone.width, embed_dim=backbone.embed_dim)
    manifest = new_manifest([{"video_id": f"v{row}", "path": f"v{row}.mp4", "label": int(labels[row])}
                             for row in range(args.videos)])
    store = FeatureStore.create(work / STORES["cache"], layout, backbone.provenance(), manifest)
    int8 = FeatureStore.create(work / STORES["int8"], replace(layout, dtype="int8"),
                               {**backbone.provenance(), "dtype": "int8"}, manifest)
    seconds = 0.0
    for row in range(args.videos):
        started = time.perf_counter()
        features = backbone.forward_clips(torch.from_numpy(clips[row : row + 1]))
        values = (
            features.tokens[0, None].numpy().astype(np.float16),  # (V=1, T, K, L, D)
            features.embeds[0, None].numpy(),
            np.arange(args.frames)[None],
            features.attention[0, None].numpy().astype(np.float16),
        )
        store.write_video(row, *values)
        seconds += time.perf_counter() - started
        int8.write_video(row, *values)  # the same features, encoded
    return seconds


# --------------------------------------------------------------------------- one epoch (child processes)


def run_side(args) -> dict:
    """One training epoch from the cache or through the live backbone; prints a JSON line."""
    from clipreel.heads.registry import create_head
    from clipreel.heads.taps import Backbone
    from clipreel.pipeline.data.cache_loader import CacheLoader
    from clipreel.stores.features import FeatureStore

    work = Path(args.work)
    store = FeatureStore.open(work / STORES[args.side])
    labels = np.load(work / "labels.npy")
    torch.manual_seed(0)
    head, _ = create_head("evl", store_layout=store.layout, provenance=store.provenance,
                          classnames=[f"class {k}" for k in range(NUM_CLASSES)])
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=4e-4, weight_decay=0.05)
    order = np.random.default_rng(1).permutation(args.videos)

    loader = CacheLoader(store, np.arange(args.videos), labels, ("tokens", "attention"), "all", args.batch,
                         shuffle=True, seed=1, views="random")
    if args.side in ("cache", "int8"):
        baseline_mb = memory_mb("VmRSS")
        reset_peak_memory()
        started = time.perf_counter()
        batches = ((batch, batch["labels"]) for batch in loader.epoch(0))
    elif args.side == "memory":
        held = {name: torch.from_numpy(values[:, 0])  # (N, T, K, L, D), (N, 2, T-1, K, P, P) float16; view 0
                for name, values in store.read(np.arange(args.videos), fields=("tokens", "attention")).items()}
        all_labels = torch.from_numpy(labels)
        plan = [torch.from_numpy(positions) for positions, _ in loader.epoch_plan(0)]  # the cache side's batches
        baseline_mb = memory_mb("VmRSS")
        reset_peak_memory()
        started = time.perf_counter()
        batches = (({name: values[positions] for name, values in held.items()}, all_labels[positions])
                   for positions in plan)
    else:
        backbone = Backbone(backbone_config(args))
        clips = torch.from_numpy(np.load(work / "clips.npy"))  # (N, T, 3, S, S): decoded + preprocessed
        baseline_mb = memory_mb("VmRSS")
        reset_peak_memory()
        started = time.perf_counter()

        def live_batches():
            for start in range(0, args.videos, args.batch):
                rows = order[start : start + args.batch]
                features = backbone.forward_clips(clips[rows])  # the frozen backbone, every epoch
                yield {"tokens": features.tokens, "attention": features.attention}, torch.from_numpy(labels[rows])

        batches = live_batches()

    steps = 0
    for batch, batch_labels in batches:
        loss = F.cross_entropy(head(batch), batch_labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    seconds = time.perf_counter() - started
    result = {"side": args.side, "seconds": seconds, "steps": steps, "peak_mb": memory_mb("VmHWM"),
              "baseline_mb": baseline_mb}
    print(json.dumps(result))
    return result


def run_child(args, work: Path, side: str) -> dict:
    command = [sys.executable, __file__, "--side", side, "--work", str(work), "--videos", str(args.videos),
               "--batch", str(args.batch), "--frames", str(args.frames)] + (["--small"] if args.small else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.side:
        run_side(args)
        return
    work = Path(tempfile.mkdtemp(prefix="clipreel-bench-train-", dir=args.dir))
    try:
        model = "clipreel-tiny" if args.small else "ViT-B-16 (random init)"
        print(f"{model}, {args.videos} videos x {args.frames} frames, batch {args.batch}, EVL head, "
              f"{NUM_CLASSES} classes, 1 torch thread")
        extraction = prepare(args, work)
        print(f"extraction (one time, not timed below): {extraction:.1f} s = {extraction / args.videos:.2f} s/video")
        runs = {side: [] for side in SIDES}
        for repeat in range(args.repeats):
            order = ("cache", "int8", "memory") if repeat % 2 == 0 else ("memory", "int8", "cache")
            for side in order:
                runs[side].append(run_child(args, work, side))
        runs["live"].append(run_child(args, work, "live"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {side: min(side_runs, key=lambda run: abs(run["seconds"] - statistics.median(
        each["seconds"] for each in side_runs))) for side, side_runs in runs.items()}  # the median run
    cache, int8, memory, live = (results[side] for side in SIDES)
    speedup = live["seconds"] / cache["seconds"]
    cache_vs_memory = memory["seconds"] / cache["seconds"]
    print(f"\n{'one epoch':<8} {'seconds':>8} {'s/video':>8} {'peak RSS MB':>12} {'(baseline MB)':>14}  runs (s)")
    for side in results.values():
        every = ", ".join(f"{run['seconds']:.2f}" for run in runs[side["side"]])
        print(f"{side['side']:<8} {side['seconds']:8.2f} {side['seconds'] / args.videos:8.3f} "
              f"{side['peak_mb']:12.0f} {side['baseline_mb']:14.0f}  {every}")
    print(f"\ncache vs memory (memory s / cache s): {cache_vs_memory:.3f} (goal >= 0.9); "
          f"int8 cache vs memory: {memory['seconds'] / int8['seconds']:.3f}")
    print(f"speedup of the cached epoch over the live backbone: {speedup:.1f}x; live frames were pre-decoded and "
          "preprocessed (generous to the live side)")
    print("peak = RSS high-water mark during the epoch (VmHWM, reset after setup); baseline = RSS after setup")
    print()
    print(f"RESULT cache_vs_memory {cache_vs_memory:.3f}")
    print(f"RESULT int8_cache_vs_memory {memory['seconds'] / int8['seconds']:.3f}")
    print(f"RESULT train_cache_speedup {speedup:.2f}")
    print(f"RESULT train_cache_peak_mb {cache['peak_mb']:.0f}")
    print(f"RESULT train_live_peak_mb {live['peak_mb']:.0f}")
    print(f"RESULT train_cache_epoch_s {cache['seconds']:.2f}")
    print(f"RESULT train_live_epoch_s {live['seconds']:.2f}")
    print(f"RESULT train_memory_epoch_s {memory['seconds']:.2f}")
    print(f"RESULT train_int8_epoch_s {int8['seconds']:.2f}")


if __name__ == "__main__":
    main()
