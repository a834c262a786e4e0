"""Batches of raw-frame clips for training and evaluation: the same batches, made in three places.

A `RawFrameDataset` item is one decoded, sampled and augmented clip, seeded by (seed, epoch,
video_id), so what a batch holds never depends on where it was made. An epoch's order is
`epoch_order` (a permutation seeded by (seed, epoch), or the dataset's order), and every loader
yields batches {"frames" (B, ...), "label" (B,), "row" (B,)} in that order:

- "workers": a torch DataLoader whose worker processes decode on this machine (the CPU default).
- "ray": a Ray Data streaming job. Decode tasks run on the Ray cluster (a local one, or the
  cluster at `address`) and batches stream into the trainer as they are ready; Ray's backpressure
  and an object-store budget of a few batches per worker bound the memory, however long the list.
- "device": decoding and augmentation in a background thread of the training process, on the
  device the decoder puts frames on. With DALI on a GPU (NVDEC) the frames are decoded into GPU
  memory, augmented there by the same torch code, and the batches never visit the host.

Each prepares at most a few batches ahead of the trainer. Call `dataset.set_epoch(epoch)` before
iterating each epoch, whatever the loader. With the dataset's on_bad_video "skip", a video that
cannot be decoded is left out of its batch (which may then hold no clip at all) and recorded in the
loader's `skipped` (manifest row -> error), over all epochs.

May import: torch, numpy, ray, clipreel.errors, clipreel.config, clipreel.pipeline.data,
clipreel.pipeline.raycluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from clipreel.config import DECODE_WORKERS
from clipreel.errors import ClipreelError
from clipreel.pipeline.data.augment import stable_generator
from clipreel.pipeline.data.decode import choose_decoder
from clipreel.pipeline.data.prefetch import read_ahead
from clipreel.pipeline.data.raw_frames import RawFrameDataset

LOADERS = ("auto", "workers", "ray", "device")
PREFETCH_BATCHES = 2  # batches each loader prepares ahead of the trainer (per worker process for "workers")


def epoch_order(size: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """Item indices of an epoch: a permutation seeded by (seed, epoch), or 0..size-1 without shuffling."""
    if shuffle:
        return torch.randperm(size, generator=stable_generator("order", seed, epoch)).tolist()
    return list(range(size))


def batch_count(size: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch of `size` items."""
    return size // batch_size if drop_last else math.ceil(size / batch_size)


@dataclass(frozen=True)
class FrameLoading:
    """How raw frames reach a model: the decoder, the loader, and the device the clips are made on."""

    decoder: str  # "pyav" or "dali"
    loader: str  # "workers", "ray" or "device"
    device: str  # where the dataset puts its clips: the model's device for "device", else "cpu"
    workers: int = DECODE_WORKERS  # decode processes ("workers") or concurrent Ray tasks ("ray")
    address: str | None = None  # the Ray cluster of "ray" (None: this process's Ray, or a local one)


def resolve_loading(decoder: str, loader: str, model_device: torch.device | str, workers: int = DECODE_WORKERS,
                    address: str | None = None) -> FrameLoading:
    """Pick the decoder and loader for a model on `model_device` ("auto" choices resolved, checked).

    decoder "auto": DALI (NVDEC) when the model is on a GPU and DALI is installed, else PyAV.
    loader "auto": "device" when DALI decodes on the GPU, else "workers". DALI on a GPU decodes in
    the training process ("device"); it cannot feed worker processes or Ray tasks.
    """
    if loader not in LOADERS:
        raise ClipreelError(f"unknown frame loader {loader!r}: choose one of {', '.join(LOADERS)}")
    on_gpu = str(model_device).startswith("cuda")
    decoder = choose_decoder(decoder, str(model_device))
    gpu_dali = decoder == "dali" and on_gpu
    if loader == "auto":
        loader = "device" if gpu_dali else "workers"
    if gpu_dali and loader != "device":
        raise ClipreelError(f"--decoder dali on {model_device} decodes in the training process: use --loader device "
                            "(or auto), or --decoder pyav to decode in worker processes")
    return FrameLoading(decoder, loader, str(model_device) if loader == "device" else "cpu", workers, address)


