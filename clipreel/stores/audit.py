"""Looking at a feature store from outside: compare provenances, summarise, verify.

These back `clipreel info`, `clipreel verify`, the "same settings?" check before videos are
added to an existing store, and the refusal of a store with nothing extracted to train or score
(`require_done_videos`). They are importable from clipreel.stores.features as well.
`rejected_videos` is verify's verdict on each done video, which repair.py acts on.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from clipreel.errors import ClipreelError
from clipreel.stores.encoding import DEFAULT_DTYPE, SCALE_SUFFIX, code_problems
from clipreel.stores.lease import lease_status
from clipreel.stores.manifest import orphan_mask
from clipreel.stores.objects import StoreObjects

EXTRACT_LOG_FOLDER = "extract_log"  # written by clipreel extract: who stored which rows, per run

if TYPE_CHECKING:
    from clipreel.stores.features import FeatureStore

# The provenance settings that decide what the stored numbers mean: videos extracted with a
# different value of any of these cannot share a store.
APPEND_KEYS = (
    "model",
    "pretrained",
    "checkpoint_sha256",
    "image_size",
    "mean",
    "std",
    "frames",
    "views",
    "crops",
    "sampling",
    "preprocess",  # also interpolation, which changes the pixels the model sees
    "feature_blocks",
    "dtype",  # float16, int8 or float8: how tokens and attention maps are kept
)
# What a store that does not record a key has: stores written before 8-bit storage are float16.
RECORD_DEFAULTS = {"dtype": DEFAULT_DTYPE}

_ABSENT = object()
# The sampling policies that use the frame stride (`pipeline.data.sampling`: dense clips take T frames
# `stride` apart; tsn and uniform spread them over the whole video and never read it).
STRIDED_POLICIES = ("dense",)


def provenance_diff(old: dict, new: dict, keys: Sequence[str] = APPEND_KEYS) -> list[str]:
    """One human-readable line per setting in `keys` that differs between `old` (the store) and
    `new` (this run), e.g. "frames: store has 8, this run asks for 16". Dict settings (sampling)
    are compared entry by entry ("sampling.stride: ..."), the stride only where a sampling uses it.
    Tuples and lists compare equal."""
    lines: list[str] = []
    for key in keys:
        default = RECORD_DEFAULTS.get(key, _ABSENT)
        old_value, new_value = _plain(old.get(key, default)), _plain(new.get(key, default))
        if key == "sampling" and not (_uses_stride(old_value) or _uses_stride(new_value)):
            old_value, new_value = _without_stride(old_value), _without_stride(new_value)
        _compare(key, old_value, new_value, lines)
    return lines


def _uses_stride(sampling) -> bool:
    return isinstance(sampling, dict) and sampling.get("policy") in STRIDED_POLICIES


def _without_stride(sampling):
    if not isinstance(sampling, dict):
        return sampling
    return {name: value for name, value in sampling.items() if name != "stride"}


def _compare(name: str, old, new, lines: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [key for key in new if key not in old]:
            _compare(f"{name}.{key}", old.get(key, _ABSENT), new.get(key, _ABSENT), lines)
    elif old is _ABSENT and new is not _ABSENT:
        lines.append(f"{name}: store does not record it, this run asks for {new!r}")
    elif new is _ABSENT and old is not _ABSENT:
        lines.append(f"{name}: store has {old!r}, this run does not set it")
    elif old != new:
        lines.append(f"{name}: store has {old!r}, this run asks for {new!r}")


def _plain(value):
    """The value as it reads back from JSON (tuples -> lists, numpy scalars -> numbers)."""
    if value is _ABSENT:
        return value
    return json.loads(json.dumps(value, default=lambda item: item.tolist() if hasattr(item, "tolist") else str(item)))


def summarize(store: "FeatureStore") -> dict:
    """Facts about a store: videos by status, layout, array shapes, bytes, provenance, writer lease.

    done comes from the done flags (the truth after a crash); failed are the not-done rows the
    manifest marks failed; every other row is pending (orphan placeholders included, also counted
    apart). writer_lease is the newest lease record with its state, or None.
    """
    manifest = store.manifest()
    videos = store.layout.videos
    done = store.done_mask()
    statuses = manifest["status"].to_numpy()[:videos]
    failed = int(((statuses == "failed") & ~done[: len(statuses)]).sum())
    arrays = {}
    for name in store.layout.array_names:
        array = store.array(name)
        arrays[name] = {"shape": list(array.shape), "chunks": list(array.chunks), "dtype": str(array.dtype)}
    return {
        "path": str(store.path),
        "schema_version": store.schema_version,
        "clipreel_version": store.clipreel_version,
        "videos": videos,
        "done": int(done.sum()),
        "failed": failed,
        "pending": videos - int(done.sum()) - failed,
        "manifest_rows": len(manifest),
        "orphaned": int(orphan_mask(manifest).sum()),
        "writer_lease": lease_status(store.path),
        "dtype": store.layout.dtype,
        "layout": asdict(store.layout),
        "arrays": arrays,
        "bytes_on_disk": _bytes_on_disk(store.path),
        "bytes_per_video": store.layout.bytes_per_video(),
        "extract_runs": _extract_runs(store.path),
        "provenance": store.provenance,
    }


def require_done_videos(store: "FeatureStore") -> None:
    """Refuse a store that holds no extracted video at all, saying how its videos stand."""
    done = store.done_mask()
    if done.any():
        return
    manifest = store.manifest()
    failed = int((manifest["status"].to_numpy()[: len(done)] == "failed").sum())
    raise ClipreelError(
        f"{store.path}: nothing is extracted in this store: none of its {len(done)} videos is done "
        f"({failed} failed, {len(done) - failed} pending). Run `clipreel extract` with the same settings to "
        "compute the pending ones; the failed ones' errors are in its manifest (`clipreel info` counts them)."
    )


def _extract_runs(location: Path | str) -> list[dict]:
    """Per extract run recorded in the store's extract_log/: its record name and, per writer node,
    the host, processes and number of videos it stored."""
    objects = StoreObjects(location)
    runs = []
    for name in objects.list(EXTRACT_LOG_FOLDER):
        data = objects.read(f"{EXTRACT_LOG_FOLDER}/{name}")
        try:
            writers = json.loads(data)["writers"] if data is not None else {}
        except (ValueError, KeyError, TypeError):
            continue  # a record damaged by hand says nothing
        runs.append({"record": name, "writers": {node: {"host": writer["host"], "pids": writer["pids"],
                                                        "videos": len(writer["rows"])}
                                                 for node, writer in writers.items()}})
    return runs


def _bytes_on_disk(location: Path | str) -> int:
    """Total size of the files under the store (any fsspec URL works too)."""
    if isinstance(location, Path):
        total = 0
        for folder, _, names in os.walk(location):
            total += sum(os.lstat(os.path.join(folder, name)).st_size for name in names)
        return total
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(location)
    return int(filesystem.du(path, total=True))


def verify(store: "FeatureStore", check_values: bool = True) -> list[str]:
    """Problems found in the store, one line each naming the row and video_id; [] when sound.

    Checks: every array and the manifest have the same number of rows; provenance
    frames/views/feature_blocks agree with the shapes; manifest status agrees with the done flags;
    failed rows carry an error message; and `rejected_videos`: every done video has all its chunk
    files at the right size and (check_values) finite tokens, embeds and attention maps (8-bit
    stores: finite, positive scales and no float8 NaN codes), and frame indices in [0, num_frames).
    """
    layout = store.layout
    manifest = store.manifest()
    problems = extent_problems(store, len(manifest))
    problems += _layout_problems(store)
    done = store.done_mask()
    rows = min(len(manifest), layout.videos)
    manifest = manifest.iloc[:rows]
    ids = manifest["video_id"].astype(str).tolist() + ["<no manifest row>"] * (layout.videos - rows)
    status = manifest["status"].to_numpy()
    errors = manifest["error"].fillna("").astype(str).str.strip().to_numpy()
    for row in np.flatnonzero((status == "done") & ~done[:rows]):
        problems.append(f"row {row} ({ids[row]}): manifest status is 'done' but its done flag is not set")
    for row in np.flatnonzero((status != "done") & done[:rows]):
        problems.append(f"row {row} ({ids[row]}): done flag is set but manifest status is {status[row]!r}")
    for row in np.flatnonzero((status == "failed") & (errors == "")):
        problems.append(f"row {row} ({ids[row]}): status 'failed' without an error message")
    for row, row_problems in rejected_videos(store, check_values).items():
        problems += [f"row {row} ({ids[row]}): {problem}" for problem in row_problems]
    return problems


def extent_problems(store: "FeatureStore", manifest_rows: int) -> list[str]:
    """The arrays in storage disagreeing with each other or with the manifest's row count."""
    extent = store.arrays_extent()
    counts = set(extent.values())
    held = f"{counts.pop()} videos" if len(counts) == 1 else ", ".join(f"{name} {n}" for name, n in extent.items())
    problems = []
    if len(set(extent.values())) > 1:
        problems.append(f"the arrays disagree on the number of videos: {held} (an interrupted append?)")
    if any(count != manifest_rows for count in extent.values()):
        problems.append(
            f"manifest has {manifest_rows} rows but the arrays hold {held} (row i of every array is manifest row i)"
        )
    return problems


