"""Stream training and evaluation batches out of a feature store.

`CacheLoader` turns a list of store rows into batches of torch tensors, one epoch at a time:

    loader = CacheLoader(store, rows, labels, fields=("tokens", "attention"), layers="all",
                         batch_size=16, shuffle=True, seed=0, views="random")
    for batch in loader.epoch(3):
        batch["tokens"]     # (B, T, K, L, D) float16   (views="all": (B, V, T, K, L, D))
        batch["attention"]  # (B, 2, T-1, K, P, P) float16   (8-bit stores: codes + FIELD_scale)
        batch["labels"], batch["rows"]   # (B,) int64

- Order: a fresh permutation every epoch, seeded by (seed, epoch), so any epoch can be replayed
  alone (this is what makes resumed training equal an uninterrupted run).
- Views: a store may hold V views per video (temporal clips x crops). views="random" hands out one
  of them per video per epoch (seeded by (seed, epoch) too): the cached views act as augmentation.
  views="all" keeps the view axis for multi-view evaluation.
- Sharding: with world_size > 1 each rank gets every world_size-th video of the shuffled order,
  padded (like torch's DistributedSampler) so that every rank runs the same number of batches.
- Prefetch: a background thread reads the next batches into a queue of at most `prefetch`
  batches, so memory is bounded by (prefetch + 2) batches, never by the dataset. An error in that
  thread is raised in the consumer.
- 8-bit stores: tokens and attention maps come out as they are stored, code tensors with their
  `FIELD_scale` tensors (half the bytes of float16 to read and to send to a GPU); the heads decode
  what they use, on their device and into their dtype (heads/cache/inputs.py: `decode_field` gives
  float values to any other reader).

Only the requested fields and feature blocks are read, and with views="random" only the chosen
view's bytes: when the store's chunks can be read directly (local files, or objects behind a URL
with ranged GETs), the loader asks for just that view's byte ranges of each row (the store's own
`read` has no view selection; with zarr fallbacks the whole row is read and the view picked
afterwards). A batch's reads happen in the prefetch thread, so a remote store's request latency
overlaps the training step.

May import: torch, numpy, clipreel.errors, clipreel.stores, clipreel.pipeline.data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.prefetch import read_ahead
from clipreel.pipeline.data.store_codes import as_code_tensor
from clipreel.stores import fastread
from clipreel.stores.encoding import SCALE_SUFFIX
from clipreel.stores.features import LAYER_AXIS, READABLE_FIELDS, FeatureStore

VIEW_MODES = ("random", "all")


class CacheLoader:
    """Batches of `fields` for `rows` of `store`, with `labels` (one per row), epoch by epoch.

    layers: which feature blocks of tokens/attention to read: None or "all", "last", or a list
    of positions along K (see HeadEntry.blocks). batch_size is per rank.
    """

    def __init__(
        self,
        store: FeatureStore,
        rows: Sequence[int] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        fields: Sequence[str],
        layers: str | Sequence[int] | None,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        views: str,
        prefetch: int = 2,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.fields = tuple(fields)
        self.layers = _layer_positions(layers, store.layout.layers)
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.views = shuffle, int(seed), views
        self.prefetch, self.drop_last = int(prefetch), drop_last
        self.rank, self.world_size = int(rank), int(world_size)
        self._check_arguments()
        # The arrays behind the fields: an 8-bit field's codes and its scales.
        self._arrays = [name for field in self.fields
                        for name in ([field, field + SCALE_SUFFIX] if field in store.layout.encoded_fields else [field])]
        # Per array, the chunk files to read single views from (None: read rows through the store).
        self._view_files = {name: self._direct_view_files(name) for name in self._arrays}
        self.batches_read = 0  # batches the background thread has finished reading (all epochs)

    # ------------------------------------------------------------------ public

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per_rank = len(self._rank_positions(np.arange(len(self.rows))))
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of epoch `epoch` (any epoch, in any order: each is seeded by (seed, epoch))."""
        batches = (self._read_batch(positions, views) for positions, views in self.epoch_plan(epoch))
        return read_ahead(batches, self.prefetch, name="clipreel-loader")

    # ------------------------------------------------------------------ planning

    def epoch_plan(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Epoch `epoch` on this rank, without reading anything: for each batch, (positions into
        `rows`, the view chosen for each)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        count = len(self.rows)
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        # Drawn for every video (not per rank), so a video's view does not depend on the sharding.
        chosen_views = rng.integers(self.store.layout.views, size=count)
        positions = self._rank_positions(order)
        stops = range(0, len(positions), self.batch_size)
        plan = [positions[start : start + self.batch_size] for start in stops]
        if self.drop_last and plan and len(plan[-1]) < self.batch_size:
            plan.pop()
        return [(batch, chosen_views[batch]) for batch in plan]

    def _rank_positions(self, order: np.ndarray) -> np.ndarray:
        """This rank's share of `order`: padded by wrapping around to a multiple of world_size."""
        if self.world_size == 1:
            return order
        padded_length = math.ceil(len(order) / self.world_size) * self.world_size
        padded = np.resize(order, padded_length)  # repeats from the start
        return padded[self.rank :: self.world_size]

    # ------------------------------------------------------------------ reading

    def _read_batch(self, positions: np.ndarray, chosen_views: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.rows[positions]
        arrays = {}
        whole_rows = [field for field in self.fields
                      if self.views == "all" or self._view_files[field] is None]
        if whole_rows:  # as stored: 8-bit fields as codes + scales
            arrays = self.store.read(rows, fields=whole_rows, layers=self.layers, decode_codes=False)  # (B, V, ...)
            if self.views == "random":
                arrays = {name: _pick_views(values, chosen_views) for name, values in arrays.items()}  # (B, ...)
        for name in self._arrays:
            if name not in arrays:
                arrays[name] = self._read_single_views(name, rows, chosen_views)  # (B, ...)
        batch = {name: torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in self._arrays}
        for field in self.store.layout.encoded_fields:
            if field in batch:
                batch[field] = as_code_tensor(batch[field], self.store.layout.dtype, field)
        batch["labels"] = torch.from_numpy(self.labels[positions])
        batch["rows"] = torch.from_numpy(rows)
        self.batches_read += 1
        return batch

    def _direct_view_files(self, name: str):
        """The raw chunk reader of array `name` (local files or remote objects), when one view of a
        row can be read from it alone.

        Only worth it with several views and views="random": otherwise the store reads whole rows.
        """
        if self.views != "random" or self.store.layout.views == 1 or not self.store.uses_direct_read:
            return None
        return self.store.chunk_reader(name)

    def _read_single_views(self, name: str, rows: np.ndarray, chosen_views: np.ndarray) -> np.ndarray:
        """(B, ...) one view per row of array `name`, copying only that view's bytes (and kept
        layers) from each file."""
        files = self._view_files[name]
        view_shape = files.row_shape[1:]  # a row is (V, ...)
        view_nbytes = math.prod(view_shape) * files.dtype.itemsize
        axis = LAYER_AXIS[name] - 1 if name in LAYER_AXIS and self.layers is not None else None
        segments = fastread.selection_segments(view_shape, files.dtype.itemsize, axis, self.layers)
        out_shape = list(view_shape)
        if axis is not None:
            out_shape[axis] = len(self.layers)
        out = np.empty((len(rows), *out_shape), dtype=files.dtype)  # (B, ...)
        out_bytes = memoryview(out).cast("B")
        slot_nbytes = out.nbytes // max(1, len(rows))
        slots = [out_bytes[index * slot_nbytes : (index + 1) * slot_nbytes] for index in range(len(rows))]
        shifted = [
            [(int(view) * view_nbytes + file_offset, out_offset, nbytes) for file_offset, out_offset, nbytes in segments]
            for view in chosen_views
        ]
        try:
            files.read_into(rows, slots, shifted)
        except fastread.ChunkFileError as error:
            raise ClipreelError(
                f"{self.store.path}: row {error.row} is marked done but its {name} {error.problem} "
                f"({error.path}). The store is damaged: run `clipreel verify`, then extract that video again."
            ) from None
        return out

    # ------------------------------------------------------------------ checks

    def _check_arguments(self) -> None:
        store = self.store
        if self.rows.ndim != 1 or self.labels.shape != self.rows.shape:
            raise ClipreelError(
                f"CacheLoader: rows {self.rows.shape} and labels {self.labels.shape} must be 1-D and of equal length"
            )
        if len(self.rows) == 0:
            raise ClipreelError("CacheLoader: no rows to load: the split is empty or none of its videos is done")
        readable = [field for field in READABLE_FIELDS if field in store.layout.array_names]
        unknown = [field for field in self.fields if field not in readable]
        if unknown:
            raise ClipreelError(
                f"{store.path} has no {unknown} (it holds {readable}); a store extracted from single frames "
                "has no attention maps: extract at least 2 frames per view"
            )
        if self.views not in VIEW_MODES:
            raise ClipreelError(f"CacheLoader: views={self.views!r}; choose one of {VIEW_MODES}")
        if self.batch_size < 1 or self.prefetch < 1:
            raise ClipreelError(
                f"CacheLoader: batch_size ({self.batch_size}) and prefetch ({self.prefetch}) must be >= 1"
            )
        if not 0 <= self.rank < self.world_size:
            raise ClipreelError(f"CacheLoader: rank {self.rank} is outside world_size {self.world_size}")
        if self.rows.min() < 0 or self.rows.max() >= store.layout.videos:
            raise ClipreelError(f"CacheLoader: rows must be in 0..{store.layout.videos - 1} for {store.path}")
        not_done = self.rows[~store.done_mask()[self.rows]]
        if len(not_done):
            raise ClipreelError(
                f"{store.path}: rows {not_done[:10].tolist()} are not done (not extracted yet): extract them "
                "first (re-run `clipreel extract`), or leave them out"
            )


def _pick_views(values: np.ndarray, chosen_views: np.ndarray) -> np.ndarray:
    """values (B, V, ...) -> (B, ...): row i's view chosen_views[i] (no copy when V == 1)."""
    if values.shape[1] == 1:
        return values[:, 0]
    return values[np.arange(len(values)), chosen_views]


def _layer_positions(layers: str | Sequence[int] | None, num_layers: int) -> list[int] | None:
    """None/"all" -> None (every block), "last" -> [K-1], a list -> that list."""
    if layers is None or layers == "all":
        return None
    if layers == "last":
        return [num_layers - 1]
    if isinstance(layers, str):
        raise ClipreelError(f"CacheLoader: layers={layers!r}; use 'all', 'last' or a list of block positions")
    positions = [int(layer) for layer in layers]
    bad = [layer for layer in positions if not 0 <= layer < num_layers]
    if bad:
        raise ClipreelError(
            f"CacheLoader: layers {bad} out of range; the store holds {num_layers} (0..{num_layers - 1})"
        )
    return None if positions == list(range(num_layers)) else positions
