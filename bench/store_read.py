"""Random mini-batch reads from the feature store, against a raw numpy memmap of the same bytes; 8-bit
stores of the same tokens against the float16 one; and (with --url) the store on object storage.

    python bench/store_read.py                 # ViT-B/16 shapes: 8 frames x 4 layers x 197 x 768
    python bench/store_read.py --small         # a quick run with small videos
    python bench/store_read.py --url moto      # also from an S3 server (moto) started on 127.0.0.1
    python bench/store_read.py --url s3://bucket/prefix --storage-option endpoint_url=http://127.0.0.1:9000

It builds a store with random fp16 tokens in a temporary folder, writes the same bytes to a
.npy file, reads everything once (so both sit in the page cache: we time reading, not the disk),
then times the same random batches with three readers, rotating their order every batch so
that machine noise hits all of them alike:

    memmap       np.load(mmap_mode="r")[sorted rows]  (a fancy-indexed copy: the bar to reach)
    store.read   FeatureStore.read(rows, fields=("tokens",))
    stock zarr   a per-row loop over zarr's own array (faster than arr.oindex[rows] here)
    int8 read    FeatureStore.read of an int8 store of the same tokens: codes + scales, decoded to
                 float16 in numpy (what a CPU reader gets)
    int8 codes   the same with decode_codes=False: codes + scales as stored (what the training loader
                 hands a GPU, which decodes them itself)
    float8 read  FeatureStore.read of a float8 store, decoded to float16

With --url the store is copied there (`clipreel copy`) and three more readers join the rotation:

    remote read    FeatureStore.read on the URL: concurrent ranged GETs (obstore where it serves)
    remote fsspec  the same through fsspec's cat_ranges (the other client, for comparison)
    remote zarr    zarr's own path on the URL (FeatureStore.open(url, fast_read=False))

A moto server runs in a process of its own; on a 2-core machine it competes with the reader for
the cores, so the remote figures are a floor, not what a real object store gives.

It ends with RESULT lines for scripts to grep, and removes its temporary files (and the copy).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr
from moto_server import start_moto

from clipreel.stores import fastread, objectread
from clipreel.stores.copy import copy_store
from clipreel.stores.encoding import STORE_DTYPES as DTYPES
from clipreel.stores.features import FeatureStore, StoreLayout
from clipreel.stores.location import (
    apply_storage_option_items,
    filesystem,
    store_location,
)
from clipreel.stores.manifest import new_manifest


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--small", action="store_true", help="small videos (197 -> 50 tokens, 768 -> 128 width)")
    parser.add_argument("--threads", type=int, default=fastread.READ_THREADS, help="store reader threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="parent folder for the temporary files")
    parser.add_argument("--url", default=None,
                        help="also read from this object-store URL (a prefix the bench may write), or 'moto': "
                             "an S3 server started on 127.0.0.1 for the run")
    parser.add_argument("--storage-option", action="append", default=[], help="key=value for --url, repeatable")
    return parser.parse_args()


def build(folder: Path, layout: StoreLayout, seed: int) -> tuple[dict[str, Path], Path]:
    """A store of each dtype and a .npy, all of the same random tokens (N, V, T, K, L, D) (float16 in
    the .npy and the float16 store, encoded in the others)."""
    paths, npy_path = {dtype: folder / f"bench-{dtype}.zarr" for dtype in DTYPES}, folder / "tokens.npy"
    manifest = new_manifest([{"video_id": f"v{row}", "path": f"v{row}.mp4"} for row in range(layout.videos)])
    stores = {dtype: FeatureStore.create(path, replace(layout, dtype=dtype), {"bench": "store_read", "dtype": dtype},
                                         manifest)
              for dtype, path in paths.items()}
    tokens_shape = (layout.videos, *layout.row_shape("tokens"))
    memmap = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float16, shape=tokens_shape)
    rng = np.random.default_rng(seed)
    embeds = np.zeros(layout.row_shape("embeds"), dtype=np.float32)
    frame_indices = np.zeros(layout.row_shape("frame_indices"), dtype=np.int32)
    attention = np.full(layout.row_shape("attention"), 1 / (layout.tokens - 1), dtype=np.float16)  # not timed
    for row in range(layout.videos):
        tokens = rng.standard_normal(layout.row_shape("tokens"), dtype=np.float32).astype(np.float16)
        for store in stores.values():
            store.write_video(row, tokens, embeds, frame_indices, attention)
        memmap[row] = tokens
    memmap.flush()
    del memmap
    os.sync()  # no dirty pages left to be flushed while we time
    return paths, npy_path


def main() -> None:
    args = parse_args()
    fastread.READ_THREADS = args.threads  # read before the reader pool is first created
    if args.small:
        layout = StoreLayout(videos=args.videos, views=1, frames=8, layers=4, tokens=50, width=128, embed_dim=64)
    else:
        layout = StoreLayout(videos=args.videos, views=1, frames=8, layers=4, tokens=197, width=768, embed_dim=512)
    video_mb = np.prod(layout.row_shape("tokens")) * 2 / 1e6
    server, remote_prefix, remote_url = None, args.url, None
    if args.url == "moto":
        server, remote_prefix = start_moto()
    elif args.url:
        apply_storage_option_items(args.storage_option, store_location(args.url))
    folder = Path(tempfile.mkdtemp(prefix="clipreel-bench-", dir=args.dir))
    try:
        started = time.perf_counter()
        paths, npy_path = build(folder, layout, args.seed)
        store_path = paths["float16"]
        print(f"built {layout.videos} videos of {video_mb:.1f} MB (float16 tokens), each dtype, "
              f"in {time.perf_counter() - started:.1f} s")

        memmap = np.load(npy_path, mmap_mode="r")
        store = FeatureStore.open(store_path)
        int8, float8 = FeatureStore.open(paths["int8"]), FeatureStore.open(paths["float8"])
        stock = zarr.open_array(str(store_path / "tokens"), mode="r")
        readers = {
            "memmap": lambda rows: memmap[np.sort(rows)],
            "store.read": lambda rows: store.read(rows, fields=("tokens",))["tokens"],
            "stock zarr": lambda rows: np.stack([stock[int(row)] for row in rows]),
            "int8 read": lambda rows: int8.read(rows, fields=("tokens",))["tokens"],
            "int8 codes": lambda rows: int8.read(rows, fields=("tokens",), decode_codes=False),
            "float8 read": lambda rows: float8.read(rows, fields=("tokens",))["tokens"],
        }
        if args.url:
            remote_url = f"{remote_prefix}/bench-{uuid.uuid4().hex[:8]}.zarr"
            started = time.perf_counter()
            copy_store(store_path, remote_url)
            print(f"copied to {remote_url} in {time.perf_counter() - started:.1f} s")
            remote = FeatureStore.open(remote_url)
            print(f"remote read path: {remote.read_path()}")
            fsspec_tokens = objectread.RowChunkObjects(remote.array("tokens"),
                                                       objectread.RangeClient(remote_url, use_obstore=False))
            remote_zarr = FeatureStore.open(remote_url, fast_read=False)
            readers.update({
                "remote read": lambda rows: remote.read(rows, fields=("tokens",))["tokens"],
                "remote fsspec": lambda rows: fastread.read_rows(fsspec_tokens, rows),
                "remote zarr": lambda rows: remote_zarr.read(rows, fields=("tokens",))["tokens"],
            })
        # Bytes each reader takes from storage per video: tokens (and their scales).
        read_bytes = {name: 2 * math.prod(layout.row_shape("tokens")) for name in readers}
        for name in ("int8 read", "int8 codes", "float8 read"):
            read_bytes[name] = math.prod(layout.row_shape("tokens")) + 2 * math.prod(int8.layout.row_shape("tokens_scale"))
        everything = np.arange(layout.videos)
        for start in range(0, layout.videos, 16):  # warm the page cache with every copy
            for name in ("memmap", "store.read", "int8 codes", "float8 read"):
                readers[name](everything[start : start + 16])

        rng = np.random.default_rng(args.seed + 1)
        batches = [rng.choice(layout.videos, size=args.batch, replace=False) for _ in range(args.batches)]
        order = np.argsort(batches[0])
        same = np.array_equal(readers["store.read"](batches[0])[order], readers["memmap"](batches[0]))
        reference = readers["store.read"](batches[0])
        exact = [name for name in readers if name not in ("memmap", "int8 read", "int8 codes", "float8 read")]
        if not same or any(not np.array_equal(readers[name](batches[0]), reference) for name in exact):
            raise SystemExit("the readers disagree: not timing")
        for name, tolerance in (("int8 read", 0.01), ("float8 read", 0.05)):
            error = np.linalg.norm(readers[name](batches[0]).astype(np.float32) - reference)
            if error > tolerance * np.linalg.norm(reference.astype(np.float32)):
                raise SystemExit(f"{name} is far from the float16 tokens: not timing")

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
        print(f"{'reader':<14} {'videos/s':>9} {'MB/video':>9} {'GB/s read':>10} {'median batch ms':>16}")
        for name, times in seconds.items():
            rate = videos_per_s[name]
            print(f"{name:<14} {rate:9.1f} {read_bytes[name] / 1e6:9.2f} {rate * read_bytes[name] / 1e9:10.2f} "
                  f"{statistics.median(times) * 1e3:16.1f}")
        print()
        print(f"RESULT store_read_vs_memmap {videos_per_s['store.read'] / videos_per_s['memmap']:.3f}")
        print(f"RESULT int8_read_vs_float16_read {videos_per_s['int8 read'] / videos_per_s['store.read']:.3f}")
        print(f"RESULT int8_codes_vs_float16_read {videos_per_s['int8 codes'] / videos_per_s['store.read']:.3f}")
        print(f"RESULT float8_read_vs_float16_read {videos_per_s['float8 read'] / videos_per_s['store.read']:.3f}")
        print(f"RESULT int8_bytes_ratio {read_bytes['int8 codes'] / read_bytes['store.read']:.3f}")
        print(f"RESULT store_read_videos_per_s {videos_per_s['store.read']:.1f}")
        print(f"RESULT memmap_videos_per_s {videos_per_s['memmap']:.1f}")
        print(f"RESULT stock_zarr_videos_per_s {videos_per_s['stock zarr']:.1f}")
        if args.url:
            print(f"RESULT remote_read_vs_local_read {videos_per_s['remote read'] / videos_per_s['store.read']:.3f}")
            print(f"RESULT remote_read_vs_remote_zarr {videos_per_s['remote read'] / videos_per_s['remote zarr']:.3f}")
            print(f"RESULT remote_fsspec_vs_remote_read {videos_per_s['remote fsspec'] / videos_per_s['remote read']:.3f}")
            print(f"RESULT remote_read_videos_per_s {videos_per_s['remote read']:.1f}")
            print(f"RESULT remote_fsspec_videos_per_s {videos_per_s['remote fsspec']:.1f}")
            print(f"RESULT remote_zarr_videos_per_s {videos_per_s['remote zarr']:.1f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if remote_url is not None:
            remote_fs, remote_root = filesystem(remote_url)
            remote_fs.rm(remote_root, recursive=True)
        if server is not None:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