def rejected_videos(store: "FeatureStore", check_values: bool = True) -> dict[int, list[str]]:
    """{row: what is wrong} for every done video whose data verify rejects (see `verify`)."""
    manifest = store.manifest()
    num_frames = pd.to_numeric(manifest["num_frames"], errors="coerce").to_numpy()
    data_arrays = [name for name in store.layout.array_names if name != "done"]
    # Behind a URL: every chunk object's size from one listing per array (None for local files).
    object_sizes = {name: store.chunk_object_sizes(name) for name in data_arrays}
    rejected = {}
    for row in np.flatnonzero(store.done_mask()):
        known_frames = num_frames[row] if row < len(manifest) else np.nan
        problems = _video_problems(store, int(row), known_frames, check_values, object_sizes)
        if problems:
            rejected[int(row)] = problems
    return rejected


def _layout_problems(store: "FeatureStore") -> list[str]:
    """Provenance settings that contradict the array shapes."""
    layout, provenance = store.layout, store.provenance
    expected = {"frames": layout.frames, "views": layout.views}
    problems = [
        f"provenance {key} is {provenance[key]} but the arrays hold {value}"
        for key, value in expected.items()
        if key in provenance and provenance[key] != value
    ]
    if "feature_blocks" in provenance and len(provenance["feature_blocks"]) != layout.layers:
        problems.append(
            f"provenance feature_blocks {provenance['feature_blocks']} has {len(provenance['feature_blocks'])} "
            f"entries but the tokens hold {layout.layers} layers"
        )
    return problems


