"""8-bit feature stores (int8 and float8 codes with float16 scales): real stores on disk, small shapes.

The round trip's error is bounded, readers return what a float16 store returns (shapes, dtypes),
appending with another dtype is refused, and verify sees damaged scales and codes.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace

import numpy as np
import pytest

from clipreel.errors import ClipreelError
from clipreel.stores import encoding
from clipreel.stores.audit import provenance_diff
from clipreel.stores.features import FeatureStore, StoreLayout, verify
from clipreel.stores.manifest import new_manifest
from clipreel.stores.repair import repair_store

# width 64: two scale blocks of 32 channels per token
LAYOUT = StoreLayout(videos=4, views=2, frames=3, layers=2, tokens=5, width=64, embed_dim=6)
FIELDS = ("tokens", "embeds", "attention", "frame_indices")


def _manifest(videos: int):
    return new_manifest([{"video_id": f"v{row}", "path": f"v{row}.mp4", "num_frames": 40} for row in range(videos)])


def _video(layout: StoreLayout, row: int) -> dict[str, np.ndarray]:
    """Activation-like float32 data: tokens of varied magnitude per block (one outlier channel),
    attention maps that are softmax rows."""
    rng = np.random.default_rng(row)
    tokens = rng.standard_normal(layout.row_shape("tokens")).astype(np.float32)  # (V, T, K, L, D)
    tokens *= rng.uniform(0.1, 20, size=(*layout.row_shape("tokens")[:-1], 1)).astype(np.float32)
    tokens[..., 5] *= 30  # an outlier channel
    logits = rng.standard_normal(layout.row_shape("attention")).astype(np.float32) * 3  # (V, 2, T-1, K, P, P)
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return {
        "tokens": tokens,
        "embeds": rng.standard_normal(layout.row_shape("embeds")).astype(np.float32),
        "frame_indices": rng.integers(0, 40, layout.row_shape("frame_indices")),
        "attention": attention,
    }


def _store(path, dtype: str, layout: StoreLayout = LAYOUT, rows=range(LAYOUT.videos)) -> FeatureStore:
    layout = replace(layout, dtype=dtype)
    store = FeatureStore.create(path, layout, {"model": "test", "dtype": dtype}, _manifest(layout.videos))
    for row in rows:
        data = _video(layout, row)
        if dtype == "float16":
            data = {**data, "tokens": data["tokens"].astype(np.float16), "attention": data["attention"].astype(np.float16)}
        store.write_video(row, **data)
    return FeatureStore.open(path, mode="r+")


@pytest.mark.parametrize("dtype", ["int8", "float8"])
def test_the_round_trip_keeps_shapes_and_bounds_the_error(tmp_path, dtype):
    store = _store(tmp_path / "s.zarr", dtype)
    read = store.read([3, 1], fields=FIELDS)
    for field in ("tokens", "attention"):
        original = np.stack([_video(LAYOUT, row)[field] for row in (3, 1)])
        assert read[field].dtype == np.float16 and read[field].shape == original.shape
        # The step of each value: its group's largest magnitude over the top code (largest per
        # block of 32 channels of a token, per attention row).
        groups = original.reshape(*original.shape[:-1], 2, 32) if field == "tokens" else original[..., None, :]
        step = np.abs(groups).max(-1, keepdims=True) / encoding.field_code(dtype, field).top
        step = np.broadcast_to(step, groups.shape).reshape(original.shape)
        error = np.abs(read[field].astype(np.float32) - original)
        float16_rounding = np.abs(original) * 2.0**-10
        if dtype == "int8":  # half a step, at worst
            bound = step * (0.5 + 2.0**-9) + float16_rounding
        else:  # float8 E4M3: 3 mantissa bits (half an ulp is 1/16 of the value), or the subnormal spacing
            bound = np.maximum(np.abs(original) * 2.0**-4, step * 2.0**-10) * (1 + 2.0**-8) + float16_rounding
        assert (error <= bound).all(), (field, float((error / bound).max()))
    np.testing.assert_array_equal(read["embeds"], np.stack([_video(LAYOUT, row)["embeds"] for row in (3, 1)]))
    relative = np.linalg.norm(read["tokens"].astype(np.float32) - np.stack([_video(LAYOUT, r)["tokens"] for r in (3, 1)]))
    relative /= np.linalg.norm(np.stack([_video(LAYOUT, r)["tokens"] for r in (3, 1)]))
    assert relative < (0.02 if dtype == "int8" else 0.05)  # the outlier channel coarsens its blocks


@pytest.mark.parametrize("dtype", ["int8", "float8"])
def test_readers_return_what_a_float16_store_returns(tmp_path, dtype):
    reference = _store(tmp_path / "f16.zarr", "float16")
    store = _store(tmp_path / f"{dtype}.zarr", dtype)
    through_zarr = FeatureStore.open(store.path, fast_read=False)
    assert store.uses_direct_read and not through_zarr.uses_direct_read
    for layers in (None, [1]):
        expected = reference.read([2, 0], fields=FIELDS, layers=layers)
        got = store.read([2, 0], fields=FIELDS, layers=layers)
        zarr_got = through_zarr.read([2, 0], fields=FIELDS, layers=layers)
        assert set(got) == set(expected) == set(zarr_got)
        for field in FIELDS:
            assert (got[field].dtype, got[field].shape) == (expected[field].dtype, expected[field].shape)
            np.testing.assert_array_equal(got[field], zarr_got[field])
        for field in ("tokens", "attention"):  # close (the bounds are the round trip's test)
            difference = got[field].astype(np.float32) - expected[field]
            assert np.linalg.norm(difference) < 0.05 * np.linalg.norm(expected[field].astype(np.float32))


def test_codes_and_scales_as_stored_decode_to_what_read_returns(tmp_path):
    store = _store(tmp_path / "s.zarr", "int8")
    stored = store.read([1, 2], fields=("tokens", "attention"), layers=[0], decode_codes=False)
    assert {name: (values.dtype, values.shape) for name, values in stored.items()} == {
        "tokens": (np.dtype(np.int8), (2, 2, 3, 1, 5, 64)),
        "tokens_scale": (np.dtype(np.float16), (2, 2, 3, 1, 5, 2)),
        "attention": (np.dtype(np.uint8), (2, 2, 2, 2, 1, 4, 4)),
        "attention_scale": (np.dtype(np.float16), (2, 2, 2, 2, 1, 4)),
    }
    decoded = store.read([1, 2], fields=("tokens", "attention"), layers=[0])
    for field in ("tokens", "attention"):
        np.testing.assert_array_equal(
            encoding.decode(field, stored[field], stored[field + "_scale"], store.layout.code(field)), decoded[field])
    # The scales are each group's largest magnitude: a token block's top code is +-127, a row's 255.
    assert (np.abs(stored["tokens"]).reshape(2, 2, 3, 1, 5, 2, 32).max(-1) == 127).all()
    assert (stored["attention"].max(-1) == 255).all()


def test_an_8bit_store_is_half_the_bytes_and_says_how_it_keeps_them(tmp_path):
    float16 = _store(tmp_path / "f16.zarr", "float16", rows=[])
    int8 = _store(tmp_path / "i8.zarr", "int8", rows=[])
    vit_b16 = StoreLayout(videos=1, views=1, frames=8, layers=4, tokens=197, width=768, embed_dim=512)
    assert 0.50 < replace(vit_b16, dtype="int8").bytes_per_video() / vit_b16.bytes_per_video() < 0.53
    assert (float16.schema_version, int8.schema_version) == (1, 2)  # earlier clipreel versions refuse 8-bit stores
    assert float16.layout.dtype == "float16" and "scale_block" not in float16.provenance
    assert {key: int8.provenance[key] for key in ("dtype", "tokens_dtype", "attention_dtype", "scale_block")} == {
        "dtype": "int8", "tokens_dtype": "int8", "attention_dtype": "uint8", "scale_block": 32}
    assert FeatureStore.open(tmp_path / "i8.zarr").layout == replace(LAYOUT, dtype="int8")
    narrow = _store(tmp_path / "narrow.zarr", "float8", layout=replace(LAYOUT, width=48), rows=[0])
    assert narrow.provenance["scale_block"] == 48  # 32 does not divide 48: one scale per token
    assert narrow.array("tokens_scale").shape == (4, 2, 3, 2, 5, 1)


def test_appending_with_another_dtype_is_refused_naming_it():
    assert provenance_diff({"model": "m"}, {"model": "m", "dtype": "int8"}) == [
        "dtype: store has 'float16', this run asks for 'int8'"]  # a store that records no dtype is float16
    assert provenance_diff({"dtype": "float16"}, {}) == []
    assert provenance_diff({"dtype": "float8"}, {"dtype": "int8"}) == ["dtype: store has 'float8', this run asks for 'int8'"]


def test_write_video_checks_codes_scales_and_values(tmp_path):
    store = _store(tmp_path / "s.zarr", "int8", rows=[])
    good = _video(LAYOUT, 0)
    codes, scales = encoding.encode("tokens", good["tokens"], encoding.INT8)
    store.write_video(0, **{**good, "tokens": codes}, tokens_scale=scales)  # encoded elsewhere
    np.testing.assert_array_equal(store.read([0], fields=("tokens",), decode_codes=False)["tokens"][0], codes)
    with pytest.raises(ClipreelError, match="values <= 0"):
        store.write_video(1, **{**good, "tokens": codes}, tokens_scale=np.zeros_like(scales))
    with pytest.raises(ClipreelError, match="keeps int8"):
        store.write_video(1, **{**good, "tokens": codes.astype(np.uint8)}, tokens_scale=scales)
    with pytest.raises(ClipreelError, match="tokens is int64"):
        store.write_video(1, **{**good, "tokens": good["tokens"].astype(np.int64)})
    with pytest.raises(ClipreelError, match="NaN or inf"):
        store.write_video(1, **{**good, "tokens": np.full_like(good["tokens"], np.nan)})
    with pytest.raises(ClipreelError, match="beyond"):
        store.write_video(1, **{**good, "tokens": np.full_like(good["tokens"], 1e6)})
    with pytest.raises(ClipreelError, match="negative values"):
        store.write_video(1, **{**good, "attention": -good["attention"]})
    assert store.done_mask().tolist() == [True, False, False, False]
    float16 = _store(tmp_path / "f16.zarr", "float16", rows=[])
    with pytest.raises(ClipreelError, match="keeps no tokens_scale"):
        float16.write_video(0, **{**good, "tokens": good["tokens"].astype(np.float16),
                                  "attention": good["attention"].astype(np.float16)}, tokens_scale=scales)
    zeros = encoding.encode("tokens", np.zeros((2, 64), np.float32), encoding.INT8)
    assert (zeros[1] == 1).all() and (zeros[0] == 0).all()  # a block of zeros gets a positive scale


def _overwrite_chunk(store: FeatureStore, name: str, row: int, values: np.ndarray) -> None:
    path = store.chunk_file(name, row)
    assert os.path.getsize(path) == values.nbytes
    with open(path, "wb") as handle:
        handle.write(np.ascontiguousarray(values).tobytes())


def test_verify_catches_bad_scales_and_nan_codes_and_repair_marks_them_not_done(tmp_path):
    store = _store(tmp_path / "s.zarr", "float8")
    manifest = store.manifest()
    manifest["status"] = "done"
    store.write_manifest(manifest)
    assert verify(store) == []
    scales = store.read([0], fields=("tokens",), decode_codes=False)["tokens_scale"][0]
    scales[0, 0, 0, 0, 0] = np.nan
    _overwrite_chunk(store, "tokens_scale", 0, scales)
    attention_scales = store.read([1], fields=("attention",), decode_codes=False)["attention_scale"][0]
    attention_scales[0, 0, 0, 0, 1] = 0
    _overwrite_chunk(store, "attention_scale", 1, attention_scales)
    codes = store.read([2], fields=("tokens",), decode_codes=False)["tokens"][0]
    codes[0, 0, 0, 0, :3] = 0x7F  # float8 NaN
    _overwrite_chunk(store, "tokens", 2, codes)
    os.remove(store.chunk_file("attention_scale", 3))

    problems = verify(store)
    assert "row 0 (v0): tokens_scale has 1 non-finite values (NaN/inf; or a missing chunk read as NaN)" in problems
    assert "row 1 (v1): attention_scale has 1 values <= 0 (scales are positive)" in problems
    assert "row 2 (v2): tokens has 3 float8 NaN codes" in problems
    assert any(problem.startswith("row 3 (v3): attention_scale chunk file missing") for problem in problems)
    repair_store(store)
    assert not store.done_mask().any()


def test_open_refuses_arrays_that_contradict_the_provenance_dtype(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path, "int8", rows=[])
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group.attrs["provenance"] = {**group.attrs["provenance"], "dtype": "float8"}  # says float8, holds int8 codes
    with pytest.raises(ClipreelError, match="tokens should be uint8.*holds int8.*inconsistent"):
        FeatureStore.open(path)
    group.attrs["provenance"] = {**group.attrs["provenance"], "dtype": "int4"}
    with pytest.raises(ClipreelError, match="provenance dtype 'int4' is not a store dtype"):
        FeatureStore.open(path)


def test_an_8bit_store_behind_a_url_reads_as_locally():
    url = f"memory://clipreel-test-{uuid.uuid4().hex}/feats.zarr"
    try:
        remote = _store(url, "int8", rows=[1, 2])
        assert remote.uses_direct_read
        local_values = encoding.decode("tokens", *encoding.encode("tokens", _video(LAYOUT, 2)["tokens"], encoding.INT8),
                                       encoding.INT8)
        np.testing.assert_array_equal(remote.read([2], fields=("tokens",))["tokens"][0], local_values)
        through_zarr = FeatureStore.open(url, fast_read=False).read([2, 1], fields=FIELDS, layers=[1])
        got = FeatureStore.open(url).read([2, 1], fields=FIELDS, layers=[1])
        for field in FIELDS:
            np.testing.assert_array_equal(got[field], through_zarr[field])
    finally:
        import fsspec

        fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)
