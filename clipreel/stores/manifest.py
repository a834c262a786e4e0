"""The manifest: one row per video, the single source of row order (row i of the feature store is row i here).

In memory it is a pandas DataFrame with exactly the columns of `MANIFEST_COLUMNS`, in that order; on
disk it is a zstd-compressed Parquet file, replaced atomically so that a crash never leaves a torn file.
A feature store's manifest may hold orphan placeholders: rows whose video is unknown, restored by
`clipreel verify --repair` for store rows that the manifest had lost (`orphan_records`, `orphan_mask`).
A label map is a small text file that fixes the order of class names (line i = label i).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clipreel.errors import ClipreelError
from clipreel.stores.location import is_remote, store_location
from clipreel.stores.objects import StoreObjects

# column name -> pandas dtype ("str" is pandas' string dtype), in manifest order
MANIFEST_COLUMNS: dict[str, str] = {
    "video_id": "str",  # unique name of the video (its path relative to the list's root, without extension)
    "path": "str",  # absolute path of the video file
    "label": "int64",  # class id, -1 = unknown
    "label_name": "str",  # class name, "" if unknown
    "split": "str",  # train / val / test / ..., "all" by default
    "num_frames": "int64",  # -1 until the video is probed
    "fps": "float64",  # NaN until the video is probed
    "status": "str",  # one of STATUSES
    "error": "str",  # why the video failed, "" otherwise
    "start": "float64",  # seconds: frames are sampled from here on (NaN: from the first frame)
    "end": "float64",  # seconds: ... up to here (NaN: to the last frame)
}
# Columns a manifest written before they existed lacks; they read back as their default.
OPTIONAL_COLUMNS = ("start", "end")
# Columns whose NaN is a real value ("unknown", "the whole video"), not "not given".
NAN_VALUED = ("fps", "start", "end")
STATUSES = ("pending", "done", "failed")

# value used for a column that a record leaves out (video_id and path have no default: they are required)
_DEFAULTS = {
    "label": -1,
    "label_name": "",
    "split": "all",
    "num_frames": -1,
    "fps": np.nan,
    "status": "pending",
    "error": "",
    "start": np.nan,
    "end": np.nan,
}
_REQUIRED = ("video_id", "path")
ORPHAN_MARK = "<orphaned row "  # video_id and path of a placeholder row: "<orphaned row 37>"


def new_manifest(records: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Build a manifest from records: fill defaults, enforce dtypes and column order, check ids.

    Columns other than `MANIFEST_COLUMNS` are dropped. Raises `ClipreelError` when `video_id` or
    `path` is missing, a status is unknown, or a `video_id` appears twice (naming both rows, 0-based).
    """
    table = pd.DataFrame(records).reset_index(drop=True)
    if table.empty and len(table.columns) == 0:  # no records at all: an empty manifest
        table = pd.DataFrame(columns=list(MANIFEST_COLUMNS))
    for name in _REQUIRED:
        if name not in table.columns:
            raise ClipreelError(f"manifest records have no {name!r} column; every video needs a video_id and a path")
        empty = table[name].isna() | (table[name].astype(str) == "")
        if empty.any():
            row = int(np.flatnonzero(empty)[0])
            raise ClipreelError(f"manifest row {row} has an empty {name!r}; every video needs a video_id and a path")
    for name, default in _DEFAULTS.items():
        if name not in table.columns:
            table[name] = default
        elif name not in NAN_VALUED:  # NaN is a real value of these; elsewhere it means "not given"
            table[name] = table[name].where(table[name].notna(), default)
    try:
        table = table[list(MANIFEST_COLUMNS)].astype(MANIFEST_COLUMNS)
    except (ValueError, TypeError) as exc:
        raise ClipreelError(f"manifest records have a value of the wrong type: {exc}") from exc

    unknown = ~table["status"].isin(STATUSES)
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise ClipreelError(
            f"manifest row {row} has status {table.at[row, 'status']!r}; it must be one of {', '.join(STATUSES)}"
        )
    _check_unique_ids(table)
    return table