def _video_problems(
    store: "FeatureStore", row: int, num_frames: float, check_values: bool, object_sizes: dict[str, dict | None]
) -> list[str]:
    """What is wrong with one done video's data (object_sizes: see rejected_videos)."""
    problems = []
    data_arrays = [name for name in store.layout.array_names if name != "done"]
    for name in data_arrays:
        expected = int(np.prod(store.array(name).shape[1:])) * store.array(name).dtype.itemsize
        sizes = object_sizes[name]
        if sizes is not None:
            if row not in sizes:
                problems.append(f"{name} chunk object missing ({store.path}/{name})")
            elif sizes[row] != expected:
                problems.append(f"{name} chunk object has {sizes[row]} bytes, expected {expected} ({store.path}/{name})")
            continue
        path = store.chunk_file(name, row)
        if path is None:  # read through zarr: the value checks below still see missing data
            continue
        if not os.path.exists(path):
            problems.append(f"{name} chunk file missing ({path})")
        elif os.path.getsize(path) != expected:
            problems.append(f"{name} chunk file has {os.path.getsize(path)} bytes, expected {expected} ({path})")
    if problems or not check_values:
        return problems
    fields = [name for name in data_arrays if not name.endswith(SCALE_SUFFIX)]
    try:
        values = store.read([row], fields=fields, decode_codes=False)  # codes and scales as stored
    except ClipreelError as error:
        return [str(error)]
    except Exception as error:  # e.g. a truncated chunk read through zarr from an fsspec URL
        return [f"unreadable: {type(error).__name__}: {error}"]
    for field in fields:
        code = store.layout.code(field)
        if code.scaled:
            problems += code_problems(field, values[field], values[field + SCALE_SUFFIX], code)
            continue
        bad = int((~np.isfinite(values[field])).sum())
        if bad:
            problems.append(f"{field} has {bad} non-finite values (NaN/inf; or a missing chunk read as NaN)")
    indices = values["frame_indices"][0]  # (V, T)
    if indices.min() < 0:
        problems.append(f"frame_indices has negative values (min {indices.min()}; -1 = never written)")
    if np.isfinite(num_frames) and num_frames > 0 and indices.max() >= num_frames:
        problems.append(f"frame_indices up to {indices.max()} but the video has {int(num_frames)} frames")
    return problems
