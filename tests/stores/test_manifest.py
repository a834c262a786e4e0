"""The Parquet manifest and the label map: round trips, atomic writes, the errors users see."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pandas as pd
import pytest

from clipreel.errors import ClipreelError
from clipreel.stores.manifest import (
    MANIFEST_COLUMNS,
    new_manifest,
    read_label_map,
    read_manifest,
    status_counts,
    write_label_map,
    write_manifest,
)


def _records():
    return [
        {"video_id": "a/one", "path": "/videos/a/one.mp4", "label": 2, "label_name": "jump", "split": "train"},
        {"video_id": "b/two", "path": "/videos/b/two.mp4", "num_frames": 90, "fps": 29.97, "status": "done"},
        {"video_id": "c/three", "path": "/videos/c/three.mp4", "status": "failed", "error": "missing file: x"},
    ]


def test_new_manifest_fills_defaults_and_orders_columns():
    table = new_manifest(_records())
    assert list(table.columns) == list(MANIFEST_COLUMNS)
    second = table.iloc[1]
    assert second["label"] == -1 and second["label_name"] == "" and second["split"] == "all"
    assert table.at[0, "num_frames"] == -1 and math.isnan(table.at[0, "fps"])
    assert table.at[0, "status"] == "pending" and table.at[0, "error"] == ""
    assert table["label"].dtype == "int64" and table["num_frames"].dtype == "int64"
    assert table["fps"].dtype == "float64"
    assert all(pd.api.types.is_string_dtype(table[name]) for name, kind in MANIFEST_COLUMNS.items() if kind == "str")


def test_round_trip_preserves_values_and_dtypes(tmp_path):
    table = new_manifest(_records())
    path = write_manifest(table, tmp_path / "sub" / "manifest.parquet")
    again = read_manifest(path)
    pd.testing.assert_frame_equal(again, table)
    assert list(again.dtypes.astype(str)) == list(table.dtypes.astype(str))


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "manifest.parquet"
    write_manifest(new_manifest(_records()), path)
    updated = read_manifest(path)
    updated.loc[0, "status"] = "done"
    write_manifest(updated, path)  # replaces the existing file
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.parquet"]
    assert read_manifest(path).at[0, "status"] == "done"


_REWRITE_FOREVER = """
import sys
import pandas as pd
from clipreel.stores.manifest import new_manifest, write_manifest
rows = range(int(sys.argv[2]))
table = new_manifest(pd.DataFrame({"video_id": [f"v{i}" for i in rows], "path": [f"/v/{i}.mp4" for i in rows]}))
print("ready", flush=True)
version = 0
while True:  # until killed
    table["num_frames"] = version
    write_manifest(table, sys.argv[1])
    version += 1
"""


def test_killed_writer_never_leaves_a_torn_file(tmp_path):
    """SIGKILL a process that rewrites a big manifest in a loop: the file is always a whole manifest."""
    path = tmp_path / "manifest.parquet"
    rows = 200_000
    command = [sys.executable, "-c", _REWRITE_FOREVER, str(path), str(rows)]
    writer = subprocess.Popen(command, stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.7)  # several writes in, most likely in the middle of one
    finally:
        writer.kill()
        writer.wait()
    table = read_manifest(path)
    assert len(table) == rows
    assert table["num_frames"].nunique() == 1  # one whole version, not a mix
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert all(name.startswith(".manifest.parquet.") and name.endswith(".tmp") for name in leftovers)


def test_duplicate_ids_name_the_id_and_both_rows():
    records = _records() + [{"video_id": "b/two", "path": "/elsewhere/two.mp4"}]
    with pytest.raises(ClipreelError) as error:
        new_manifest(records)
    message = str(error.value)
    assert "'b/two'" in message and "rows 1 and 3" in message


def test_unknown_status_and_missing_path_are_refused():
    with pytest.raises(ClipreelError, match="status 'running'"):
        new_manifest([{"video_id": "a", "path": "/a.mp4", "status": "running"}])
    with pytest.raises(ClipreelError, match="'path'"):
        new_manifest([{"video_id": "a"}])


def test_read_refuses_missing_files_and_other_tables(tmp_path):
    with pytest.raises(ClipreelError, match="does not exist"):
        read_manifest(tmp_path / "nope.parquet")
    other = tmp_path / "other.parquet"
    pd.DataFrame({"video_id": ["a"], "score": [1.0]}).to_parquet(other)
    with pytest.raises(ClipreelError, match="not a clipreel manifest.*path"):
        read_manifest(other)
    wrong_type = tmp_path / "wrong.parquet"
    table = new_manifest(_records())
    table["label"] = table["label"].astype(str)
    table.to_parquet(wrong_type)
    with pytest.raises(ClipreelError, match="'label' holds"):
        read_manifest(wrong_type)
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("path,label\n")
    with pytest.raises(ClipreelError, match="not a Parquet manifest"):
        read_manifest(not_parquet)


def test_status_counts_include_zeros():
    assert status_counts(new_manifest(_records())) == {"pending": 1, "done": 1, "failed": 1}
    assert status_counts(new_manifest(_records()[:1])) == {"pending": 1, "done": 0, "failed": 0}


def test_label_map_round_trip_as_text(tmp_path):
    names = ["red circle moving left", "brush hair", "push-up"]
    path = write_label_map(names, tmp_path / "labels.txt")
    assert path.read_text().splitlines() == names
    assert read_label_map(path) == names


def test_label_map_reads_id_name_csv_in_any_order(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('id,name\n1,brush hair\n0,"massaging person\'s head"\n2,"a, b"\n')
    assert read_label_map(path) == ["massaging person's head", "brush hair", "a, b"]


def test_label_map_errors_name_the_line(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("run\n\njump\n")
    with pytest.raises(ClipreelError, match="line 2 is blank"):
        read_label_map(blank)
    repeated = tmp_path / "repeated.txt"
    repeated.write_text("run\njump\nrun\n")
    with pytest.raises(ClipreelError, match="'run' is given for labels 0 and 2"):
        read_label_map(repeated)
    gap = tmp_path / "gap.csv"
    gap.write_text("id,name\n0,run\n2,jump\n")
    with pytest.raises(ClipreelError, match="no gaps"):
        read_label_map(gap)
    with pytest.raises(ClipreelError, match="does not exist"):
        read_label_map(tmp_path / "none.txt")
