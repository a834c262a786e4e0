"""The feature store: one Zarr v3 group holding the frozen CLIP features of a video collection.

Layout (documented field by field in docs/store.md):

    NAME.zarr/
      zarr.json             root group; attributes schema_version, clipreel_version, provenance
      manifest.parquet      one row per video; row i of every array below is manifest row i
      writer_lease/         who may add rows and rewrite the manifest now (lease.py)
      tokens/               (N, V, T, K, L, D)          float16  outputs of the K feature blocks, CLS first
      embeds/               (N, V, T, E)                float32  projected per-frame embeddings (not normalised)
      attention/            (N, V, 2, T-1, K, P, P)     float16  EVL's cross-frame attention maps (T >= 2 only)
      frame_indices/        (N, V, T)                   int32    the frame numbers actually sampled
      done/                 (N,)                        uint8    1 once all of a video's data is written

An 8-bit store (provenance dtype int8 or float8, schema_version 2) keeps tokens and attention as
int8/uint8 codes with float16 scales of their own, tokens_scale (N, V, T, K, L, D/32) and
attention_scale (N, V, 2, T-1, K, P) (encoding.py); `read` returns float16 values all the same.

`attention` holds, per feature block, the head-averaged softmax attention of each frame's patch
queries over the previous frame's (index 0) and the next frame's (index 1) patch keys: exactly
what EVL's temporal cross-attention consumes. It depends only on frozen weights, so extraction
computes it once and training never recomputes q/k (docs/store.md weighs the alternatives).

Every per-video array has one chunk per video, stored uncompressed. A video therefore owns its
chunk files, and writers in different processes never touch the same file (zarr's
read-modify-write of a shared chunk loses updates). A video's `done` chunk is written last, so
a crash can leave a half-written video but never one that reads as done.

A linked store is a local folder holding only its own manifest.parquet and linked_arrays.json,
which names another store whose root metadata and arrays it reads (the few-shot and base-to-novel
protocols give a remote store's videos other splits and labels this way; for a local store they
use symbolic links). It is read-only.

One process at a time holds the store's writer lease (lease.py) and alone adds rows or rewrites
the manifest. Even so, every manifest write reads the manifest and the arrays' extent again from
storage and refuses to drop, move or miscount a row, so no stale view can shrink the manifest.

Reading goes straight to the chunk files when the store is a local folder (fastread.py), and
straight to the chunk objects with concurrent ranged GETs behind a URL (objectread.py); through
zarr only for an array whose encoding is not raw bytes, or when asked (fast_read=False).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import zarr
import zarr.errors

from clipreel import __version__
from clipreel.errors import ClipreelError
from clipreel.stores import fastread, objectread
from clipreel.stores.audit import provenance_diff, summarize, verify
from clipreel.stores.encoding import (
    DEFAULT_DTYPE,
    SCALE_SUFFIX,
    FieldCode,
    checked_dtype,
    code_problems,
    decode,
    encode,
    field_code,
    provenance_entries,
    scale_shape,
)
from clipreel.stores.lease import LEASE_FOLDER
from clipreel.stores.location import StoreAccess, is_remote, store_location
from clipreel.stores.manifest import (
    manifest_from_parquet,
    manifest_to_parquet,
    manifest_values,
    new_manifest,
    orphan_mask,
)
from clipreel.stores.objects import StoreObjects

__all__ = [
    "SCHEMA_VERSION",
    "FeatureStore",
    "StoreLayout",
    "provenance_diff",
    "summarize",
    "verify",
]

# The newest layout this clipreel writes and reads: 2 adds 8-bit tokens and attention maps with
# their scale arrays. float16 stores are written as 1, the layout they have always had, so that
# earlier clipreel versions read them; those versions refuse 8-bit stores instead of misreading them.
SCHEMA_VERSION = 2
FLOAT16_SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.parquet"
LINK_FILE = "linked_arrays.json"  # a linked store: {"arrays": location of the store whose arrays it reads}
READABLE_FIELDS = ("tokens", "embeds", "attention", "frame_indices")
# Where the layer axis K sits within one video's slice of each array that has one.
LAYER_AXIS = {"tokens": 2, "tokens_scale": 2, "attention": 3, "attention_scale": 3}


@dataclass(frozen=True)
class StoreLayout:
    """The sizes of a store: N videos, V views, T frames, K feature blocks, L tokens, D width, E;
    and how it keeps tokens and attention maps (`dtype`: float16, int8 or float8, see encoding.py)."""

    videos: int
    views: int
    frames: int
    layers: int
    tokens: int
    width: int
    embed_dim: int
    dtype: str = DEFAULT_DTYPE

    def __post_init__(self) -> None:
        checked_dtype(self.dtype, "StoreLayout dtype")

    def row_shape(self, name: str) -> tuple[int, ...]:
        """The shape of one video's slice of the array `name`."""
        if name.endswith(SCALE_SUFFIX):
            field = name.removesuffix(SCALE_SUFFIX)
            return scale_shape(field, self.row_shape(field))
        return {
            "tokens": (self.views, self.frames, self.layers, self.tokens, self.width),
            "embeds": (self.views, self.frames, self.embed_dim),
            "attention": (self.views, 2, self.frames - 1, self.layers, self.tokens - 1, self.tokens - 1),
            "frame_indices": (self.views, self.frames),
            "done": (),
        }[name]

    def code(self, field: str) -> FieldCode:
        """How this store keeps `field` (float16 values, or 8-bit codes with scales)."""
        return field_code(self.dtype, field)

    def spec(self, name: str) -> "ArraySpec":
        """How the array `name` of this store is created: ARRAYS, with the codes' dtype for 8-bit fields."""
        spec = ARRAYS[name]
        if self.code(name).scaled:
            return replace(spec, dtype=self.code(name).storage_dtype, fill_value=0,
                           description=f"{spec.description}; {self.code(name).kind} codes, "
                                       f"value = code / {self.code(name).top:g} * {name}{SCALE_SUFFIX}")
        return spec

    @property
    def array_names(self) -> tuple[str, ...]:
        """The per-video arrays of a store of this layout: no attention maps for single frames, scales
        only for 8-bit fields."""
        def kept(name: str) -> bool:
            field = name.removesuffix(SCALE_SUFFIX)
            if field == "attention" and self.frames < 2:
                return False
            return not name.endswith(SCALE_SUFFIX) or self.code(field).scaled

        return tuple(name for name in ARRAYS if kept(name))

    @property
    def encoded_fields(self) -> tuple[str, ...]:
        """The fields kept as codes + scales (none in a float16 store)."""
        return tuple(name for name in self.array_names if name + SCALE_SUFFIX in self.array_names)

    def bytes_per_video(self) -> int:
        """Bytes one video occupies on disk (all its chunks, uncompressed)."""
        return sum(
            math.prod(self.row_shape(name)) * np.dtype(self.spec(name).dtype).itemsize for name in self.array_names
        )