def frame_loader(dataset: RawFrameDataset, batch_size: int, loading: FrameLoading, *, shuffle: bool, seed: int = 0,
                 drop_last: bool = False):
    """The loader `loading.loader` over `dataset` (built with `loading.decoder` and `.device`): iterate it
    once per epoch, after `dataset.set_epoch(epoch)`."""
    if batch_size < 1:
        raise ClipreelError(f"batch size must be at least 1 (got {batch_size})")
    if loading.loader == "workers":
        return raw_frame_loader(dataset, batch_size, loading.workers, shuffle, seed, drop_last)
    if loading.loader == "ray":
        return RayFrameStream(dataset, batch_size, max(1, loading.workers), shuffle, seed, drop_last, loading.address)
    if loading.loader == "device":
        return DeviceFrameStream(dataset, batch_size, shuffle, seed, drop_last)
    raise ClipreelError(f"unknown frame loader {loading.loader!r}: choose one of {', '.join(LOADERS[1:])}")


# --------------------------------------------------------------------------- "workers": torch DataLoader


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs over a RawFrameDataset, in `epoch_order`.

    It reads the epoch from the dataset in the main process when an epoch starts, so
    `dataset.set_epoch(e)` reaches persistent worker processes, whose copy of the dataset never changes.
    """

    def __init__(self, dataset: RawFrameDataset, shuffle: bool, seed: int):
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.dataset.epoch
        return iter([(epoch, index) for index in epoch_order(len(self.dataset), self.shuffle, self.seed, epoch)])


def raw_frame_loader(
    dataset: RawFrameDataset,
    batch_size: int,
    workers: int,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader decoding in `workers` processes (0: in this process), same batches for any worker count.

    Workers stay alive between epochs (persistent) and each prepares at most PREFETCH_BATCHES batches
    ahead, so memory is bounded by about workers x PREFETCH_BATCHES batches. Call
    `dataset.set_epoch(epoch)` before iterating each epoch.
    """
    if workers < 0:
        raise ClipreelError(f"workers must be >= 0 (got {workers}); 0 decodes in the training process")
    return _FrameDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(dataset, shuffle, seed),
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        worker_init_fn=_one_torch_thread,
        collate_fn=dataset.collate,
        drop_last=drop_last,
    )


class _FrameDataLoader(DataLoader):
    """A DataLoader whose worker-process errors about a video arrive as the ClipreelError they were,
    and which collects the videos its batches skipped (`skipped`: row -> error).

    torch re-raises an exception from a worker as a RuntimeError holding the worker's traceback
    when it cannot rebuild the exception from one message, as with `DecodeError`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: dict[int, str] = {}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as error:
                raise _worker_decode_error(error) from None
            yield _take_skipped(batch, self.skipped)


def _take_skipped(batch: dict, skipped: dict[int, str]) -> dict[str, torch.Tensor]:
    """The batch without its list of skipped videos, which goes into `skipped` (row -> error)."""
    skipped.update((int(row), error) for row, error in batch.pop("skipped"))
    return batch


def _worker_decode_error(error: RuntimeError) -> Exception:
    """The DecodeError message in a worker's traceback, as a ClipreelError; any other error as it is."""
    text = str(error)
    name, _, message = text.strip().splitlines()[-1].partition(": ")  # "...probe.DecodeError: <path>: row ..."
    if text.startswith("Caught DecodeError") and name.endswith("DecodeError"):
        return ClipreelError(message)
    return error


def _one_torch_thread(worker_id: int) -> None:
    """Worker set-up: one torch thread per decode process (faster and steadier on these machines)."""
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- "ray": Ray Data streaming


