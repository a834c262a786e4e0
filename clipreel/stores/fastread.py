"""Read the per-video chunk files of a LOCAL Zarr v3 array straight into numpy buffers.

Why this exists: the feature store keeps one uncompressed chunk per video, so a chunk file is
nothing but the row's bytes in C order. Stock zarr reads a random mini-batch several times
slower than a numpy memmap of the same bytes (measured on a 2-core VM: ~7 videos/s with `oindex`,
25-58 with a per-video loop, 232 for the memmap; docs/store.md, "The read path"), because of per-chunk decode machinery and copies. Here
each chunk file is read with `os.preadv` directly into its slot of a preallocated output
array, on a small thread pool (file reads release the GIL).

This is only correct for arrays whose chunks really are raw bytes: `direct_read_obstacle`
checks the array metadata (one row per chunk, a single little-endian `bytes` codec, no
compressor, filter, checksum or storage transformer, a plain numeric dtype, a local
directory store or an fsspec one) and says why not otherwise; callers then fall back to zarr
itself. Chunk file names come from the array's own chunk key encoding, never a hard-coded
pattern. The chunk objects of a store behind a URL are read by objectread.RowChunkObjects, with
the same `read_into` interface; `read_rows` serves both.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from zarr.codecs import BytesCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.storage import FsspecStore, LocalStore

from clipreel.errors import ClipreelError

# Reader threads. On the 2-core dev VM (bench/store_read.py, ViT-B/16 rows of 12 MB, page
# cache warm) 1 thread reads at ~0.95x a numpy memmap, 4 threads at 1.1-1.2x, 8 no better.
READ_THREADS = 4
# Rows smaller than this are read in the calling thread: handing a task to a thread costs tens
# of microseconds, which is more than copying a small row (a 16 KB embeds row: 2 ms serial vs
# 8-12 ms through the pool for 256 rows).
THREADED_ROW_BYTES = 1 << 20

# A byte range copied from a chunk file into a row's slot of the output: (file offset,
# offset in the row's output bytes, length in bytes).
Segment = tuple[int, int, int]


class ChunkFileError(ClipreelError):
    """A row's chunk file is missing or has the wrong size; `row` and `path` say which."""

    def __init__(self, row: int, path: str, problem: str):
        super().__init__(f"row {row}: {problem} ({path})")
        self.row, self.path, self.problem = row, path, problem


def direct_read_obstacle(array) -> str | None:
    """Why the chunks of this zarr array cannot be read straight from files; None if they can."""
    if not isinstance(array.store, (LocalStore, FsspecStore)):
        return f"its store is {type(array.store).__name__}, not a local directory or an fsspec URL"
    metadata = array.metadata
    if metadata.zarr_format != 3:
        return f"it is Zarr format {metadata.zarr_format}, not 3"
    if metadata.storage_transformers:
        return "it has storage transformers"
    grid = metadata.chunk_grid
    one_row = (1, *metadata.shape[1:])
    if not isinstance(grid, RegularChunkGrid) or tuple(grid.chunk_shape) != one_row:
        return f"its chunks are {grid}, not one row {one_row} each"
    codecs = metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return f"its codecs are {[type(codec).__name__ for codec in codecs]}, not a single bytes codec"
    dtype = metadata.data_type.to_native_dtype()
    if dtype.kind not in "biuf":
        return f"its dtype {dtype} is not a plain number"
    if dtype.itemsize > 1 and (codecs[0].endian is None or codecs[0].endian.value != sys.byteorder):
        return f"its byte order {codecs[0].endian} is not this machine's ({sys.byteorder})"
    return None


