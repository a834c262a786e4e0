"""CacheLoader throughput against plain FeatureStore.read of the same rows, and on 8-bit stores.

    python bench/loader.py               # ViT-B/16 shapes, EVL fields: tokens (8 x 4 x 197 x 768) + attention
    python bench/loader.py --views 2     # also: one random view per video vs reading both and picking one
    python bench/loader.py --small       # a quick run with small videos

It builds a store of random fp16 features in a temporary folder (the EVL fields: tokens of 4
feature blocks and their cross-frame attention maps), reads everything once so that we time
reading from the page cache rather than the disk, then alternates, epoch by epoch:

    loader       iterate CacheLoader.epoch(e): shuffled batches, a background reader thread,
                 torch tensors out (the consumer does nothing, so this is the loader's ceiling)
    store.read   the same batches of rows read in the calling thread with FeatureStore.read,
                 wrapped as torch tensors (what a loop without the loader would do)
    int8         the loader on an int8 store of the same features: batches of codes + scales, as
                 stored (the heads decode each feature block as they use it, on their device)
    float8       the loader on a float8 store

With --views V > 1 the loader (one random view per video, reading only that view's bytes) is
also compared with "read every view with store.read, then keep one", the fallback the loader
would otherwise need. It ends with RESULT lines and removes its temporary files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from clipreel.pipeline.data.cache_loader import CacheLoader
from clipreel.stores.encoding import STORE_DTYPES as DTYPES
from clipreel.stores.features import FeatureStore, StoreLayout
from clipreel.stores.manifest import new_manifest

FIELDS = ("tokens", "attention")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6, help="timed epochs per reader")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="small videos (197 -> 50 tokens, 768 -> 128 width)")
    parser.add_argument("--dir", default=None, help="parent folder for the temporary store")
    return parser.parse_args()


def build(path: Path, layout: StoreLayout) -> FeatureStore:
    """A store of random features (every video shares one random block: values do not matter here)."""
    manifest = new_manifest(
        [{"video_id": f"v{row}", "path": f"v{row}.mp4", "label": row % 4} for row in range(layout.videos)]
    )
    store = FeatureStore.create(path, layout, {"bench": "loader", "dtype": layout.dtype}, manifest)
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal(layout.row_shape("tokens"), dtype=np.float32).astype(np.float16)
    attention = rng.random(layout.row_shape("attention"), dtype=np.float32)
    attention = (attention / attention.sum(-1, keepdims=True)).astype(np.float16)  # softmax-like rows
    embeds = np.zeros(layout.row_shape("embeds"), dtype=np.float32)
    frame_indices = np.zeros(layout.row_shape("frame_indices"), dtype=np.int32)
    for row in range(layout.videos):
        store.write_video(row, tokens, embeds, frame_indices, attention)
    os.sync()  # no dirty pages left to be flushed while we time
    return FeatureStore.open(path)


def time_loader(loader: CacheLoader, epoch: int) -> float:
    """Seconds to iterate one epoch (every batch touched, as a training step would)."""
    started = time.perf_counter()
    for _ in loader.epoch(epoch):
        pass
    return time.perf_counter() - started


def time_store_read(store: FeatureStore, loader: CacheLoader, epoch: int, pick_view: bool) -> float:
    """Seconds to read the loader's batches of `epoch` with store.read in this thread."""
    plan = loader.epoch_plan(epoch)  # the same rows in the same batches
    started = time.perf_counter()
    for positions, views in plan:
        arrays = store.read(loader.rows[positions], fields=FIELDS)  # (B, V, ...)
        if pick_view:
            arrays = {name: values[np.arange(len(values)), views] for name, values in arrays.items()}
        [torch.from_numpy(np.ascontiguousarray(values)) for values in arrays.values()]
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    tokens, width, embed_dim = (50, 128, 64) if args.small else (197, 768, 512)
    layout = StoreLayout(videos=args.videos, views=args.views, frames=8, layers=4, tokens=tokens, width=width,
                         embed_dim=embed_dim)
    folder = Path(tempfile.mkdtemp(prefix="clipreel-bench-loader-", dir=args.dir))
    try:
        started = time.perf_counter()
        stores = {dtype: build(folder / f"bench-{dtype}.zarr", replace(layout, dtype=dtype)) for dtype in DTYPES}
        store = stores["float16"]
        # Bytes of one view of one video's EVL fields as each store keeps them (codes and scales).
        view_bytes = {dtype: sum(stores[dtype].array(name).nbytes // layout.videos // layout.views
                                 for name in stores[dtype].layout.array_names if name.removesuffix("_scale") in FIELDS)
                      for dtype in DTYPES}
        print(f"built {layout.videos} videos x {layout.views} view(s) of each dtype, EVL fields per view: "
              + ", ".join(f"{dtype} {value / 1e6:.2f} MB" for dtype, value in view_bytes.items())
              + f", in {time.perf_counter() - started:.1f} s")
        rows = np.arange(layout.videos)

        loaders = {name: CacheLoader(stores[dtype], rows, rows % 4, FIELDS, "all", args.batch, shuffle=True, seed=0,
                                     views="random", prefetch=args.prefetch)
                   for name, dtype in (("loader", "float16"), ("int8", "int8"), ("float8", "float8"))}
        loader = loaders["loader"]
        time_store_read(store, loader, 0, pick_view=False)  # warm the page cache
        for each in loaders.values():
            time_loader(each, 0)

        readers = {name: (lambda epoch, each=each: time_loader(each, epoch)) for name, each in loaders.items()}
        readers["store.read"] = lambda epoch: time_store_read(store, loader, epoch, pick_view=layout.views > 1)
        reader_bytes = {"loader": view_bytes["float16"], "int8": view_bytes["int8"], "float8": view_bytes["float8"],
                        "store.read": view_bytes["float16"] * (layout.views if layout.views > 1 else 1)}
        seconds = {name: [] for name in readers}
        for epoch in range(1, args.epochs + 1):
            shift = epoch % len(readers)  # rotate who goes first
            for name in list(readers)[shift:] + list(readers)[:shift]:
                seconds[name].append(readers[name](epoch))

        batches = len(loader)
        rate = {name: batches / statistics.median(times) for name, times in seconds.items()}
        print(f"\n{args.epochs} epochs of {batches} batches of {args.batch}, prefetch {args.prefetch}")
        print(f"{'reader':<12} {'batches/s':>10} {'videos/s':>9} {'MB/video':>9} {'GB/s read':>10}")
        for name, value in rate.items():
            videos = value * args.batch
            print(f"{name:<12} {value:10.2f} {videos:9.1f} {reader_bytes[name] / 1e6:9.2f} "
                  f"{videos * reader_bytes[name] / 1e9:10.2f}")
        ratio = rate["loader"] / rate["store.read"]
        print(f"\nloader / store.read = {ratio:.3f} (goal >= 0.8)")
        if layout.views > 1:
            print("(store.read reads every view and keeps one; the loader reads only the chosen view's bytes)")
        print()
        print(f"RESULT loader_vs_store_read {ratio:.3f}")
        print(f"RESULT loader_int8_vs_float16 {rate['int8'] / rate['loader']:.3f}")
        print(f"RESULT loader_float8_vs_float16 {rate['float8'] / rate['loader']:.3f}")
        print(f"RESULT loader_int8_bytes_ratio {view_bytes['int8'] / view_bytes['float16']:.3f}")
        print(f"RESULT loader_batches_per_s {rate['loader']:.2f}")
        print(f"RESULT store_read_batches_per_s {rate['store.read']:.2f}")
        print(f"RESULT loader_views {layout.views}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