@dataclass(frozen=True)
class ArraySpec:
    """How one per-video array is created."""

    dtype: str
    fill_value: float | int  # what zarr returns for an unwritten row: NaN / -1 make it obvious
    dimension_names: tuple[str, ...]
    # True: every write makes the row's file, whatever the values. False (done only): writing
    # the fill value 0 deletes the file, so "done chunk exists" is the same as "done == 1".
    write_empty_chunks: bool
    description: str


ARRAYS = {
    "tokens": ArraySpec(
        dtype="float16",
        fill_value=float("nan"),
        dimension_names=("video", "view", "frame", "layer", "token", "channel"),
        write_empty_chunks=True,
        description="outputs of the feature blocks (provenance feature_blocks), CLS first then patches row-major",
    ),
    "tokens_scale": ArraySpec(
        dtype="float16",
        fill_value=float("nan"),
        dimension_names=("video", "view", "frame", "layer", "token", "channel_block"),
        write_empty_chunks=True,
        description="8-bit stores: each token's largest magnitude per block of provenance scale_block channels",
    ),
    "embeds": ArraySpec(
        dtype="float32",
        fill_value=float("nan"),
        dimension_names=("video", "view", "frame", "embed"),
        write_empty_chunks=True,
        description="projected per-frame image embeddings (ln_post + proj), not L2-normalised",
    ),
    "attention": ArraySpec(
        dtype="float16",
        fill_value=float("nan"),
        dimension_names=("video", "view", "direction", "frame_pair", "layer", "query_patch", "key_patch"),
        write_empty_chunks=True,
        description="head-averaged softmax attention of frame t's patches over frame t-1's (direction 0, "
        "t = 1..T-1) and frame t+1's (direction 1, t = 0..T-2) patches, per feature block",
    ),
    "attention_scale": ArraySpec(
        dtype="float16",
        fill_value=float("nan"),
        dimension_names=("video", "view", "direction", "frame_pair", "layer", "query_patch"),
        write_empty_chunks=True,
        description="8-bit stores: the largest value of each attention map row",
    ),
    "frame_indices": ArraySpec(
        dtype="int32",
        fill_value=-1,
        dimension_names=("video", "view", "frame"),
        write_empty_chunks=True,
        description="indices of the decoded frames in the video",
    ),
    "done": ArraySpec(
        dtype="uint8",
        fill_value=0,
        dimension_names=("video",),
        write_empty_chunks=False,
        description="1 once all of the video's data is written (written last)",
    ),
}


