"""A feature store on object storage: a real S3 endpoint (moto's server on 127.0.0.1) reached
through s3fs and obstore as a user reaches AWS; storage options from --storage-option items."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import fsspec
import numpy as np
import pytest

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.cache_loader import CacheLoader
from clipreel.stores.features import FeatureStore, StoreLayout, verify
from clipreel.stores.location import StoreAccess, parse_storage_options, store_location, use_storage_options
from clipreel.stores.manifest import new_manifest
from clipreel.stores.repair import repair_store

LAYOUT = StoreLayout(videos=6, views=2, frames=3, layers=4, tokens=5, width=8, embed_dim=6)


def make_store(location, layout: StoreLayout = LAYOUT) -> FeatureStore:
    manifest = new_manifest([{"video_id": f"video{i}", "path": f"/v/video{i}.mp4", "label": i % 2, "num_frames": 40}
                             for i in range(layout.videos)])
    return FeatureStore.create(location, layout, {"frames": layout.frames, "views": layout.views}, manifest)


def video_data(layout: StoreLayout, row: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(500 + row)
    return {
        "tokens": rng.standard_normal(layout.row_shape("tokens")).astype(np.float16),  # (V, T, K, L, D)
        "embeds": rng.standard_normal(layout.row_shape("embeds")).astype(np.float32),  # (V, T, E)
        "frame_indices": rng.integers(0, 40, layout.row_shape("frame_indices")),  # (V, T)
        "attention": rng.random(layout.row_shape("attention")).astype(np.float16),  # (V, 2, T-1, K, P, P)
    }


def test_storage_options_parse_values_as_json_and_dotted_keys_as_nested_options():
    options = parse_storage_options(
        ["endpoint_url=http://127.0.0.1:9000", "anon=true", "default_block_size=1048576",
         "client_kwargs.region_name=eu-west-1", "client_kwargs.verify=false"]
    )
    assert options == {"endpoint_url": "http://127.0.0.1:9000", "anon": True, "default_block_size": 1048576,
                       "client_kwargs": {"region_name": "eu-west-1", "verify": False}}
    for bad in ("endpoint_url", "=x", "a..b=1"):
        with pytest.raises(ClipreelError, match="write key=value"):
            parse_storage_options([bad])
    with pytest.raises(ClipreelError, match="is a local path"):
        use_storage_options(store_location("feats.zarr"), {"anon": True})
    assert store_location("file:///data/f.zarr") == store_location("/data/f.zarr")
    assert "do-not-print" not in repr(StoreAccess("s3://b/f.zarr", {"secret": "do-not-print"}, {"AWS_X": "do-not-print"}))


@pytest.mark.parametrize("client", ["obstore", "fsspec"])
def test_an_s3_store_reads_rows_and_views_with_ranged_gets_equal_to_zarrs_own_path(s3_endpoint, client):
    if client == "obstore":
        pytest.importorskip("obstore", reason="obstore is not installed (the test and s3 extras have it)")
    url = f"{s3_endpoint}/feats.zarr"
    store = make_store(url)
    for row in (0, 2, 3, 5):
        store.write_video(row, **video_data(LAYOUT, row))
    if client == "fsspec":  # an option obstore has no equivalent for keeps the store on fsspec
        use_storage_options(store_location(url), {"config_kwargs": {"connect_timeout": 30}})
    reopened = FeatureStore.open(url)
    assert reopened.read_path() == ("obstore ranged GETs" if client == "obstore" else
                                    "fsspec cat_ranges (storage options ['config_kwargs'] have no obstore equivalent here)")
    assert reopened.done_mask().tolist() == [True, False, True, True, False, True]

    fields = ("tokens", "attention", "embeds", "frame_indices")
    got = reopened.read([5, 0, 3], fields=fields, layers=[3, 1])
    through_zarr = FeatureStore.open(url, fast_read=False).read([5, 0, 3], fields=fields, layers=[3, 1])
    for field in fields:
        np.testing.assert_array_equal(got[field], through_zarr[field])
    np.testing.assert_array_equal(got["tokens"][0], video_data(LAYOUT, 5)["tokens"][:, :, [3, 1]])
    with pytest.raises(ClipreelError, match=r"row 4 \(video4\) is not done"):
        reopened.read([0, 4])

    # One view per video (views="random"): only that view's byte ranges are fetched.
    loader = CacheLoader(reopened, [0, 2, 3, 5], [0, 0, 1, 1], fields=("tokens", "attention"), layers="last",
                         batch_size=4, shuffle=True, seed=3, views="random")
    (positions, views), = loader.epoch_plan(0)
    batch = next(iter(loader.epoch(0)))
    rows = np.array([0, 2, 3, 5])[positions]
    for index, (row, view) in enumerate(zip(rows, views)):
        np.testing.assert_array_equal(batch["tokens"][index].numpy(), video_data(LAYOUT, row)["tokens"][view][:, [3]])
        np.testing.assert_array_equal(batch["attention"][index].numpy(),
                                      video_data(LAYOUT, row)["attention"][view][:, :, [3]])


def test_a_missing_or_truncated_chunk_object_is_named_by_read_and_verify_and_repair_clears_it(s3_endpoint):
    url = f"{s3_endpoint}/feats.zarr"
    store = make_store(url)
    for row in range(LAYOUT.videos):
        store.write_video(row, **video_data(LAYOUT, row))
    manifest = store.manifest()
    manifest["status"] = "done"
    store.write_manifest(manifest)
    filesystem, root = fsspec.core.url_to_fs(url)
    filesystem.rm_file(f"{root}/tokens/c/1/0/0/0/0/0")
    filesystem.pipe_file(f"{root}/embeds/c/4/0/0/0", b"short")

    with pytest.raises(ClipreelError, match=r"row 1 \(video1\) is marked done but its tokens chunk object missing"):
        FeatureStore.open(url).read([0, 1])
    problems = verify(FeatureStore.open(url))
    assert any(p.startswith("row 1 (video1): tokens chunk object missing") for p in problems), problems
    assert any(p.startswith("row 4 (video4): embeds chunk object has 5 bytes") for p in problems), problems

    report = repair_store(FeatureStore.open(url, mode="r+"))
    assert report.rechecked_rows == [1, 4]
    assert FeatureStore.open(url).done_mask().tolist() == [True, False, True, True, False, True]
    assert verify(FeatureStore.open(url)) == []


_READ_PICKLED_STORE = """
import pickle, sys
import numpy as np
store = pickle.loads(sys.stdin.buffer.read())
tokens = store.read([2], fields=("tokens",))["tokens"]
print(store.read_path(), float(np.abs(tokens.astype(np.float64)).sum()))
"""


def test_storage_options_reach_the_store_travel_with_a_pickled_store_and_are_recorded_nowhere(
    s3_endpoint, moto_endpoint, monkeypatch
):
    pytest.importorskip("obstore", reason="obstore is not installed (the test and s3 extras have it)")
    # Only the options, not the environment, say where the server is and what the credentials are.
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    url = f"{s3_endpoint}/feats.zarr"
    secret = "never-written-7f3a9c"
    use_storage_options(store_location(url), parse_storage_options(
        [f"endpoint_url={moto_endpoint}", "key=test", f"secret={secret}"]))
    store = make_store(url)
    store.write_video(2, **video_data(LAYOUT, 2))
    filesystem, root = fsspec.core.url_to_fs(url)
    for path in filesystem.find(root):
        assert secret.encode() not in filesystem.cat_file(path), path

    # A process without this one's configuration or environment (like a Ray worker on another
    # node) reads the store from its pickle alone.
    clean_environment = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "FSSPEC_"))}
    child = subprocess.run([sys.executable, "-c", _READ_PICKLED_STORE], input=pickle.dumps(FeatureStore.open(url)),
                           capture_output=True, env=clean_environment, timeout=120)
    assert child.returncode == 0, child.stderr.decode()
    expected = float(np.abs(video_data(LAYOUT, 2)["tokens"].astype(np.float64)).sum())
    path_used, total = child.stdout.decode().split()[:-1], float(child.stdout.decode().split()[-1])
    assert " ".join(path_used) == "obstore ranged GETs" and total == expected


def test_a_linked_store_reads_the_arrays_of_an_s3_store_with_a_manifest_of_its_own(s3_endpoint, tmp_path):
    pytest.importorskip("obstore", reason="obstore is not installed (the test and s3 extras have it)")
    url = f"{s3_endpoint}/feats.zarr"
    store = make_store(url)
    for row in (1, 4):
        store.write_video(row, **video_data(LAYOUT, row))
    relabelled = store.manifest()
    relabelled["split"] = ["shots" if row in (1, 4) else "rest" for row in range(LAYOUT.videos)]
    linked_path = tmp_path / "protocol" / "shots.zarr"
    FeatureStore.link(linked_path, url, relabelled)

    assert FeatureStore.exists(linked_path) and sorted(p.name for p in linked_path.iterdir()) == [
        "linked_arrays.json", "manifest.parquet"]
    linked = FeatureStore.open(linked_path)
    assert linked.manifest()["split"].tolist() == relabelled["split"].tolist()
    assert linked.read_path() == "obstore ranged GETs" and linked.done_mask().tolist() == [
        False, True, False, False, True, False]
    np.testing.assert_array_equal(linked.read([4], fields=("embeds",))["embeds"][0], video_data(LAYOUT, 4)["embeds"])
    reopened = pickle.loads(pickle.dumps(linked))
    assert reopened.path == linked_path and reopened.manifest()["split"].tolist() == relabelled["split"].tolist()
    with pytest.raises(ClipreelError, match="is a linked store .* open it read-only"):
        FeatureStore.open(linked_path, mode="r+")
    with pytest.raises(ClipreelError, match="needs one row per row"):
        FeatureStore.link(tmp_path / "bad.zarr", url, relabelled.iloc[:3])


def test_clipreel_manifest_writes_its_parquet_to_a_url(s3_endpoint, tmp_path):
    from typer.testing import CliRunner

    from clipreel.cli import app
    from clipreel.stores.manifest import read_manifest

    videos = tmp_path / "videos.csv"
    videos.write_text("path,label\nclips/a.mp4,0\nclips/b.mp4,1\n")
    url = f"{s3_endpoint}/lists/videos.parquet"
    result = CliRunner().invoke(app, ["manifest", str(videos), url, "--skip-missing"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(url)
    assert manifest["label"].tolist() == [0, 1] and (manifest["status"] == "failed").all()