def _check_unique_ids(table: pd.DataFrame) -> None:
    """Raise naming the first duplicated video_id and the two rows that hold it."""
    repeated = table["video_id"].duplicated(keep=False)
    if not repeated.any():
        return
    first_id = table["video_id"][repeated].iloc[0]
    rows = np.flatnonzero(table["video_id"] == first_id)[:2]
    raise ClipreelError(
        f"video_id {first_id!r} appears twice in the manifest (rows {rows[0]} and {rows[1]}, 0-based); "
        "every video must appear once: remove one of the two"
    )


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path | str:
    """Write the manifest to `path` (Parquet, zstd) atomically (StoreObjects.replace: a fsynced
    temporary file and os.replace on a local disk, one whole-object write behind a URL)."""
    data = manifest_to_parquet(new_manifest(df))
    location = store_location(path)
    folder, name = location.rsplit("/", 1) if is_remote(location) else (location.parent, location.name)
    StoreObjects(folder).replace(name, data)
    return location


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by `write_manifest` (a file or a URL), checking that it has the
    manifest's columns and dtypes."""
    location = store_location(path)
    if is_remote(location):
        folder, name = location.rsplit("/", 1)
        data = StoreObjects(folder).read(name)
        if data is None:
            raise ClipreelError(f"manifest {location} does not exist; write one with `clipreel manifest VIDEOS {location}`")
        return manifest_from_parquet(data, location)
    path = location
    if not path.is_file():
        raise ClipreelError(f"manifest {path} does not exist; write one with `clipreel manifest VIDEOS {path}`")
    return manifest_from_parquet(path.read_bytes(), str(path))


def manifest_to_parquet(manifest: pd.DataFrame) -> bytes:
    """A manifest (as `new_manifest` returns it) as the bytes of a zstd-compressed Parquet file."""
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False), buffer, compression="zstd")
    return buffer.getvalue().to_pybytes()


def manifest_values(changes: pd.DataFrame) -> pd.DataFrame:
    """Some manifest columns (any of `MANIFEST_COLUMNS`) cast to their dtypes, statuses checked:
    new values for rows of a manifest, without rebuilding all of it."""
    unknown = [name for name in changes.columns if name not in MANIFEST_COLUMNS]
    if unknown:
        raise ClipreelError(f"manifest values: unknown column(s) {unknown}; the manifest has {list(MANIFEST_COLUMNS)}")
    try:
        values = changes.astype({name: MANIFEST_COLUMNS[name] for name in changes.columns}).reset_index(drop=True)
    except (ValueError, TypeError) as exc:
        raise ClipreelError(f"manifest values of the wrong type: {exc}") from exc
    if "status" in values.columns and not values["status"].isin(STATUSES).all():
        bad = values["status"][~values["status"].isin(STATUSES)].iloc[0]
        raise ClipreelError(f"manifest status {bad!r}; it must be one of {', '.join(STATUSES)}")
    return values


def manifest_from_parquet(data: bytes, where: str) -> pd.DataFrame:
    """A manifest from Parquet bytes (read from `where`, named in errors), columns and dtypes checked."""
    try:
        table = pq.read_table(pa.BufferReader(data)).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise ClipreelError(f"{where} is not a Parquet manifest ({exc}); write one with `clipreel manifest`") from exc
    for name in OPTIONAL_COLUMNS:
        if name not in table.columns:
            table[name] = _DEFAULTS[name]
    missing = [name for name in MANIFEST_COLUMNS if name not in table.columns]
    if missing:
        raise ClipreelError(
            f"{where} is not a clipreel manifest: it lacks the column(s) {', '.join(missing)}; "
            "write one with `clipreel manifest`"
        )
    for name, dtype in MANIFEST_COLUMNS.items():
        if not _has_kind(table[name], dtype):
            raise ClipreelError(
                f"{where}: manifest column {name!r} holds {table[name].dtype}, expected {dtype}; "
                "rewrite it with `clipreel manifest`"
            )
    return new_manifest(table)


def orphan_records(rows: range) -> list[dict]:
    """Placeholder manifest rows for store rows whose video is unknown (the manifest had lost them).

    A placeholder is pending; its video_id and path are both "<orphaned row N>". Adding videos to the
    store fills placeholders before it grows the arrays.
    """
    return [{"video_id": f"{ORPHAN_MARK}{row}>", "path": f"{ORPHAN_MARK}{row}>"} for row in rows]


def orphan_mask(df: pd.DataFrame) -> np.ndarray:
    """(len(df),) bool: which rows are orphan placeholders."""
    ids = df["video_id"].astype(str)
    return (ids.str.startswith(ORPHAN_MARK) & (ids == df["path"].astype(str))).to_numpy(dtype=bool)


