"""CacheLoader on real Zarr stores on disk: order, views, layers, sharding, bounded prefetch, errors;
float16 and 8-bit stores alike (8-bit fields handed on as codes with their scales)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from clipreel.errors import ClipreelError
from clipreel.heads.cache.inputs import decode_field
from clipreel.pipeline.data.cache_loader import CacheLoader
from clipreel.stores.features import FeatureStore, StoreLayout
from clipreel.stores.manifest import new_manifest

LAYOUT = StoreLayout(videos=10, views=3, frames=4, layers=2, tokens=5, width=8, embed_dim=4)
FIELDS = ("tokens", "embeds", "attention", "frame_indices")


def _code(row: int, view: int, layer: int = 0) -> float:
    """The value every element of (row, view, layer) holds, exact in float16 (and through 8-bit
    codes: a group of equal values is its scale times the top code)."""
    return row * 100 + view * 10 + layer


def _make_store(path, layout: StoreLayout = LAYOUT, done_rows=None, dtype: str = "float16") -> FeatureStore:
    """A store whose every value says which row, view and feature block it belongs to."""
    manifest = new_manifest([{"video_id": f"v{row}", "path": f"v{row}.mp4"} for row in range(layout.videos)])
    layout = replace(layout, dtype=dtype)
    store = FeatureStore.create(path, layout, {"test": "loader", "dtype": dtype}, manifest)
    for row in done_rows if done_rows is not None else range(layout.videos):
        tokens = np.empty(layout.row_shape("tokens"), dtype=np.float16)  # (V, T, K, L, D)
        attention = np.empty(layout.row_shape("attention"), dtype=np.float16)  # (V, 2, T-1, K, P, P)
        for view in range(layout.views):
            for layer in range(layout.layers):
                tokens[view, :, layer] = _code(row, view, layer)
                attention[view, :, :, layer] = _code(row, view, layer)
        embeds = np.stack([np.full(layout.row_shape("embeds")[1:], _code(row, view), np.float32)
                           for view in range(layout.views)])  # (V, T, E)
        frame_indices = np.stack([np.arange(layout.frames) + view for view in range(layout.views)])
        store.write_video(row, tokens, embeds, frame_indices, attention)
    return FeatureStore.open(path)


@pytest.fixture(scope="module", params=["float16", "int8", "float8"])
def store(tmp_path_factory, request) -> FeatureStore:
    return _make_store(tmp_path_factory.mktemp("loader") / "s.zarr", dtype=request.param)


def _loader(store, **overrides) -> CacheLoader:
    rows = np.arange(store.layout.videos)
    arguments = {"fields": FIELDS, "layers": "all", "batch_size": 4, "shuffle": True, "seed": 0, "views": "random"}
    arguments.update(overrides)
    return CacheLoader(store, rows, labels=rows % 3, **arguments)


def _values(batch: dict) -> dict:
    """The batch with 8-bit fields decoded to float16 (what a float16 store's batch holds)."""
    values = {name: tensor for name, tensor in batch.items() if not name.endswith("_scale")}
    for name in batch:
        if name.endswith("_scale"):
            field = name.removesuffix("_scale")
            values[field] = decode_field(field, batch[field], batch[name])
    return values


def _rows_of_epoch(loader: CacheLoader, epoch: int) -> list[int]:
    return [int(row) for batch in loader.epoch(epoch) for row in batch["rows"]]


@pytest.mark.parametrize("fast_read", [True, False], ids=["chunk-files", "zarr"])
@pytest.mark.parametrize("layers", ["all", "last"])
def test_batches_hold_one_consistent_view_and_the_requested_layers(store, fast_read, layers):
    store = FeatureStore.open(store.path, fast_read=fast_read)
    loader = _loader(store, layers=layers)
    kept = [0, 1] if layers == "all" else [1]
    seen = []
    for batch in map(_values, loader.epoch(0)):
        size = len(batch["rows"])
        assert batch["tokens"].shape == (size, 4, len(kept), 5, 8) and batch["tokens"].dtype == torch.float16
        assert batch["attention"].shape == (size, 2, 3, len(kept), 4, 4) and batch["attention"].dtype == torch.float16
        assert batch["embeds"].shape == (size, 4, 4)
        np.testing.assert_array_equal(batch["labels"].numpy(), batch["rows"].numpy() % 3)
        for i, row in enumerate(batch["rows"].tolist()):
            view = (int(batch["embeds"][i, 0, 0]) - row * 100) // 10
            assert 0 <= view < 3
            for position, layer in enumerate(kept):
                assert (batch["tokens"][i, :, position].float() == _code(row, view, layer)).all()
                assert (batch["attention"][i, :, :, position].float() == _code(row, view, layer)).all()
            np.testing.assert_array_equal(batch["frame_indices"][i].numpy(), np.arange(4) + view)
            seen.append(row)
    assert sorted(seen) == list(range(10))


def test_both_read_paths_give_identical_batches(store):
    direct = _loader(FeatureStore.open(store.path, fast_read=True), layers="last")
    through_zarr = _loader(FeatureStore.open(store.path, fast_read=False), layers="last")
    for a, b in zip(direct.epoch(5), through_zarr.epoch(5), strict=True):
        assert set(a) == set(b)
        for field in a:  # float8 codes compared by their bits (numpy has no float8)
            assert a[field].dtype == b[field].dtype
            bits = [batch[field].view(torch.uint8) if batch[field].dtype == torch.float8_e4m3fn else batch[field]
                    for batch in (a, b)]
            assert torch.equal(*bits), field


def test_order_is_a_seeded_permutation_that_changes_every_epoch(store):
    loader = _loader(store)
    first, second = _rows_of_epoch(loader, 0), _rows_of_epoch(loader, 1)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert _rows_of_epoch(_loader(store), 1) == second  # same seed, same epoch, new loader
    assert _rows_of_epoch(_loader(store, seed=1), 1) != second
    assert _rows_of_epoch(_loader(store, shuffle=False), 3) == list(range(10))


def test_random_views_change_across_epochs_and_all_views_keep_the_view_axis(store):
    loader = _loader(store, fields=("embeds",))
    views_by_row: dict[int, set[int]] = {row: set() for row in range(10)}
    for epoch in range(6):
        for batch in loader.epoch(epoch):
            for row, embeds in zip(batch["rows"].tolist(), batch["embeds"], strict=True):
                views_by_row[row].add((int(embeds[0, 0]) - row * 100) // 10)
    assert sum(len(views) > 1 for views in views_by_row.values()) >= 8

    every_view = _loader(store, views="all", shuffle=False, layers="last")
    batch = _values(next(iter(every_view.epoch(0))))
    assert batch["tokens"].shape == (4, 3, 4, 1, 5, 8)  # (B, V, T, K, L, D)
    assert batch["embeds"].shape == (4, 3, 4, 4)
    for view in range(3):
        assert (batch["embeds"][1, view] == _code(1, view)).all()


def test_ranks_share_the_epoch_in_equal_parts(store):
    shards = [_loader(store, rank=rank, world_size=3, fields=("embeds",)) for rank in range(3)]
    rows = [_rows_of_epoch(shard, 2) for shard in shards]
    assert [len(part) for part in rows] == [4, 4, 4]  # 10 videos padded to 12
    assert set().union(*map(set, rows)) == set(range(10))
    assert len(shards[0]) == len(shards[2]) == 1
    unsharded = _rows_of_epoch(_loader(store, fields=("embeds",), batch_size=12), 2)
    assert rows[0] == unsharded[0::3][:4]


def test_drop_last_and_length(store):
    assert len(_loader(store)) == 3
    loader = _loader(store, drop_last=True)
    assert len(loader) == 2
    assert [len(batch["rows"]) for batch in loader.epoch(0)] == [4, 4]


def test_prefetch_never_reads_more_than_the_queue_holds(store):
    prefetch = 2
    loader = _loader(store, batch_size=1, prefetch=prefetch, fields=("embeds",))
    consumed, read_ahead = 0, []
    for _ in loader.epoch(0):
        consumed += 1
        time.sleep(0.15)  # a slow consumer: the reader has all the time it wants to run ahead
        read_ahead.append(loader.batches_read - consumed)
    # At most `prefetch` batches wait in the queue, plus the one the reader holds while it waits.
    assert max(read_ahead) == prefetch + 1
    assert loader.batches_read == consumed == 10


def test_a_read_error_surfaces_in_the_consumer(tmp_path):
    store = _make_store(tmp_path / "damaged.zarr")
    broken_row = 6
    os.remove(store.chunk_file("tokens", broken_row))
    loader = _loader(FeatureStore.open(store.path), shuffle=False, batch_size=2, fields=("tokens",))
    delivered = []
    with pytest.raises(ClipreelError, match="row 6"):
        for batch in loader.epoch(0):
            delivered += batch["rows"].tolist()
    assert delivered == [0, 1, 2, 3, 4, 5]  # everything before the damaged row arrived


def test_stopping_early_ends_the_reader_thread(store):
    loader = _loader(store, batch_size=1, prefetch=1)
    for _ in loader.epoch(0):
        break
    assert not [thread for thread in threading.enumerate() if thread.name == "clipreel-loader"]


def test_rows_that_are_not_done_are_refused(tmp_path):
    store = _make_store(tmp_path / "partial.zarr", done_rows=[0, 1, 2])
    with pytest.raises(ClipreelError, match=r"\[3, 4\].*not done"):
        CacheLoader(store, [0, 3, 4], [0, 0, 0], ("embeds",), "all", 2, shuffle=False, seed=0, views="all")


@pytest.mark.parametrize("dtype", ["int8", "float8"])
@pytest.mark.parametrize("views", ["random", "all"])
def test_8bit_batches_hold_codes_and_scales_that_decode_to_the_float16_batches(tmp_path, dtype, views):
    float16 = _loader(_make_store(tmp_path / "f16.zarr"), views=views, layers="last")
    eight_bit = _loader(_make_store(tmp_path / "8bit.zarr", dtype=dtype), views=views, layers="last")
    codes = {"int8": (torch.int8, torch.uint8), "float8": (torch.float8_e4m3fn, torch.float8_e4m3fn)}[dtype]
    for expected, encoded in zip(float16.epoch(2), eight_bit.epoch(2), strict=True):
        assert (encoded["tokens"].dtype, encoded["attention"].dtype) == codes
        assert encoded["tokens_scale"].shape == (*expected["tokens"].shape[:-1], 1)  # width 8: one scale per token
        assert encoded["attention_scale"].shape == expected["attention"].shape[:-1]
        decoded = _values(encoded)
        assert set(decoded) == set(expected) == {*FIELDS, "labels", "rows"}
        for name, values in expected.items():
            assert decoded[name].dtype == values.dtype
            np.testing.assert_array_equal(decoded[name].numpy(), values.numpy())