class RowChunkFiles:
    """The chunk files of one local array whose every chunk is one row of raw bytes.

    Build it only for arrays where `direct_read_obstacle(array)` is None.
    """

    def __init__(self, array):
        metadata = array.metadata
        self.row_shape = tuple(metadata.shape[1:])
        self.dtype = metadata.data_type.to_native_dtype()
        self.row_nbytes = math.prod(self.row_shape) * self.dtype.itemsize
        self._folder = str(Path(array.store.root) / array.path)
        self._encoding = metadata.chunk_key_encoding
        self._inner_zeros = (0,) * len(self.row_shape)

    def path(self, row: int) -> str:
        """The file holding `row` (whether or not it exists yet)."""
        key = self._encoding.encode_chunk_key((row, *self._inner_zeros))
        return os.path.join(self._folder, key)

    def written_rows(self) -> np.ndarray:
        """Rows of a 1-D array whose chunk file exists, from one directory listing.

        Opening every chunk through zarr costs one file read per row (slow at 100k rows); the
        listing costs one `scandir`. Key shapes handled: "c/7", "c.7" and "7".
        """
        if self.row_shape:
            raise ValueError("written_rows lists the chunks of 1-D arrays only")
        key_of_zero = self._encoding.encode_chunk_key((0,))  # e.g. "c/0"
        folder, name_prefix = os.path.split(key_of_zero[:-1])  # ("c", "") or ("", "c.")
        rows = []
        try:
            entries = os.scandir(os.path.join(self._folder, folder))
        except FileNotFoundError:  # no chunk written yet
            return np.zeros(0, dtype=np.int64)
        with entries:
            for entry in entries:
                number = entry.name[len(name_prefix) :]
                if entry.name.startswith(name_prefix) and number.isdigit() and str(int(number)) == number:
                    rows.append(int(number))
        return np.asarray(rows, dtype=np.int64)

    def read_into(self, rows: Sequence[int], slots: Sequence[memoryview], segments: Sequence[Sequence[Segment]]) -> None:
        """Copy `segments[i]` of row `rows[i]`'s file into `slots[i]`; large rows on the reader threads.

        Raises ChunkFileError for the first failing row (in order), after every read has ended.
        """
        if len(rows) <= 1 or len(slots[0]) < THREADED_ROW_BYTES:
            for row, slot, row_segments in zip(rows, slots, segments, strict=True):
                self.read_row_into(int(row), slot, row_segments)
            return
        tasks = [
            _pool().submit(self.read_row_into, int(row), slot, row_segments)
            for row, slot, row_segments in zip(rows, slots, segments, strict=True)
        ]
        errors = [task.exception() for task in tasks]  # waits for every task before raising
        for error in errors:
            if error is not None:
                raise error

    def read_row_into(self, row: int, out: memoryview, segments: Sequence[Segment]) -> None:
        """Copy the `segments` of `row`'s chunk file into `out` (that row's output bytes)."""
        path = self.path(row)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ChunkFileError(row, path, "chunk file missing") from None
        try:
            size = os.fstat(fd).st_size
            if size != self.row_nbytes:
                raise ChunkFileError(row, path, f"chunk file has {size} bytes, expected {self.row_nbytes}")
            for file_offset, out_offset, nbytes in segments:
                _pread_exact(fd, out[out_offset : out_offset + nbytes], file_offset)
        finally:
            os.close(fd)


def selection_segments(row_shape: tuple[int, ...], itemsize: int, axis: int | None, keep) -> list[Segment]:
    """Byte ranges that copy a row, keeping only positions `keep` along `axis` (None = all).

    Adjacent ranges are merged, so keeping everything is a single range.
    """
    row_nbytes = math.prod(row_shape) * itemsize
    if axis is None:
        return [(0, 0, row_nbytes)]
    outer = math.prod(row_shape[:axis])
    count = row_shape[axis]
    inner_nbytes = math.prod(row_shape[axis + 1 :]) * itemsize
    segments: list[Segment] = []
    for o in range(outer):
        for j, k in enumerate(keep):
            file_offset = (o * count + k) * inner_nbytes
            out_offset = (o * len(keep) + j) * inner_nbytes
            if segments:
                last_file, last_out, last_nbytes = segments[-1]
                if last_file + last_nbytes == file_offset and last_out + last_nbytes == out_offset:
                    segments[-1] = (last_file, last_out, last_nbytes + inner_nbytes)
                    continue
            segments.append((file_offset, out_offset, inner_nbytes))
    return segments


def read_rows(files, rows: Sequence[int], axis: int | None = None, keep=None) -> np.ndarray:
    """Rows `rows` (in that order) of a raw-chunk array (RowChunkFiles or objectread.RowChunkObjects),
    optionally keeping `keep` along `axis`.

    axis counts within a row (0 = the first axis after the row axis). Returns (len(rows), ...).
    Raises ChunkFileError (the first failing row in `rows` order) for missing or mis-sized files.
    """
    out_row_shape = list(files.row_shape)
    if axis is not None:
        out_row_shape[axis] = len(keep)
    out = np.empty((len(rows), *out_row_shape), dtype=files.dtype)  # (B, ...)
    if out.size == 0:
        return out
    segments = selection_segments(files.row_shape, files.dtype.itemsize, axis, keep)
    out_bytes = memoryview(out).cast("B")
    row_out_nbytes = out.nbytes // len(rows)
    slots = [out_bytes[i * row_out_nbytes : (i + 1) * row_out_nbytes] for i in range(len(rows))]
    files.read_into(rows, slots, [segments] * len(rows))
    return out


def map_threads(function, items) -> list:
    """function(item) for every item, on the reader threads; results in item order."""
    return list(_pool().map(function, items))


def _pread_exact(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` from the file at `offset` (a read may return fewer bytes than asked)."""
    while len(buffer):
        count = os.preadv(fd, [buffer], offset)
        if count == 0:
            raise EOFError(f"file ended at byte {offset}")
        buffer, offset = buffer[count:], offset + count


_pool_state: dict[str, object] = {"pid": None, "pool": None}


def _pool() -> ThreadPoolExecutor:
    """The process's reader threads, created on first use (and again in a forked child)."""
    if _pool_state["pid"] != os.getpid():
        _pool_state["pool"] = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="clipreel-read")
        _pool_state["pid"] = os.getpid()
    return _pool_state["pool"]