class RayFrameStream:
    """A RawFrameDataset streamed through Ray Data: decode tasks on the cluster, batches in order.

    Each epoch is one Ray Data job over blocks of about one batch of (epoch, index) items; at most
    `workers` decode tasks run at once (one CPU each), the job's object-store budget is a few
    batches per task, and `iter_torch_batches` keeps PREFETCH_BATCHES ready. Order is preserved, so
    the batches equal those of `raw_frame_loader` with the same seed. Ray is started on first use
    (or the cluster at `address` joined) and left running for the next epochs.
    """

    def __init__(self, dataset: RawFrameDataset, batch_size: int, workers: int, shuffle: bool, seed: int,
                 drop_last: bool = False, address: str | None = None):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.shuffle, self.seed, self.drop_last, self.address = shuffle, seed, drop_last, address
        self.skipped: dict[int, str] = {}

    def __len__(self) -> int:
        return batch_count(len(self.dataset), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import ray
        from ray.data import ExecutionResources, TaskPoolStrategy

        from clipreel.pipeline.raycluster import ensure_ray, quiet_ray_data

        ensure_ray(self.address)
        epoch = self.dataset.epoch
        order = epoch_order(len(self.dataset), self.shuffle, self.seed, epoch)
        items = [{"epoch": epoch, "index": index} for index in order]
        blocks = max(1, math.ceil(len(items) / self.batch_size))
        stream = ray.data.from_items(items, override_num_blocks=blocks)
        options = stream.context.execution_options
        options.preserve_order = True
        budget = (self.workers + PREFETCH_BATCHES) * 2 * self.batch_size * self.dataset.item_nbytes()
        options.resource_limits = ExecutionResources(object_store_memory=budget)
        stream.context.raise_original_map_exception = True  # a DecodeError arrives as itself, not wrapped
        quiet_ray_data(stream.context)
        stream = stream.map_batches(
            _decode_block, fn_kwargs={"dataset": self.dataset}, batch_size=None, batch_format="numpy",
            compute=TaskPoolStrategy(size=self.workers), num_cpus=1,
        )
        batches = stream.iter_batches(batch_size=self.batch_size, prefetch_batches=PREFETCH_BATCHES,
                                      drop_last=self.drop_last, batch_format="numpy")
        try:
            for batch in batches:
                yield _take_skipped(_torch_batch(batch), self.skipped)
        except Exception as error:  # a bad video in a task: raise the user's error, not Ray's wrapping
            raise _user_error(error) from None


def _decode_block(items: dict[str, np.ndarray], dataset: RawFrameDataset) -> dict[str, np.ndarray]:
    """A Ray Data task: the clips of a block of (epoch, index) items, stacked, one row per item; a
    video that could not be decoded (on_bad_video "skip") has blank frames and its error."""
    torch.set_num_threads(1)
    clips = [dataset[(int(epoch), int(index))] for epoch, index in zip(items["epoch"], items["index"])]
    blank = np.zeros(dataset.item_shape(), dtype=np.float32)
    return {
        "frames": np.stack([blank if "error" in clip else clip["frames"].numpy() for clip in clips]),  # (n, ...)
        "label": np.array([clip["label"] for clip in clips], dtype=np.int64),
        "row": np.array([clip["row"] for clip in clips], dtype=np.int64),
        "error": np.array([clip.get("error", "") for clip in clips], dtype=object),
    }


def _torch_batch(batch: dict[str, np.ndarray]) -> dict:
    """A numpy batch of `_decode_block` rows as the loaders' batch: the decoded clips, and "skipped"."""
    failed = batch["error"] != ""
    keep = ~failed if failed.any() else slice(None)  # a view of the whole batch when every video decoded
    return {
        "frames": _tensor(batch["frames"][keep]),  # (B, ...) float32
        "label": _tensor(batch["label"][keep]),
        "row": _tensor(batch["row"][keep]),
        "skipped": [(int(row), str(error)) for row, error in zip(batch["row"][failed], batch["error"][failed])],
    }


def _tensor(values: np.ndarray) -> torch.Tensor:
    """A numpy column as a tensor; a read-only one (from Ray's object store) is copied first."""
    return torch.from_numpy(np.require(values, requirements="W"))


def _user_error(error: Exception) -> Exception:
    """The ClipreelError (e.g. a DecodeError naming the video) a Ray task raised, else `error` itself."""
    cause = getattr(error, "cause", None)  # a RayTaskError holds the task's own exception
    return cause if isinstance(cause, ClipreelError) else error


# --------------------------------------------------------------------------- "device": a background thread


class DeviceFrameStream:
    """A RawFrameDataset decoded and augmented in a background thread of this process.

    The frames stay where the dataset's decoder puts them: with DALI on a GPU they are decoded by
    NVDEC into GPU memory and augmented there, so batches arrive on the GPU. PREFETCH_BATCHES are
    prepared ahead of the trainer.
    """

    def __init__(self, dataset: RawFrameDataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False):
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.skipped: dict[int, str] = {}

    def __len__(self) -> int:
        return batch_count(len(self.dataset), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.dataset.epoch
        order = epoch_order(len(self.dataset), self.shuffle, self.seed, epoch)
        size = self.batch_size
        starts = range(0, len(self) * size, size)
        batches = (self.dataset.collate([self.dataset[(epoch, index)] for index in order[start : start + size]])
                   for start in starts)
        ready = read_ahead(batches, PREFETCH_BATCHES, name="clipreel-frames")
        return (_take_skipped(batch, self.skipped) for batch in ready)
