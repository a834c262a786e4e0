"""Manifest writes that cannot shrink the manifest, repair of every inconsistent state, recheck of
damaged videos: real Zarr stores on disk and behind an fsspec URL."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from clipreel.cli import app
from clipreel.errors import ClipreelError
from clipreel.stores.features import FeatureStore, StoreLayout, verify
from clipreel.stores.lease import WriterLease
from clipreel.stores.manifest import manifest_to_parquet, new_manifest, orphan_mask
from clipreel.stores.objects import StoreObjects
from clipreel.stores.repair import (
    complete_append,
    recheck,
    reconcile_statuses,
    repair_store,
    repair_store_at,
)

LAYOUT = StoreLayout(videos=6, views=1, frames=3, layers=2, tokens=5, width=8, embed_dim=4)
NUM_FRAMES = 30


def records(start: int, count: int) -> list[dict]:
    return [{"video_id": f"video{i:03d}", "path": f"/videos/video{i:03d}.mp4", "num_frames": NUM_FRAMES}
            for i in range(start, start + count)]


def write_done(store: FeatureStore, rows) -> None:
    """Write distinct data for each row and mark it done in the manifest too."""
    for row in rows:
        rng = np.random.default_rng(row)
        store.write_video(
            row,
            tokens=rng.standard_normal(LAYOUT.row_shape("tokens")).astype(np.float16),  # (V, T, K, L, D)
            embeds=rng.standard_normal(LAYOUT.row_shape("embeds")).astype(np.float32),  # (V, T, E)
            frame_indices=rng.integers(0, NUM_FRAMES, LAYOUT.row_shape("frame_indices")),  # (V, T)
            attention=rng.random(LAYOUT.row_shape("attention")).astype(np.float16),  # (V, 2, T-1, K, P, P)
        )
    reconcile_statuses(store)


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "feats.zarr"
    write_done(FeatureStore.create(path, LAYOUT, {"frames": 3}, new_manifest(records(0, 6))), [0, 1, 2])
    return path


def test_a_writer_with_a_stale_view_cannot_shrink_the_manifest_and_its_merge_keeps_appended_rows(store_path):
    first = FeatureStore.open(store_path, mode="r+")  # its layout says 6 videos
    stale = first.manifest()
    second = FeatureStore.open(store_path, mode="r+")
    second.append(new_manifest(records(6, 3)))
    write_done(second, [6, 7])

    stale.loc[3, "status"] = "failed"
    stale.loc[3, "error"] = "ValueError: not a video"
    with pytest.raises(ClipreelError, match="has 6 rows, the manifest in storage 9; a manifest never loses rows"):
        first.write_manifest(stale)
    with pytest.raises(ClipreelError, match="puts video 'video001' at row 0"):
        first.write_manifest(second.manifest().iloc[[1, 0, 2, 3, 4, 5, 6, 7, 8]])

    merged = first.update_manifest(stale.iloc[[3]][["video_id", "status", "error"]])

    reopened = FeatureStore.open(store_path)
    assert merged.equals(reopened.manifest())
    assert reopened.manifest()["video_id"].tolist() == [f"video{i:03d}" for i in range(9)]
    assert reopened.manifest()["status"].tolist() == ["done"] * 3 + ["failed", "pending", "pending", "done", "done", "pending"]
    assert reopened.arrays_extent() == {name: 9 for name in LAYOUT.array_names}
    assert verify(reopened) == []


def test_repair_restores_the_rows_a_manifest_lost_and_extracting_again_fills_them(store_path):
    # The state a stale writer left before manifest writes were merged: rows 6-8 appended and
    # two of them computed, then the manifest overwritten with the 6 rows that writer knew.
    store = FeatureStore.open(store_path, mode="r+")
    six_rows = store.manifest()
    store.append(new_manifest(records(6, 3)))
    write_done(store, [6, 7])
    StoreObjects(store_path).replace("manifest.parquet", manifest_to_parquet(six_rows))

    store = FeatureStore.open(store_path, mode="r+")
    assert "manifest has 6 rows but the arrays hold 9 videos" in verify(store)[0]
    with pytest.raises(ClipreelError, match="verify --repair"):
        complete_append(store)
    with pytest.raises(ClipreelError, match="verify --repair"):
        store.update_manifest(six_rows.iloc[[0]][["video_id", "status"]])

    result = CliRunner().invoke(app, ["verify", str(store_path), "--repair"])

    assert result.exit_code == 0, result.output
    assert "rows 6..8: restored in the manifest as orphan placeholders" in result.output
    store = FeatureStore.open(store_path, mode="r+")
    manifest = store.manifest()
    assert len(manifest) == 9 and orphan_mask(manifest).tolist() == [False] * 6 + [True] * 3
    assert (manifest["status"].iloc[6:] == "pending").all()
    assert store.done_mask().tolist() == [True] * 3 + [False] * 6  # the orphans' data belongs to no known video
    assert verify(store) == []

    store.append(new_manifest(records(6, 4)))  # the three lost videos, and one new

    assert store.manifest()["video_id"].tolist() == [f"video{i:03d}" for i in range(10)]
    assert store.arrays_extent() == {name: 10 for name in LAYOUT.array_names}
    assert not orphan_mask(store.manifest()).any()
    write_done(store, range(3, 10))
    assert verify(store) == [] and store.done_mask().all()


def test_an_append_interrupted_before_the_arrays_grew_is_completed_without_loss(store_path):
    # append() saves the manifest first; a crash then leaves the arrays short (here: tokens grown, the rest not).
    store = FeatureStore.open(store_path, mode="r+")
    longer = new_manifest([*store.manifest().to_dict("records"), *records(6, 2)])
    StoreObjects(store_path).replace("manifest.parquet", manifest_to_parquet(longer))
    tokens = zarr.open_array(str(store_path / "tokens"), mode="r+")
    tokens.resize((8, *tokens.shape[1:]))

    store = FeatureStore.open(store_path, mode="r+")
    problems = verify(store)
    assert any("the arrays disagree on the number of videos: tokens 8, embeds 6" in line for line in problems)

    grown = complete_append(store)

    assert grown == {name: (6, 8) for name in LAYOUT.array_names if name != "tokens"}
    assert store.layout.videos == 8 and store.arrays_extent() == {name: 8 for name in LAYOUT.array_names}
    assert store.manifest()["video_id"].tolist() == [f"video{i:03d}" for i in range(8)]
    assert store.done_mask().tolist() == [True] * 3 + [False] * 5
    assert verify(store) == []


def test_recheck_clears_the_done_flag_of_exactly_the_damaged_videos(store_path):
    store = FeatureStore.open(store_path, mode="r+")
    write_done(store, [3, 4])
    os.remove(store.chunk_file("tokens", 1))  # deleted
    with open(store.chunk_file("embeds", 2), "r+b") as chunk:  # truncated
        chunk.truncate(10)
    tokens = zarr.open_array(str(store_path / "tokens"), mode="r+")
    damaged = tokens[4]
    damaged[0, 1, 1, 2, 3] = np.inf
    tokens[4] = damaged  # a non-finite value
    untouched = {row: os.stat(store.chunk_file("tokens", row)).st_mtime_ns for row in (0, 3)}

    rejected = recheck(store)

    assert sorted(rejected) == [1, 2, 4]
    assert "tokens chunk file missing" in rejected[1][0]
    assert "embeds chunk file has 10 bytes" in rejected[2][0]
    assert "tokens has 1 non-finite values" in rejected[4][0]
    assert store.done_mask().tolist() == [True, False, False, True, False, False]
    manifest, changed = reconcile_statuses(store)
    assert changed == 3 and manifest["status"].tolist()[:5] == ["done", "pending", "pending", "done", "pending"]
    assert verify(store) == []
    assert {row: os.stat(store.chunk_file("tokens", row)).st_mtime_ns for row in (0, 3)} == untouched


def test_repair_retries_silent_failures_and_is_refused_while_another_writer_holds_the_lease(store_path):
    store = FeatureStore.open(store_path, mode="r+")
    manifest = store.manifest()
    manifest.loc[4, "status"] = "failed"  # no error message: nothing says why
    manifest.loc[1, "status"] = "pending"  # though its flag is set
    store.write_manifest(manifest)
    assert len(verify(store)) == 2

    with WriterLease.acquire(store_path, "another writer"), pytest.raises(ClipreelError, match="has another writer"):
        repair_store_at(store_path)
    report, remaining = repair_store_at(store_path)

    assert report.actions == ["2 manifest statuses set from the done flags"] and remaining == []
    assert FeatureStore.open(store_path).manifest()["status"].tolist() == ["done"] * 3 + ["pending"] * 3


def test_merge_and_repair_work_the_same_behind_an_fsspec_url():
    url = f"memory://clipreel-test-{uuid.uuid4().hex}/feats.zarr"
    try:
        store = FeatureStore.create(url, LAYOUT, {"frames": 3}, new_manifest(records(0, 6)))
        write_done(store, [0, 5])
        stale = FeatureStore.open(url, mode="r+")
        store.append(new_manifest(records(6, 2)))
        with pytest.raises(ClipreelError, match="never loses rows"):
            stale.write_manifest(stale.manifest().iloc[:6])
        stale.update_manifest(new_manifest(records(2, 1)).assign(status="failed", error="bad")[["video_id", "status", "error"]])
        assert FeatureStore.open(url).manifest()["status"].tolist()[:3] == ["done", "pending", "failed"]

        zarr.open_array(url + "/embeds", mode="r+").resize((9, *LAYOUT.row_shape("embeds")))
        report = repair_store(FeatureStore.open(url, mode="r+"))
        assert report.orphaned_rows == [8]
        repaired = FeatureStore.open(url)
        assert repaired.arrays_extent() == {name: 9 for name in LAYOUT.array_names}
        assert len(repaired.manifest()) == 9 and verify(repaired) == []
    finally:
        import fsspec

        fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)
