"""Random mini-batch reads from the feature store, against a raw numpy memmap of the same bytes.

    python bench/store_read.py                 # ViT-B/16 shapes: 8 frames x 5 layers x 197 x 768 fp16
    python bench/store_read.py --small         # a quick run with small videos

It builds a store with random fp16 tokens in a temporary folder, writes the same bytes to a
.npy file, reads everything once (so both sit in the page cache: we time reading, not the disk),
then times the same random batches with three readers, rotating their order every batch so
that machine noise hits all of them alike:

    memmap       np.load(mmap_mode="r")[sorted rows]  (a fancy-indexed copy: the bar to reach)
    store.read   FeatureStore.read(rows, fields=("tokens",))
    stock zarr   a per-row loop over zarr's own array (faster than arr.oindex[rows] here)

It ends with RESULT lines for scripts to grep, and removes its temporary files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from clipreel.stores import fastread
from clipreel.stores.features import FeatureStore, StoreLayout
from clipreel.stores.manifest import new_manifest


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--small", action="store_true", help="small videos (197 -> 50 tokens, 768 -> 128 width)")
    parser.add_argument("--threads", type=int, default=fastread.READ_THREADS, help="store reader threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="parent folder for the temporary files")
    return parser.parse_args()


def build(folder: Path, layout: StoreLayout, seed: int) -> tuple[Path, Path]:
    """A store and a .npy holding the same random tokens (N, V, T, K, L, D) float16."""
    store_path, npy_path = folder / "bench.zarr", folder / "tokens.npy"
    manifest = new_manifest([{"video_id": f"v{row}", "path": f"v{row}.mp4"} for row in range(layout.videos)])
    store = FeatureStore.create(store_path, layout, {"bench": "store_read"}, manifest)
    tokens_shape = (layout.videos, *layout.row_shape("tokens"))
    memmap = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float16, shape=tokens_shape)
    rng = np.random.default_rng(seed)
    embeds = np.zeros(layout.row_shape("embeds"), dtype=np.float32)
    frame_indices = np.zeros(layout.row_shape("frame_indices"), dtype=np.int32)
    attention = np.zeros(layout.row_shape("attention"), dtype=np.float16)  # not timed: tokens are
    for row in range(layout.videos):
        tokens = rng.standard_normal(layout.row_shape("tokens"), dtype=np.float32).astype(np.float16)
        store.write_video(row, tokens, embeds, frame_indices, attention)
        memmap[row] = tokens
    memmap.flush()
    del memmap
    os.sync()  # no dirty pages left to be flushed while we time
    return store_path, npy_path


def main() -> None:
    args = parse_args()
    fastread.READ_THREADS = args.threads  # read before the reader pool is first created
    if args.small:
        layout = StoreLayout(videos=args.videos, views=1, frames=8, layers=4, tokens=50, width=128, embed_dim=64)
    else:
        layout = StoreLayout(videos=args.videos, views=1, frames=8, layers=4, tokens=197, width=768, embed_dim=512)
    video_mb = np.prod(layout.row_shape("tokens")) * 2 / 1e6
    folder = Path(tempfile.mkdtemp(prefix="clipreel-bench-", dir=args.dir))
    try:
        started = time.perf_counter()
        store_path, npy_path = build(folder, layout, args.seed)
        print(f"built {layout.videos} videos of {video_mb:.1f} MB (tokens) in {time.perf_counter() - started:.1f} s")

        memmap = np.load(npy_path, mmap_mode="r")
        store = FeatureStore.open(store_path)
        stock = zarr.open_array(str(store_path / "tokens"), mode="r")
        readers = {
            "memmap": lambda rows: memmap[np.sort(rows)],
            "store.read": lambda rows: store.read(rows, fields=("tokens",))["tokens"],
            "stock zarr": lambda rows: np.stack([stock[int(row)] for row in rows]),
        }
        everything = np.arange(layout.videos)
        for start in range(0, layout.videos, 16):  # warm the page cache with both copies
            readers["memmap"](everything[start : start + 16])
            readers["store.read"](everything[start : start + 16])

        rng = np.random.default_rng(args.seed + 1)
        batches = [rng.choice(layout.videos, size=args.batch, replace=False) for _ in range(args.batches)]
        order = np.argsort(batches[0])
        same = np.array_equal(readers["store.read"](batches[0])[order], readers["memmap"](batches[0]))
        if not same or not np.array_equal(readers["stock zarr"](batches[0]), readers["store.read"](batches[0])):
            raise SystemExit("the readers disagree: not timing")

        seconds = {name: [] for name in readers}
        names = list(readers)
        for number, rows in enumerate(batches):
            shift = number % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                readers[name](rows)
                seconds[name].append(time.perf_counter() - started)

        videos_per_s = {name: args.batch * len(batches) / sum(times) for name, times in seconds.items()}
        print(f"\n{args.batches} random batches of {args.batch} from {layout.videos} videos, "
              f"{args.threads} store reader threads")
        print(f"{'reader':<12} {'videos/s':>9} {'GB/s':>6} {'median batch ms':>16}")
        for name, times in seconds.items():
            rate = videos_per_s[name]
            print(f"{name:<12} {rate:9.1f} {rate * video_mb / 1e3:6.2f} {statistics.median(times) * 1e3:16.1f}")
        print()
        print(f"RESULT store_read_vs_memmap {videos_per_s['store.read'] / videos_per_s['memmap']:.3f}")
        print(f"RESULT store_read_videos_per_s {videos_per_s['store.read']:.1f}")
        print(f"RESULT memmap_videos_per_s {videos_per_s['memmap']:.1f}")
        print(f"RESULT stock_zarr_videos_per_s {videos_per_s['stock zarr']:.1f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
