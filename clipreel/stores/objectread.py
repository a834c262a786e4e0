"""Read the per-video chunk objects of a Zarr v3 array behind an fsspec URL with concurrent ranged GETs.

The remote twin of fastread.py: a feature store keeps one uncompressed chunk per video, so a
chunk object is the row's raw bytes in C order and any slice of it (one view, some layers) is a
byte range. A mini-batch becomes one batch of concurrent ranged GETs whose bodies are copied into
their slots of a preallocated array, instead of zarr's per-chunk path (one whole-chunk request
and a decode per row, however little of it is needed).

Two clients send the GETs:

- obstore (Rust, for s3://, gs://, az://): measured on the 2-core dev VM against moto's server on
  127.0.0.1, 8 random 12 MB rows per batch: 50 rows/s and 10 ms of client CPU per row, against
  27 rows/s and 27 ms for s3fs's `cat_ranges`; with 0.3 MB rows 328 against 208 rows/s
  (bench/store_read.py --url moto compares the two through FeatureStore's own read path). It reads
  the AWS_*/GOOGLE_*/AZURE_* variables itself; the common s3fs options (endpoint_url, key,
  secret, token, anon, region) are translated. It is used when it is installed and its first
  request (a HEAD of the store's zarr.json) succeeds; otherwise, and for other protocols,
- fsspec's `cat_ranges` on the store's own filesystem (any protocol, every credential source
  botocore knows, e.g. AWS config files and profiles).

`RangeClient.describe()` says which one a store uses and why. Imports fsspec, zarr, numpy and
stores.fastread (the shared row layout helpers).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from typing import Sequence

import numpy as np

from clipreel.stores.fastread import ChunkFileError, Segment, map_threads
from clipreel.stores.location import filesystem, protocol_of, storage_options

OBSTORE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
# Ranged GETs in flight at once per batch (object stores reward concurrency; more gained nothing
# against the loopback server and would only add memory).
MAX_CONCURRENT_GETS = 32
# s3fs options with an obstore S3 equivalent; any other option keeps a store on fsspec.
_S3_OPTION_NAMES = {"key": "access_key_id", "secret": "secret_access_key", "token": "session_token",
                    "endpoint_url": "endpoint", "region": "region"}


class RangeClient:
    """Concurrent ranged GETs of objects named relative to one store root."""

    def __init__(self, location: str, use_obstore: bool = True):
        self.location = location
        self._fs, root = filesystem(location)
        self._root = root.rstrip("/")
        self._obstore, self._why_not_obstore = _obstore_for(location) if use_obstore else (None, "obstore not asked for")

    def describe(self) -> str:
        if self._obstore is not None:
            return "obstore ranged GETs"
        return f"fsspec cat_ranges ({self._why_not_obstore})"

    def get(self, keys: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> list[bytes | memoryview | None]:
        """The bytes [start, end) of each object `keys[i]`; None where the object does not exist."""
        if not keys:
            return []
        if self._obstore is not None:
            return _run(_obstore_gets(self._obstore, keys, starts, ends))
        paths = [f"{self._root}/{key}" for key in keys]
        if self._fs.async_impl:  # one gather of coroutines
            results = self._fs.cat_ranges(
                paths, list(starts), list(ends), on_error="return", batch_size=MAX_CONCURRENT_GETS
            )
        else:  # a blocking filesystem: its reads on the reader threads
            requests = [(self._fs, path, start, end) for path, start, end in zip(paths, starts, ends, strict=True)]
            results = map_threads(_cat_or_error, requests)
        out = []
        for path, result in zip(paths, results, strict=True):
            if isinstance(result, FileNotFoundError):
                out.append(None)
            elif isinstance(result, BaseException):
                raise OSError(f"reading {path}: {type(result).__name__}: {result}") from result
            else:
                out.append(result)
        return out

    def list_sizes(self, prefix: str) -> dict[str, int]:
        """{key relative to the root: size} of every object under `prefix` (one paged listing)."""
        path = f"{self._root}/{prefix}"
        self._fs.invalidate_cache(path)
        try:
            found = self._fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        return {name[len(self._root) + 1 :]: int(info["size"]) for name, info in found.items()}


class RowChunkObjects:
    """The chunk objects of one array behind a URL whose every chunk is one row of raw bytes.

    Build it only for arrays where `fastread.direct_read_obstacle(array)` is None. Same interface
    as fastread.RowChunkFiles: path, written_rows, read_into.
    """

    def __init__(self, array, client: RangeClient):
        metadata = array.metadata
        self.row_shape = tuple(metadata.shape[1:])
        self.dtype = metadata.data_type.to_native_dtype()
        self.row_nbytes = math.prod(self.row_shape) * self.dtype.itemsize
        self._array_path = array.path
        self._encoding = metadata.chunk_key_encoding
        self._inner_zeros = (0,) * len(self.row_shape)
        self._client = client

    def key(self, row: int) -> str:
        """The object's key relative to the store root."""
        return f"{self._array_path}/{self._encoding.encode_chunk_key((row, *self._inner_zeros))}"

    def path(self, row: int) -> str:
        """The object's URL (for messages)."""
        return f"{self._client.location}/{self.key(row)}"

    def object_sizes(self) -> dict[int, int]:
        """{row: object size} of every chunk object written, from one listing."""
        # encode((row, 0, ...)) is before + str(row) + after, e.g. "c/" + "7" + "/0/0" by default.
        key_of_zero = self._encoding.encode_chunk_key((0, *self._inner_zeros))
        key_of_one = self._encoding.encode_chunk_key((1, *self._inner_zeros))
        split = next(i for i, (a, b) in enumerate(zip(key_of_zero, key_of_one)) if a != b)
        before, after = key_of_zero[:split], key_of_zero[split + 1 :]
        folder = f"{self._array_path}/{before.rsplit('/', 1)[0]}" if "/" in before else self._array_path
        sizes = {}
        for key, size in self._client.list_sizes(folder).items():
            name = key[len(self._array_path) + 1 :]
            number = name[len(before) : len(name) - len(after)]
            if name.startswith(before) and name.endswith(after) and number.isdigit() and str(int(number)) == number:
                sizes[int(number)] = size
        return sizes

    def written_rows(self) -> np.ndarray:
        """Rows whose chunk object exists, from one listing (the done flags: see FeatureStore.done_mask)."""
        return np.asarray(sorted(self.object_sizes()), dtype=np.int64)

    def exist(self, rows: Sequence[int]) -> np.ndarray:
        """(len(rows),) bool: whether each row's chunk object exists (one small GET each, concurrently)."""
        found = self._client.get([self.key(int(row)) for row in rows], [0] * len(rows), [1] * len(rows))
        return np.array([data is not None for data in found], dtype=bool)

    def read_into(self, rows: Sequence[int], slots: Sequence[memoryview], segments: Sequence[Sequence[Segment]]) -> None:
        """Copy `segments[i]` of row `rows[i]`'s object into `slots[i]`, all GETs at once.

        Raises ChunkFileError for the first row (in order) whose object is missing or too short.
        """
        keys, starts, ends, targets = [], [], [], []
        for index, (row, row_segments) in enumerate(zip(rows, segments, strict=True)):
            for file_offset, out_offset, nbytes in row_segments:
                keys.append(self.key(int(row)))
                starts.append(file_offset)
                ends.append(file_offset + nbytes)
                targets.append((index, out_offset, nbytes))
        bodies = self._client.get(keys, starts, ends)
        for (index, out_offset, nbytes), body in zip(targets, bodies, strict=True):
            row = int(rows[index])
            if body is None:
                raise ChunkFileError(row, self.path(row), "chunk object missing")
            if len(body) != nbytes:
                raise ChunkFileError(row, self.path(row), f"chunk object shorter than its {self.row_nbytes} bytes")
            slots[index][out_offset : out_offset + nbytes] = memoryview(body).cast("B")


