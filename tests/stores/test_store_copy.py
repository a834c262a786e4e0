"""`clipreel copy`: a store copied local -> S3 (moto's server on 127.0.0.1) -> local, interrupted and
resumed, updated after the source changed, and refused where a copy would be wrong."""

from __future__ import annotations

import time

import fsspec
import numpy as np
import pytest
from typer.testing import CliRunner

from clipreel.cli import app
from clipreel.errors import ClipreelError
from clipreel.stores.copy import MODIFIED_SLACK_SECONDS, copy_store
from clipreel.stores.features import FeatureStore, StoreLayout
from clipreel.stores.lease import WriterLease
from clipreel.stores.manifest import new_manifest

LAYOUT = StoreLayout(videos=5, views=1, frames=2, layers=2, tokens=5, width=8, embed_dim=4)


def make_source(path, done_rows=(0, 1, 3, 4)) -> FeatureStore:
    manifest = new_manifest([{"video_id": f"video{i}", "path": f"/v/video{i}.mp4", "num_frames": 20}
                             for i in range(LAYOUT.videos)])
    store = FeatureStore.create(path, LAYOUT, {"model": "copy-test", "frames": 2, "views": 1}, manifest)
    for row in done_rows:
        write_video(store, row)
    manifest = store.manifest()
    manifest.loc[list(done_rows), "status"] = "done"
    store.write_manifest(manifest)
    return store


def write_video(store: FeatureStore, row: int, seed: int = 0) -> None:
    rng = np.random.default_rng([row, seed])
    store.write_video(
        row,
        tokens=rng.standard_normal(LAYOUT.row_shape("tokens")).astype(np.float16),
        embeds=rng.standard_normal(LAYOUT.row_shape("embeds")).astype(np.float32),
        frame_indices=rng.integers(0, 20, LAYOUT.row_shape("frame_indices")),
        attention=rng.random(LAYOUT.row_shape("attention")).astype(np.float16),
    )


def assert_same_store(copy_location, source: FeatureStore) -> None:
    copied = FeatureStore.open(copy_location)
    assert copied.done_mask().tolist() == source.done_mask().tolist()
    assert copied.manifest().equals(source.manifest())
    rows = np.flatnonzero(source.done_mask())
    fields = ("tokens", "embeds", "attention", "frame_indices")
    for field, values in source.read(rows, fields=fields).items():
        np.testing.assert_array_equal(copied.read(rows, fields=fields)[field], values)


def test_copy_local_to_s3_and_back_through_the_cli_then_again_copies_only_metadata(tmp_path, s3_endpoint):
    pytest.importorskip("obstore", reason="obstore is not installed (the test and s3 extras have it)")
    source = make_source(tmp_path / "source.zarr")
    remote = f"{s3_endpoint}/copy.zarr"
    runner = CliRunner()
    result = runner.invoke(app, ["copy", str(tmp_path / "source.zarr"), remote, "--no-progress", "--check-values"])
    assert result.exit_code == 0, result.output
    assert "the copy has every object of the source and verifies" in result.output
    assert_same_store(remote, source)
    assert FeatureStore.open(remote).read_path() == "obstore ranged GETs"

    back = tmp_path / "back.zarr"
    result = runner.invoke(app, ["copy", remote, str(back), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert_same_store(back, source)

    again = copy_store(remote, back)  # only the metadata (5 arrays, the root) and the manifest again
    assert again.copied == 7 and again.skipped == again.objects - 7 and again.problems == []


def test_an_interrupted_copy_is_no_store_until_resumed_and_the_resume_copies_only_the_rest(tmp_path, s3_endpoint):
    source = make_source(tmp_path / "source.zarr")
    remote = f"{s3_endpoint}/copy.zarr"

    class Interrupted(Exception):
        pass

    def interrupt_after_six(done: int, total: int, copied_bytes: int) -> None:
        if done == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        copy_store(source.path, remote, progress=interrupt_after_six)
    assert not FeatureStore.exists(remote)  # the root zarr.json is copied last

    resumed = copy_store(source.path, remote)
    assert resumed.skipped >= 6 and resumed.copied == resumed.objects - resumed.skipped
    assert resumed.problems == []
    assert_same_store(remote, source)


def test_a_second_copy_brings_the_source_changes_and_drops_flags_the_source_cleared(tmp_path, s3_endpoint):
    source = make_source(tmp_path / "source.zarr")
    remote = f"{s3_endpoint}/copy.zarr"
    assert copy_store(source.path, remote).problems == []
    time.sleep(MODIFIED_SLACK_SECONDS + 0.5)  # changes closer to the copy than the slack are not seen

    writable = FeatureStore.open(source.path, mode="r+")
    writable.mark_not_done([1])
    write_video(writable, 2, seed=7)  # video 2 done now
    writable.mark_not_done([3])
    write_video(writable, 3, seed=9)  # video 3 computed again: same sizes, new values
    manifest = writable.manifest()
    manifest.loc[1, "status"], manifest.loc[2, "status"] = "pending", "done"
    writable.write_manifest(manifest)

    update = copy_store(source.path, remote)
    assert update.problems == []
    assert "done/c/1" in update.deleted
    assert_same_store(remote, FeatureStore.open(source.path))


def test_copy_refuses_a_source_being_written_and_a_destination_holding_another_store(tmp_path, s3_endpoint):
    source = make_source(tmp_path / "source.zarr")
    with WriterLease.acquire(source.path, "clipreel extract"):
        with pytest.raises(ClipreelError, match="is being written: its writer lease is held by clipreel extract"):
            copy_store(source.path, f"{s3_endpoint}/copy.zarr")

    other = tmp_path / "other.zarr"
    FeatureStore.create(other, LAYOUT, {"model": "another", "frames": 2, "views": 1},
                        new_manifest([{"video_id": f"x{i}", "path": f"/x{i}.mp4"} for i in range(LAYOUT.videos)]))
    with pytest.raises(ClipreelError, match="holds another store .*model: store has 'another'"):
        copy_store(source.path, other)
    filesystem, root = fsspec.core.url_to_fs(str(other))
    assert not filesystem.exists(f"{root}/done/c/0")  # nothing was written into it