class FeatureStore:
    """A feature store on disk (a local folder) or behind an fsspec URL. Use create() or open()."""

    def __init__(self, path: Path | str, group: zarr.Group, mode: str, fast_read: bool,
                 arrays_location: Path | str | None = None):
        self.path = path  # Path for a local folder, str for a URL
        self.arrays_location = arrays_location if arrays_location is not None else path  # other for a linked store
        self.mode = mode
        self._group = group
        self._fast_read = fast_read
        self._objects = StoreObjects(path)
        self._ranges = objectread.RangeClient(self.arrays_location) if is_remote(self.arrays_location) else None
        attributes = group.attrs.asdict()
        self.provenance: dict = dict(attributes.get("provenance", {}))
        self.schema_version: int = attributes["schema_version"]
        self.clipreel_version: str | None = attributes.get("clipreel_version")
        self._load_arrays()

    def _load_arrays(self) -> None:
        """Read the arrays' metadata from storage: the layout (N from tokens, the dtype from the
        provenance) and the readers."""
        videos, views, frames, layers, tokens, width = self._group["tokens"].shape
        dtype = checked_dtype(self.provenance.get("dtype", DEFAULT_DTYPE), f"{self.path}: provenance dtype")
        self.layout = StoreLayout(videos, views, frames, layers, tokens, width, self._group["embeds"].shape[-1], dtype)
        for name in self.layout.array_names:
            stored, expected = self._group[name].dtype, np.dtype(self.layout.spec(name).dtype)
            if stored != expected or tuple(self._group[name].shape[1:]) != self.layout.row_shape(name):
                raise ClipreelError(
                    f"{self.path}: its provenance says dtype {dtype}, so {name} should be {expected} of "
                    f"{self.layout.row_shape(name)} per video, but the array holds {stored} of "
                    f"{tuple(self._group[name].shape[1:])}. The store is inconsistent: extract it again."
                )
        self._arrays = {
            name: self._group[name].with_config({"write_empty_chunks": ARRAYS[name].write_empty_chunks})
            for name in self.layout.array_names
        }
        # Per array: why its chunk files cannot be read directly (absent when they can), and
        # the files themselves where they can.
        self.direct_read_obstacles = {
            name: obstacle
            for name, array in self._arrays.items()
            if (obstacle := fastread.direct_read_obstacle(array)) is not None
        }
        self._files = {
            name: None if name in self.direct_read_obstacles else self._chunk_files(array)
            for name, array in self._arrays.items()
        }

    def _chunk_files(self, array):
        """The reader of one raw-chunk array: local files, or objects behind the store's URL."""
        if self._ranges is not None:
            return objectread.RowChunkObjects(array, self._ranges)
        return fastread.RowChunkFiles(array)

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layout: StoreLayout,
        provenance: dict,
        manifest: pd.DataFrame,
    ) -> "FeatureStore":
        """Create a new store at `path` (which must not exist, or be an empty folder but for its writer lease)."""
        location = store_location(path)
        if isinstance(location, Path) and location.exists() and any(
            entry.name != LEASE_FOLDER for entry in location.iterdir()
        ):
            raise ClipreelError(
                f"{location} already exists and is not empty: choose a new path, delete it, or add "
                "videos to an existing store with FeatureStore.open(path, 'r+').append(rows)"
            )
        try:
            json.dumps(provenance, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ClipreelError(f"store provenance must be plain JSON (lists, numbers, strings): {exc}") from None
        if provenance.get("dtype", DEFAULT_DTYPE) != layout.dtype:
            raise ValueError(f"provenance dtype {provenance.get('dtype')!r} differs from the layout's {layout.dtype!r}")
        if layout.dtype != DEFAULT_DTYPE:  # readers learn the encoding from the provenance
            provenance = {**provenance, **provenance_entries(layout.dtype, layout.width)}
        manifest = new_manifest(manifest)
        if len(manifest) != layout.videos:
            raise ClipreelError(
                f"{location}: the manifest has {len(manifest)} rows but the layout asks for "
                f"{layout.videos} videos; row i of the store is manifest row i, so they must match"
            )
        try:
            group = zarr.create_group(
                str(location),
                zarr_format=3,
                attributes={
                    "schema_version": FLOAT16_SCHEMA_VERSION if layout.dtype == DEFAULT_DTYPE else SCHEMA_VERSION,
                    "clipreel_version": __version__,
                    "provenance": provenance,
                },
            )
        except zarr.errors.BaseZarrError as exc:  # e.g. a group or array already there (URLs)
            raise ClipreelError(f"cannot create a store at {location}: {exc}. Choose a new path.") from None
        for name in layout.array_names:
            spec = layout.spec(name)
            row_shape = layout.row_shape(name)
            group.create_array(
                name,
                shape=(layout.videos, *row_shape),
                chunks=(1, *row_shape),  # one chunk per video: a writer owns its video's files
                dtype=spec.dtype,
                compressors=None,  # fp16 activations compress by < 10% (docs/store.md, "Arrays")
                filters=None,
                fill_value=spec.fill_value,
                dimension_names=spec.dimension_names,
                attributes={"description": spec.description},
            )
        # The manifest is written last: a store without one is an interrupted create.
        StoreObjects(location).replace(MANIFEST_FILE, manifest_to_parquet(manifest))
        return cls.open(location, mode="r+")

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether `path` holds a store (its root zarr.json, or a link to another store's), complete or not."""
        objects = StoreObjects(store_location(path))
        return objects.exists("zarr.json") or objects.exists(LINK_FILE)

    @staticmethod
    def link(path: Path, arrays: str | os.PathLike, manifest: pd.DataFrame) -> None:
        """Make (or refresh) at the local folder `path` a linked store: `manifest` over the arrays of
        the store at `arrays` (a folder or URL), which must have one row per manifest row."""
        source = FeatureStore.open(arrays)
        if len(manifest) != source.layout.videos:
            raise ClipreelError(
                f"{path}: a linked store's manifest needs one row per row of {arrays} ({source.layout.videos}), "
                f"got {len(manifest)}"
            )
        objects = StoreObjects(path)
        objects.replace(LINK_FILE, json.dumps({"arrays": str(source.path)}).encode())
        objects.replace(MANIFEST_FILE, manifest_to_parquet(new_manifest(manifest)))

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", fast_read: bool = True) -> "FeatureStore":
        """Open an existing store; mode "r" (read only) or "r+" (write videos, manifest, append).

        fast_read=False reads through zarr even where chunk files could be read directly.
        """
        if mode not in ("r", "r+"):
            raise ClipreelError(f"FeatureStore.open: mode {mode!r} must be 'r' or 'r+'")
        location = store_location(path)
        if isinstance(location, Path) and location.exists() and not location.is_dir():
            raise ClipreelError(
                f"{location} is a file, not a feature store: a store is the folder `clipreel extract --out` "
                "writes (a video list goes to `clipreel extract --videos`)."
            )
        if isinstance(location, Path) and not location.is_dir():
            raise ClipreelError(
                f"{location} is not a feature store: no such folder. Create one with `clipreel extract`."
            )
        arrays_location = location
        link = StoreObjects(location).read(LINK_FILE)
        if link is not None:
            if mode != "r":
                raise ClipreelError(f"{location} is a linked store (it reads another store's arrays): open it read-only")
            arrays_location = store_location(json.loads(link)["arrays"])
        try:
            group = zarr.open_group(str(arrays_location), mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.BaseZarrError, KeyError) as exc:
            raise ClipreelError(
                f"{location} is not a clipreel feature store: it holds no Zarr v3 group (zarr.json) ({exc})"
            ) from None
        attributes = group.attrs.asdict()
        if "schema_version" not in attributes:
            raise ClipreelError(
                f"{location} is a Zarr group but not a clipreel feature store: its root has no "
                "'schema_version' attribute. Point to a store written by `clipreel extract`."
            )
        if attributes["schema_version"] not in range(FLOAT16_SCHEMA_VERSION, SCHEMA_VERSION + 1):
            raise ClipreelError(
                f"{location} has store schema_version {attributes['schema_version']!r}; this clipreel "
                f"({__version__}) reads schema_versions {FLOAT16_SCHEMA_VERSION} to {SCHEMA_VERSION}. Use the "
                f"clipreel version that wrote it ({attributes.get('clipreel_version')}) or extract again."
            )
        dtype = checked_dtype(attributes.get("provenance", {}).get("dtype", DEFAULT_DTYPE), f"{location}: provenance dtype")
        frames = group["tokens"].shape[2] if _has_member(group, "tokens") else 2
        required = StoreLayout(0, 1, frames, 1, 2, 1, 1, dtype).array_names  # the arrays of such a store
        missing = [name for name in required if not _has_member(group, name)]
        if not StoreObjects(location).exists(MANIFEST_FILE):
            missing.append(MANIFEST_FILE)
        if missing:
            raise ClipreelError(
                f"{location} is an incomplete clipreel feature store: {', '.join(missing)} missing "
                "(an interrupted create?). Delete it and extract again."
            )
        return cls(location, group, mode, fast_read, arrays_location)

    def __reduce__(self):
        """Pickle as "open the same path again" (e.g. to hand a store to Ray workers), carrying the
        storage options and variables that reach its arrays (StoreAccess), since a worker on another
        node has neither this process's configuration nor its environment."""
        return (_reopen, (StoreAccess.of(self.arrays_location), str(self.path), self.mode, self._fast_read))

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, videos={self.layout.videos}, mode={self.mode!r})"

    # ------------------------------------------------------------------ manifest

    def manifest(self) -> pd.DataFrame:
        """The store's manifest (manifest.parquet inside the store), as storage holds it now."""
        data = self._objects.read(MANIFEST_FILE)
        if data is None:
            raise ClipreelError(f"{self.path}: {MANIFEST_FILE} is missing; the store cannot name its videos")
        return manifest_from_parquet(data, f"{self.path}/{MANIFEST_FILE}")

    def arrays_extent(self) -> dict[str, int]:
        """Rows of each per-video array as storage says now (this object's layout may be older)."""
        return {name: self._group[name].shape[0] for name in self.layout.array_names}

    def write_manifest(self, df: pd.DataFrame) -> None:
        """Save `df` as the manifest, atomically.

        It must keep every video of the manifest in storage at its row (only orphan placeholders may
        take another video) and have exactly one row per row of the arrays in storage. Both are read
        again from storage, so a writer whose view predates another writer's append is refused
        instead of shrinking the manifest. Hold the store's writer lease while writing.
        """
        self._require_writable("write the manifest")
        self._save_checked_manifest(new_manifest(df), self.manifest())

    def update_manifest(self, changes: pd.DataFrame) -> pd.DataFrame:
        """Merge `changes` into the manifest in storage, save it atomically and return it.

        changes: a `video_id` column and any other manifest columns; each video it lists gets those
        values, and every other row stays as storage has it (rows another writer appended included).
        """
        self._require_writable("write the manifest")
        if "video_id" not in changes.columns:
            raise ClipreelError("update_manifest: changes need a video_id column naming the videos they change")
        values = manifest_values(changes.drop(columns="video_id"))
        manifest = self.manifest()
        positions = pd.Index(manifest["video_id"]).get_indexer(changes["video_id"])
        if (positions < 0).any():
            missing = changes["video_id"].to_numpy()[positions < 0][:5].tolist()
            raise ClipreelError(f"{self.path}: update_manifest: videos {missing} are not in the store's manifest")
        for column in values.columns:
            manifest.iloc[positions, manifest.columns.get_loc(column)] = values[column].to_numpy()
        # The rows and their videos are storage's own, so only the row count needs checking.
        self._check_extent(len(manifest))
        self._objects.replace(MANIFEST_FILE, manifest_to_parquet(manifest))
        return manifest

    def append(self, rows: pd.DataFrame) -> None:
        """Add videos: into orphan placeholder rows first, then at the end, growing every array.

        The new rows start not done. The manifest is saved before the arrays grow (metadata only), so
        a crash in between leaves rows that the manifest names and the arrays do not reach yet; the
        next writer grows the arrays (`grow_arrays`), losing nothing. Hold the store's writer lease.
        """
        self._require_writable("append videos")
        stored = self.manifest()
        self._check_extent(len(stored))
        new = new_manifest(rows)
        placeholders = np.flatnonzero(orphan_mask(stored))[: len(new)]
        filled = stored.copy()
        for column in filled.columns:
            filled.iloc[placeholders, filled.columns.get_loc(column)] = new[column].to_numpy()[: len(placeholders)]
        combined = new_manifest(pd.concat([filled, new.iloc[len(placeholders) :]], ignore_index=True))
        self.mark_not_done(placeholders)
        self._objects.replace(MANIFEST_FILE, manifest_to_parquet(combined))
        self.grow_arrays(len(combined))

    def grow_arrays(self, videos: int) -> dict[str, tuple[int, int]]:
        """Resize every per-video array with fewer than `videos` rows in storage to `videos` rows.

        Only metadata changes: the new rows have no chunk files and read as not done. Returns
        {array: (rows before, rows after)} for the arrays that grew.
        """
        self._require_writable("grow the arrays")
        grown = {}
        for name in self.layout.array_names:
            array = self._group[name]  # its metadata as storage has it now
            if array.shape[0] < videos:
                grown[name] = (array.shape[0], videos)
                array.resize((videos, *array.shape[1:]))
        self._load_arrays()
        return grown

    def mark_not_done(self, rows: Sequence[int]) -> None:
        """Clear the done flags of `rows`: they read as not done, and the next extract computes them.

        Their chunk files stay until that rewrite.
        """
        self._require_writable("clear done flags")
        rows = self._checked_rows(rows)
        done = self._arrays["done"]
        for row in rows[self._done_rows_among(rows)]:
            done[int(row)] = 0

    # ------------------------------------------------------------------ writing

    def write_video(
        self,
        row: int,
        tokens: np.ndarray,
        embeds: np.ndarray,
        frame_indices: np.ndarray,
        attention: np.ndarray | None = None,
        *,
        tokens_scale: np.ndarray | None = None,
        attention_scale: np.ndarray | None = None,
    ) -> None:
        """Write one video's data, then its done flag.

        tokens (V, T, K, L, D), embeds (V, T, E) float32, frame_indices (V, T) integers, attention
        (V, 2, T-1, K, P, P) (required when T >= 2, absent when T == 1). A float16 store takes tokens
        and attention as float16. An 8-bit store takes them as float16 or float32 values, which it
        encodes (encoding.encode), or as the codes with their scales (`tokens_scale`,
        `attention_scale`), encoded elsewhere as encoding.encode does (the extraction actors encode
        on their device). Rewriting a done video first clears its flag, so a crash mid-rewrite
        leaves it not done.
        """
        self._require_writable("write videos")
        row = self._checked_rows([row])[0]
        values = {
            "embeds": _checked_values("embeds", embeds, self.layout.row_shape("embeds"), np.float32, row),
            "frame_indices": _checked_indices(frame_indices, self.layout.row_shape("frame_indices"), row),
            **self._checked_field("tokens", tokens, tokens_scale, row),
        }
        if "attention" in self._arrays:
            if attention is None:
                raise ClipreelError(f"write_video row {row}: this store keeps cross-frame attention maps; pass attention")
            values.update(self._checked_field("attention", attention, attention_scale, row))
        elif attention is not None or attention_scale is not None:
            raise ClipreelError(f"write_video row {row}: a single-frame store keeps no attention maps")
        done = self._arrays["done"]
        if self._done_rows_among(np.array([row])).any():
            done[row] = 0
        for name, array_values in values.items():
            self._arrays[name][row] = array_values
        done[row] = 1

    def _checked_field(self, field: str, given, scales, row: int) -> dict[str, np.ndarray]:
        """{array name: what to write} for tokens or attention: float16 values, or 8-bit codes and
        their scales (encoded here from float values, or checked as given)."""
        code, shape = self.layout.code(field), self.layout.row_shape(field)
        if not code.scaled:
            if scales is not None:
                raise ClipreelError(f"write_video row {row}: a float16 store keeps no {field}{SCALE_SUFFIX}")
            return {field: _checked_values(field, given, shape, np.float16, row)}
        given = np.asarray(given)
        if given.shape != shape:
            raise ClipreelError(f"write_video row {row}: {field} has shape {given.shape}, the store expects {shape}")
        if scales is None:
            if given.dtype not in (np.float16, np.float32):
                raise ClipreelError(
                    f"write_video row {row}: {field} is {given.dtype}; this {self.layout.dtype} store encodes float16 "
                    f"or float32 values, or takes {code.storage_dtype} codes with {field}{SCALE_SUFFIX}"
                )
            try:
                codes, scales = encode(field, given, code)
            except ClipreelError as error:
                raise ClipreelError(f"write_video row {row}: {error}") from None
            return {field: codes, field + SCALE_SUFFIX: scales}
        scales = np.asarray(scales)
        expected_scales = scale_shape(field, shape)
        if given.dtype != np.dtype(code.storage_dtype) or scales.dtype != np.float16 or scales.shape != expected_scales:
            raise ClipreelError(
                f"write_video row {row}: {field} codes {given.dtype} {given.shape} with scales {scales.dtype} "
                f"{scales.shape}; this {self.layout.dtype} store keeps {code.storage_dtype} {shape} with float16 "
                f"{expected_scales}"
            )
        problems = code_problems(field, given, scales, code)
        if problems:
            raise ClipreelError(f"write_video row {row}: " + "; ".join(problems))
        return {field: given, field + SCALE_SUFFIX: scales}

    # ------------------------------------------------------------------ reading

    def done_mask(self) -> np.ndarray:
        """(N,) bool: True where the video's done flag is set.

        This is one listing of the done/ chunk folder or prefix (a done chunk exists exactly when
        the flag is 1), not N chunk reads.
        """
        files = self._files["done"] if self._fast_read else None
        if files is None:
            return self._arrays["done"][:] == 1
        rows = files.written_rows()
        mask = np.zeros(self.layout.videos, dtype=bool)
        mask[rows[rows < self.layout.videos]] = True
        return mask

    def read(
        self,
        rows: Sequence[int],
        fields: Sequence[str] = ("tokens", "embeds"),
        layers: Sequence[int] | None = None,
        decode_codes: bool = True,
    ) -> dict[str, np.ndarray]:
        """Read `fields` of the videos `rows`, stacked in the given row order.

        tokens (B, V, T, K', L, D) float16, embeds (B, V, T, E) float32, attention
        (B, V, 2, T-1, K', P, P) float16, frame_indices (B, V, T) int32, whatever the store's dtype:
        8-bit tokens and attention maps are decoded. decode_codes=False returns them as stored
        instead, their codes under the field's name and their scales under `FIELD_scale` (for a
        reader that decodes elsewhere, e.g. on the training device). `layers` keeps those positions
        along the feature-block axis K of tokens and attention (None = all). Every row must be
        done; a not-done row is an error naming it.
        """
        rows = self._checked_rows(rows)
        readable = [field for field in READABLE_FIELDS if field in self._arrays]
        unknown = [field for field in fields if field not in readable]
        if unknown:
            raise ClipreelError(f"FeatureStore.read: unknown fields {unknown}; this store has {readable}")
        keep = self._checked_layers(layers)
        distinct = np.unique(rows)
        not_done = distinct[~self._done_rows_among(distinct)]
        if len(not_done):
            raise ClipreelError(
                f"{self.path}: {self._describe_rows(not_done)} {'is' if len(not_done) == 1 else 'are'} "
                "not done (no done flag yet). Extract them first, or read only rows where "
                "store.done_mask() is True."
            )
        result = {}
        for field in fields:
            names = [field, field + SCALE_SUFFIX] if field in self.layout.encoded_fields else [field]
            stored = {name: self._read_array(name, rows, keep) for name in names}
            if decode_codes and len(names) == 2:
                stored = {field: decode(field, stored[field], stored[field + SCALE_SUFFIX], self.layout.code(field))}
            result.update(stored)
        return result

    def _read_array(self, name: str, rows: np.ndarray, keep: list[int] | None) -> np.ndarray:
        """Rows `rows` of the array `name` as stored, keeping positions `keep` along K (None = all)."""
        axis = LAYER_AXIS.get(name) if keep is not None else None
        files = self._files[name] if self._fast_read else None
        if files is None:
            return self._read_with_zarr(name, rows, axis, keep)
        try:
            return fastread.read_rows(files, rows, axis, keep)
        except fastread.ChunkFileError as error:
            raise ClipreelError(
                f"{self.path}: {self._describe_rows([error.row])} is marked done but its {name} "
                f"{error.problem} ({error.path}). The store is damaged: `clipreel verify --repair "
                f"{self.path}` marks such videos not done, and the same `clipreel extract` command "
                "then computes them again (or run that command with --recheck)."
            ) from None

    def array(self, name: str):
        """The underlying zarr array `name` (for inspection tools; write through write_video)."""
        return self._arrays[name]

    @property
    def uses_direct_read(self) -> bool:
        """True when read() and done_mask() go straight to the chunk files or objects, not through zarr."""
        return self._fast_read and not self.direct_read_obstacles

    def read_path(self) -> str:
        """How read() reaches the data, for `clipreel info` and benchmarks."""
        if not self._fast_read:
            return "zarr (fast_read=False)"
        if self.direct_read_obstacles:
            return "zarr for " + "; ".join(f"{name}: {why}" for name, why in self.direct_read_obstacles.items())
        return self._ranges.describe() if self._ranges is not None else "direct local file reads"

    def chunk_reader(self, name: str):
        """The raw-chunk reader of array `name` (fastread.RowChunkFiles or objectread.RowChunkObjects),
        or None when it is read through zarr."""
        return self._files[name] if self._fast_read else None

    def chunk_file(self, name: str, row: int) -> str | None:
        """The local file holding row `row` of array `name`, or None if it is not a raw local file."""
        files = self._files[name]
        return files.path(row) if isinstance(files, fastread.RowChunkFiles) else None

    def chunk_object_sizes(self, name: str) -> dict[int, int] | None:
        """{row: size} of the chunk objects of array `name` behind a URL (one listing), or None for
        a local store or an array read through zarr."""
        files = self._files[name]
        return files.object_sizes() if isinstance(files, objectread.RowChunkObjects) else None

    # ------------------------------------------------------------------ helpers

    def _save_checked_manifest(self, manifest: pd.DataFrame, stored: pd.DataFrame) -> None:
        """Save `manifest` if it keeps every video of `stored` (storage's manifest) at its row and
        matches the arrays' extent in storage."""
        if len(manifest) < len(stored):
            raise ClipreelError(
                f"{self.path}: the new manifest has {len(manifest)} rows, the manifest in storage {len(stored)}; "
                "a manifest never loses rows (did another process add videos since this one read it?). "
                "Merge changes into the stored manifest with update_manifest()."
            )
        ids, stored_ids = manifest["video_id"].to_numpy(), stored["video_id"].to_numpy()
        moved = np.flatnonzero((ids[: len(stored_ids)] != stored_ids) & ~orphan_mask(stored))
        if len(moved):
            row = int(moved[0])
            raise ClipreelError(
                f"{self.path}: the new manifest puts video {ids[row]!r} at row {row}, where the store holds "
                f"{stored_ids[row]!r}; a row never changes video. Merge changes with update_manifest()."
            )
        self._check_extent(len(manifest))
        self._objects.replace(MANIFEST_FILE, manifest_to_parquet(manifest))

    def _check_extent(self, rows: int) -> None:
        """Raise unless every per-video array in storage has `rows` rows."""
        extent = self.arrays_extent()
        if any(count != rows for count in extent.values()):
            counts = ", ".join(f"{name} {count}" for name, count in extent.items())
            raise ClipreelError(
                f"{self.path}: the manifest has {rows} rows but the arrays in storage hold {counts}; row i of "
                f"every array must be manifest row i. Run `clipreel verify --repair {self.path}` to make "
                "them agree."
            )

    def _read_with_zarr(self, field: str, rows: np.ndarray, axis: int | None, keep) -> np.ndarray:
        """The fallback read: one zarr read per row, on the reader threads (zarr itself is async)."""
        array = self._arrays[field]
        row_shape = list(array.shape[1:])
        if axis is not None:
            row_shape[axis] = len(keep)
        if len(rows) == 0:
            return np.empty((0, *row_shape), dtype=array.dtype)

        def read_one(row: int) -> np.ndarray:
            if axis is None:
                return array[int(row)]
            selection = [int(row)] + [slice(None)] * len(array.shape[1:])
            selection[1 + axis] = list(keep)
            return array.oindex[tuple(selection)]

        return np.stack(fastread.map_threads(read_one, rows))

    def _done_rows_among(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) bool: which of these (valid) rows are done."""
        files = self._files["done"] if self._fast_read else None
        if files is None and len(rows) == 0:
            return np.zeros(0, dtype=bool)
        if files is None:
            return self._arrays["done"].get_orthogonal_selection(rows) == 1
        if isinstance(files, objectread.RowChunkObjects):
            return files.exist(rows)
        return np.array([os.path.exists(files.path(int(row))) for row in rows], dtype=bool)

    def _checked_rows(self, rows) -> np.ndarray:
        rows_array = np.asarray(rows)  # lists, ranges, numpy arrays, pandas indexes
        if rows_array.ndim != 1 or (len(rows_array) and rows_array.dtype.kind not in "iu"):
            raise ClipreelError(f"rows must be a 1-D sequence of integers, got {rows!r:.80}")
        rows_array = rows_array.astype(np.int64)
        bad = rows_array[(rows_array < 0) | (rows_array >= self.layout.videos)]
        if len(bad):
            raise ClipreelError(
                f"{self.path}: rows {bad[:10].tolist()} out of range; the store has {self.layout.videos} "
                "videos (rows 0..N-1; reopen the store if another process appended)"
            )
        return rows_array

    def _checked_layers(self, layers: Sequence[int] | None) -> list[int] | None:
        """Layer positions to keep along K, or None when that is all of them in order."""
        if layers is None:
            return None
        keep = [int(k) for k in layers]
        bad = [k for k in keep if not 0 <= k < self.layout.layers]
        if bad:
            blocks = self.provenance.get("feature_blocks")
            raise ClipreelError(
                f"{self.path}: layers {bad} out of range: the store holds {self.layout.layers} layers "
                f"(positions 0..{self.layout.layers - 1}; feature blocks {blocks})"
            )
        return None if keep == list(range(self.layout.layers)) else keep

    def _describe_rows(self, rows: Sequence[int]) -> str:
        """'row 3 (video_id abc)' or 'rows 3, 5, ... (video_ids ...)', for error messages."""
        ids = self.manifest()["video_id"]
        shown = [f"{int(row)} ({ids.iloc[int(row)]})" if int(row) < len(ids) else str(int(row)) for row in rows[:10]]
        more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
        return ("row " if len(rows) == 1 else "rows ") + ", ".join(shown) + more

    def _require_writable(self, action: str) -> None:
        if self.mode != "r+":
            raise ClipreelError(f"{self.path} is open read-only: open it with mode='r+' to {action}")


# ---------------------------------------------------------------------- module helpers


def _reopen(access: StoreAccess, path: str, mode: str, fast_read: bool) -> FeatureStore:
    """Open a pickled store again in this process, with the access it was pickled with."""
    access.apply()
    return FeatureStore.open(path, mode, fast_read)


def _has_member(group: zarr.Group, name: str) -> bool:
    """Whether the group has a child `name`, asked directly (listing the group would warn that
    manifest.parquet is not a Zarr node)."""
    try:
        group[name]
    except KeyError:
        return False
    return True


def _checked_values(name: str, values, shape: tuple[int, ...], dtype, row: int) -> np.ndarray:
    """A video's float array with the expected shape and dtype, and finite (fp16 overflow shows here)."""
    values = np.asarray(values)
    if values.shape != shape:
        raise ClipreelError(f"write_video row {row}: {name} has shape {values.shape}, the store expects {shape}")
    if values.dtype != dtype:
        raise ClipreelError(
            f"write_video row {row}: {name} is {values.dtype}, the store keeps {np.dtype(dtype)} "
            f"(convert with .astype(np.{np.dtype(dtype).name}))"
        )
    if not np.isfinite(values).all():
        raise ClipreelError(
            f"write_video row {row}: {name} contains NaN or inf (float16 overflow of large activations?)"
        )
    return values


def _checked_indices(values, shape: tuple[int, ...], row: int) -> np.ndarray:
    """Frame indices: any integer dtype, non-negative and within int32, returned as int32."""
    values = np.asarray(values)
    if values.shape != shape:
        raise ClipreelError(f"write_video row {row}: frame_indices has shape {values.shape}, the store expects {shape}")
    if values.dtype.kind not in "iu":
        raise ClipreelError(f"write_video row {row}: frame_indices must be integers, got {values.dtype}")
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
        raise ClipreelError(
            f"write_video row {row}: frame_indices must be in [0, 2**31), got {values.min()}..{values.max()}"
        )
    return values.astype(np.int32)