def _has_kind(column: pd.Series, dtype: str) -> bool:
    """True when `column` can be stored as `dtype` without changing what its values mean."""
    if dtype == "str":
        return pd.api.types.is_string_dtype(column) or column.isna().all()
    if dtype == "int64":
        return pd.api.types.is_integer_dtype(column)
    return pd.api.types.is_float_dtype(column) or pd.api.types.is_integer_dtype(column)


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    """How many videos are in each status, e.g. {'pending': 3, 'done': 10, 'failed': 1} (zeros included)."""
    counts = df["status"].value_counts()
    return {status: int(counts.get(status, 0)) for status in STATUSES}


def write_label_map(names: list[str], path: str | Path) -> Path:
    """Write class names one per line (line i = label i)."""
    path = Path(path)
    for index, name in enumerate(names):
        if not name.strip() or "\n" in name or name != name.strip():
            raise ClipreelError(f"class name {name!r} (label {index}) must be non-empty, one line, no outer spaces")
    _check_unique_names(names, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    return path


def read_label_map(path: str | Path) -> list[str]:
    """Read class names in label order from a text file (one per line) or an `id,name` CSV with that header."""
    path = Path(path)
    if not path.is_file():
        raise ClipreelError(f"label map {path} does not exist; give a text file with one class name per line")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ClipreelError(f"label map {path} is empty; give one class name per line")
    if lines[0].replace(" ", "").lower() == "id,name":
        names = _names_from_id_csv(lines, path)
    else:
        names = [line.strip() for line in lines]
        for number, name in enumerate(names, start=1):
            if not name:
                raise ClipreelError(
                    f"label map {path}, line {number} is blank; line i must hold the name of label i-1: "
                    "remove the blank line or name the class"
                )
    _check_unique_names(names, str(path))
    return names


def _names_from_id_csv(lines: list[str], path: Path) -> list[str]:
    """Class names from an `id,name` CSV: ids must be 0..N-1, each once, in any order."""
    by_id: dict[int, str] = {}
    reader = csv.reader(lines[1:])
    for row in reader:
        number = reader.line_num + 1  # +1 for the header line
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip().lstrip("-").isdigit():
            raise ClipreelError(f"label map {path}, line {number}: expected 'id,name' with an integer id, got {row}")
        label, name = int(row[0]), row[1].strip()
        if label in by_id:
            raise ClipreelError(f"label map {path}, line {number}: id {label} is given twice; give each id once")
        by_id[label] = name
    expected = list(range(len(by_id)))
    if sorted(by_id) != expected:
        raise ClipreelError(
            f"label map {path}: ids must be 0..{len(by_id) - 1} with no gaps, got {sorted(by_id)[:10]}...; "
            "renumber the ids from 0"
        )
    return [by_id[label] for label in expected]


def _check_unique_names(names: list[str], where: str) -> None:
    """Raise when a class name appears twice (two labels could not be told apart by name)."""
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            raise ClipreelError(
                f"label map {where}: class name {name!r} is given for labels {seen[name]} and {index}; "
                "class names must be unique"
            )
        seen[name] = index


def classnames_from_manifest(manifest: pd.DataFrame, where: str) -> list[str]:
    """Class names by label id from the manifest's label/label_name columns."""
    labelled = manifest[manifest["label"] >= 0]
    if labelled.empty:
        raise ClipreelError(f"{where}: the manifest has no labelled video; extract from a labelled list.")
    names_by_label = labelled.groupby("label")["label_name"].unique()
    conflicting = {int(label): list(names) for label, names in names_by_label.items() if len(names) > 1}
    if conflicting:
        raise ClipreelError(
            f"{where}: labels with several names in the manifest: {conflicting}. Give a label map with --classes."
        )
    count = int(labelled["label"].max()) + 1
    names = {int(label): str(names[0]) for label, names in names_by_label.items()}
    unnamed = [label for label in range(count) if not names.get(label)]
    if unnamed:
        raise ClipreelError(
            f"{where}: labels {unnamed[:10]} have no name in the manifest (no video, or an empty label_name). "
            "Give the label map with --classes (one class name per line)."
        )
    return [names[label] for label in range(count)]
