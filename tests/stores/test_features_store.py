"""The Zarr v3 feature store: real stores on disk (tmp_path), small shapes."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr

from clipreel.errors import ClipreelError
from clipreel.stores import fastread
from clipreel.stores.features import (
    FeatureStore,
    StoreLayout,
    provenance_diff,
    summarize,
    verify,
)
from clipreel.stores.manifest import new_manifest

LAYOUT = StoreLayout(videos=6, views=2, frames=3, layers=4, tokens=5, width=8, embed_dim=6)
NUM_FRAMES = 40  # every test video "has" this many frames
PROVENANCE = {
    "model": "clipreel-tiny",
    "pretrained": "none",
    "checkpoint_sha256": None,
    "image_size": 112,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "frames": 3,
    "views": 2,
    "crops": 1,
    "sampling": {"policy": "tsn", "frames": 3, "stride": 16, "views": 2, "seed": 0},
    "feature_blocks": [2, 3, 4, 5],
}


def make_manifest(videos: int, start: int = 0):
    return new_manifest(
        [{"video_id": f"video{i:03d}", "path": f"/videos/video{i:03d}.mp4", "label": i % 3, "num_frames": NUM_FRAMES}
         for i in range(start, start + videos)]
    )


def make_store(path: Path | str, layout: StoreLayout = LAYOUT) -> FeatureStore:
    return FeatureStore.create(path, layout, PROVENANCE, make_manifest(layout.videos))


def video_data(layout: StoreLayout, row: int) -> dict[str, np.ndarray]:
    """Distinct, reproducible data for each row (so a row read back can only match its own)."""
    rng = np.random.default_rng(1000 + row)
    data = {
        "tokens": rng.standard_normal(layout.row_shape("tokens")).astype(np.float16),  # (V, T, K, L, D)
        "embeds": rng.standard_normal(layout.row_shape("embeds")).astype(np.float32),  # (V, T, E)
        "frame_indices": rng.integers(0, NUM_FRAMES, layout.row_shape("frame_indices")),  # (V, T) int64
    }
    if layout.frames >= 2:  # (V, 2, T-1, K, P, P)
        data["attention"] = rng.random(layout.row_shape("attention")).astype(np.float16)
    return data


def write_rows(store: FeatureStore, rows) -> None:
    for row in rows:
        store.write_video(row, **video_data(store.layout, row))


def chunk_files(store_path: Path, array: str) -> list[Path]:
    return sorted(path for path in (store_path / array).rglob("*") if path.is_file() and path.name != "zarr.json")


def set_status(store: FeatureStore, rows, status: str, error: str = "") -> None:
    manifest = store.manifest()
    manifest.loc[list(rows), "status"] = status
    manifest.loc[list(rows), "error"] = error
    store.write_manifest(manifest)


# ---------------------------------------------------------------------- create / open


def test_create_then_open_round_trips_layout_provenance_and_manifest(tmp_path):
    path = tmp_path / "feats.zarr"
    manifest = make_manifest(LAYOUT.videos)
    FeatureStore.create(path, LAYOUT, PROVENANCE, manifest)

    store = FeatureStore.open(path)
    assert store.layout == LAYOUT
    assert store.provenance == PROVENANCE
    assert store.schema_version == 1
    assert store.manifest().equals(manifest)
    assert store.uses_direct_read, store.direct_read_obstacles
    assert store.array("tokens").shape == (6, 2, 3, 4, 5, 8)
    assert store.array("tokens").chunks == (1, 2, 3, 4, 5, 8)
    assert store.array("attention").shape == (6, 2, 2, 2, 4, 4, 4)  # (N, V, 2, T-1, K, P, P)


def test_attention_maps_round_trip_with_a_layer_subset_and_are_required(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    data = video_data(store.layout, 2)
    with pytest.raises(ClipreelError, match="pass attention"):
        store.write_video(2, **{name: values for name, values in data.items() if name != "attention"})
    store.write_video(2, **data)
    read = store.read([2], fields=("attention",), layers=[1, 3])["attention"]
    np.testing.assert_array_equal(read[0], data["attention"][:, :, :, [1, 3]])


def test_a_single_frame_store_has_no_attention_maps(tmp_path):
    layout = replace(LAYOUT, frames=1)
    store = make_store(tmp_path / "s.zarr", layout)
    assert "attention" not in store.layout.array_names
    write_rows(store, [0])
    assert set(store.read([0], fields=("tokens", "embeds"))) == {"tokens", "embeds"}
    with pytest.raises(ClipreelError, match="no attention"):
        store.write_video(1, **video_data(layout, 1), attention=np.zeros((2, 2, 1, 4, 4, 4), np.float16))
    with pytest.raises(ClipreelError, match="unknown fields"):
        store.read([0], fields=("attention",))


def test_create_refuses_an_existing_non_empty_path_and_a_short_manifest(tmp_path):
    path = tmp_path / "feats.zarr"
    path.mkdir()
    (path / "something").write_text("x")
    with pytest.raises(ClipreelError, match="not empty"):
        make_store(path)
    with pytest.raises(ClipreelError, match="manifest has 5 rows"):
        FeatureStore.create(tmp_path / "other.zarr", LAYOUT, PROVENANCE, make_manifest(5))


def test_open_of_a_non_store_names_the_path_and_what_is_missing(tmp_path):
    with pytest.raises(ClipreelError, match="no such folder") as missing:
        FeatureStore.open(tmp_path / "nope.zarr")
    assert "nope.zarr" in str(missing.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipreelError, match="no Zarr v3 group"):
        FeatureStore.open(tmp_path / "empty")

    zarr.create_group(str(tmp_path / "plain.zarr"), zarr_format=3)
    with pytest.raises(ClipreelError, match="schema_version"):
        FeatureStore.open(tmp_path / "plain.zarr")

    zarr.create_group(str(tmp_path / "future.zarr"), zarr_format=3, attributes={"schema_version": 99})
    with pytest.raises(ClipreelError, match="schema_version 99"):
        FeatureStore.open(tmp_path / "future.zarr")

    store_path = tmp_path / "feats.zarr"
    make_store(store_path)
    (store_path / "manifest.parquet").unlink()
    with pytest.raises(ClipreelError, match="manifest.parquet missing"):
        FeatureStore.open(store_path)


# ---------------------------------------------------------------------- write / read


def test_read_returns_what_was_written_in_the_given_row_order(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    write_rows(store, [0, 2, 3, 5])
    rows = [5, 0, 3, 5, 2]  # arbitrary order, one row twice

    got = store.read(rows, fields=("tokens", "embeds", "attention", "frame_indices"))

    assert got["tokens"].dtype == np.float16 and got["tokens"].shape == (5, 2, 3, 4, 5, 8)
    assert got["embeds"].dtype == np.float32 and got["frame_indices"].dtype == np.int32
    for position, row in enumerate(rows):
        expected = video_data(LAYOUT, row)
        for field in ("tokens", "embeds", "attention", "frame_indices"):
            np.testing.assert_array_equal(got[field][position], expected[field])
    assert set(store.read(rows).keys()) == {"tokens", "embeds"}


def test_read_with_a_layer_subset_keeps_those_positions_in_order(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    write_rows(store, [1, 4])

    got = store.read(range(1, 5, 3), fields=("tokens",), layers=[3, 0, 1])["tokens"]

    assert got.shape == (2, 2, 3, 3, 5, 8)
    for position, row in enumerate([1, 4]):
        np.testing.assert_array_equal(got[position], video_data(LAYOUT, row)["tokens"][:, :, [3, 0, 1]])
    with pytest.raises(ClipreelError, match="layers \\[4\\] out of range"):
        store.read([1], layers=[4])


def test_direct_file_reads_equal_reads_through_zarr(tmp_path):
    path = tmp_path / "s.zarr"
    write_rows(make_store(path), [0, 1, 3, 4])
    fast = FeatureStore.open(path)
    through_zarr = FeatureStore.open(path, fast_read=False)
    assert fast.uses_direct_read and not through_zarr.uses_direct_read

    for layers in (None, [2], [1, 3]):
        a = fast.read([4, 0, 3], fields=("tokens", "embeds", "attention", "frame_indices"), layers=layers)
        b = through_zarr.read([4, 0, 3], fields=("tokens", "embeds", "attention", "frame_indices"), layers=layers)
        for field in a:
            np.testing.assert_array_equal(a[field], b[field])
    np.testing.assert_array_equal(fast.done_mask(), through_zarr.done_mask())


def test_rows_of_a_megabyte_are_read_on_threads_and_a_missing_file_names_its_row(tmp_path):
    layout = StoreLayout(videos=5, views=1, frames=4, layers=3, tokens=50, width=1024, embed_dim=8)
    assert np.prod(layout.row_shape("tokens")) * 2 >= fastread.THREADED_ROW_BYTES  # the threaded path
    path = tmp_path / "s.zarr"
    store = make_store(path, layout)
    write_rows(store, [0, 2, 3, 4])

    got = store.read([4, 0, 3], fields=("tokens",), layers=[2, 1])["tokens"]
    expected = FeatureStore.open(path, fast_read=False).read([4, 0, 3], fields=("tokens",), layers=[2, 1])["tokens"]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got[1], video_data(layout, 0)["tokens"][:, :, [2, 1]])

    os.remove(store.chunk_file("tokens", 3))
    with pytest.raises(ClipreelError, match=r"row 3 \(video003\) is marked done but its tokens chunk file missing"):
        store.read([4, 0, 3, 2])


def test_an_fsspec_url_store_reads_its_chunk_objects_with_ranged_reads():
    url = f"memory://clipreel-test-{uuid.uuid4().hex}/feats.zarr"
    try:
        store = make_store(url)
        assert store.uses_direct_read and store.read_path() == "fsspec cat_ranges (obstore does not serve memory://)"
        write_rows(store, [2, 3])
        reopened = FeatureStore.open(url)
        got = reopened.read([3, 2], fields=("tokens", "frame_indices"), layers=[1])
        through_zarr = FeatureStore.open(url, fast_read=False).read([3, 2], fields=("tokens", "frame_indices"), layers=[1])
        for field in ("tokens", "frame_indices"):
            np.testing.assert_array_equal(got[field], through_zarr[field])
        np.testing.assert_array_equal(got["tokens"][0], video_data(LAYOUT, 3)["tokens"][:, :, [1]])
        np.testing.assert_array_equal(got["frame_indices"][1], video_data(LAYOUT, 2)["frame_indices"])
        assert reopened.done_mask().tolist() == [False, False, True, True, False, False]
        assert reopened.manifest()["video_id"].tolist() == make_manifest(LAYOUT.videos)["video_id"].tolist()
    finally:
        import fsspec

        fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def test_done_flag_appears_only_after_write_and_reading_a_not_done_row_names_it(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    assert not store.done_mask().any()
    with pytest.raises(ClipreelError, match=r"row 2 \(video002\) is not done"):
        store.read([2])

    write_rows(store, [2])

    assert store.done_mask().tolist() == [False, False, True, False, False, False]
    with pytest.raises(ClipreelError, match=r"row 1 \(video001\)"):
        store.read([2, 1])


def test_write_video_validates_shapes_and_dtypes(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    good = video_data(LAYOUT, 0)
    with pytest.raises(ClipreelError, match="tokens is float32"):
        store.write_video(0, **{**good, "tokens": good["tokens"].astype(np.float32)})
    with pytest.raises(ClipreelError, match="embeds has shape"):
        store.write_video(0, **{**good, "embeds": good["embeds"][:, :2]})
    with pytest.raises(ClipreelError, match="NaN or inf"):
        store.write_video(0, **{**good, "tokens": np.full_like(good["tokens"], np.inf)})
    with pytest.raises(ClipreelError, match="frame_indices must be in"):
        store.write_video(0, **{**good, "frame_indices": -good["frame_indices"] - 1})
    with pytest.raises(ClipreelError, match="out of range"):
        store.write_video(6, **good)
    with pytest.raises(ClipreelError, match="read-only"):
        FeatureStore.open(tmp_path / "s.zarr").write_video(0, **good)
    assert not store.done_mask().any()


def test_rewriting_a_done_video_replaces_its_data(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    write_rows(store, [1])
    replacement = video_data(LAYOUT, 5)
    store.write_video(1, **replacement)
    np.testing.assert_array_equal(store.read([1])["tokens"][0], replacement["tokens"])
    assert store.done_mask().sum() == 1


def test_unwritten_rows_create_no_chunk_files(tmp_path):
    path = tmp_path / "s.zarr"
    store = make_store(path)
    assert all(chunk_files(path, name) == [] for name in ("tokens", "embeds", "frame_indices", "done"))

    write_rows(store, [3])
    store.append(make_manifest(2, start=LAYOUT.videos))

    for name in ("tokens", "embeds", "frame_indices", "done"):
        files = chunk_files(path, name)
        assert len(files) == 1, (name, files)
        assert files[0] == Path(store.chunk_file(name, 3))


def _write_rows_in_child(path: str, rows: list[int]) -> None:
    store = FeatureStore.open(path, mode="r+")
    for _ in range(3):  # rewrite a few times to widen the window in which the writers overlap
        write_rows(store, rows)


def test_two_processes_writing_different_rows_lose_nothing(tmp_path):
    layout = StoreLayout(videos=8, views=2, frames=4, layers=4, tokens=50, width=64, embed_dim=16)
    path = tmp_path / "s.zarr"
    make_store(path, layout)
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_write_rows_in_child, args=(str(path), rows)) for rows in ([0, 2, 4, 6], [1, 3, 5, 7])
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0

    store = FeatureStore.open(path)
    assert store.done_mask().all()
    got = store.read(range(8), fields=("tokens", "embeds", "attention", "frame_indices"))
    for row in range(8):
        for field, expected in video_data(layout, row).items():
            np.testing.assert_array_equal(got[field][row], expected)


def test_append_grows_every_array_and_keeps_old_data(tmp_path):
    path = tmp_path / "s.zarr"
    store = make_store(path)
    write_rows(store, [0, 5])

    store.append(make_manifest(3, start=LAYOUT.videos))

    for reopened in (store, FeatureStore.open(path)):
        assert reopened.layout.videos == 9
        assert reopened.array("embeds").shape == (9, 2, 3, 6)
        assert reopened.array("done").shape == (9,)
        manifest = reopened.manifest()
        assert manifest["video_id"].tolist()[-3:] == ["video006", "video007", "video008"]
        assert (manifest["status"].iloc[6:] == "pending").all()
        assert reopened.done_mask().tolist() == [True, False, False, False, False, True, False, False, False]
        np.testing.assert_array_equal(reopened.read([5])["tokens"][0], video_data(LAYOUT, 5)["tokens"])
    write_rows(store, [8])
    np.testing.assert_array_equal(store.read([8])["embeds"][0], video_data(LAYOUT, 8)["embeds"])
    with pytest.raises(ClipreelError, match="appears twice"):
        store.append(make_manifest(1, start=2))


def test_pickled_store_reopens_the_same_path(tmp_path):
    import pickle

    store = make_store(tmp_path / "s.zarr")
    write_rows(store, [4])
    copy = pickle.loads(pickle.dumps(store))
    assert copy.path == store.path and copy.mode == "r+"
    np.testing.assert_array_equal(copy.read([4])["embeds"], store.read([4])["embeds"])


# ---------------------------------------------------------------------- provenance / summarize / verify


def test_provenance_diff_names_each_differing_setting():
    assert provenance_diff(PROVENANCE, {**PROVENANCE, "mean": tuple(PROVENANCE["mean"])}) == []
    dense = {**PROVENANCE, "sampling": {**PROVENANCE["sampling"], "policy": "dense"}}
    new = {**dense, "frames": 16, "sampling": {**dense["sampling"], "stride": 4}}
    del new["crops"]
    lines = provenance_diff(dense, new)
    assert "frames: store has 3, this run asks for 16" in lines
    assert "sampling.stride: store has 16, this run asks for 4" in lines
    assert "crops: store has 1, this run does not set it" in lines
    assert len(lines) == 3
    assert provenance_diff(PROVENANCE, {**PROVENANCE, "model": "ViT-B-16"}, keys=("frames",)) == []


def test_provenance_diff_compares_the_stride_only_for_samplings_that_use_it():
    """TSN (and uniform) sampling spread the frames over the whole video and never read the stride."""
    other_stride = {**PROVENANCE, "sampling": {**PROVENANCE["sampling"], "stride": 4}}
    assert provenance_diff(PROVENANCE, other_stride) == []
    dense = {**other_stride, "sampling": {**other_stride["sampling"], "policy": "dense"}}
    assert provenance_diff(PROVENANCE, dense) == [
        "sampling.policy: store has 'tsn', this run asks for 'dense'",
        "sampling.stride: store has 16, this run asks for 4",
    ]


def good_store(path: Path) -> FeatureStore:
    """Rows 0-2 done, row 3 failed with a message, rows 4-5 pending; manifest agrees."""
    store = make_store(path)
    write_rows(store, [0, 1, 2])
    set_status(store, [0, 1, 2], "done")
    set_status(store, [3], "failed", "ValueError: not a video")
    return store


def test_verify_passes_on_a_good_store(tmp_path):
    assert verify(good_store(tmp_path / "s.zarr")) == []


def test_verify_catches_a_deleted_chunk_file_of_a_done_row(tmp_path):
    store = good_store(tmp_path / "s.zarr")
    os.remove(store.chunk_file("tokens", 1))
    problems = verify(store)
    assert len(problems) == 1
    assert "row 1 (video001)" in problems[0] and "tokens chunk file missing" in problems[0]
    with pytest.raises(ClipreelError, match=r"row 1 \(video001\) is marked done but its tokens chunk file missing"):
        store.read([0, 1])


def test_verify_catches_non_finite_values_in_a_done_row(tmp_path):
    path = tmp_path / "s.zarr"
    store = good_store(path)
    tokens = zarr.open_array(str(path / "tokens"), mode="r+")
    damaged = tokens[2]
    damaged[1, 2, 3, 4, 5] = np.nan
    tokens[2] = damaged
    problems = verify(store)
    assert len(problems) == 1
    assert "row 2 (video002)" in problems[0] and "tokens has 1 non-finite" in problems[0]


def test_verify_catches_frame_indices_out_of_range(tmp_path):
    store = good_store(tmp_path / "s.zarr")
    data = video_data(LAYOUT, 0)
    data["frame_indices"][1, 2] = NUM_FRAMES  # one past the last frame
    store.write_video(0, **data)
    problems = verify(store)
    assert len(problems) == 1
    assert "row 0 (video000)" in problems[0] and f"has {NUM_FRAMES} frames" in problems[0]


def test_verify_catches_manifest_and_done_flags_disagreeing(tmp_path):
    store = good_store(tmp_path / "s.zarr")
    set_status(store, [4], "done")  # says done, no flag
    write_rows(store, [5])  # flag set, manifest still pending
    set_status(store, [2], "failed", "")  # failed without a message (and it has a done flag)
    problems = verify(store)
    assert any("row 4 (video004)" in line and "done flag is not set" in line for line in problems)
    assert any("row 5 (video005)" in line and "manifest status is 'pending'" in line for line in problems)
    assert any("row 2 (video002)" in line and "without an error message" in line for line in problems)
    assert any("row 2 (video002)" in line and "manifest status is 'failed'" in line for line in problems)
    assert len(problems) == 4


def test_verify_catches_a_manifest_with_the_wrong_row_count(tmp_path):
    path = tmp_path / "s.zarr"
    store = good_store(path)
    from clipreel.stores.manifest import write_manifest

    write_manifest(store.manifest().iloc[:5], path / "manifest.parquet")
    problems = verify(store)
    assert any("manifest has 5 rows but the arrays hold 6 videos" in line for line in problems)


def test_summarize_counts_videos_and_bytes(tmp_path):
    path = tmp_path / "s.zarr"
    store = good_store(path)
    set_status(store, [1], "failed", "stale status")  # the done flag wins over the manifest

    facts = summarize(store)

    assert (facts["videos"], facts["done"], facts["failed"], facts["pending"]) == (6, 3, 1, 2)
    assert facts["layout"]["frames"] == 3 and facts["arrays"]["tokens"]["shape"] == [6, 2, 3, 4, 5, 8]
    assert facts["provenance"] == PROVENANCE
    arrays = ("tokens", "embeds", "attention", "frame_indices", "done")
    one_video = sum(os.path.getsize(store.chunk_file(name, 0)) for name in arrays)
    assert facts["bytes_per_video"] == one_video
    assert facts["bytes_on_disk"] == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------- the direct reader itself


def test_direct_reader_follows_the_chunk_key_encoding_and_refuses_encoded_chunks(tmp_path):
    group = zarr.create_group(str(tmp_path / "g.zarr"), zarr_format=3)
    values = np.arange(4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5)
    dotted = group.create_array(
        "dotted", shape=values.shape, chunks=(1, 3, 5), dtype="float32", compressors=None,
        chunk_key_encoding={"name": "default", "separator": "."},
    )
    dotted[...] = values
    assert fastread.direct_read_obstacle(dotted) is None
    files = fastread.RowChunkFiles(dotted)
    assert files.path(2).endswith(os.path.join("dotted", "c.2.0.0"))
    np.testing.assert_array_equal(fastread.read_rows(files, [3, 1], axis=1, keep=[4, 0]), values[[3, 1]][:, :, [4, 0]])

    flags = group.create_array("flags", shape=(5,), chunks=(1,), dtype="uint8", chunk_key_encoding={"name": "v2"})
    flags[1] = 1
    flags[4] = 1
    assert sorted(fastread.RowChunkFiles(flags).written_rows()) == [1, 4]

    compressed = group.create_array("zstd", shape=values.shape, chunks=(1, 3, 5), dtype="float32")  # default: zstd
    assert "codecs" in fastread.direct_read_obstacle(compressed)
    two_rows = group.create_array("two", shape=values.shape, chunks=(2, 3, 5), dtype="float32", compressors=None)
    assert "not one row" in fastread.direct_read_obstacle(two_rows)


def test_selection_segments_match_numpy_indexing():
    row_shape, keep = (2, 3, 4, 5), [3, 1, 2]
    row = np.arange(np.prod(row_shape), dtype=np.int16).reshape(row_shape)
    source, expected = row.tobytes(), row[:, :, keep].tobytes()
    out = bytearray(len(expected))
    for file_offset, out_offset, nbytes in fastread.selection_segments(row_shape, 2, 2, keep):
        out[out_offset : out_offset + nbytes] = source[file_offset : file_offset + nbytes]
    assert bytes(out) == expected
    assert fastread.selection_segments(row_shape, 2, 2, [0, 1, 2, 3]) == [(0, 0, row.nbytes)]