def _cat_or_error(request):
    """One ranged read of a blocking filesystem: the bytes, or the exception it raised."""
    filesystem_, path, start, end = request
    try:
        return filesystem_.cat_file(path, start, end)
    except Exception as error:  # returned like cat_ranges(on_error="return") does
        return error


# ---------------------------------------------------------------------- obstore


def _obstore_for(location: str):
    """(an obstore store rooted at `location`, None), or (None, why obstore is not used)."""
    protocol = protocol_of(location)
    if protocol not in OBSTORE_PROTOCOLS:
        return None, f"obstore does not serve {protocol}://"
    try:
        import obstore
        from obstore.store import from_url
    except ImportError:
        return None, "obstore is not installed"
    config, client_options, untranslated = _obstore_options(protocol, storage_options(location))
    if untranslated:
        return None, f"storage options {untranslated} have no obstore equivalent here"
    try:
        store = from_url(location.replace("s3a://", "s3://", 1), config=config or None,
                         client_options=client_options or None)
        obstore.head(store, "zarr.json")
    except Exception as error:  # credentials only botocore finds (profiles, config files), a refused request
        return None, f"obstore could not read the store ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    return store, ""


def _obstore_options(protocol: str, options: dict) -> tuple[dict, dict, list[str]]:
    """fsspec options -> (obstore config, obstore client options, names of options it cannot take).

    Only s3fs's common options translate; obstore reads the AWS_*/GOOGLE_*/AZURE_* variables itself.
    """
    config, client_options = {}, {}
    if protocol in ("s3", "s3a"):
        client_kwargs = options.pop("client_kwargs", {})
        if isinstance(client_kwargs, dict) and set(client_kwargs) <= {"region_name"}:
            if "region_name" in client_kwargs:
                config["region"] = client_kwargs["region_name"]
        else:
            options["client_kwargs"] = client_kwargs
        if options.pop("anon", False):
            config["skip_signature"] = True
        for name in [name for name in options if name in _S3_OPTION_NAMES]:
            config[_S3_OPTION_NAMES[name]] = options.pop(name)
        endpoint = (config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL", ""))
        if endpoint.startswith("http://"):
            client_options["allow_http"] = True
    return config, client_options, sorted(options)


async def _obstore_gets(store, keys, starts, ends) -> list:
    import obstore

    limit = asyncio.Semaphore(MAX_CONCURRENT_GETS)

    async def one(key: str, start: int, end: int):
        async with limit:
            try:
                return await obstore.get_range_async(store, key, start=start, end=end)
            except FileNotFoundError:
                return None

    return await asyncio.gather(*(one(key, start, end) for key, start, end in zip(keys, starts, ends, strict=True)))


_loop_state: dict[str, object] = {"pid": None, "loop": None}
_loop_lock = threading.Lock()


def _run(coroutine):
    """Run `coroutine` on this process's background event loop (works from any thread, also one
    that runs its own loop) and return its result."""
    with _loop_lock:
        if _loop_state["pid"] != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="clipreel-objectread", daemon=True).start()
            _loop_state.update(pid=os.getpid(), loop=loop)
    return asyncio.run_coroutine_threadsafe(coroutine, _loop_state["loop"]).result()
