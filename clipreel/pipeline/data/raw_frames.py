"""Raw clips for the methods that train the backbone: decode, sample, augment, one item per video.

The fine-tuning methods (ViFi-CLIP, bridge-and-prompt, full X-CLIP, EZ-CLIP) cannot train from
the feature cache, so they read videos again, through the same manifest, sampling policies and
decoders (PyAV; DALI on a GPU) as extraction, and augment each clip (`augment.augment_clip`).

Determinism: every random draw comes from a generator seeded by (seed, epoch, video_id) with a
stable hash, so a clip's frames and augmentation are the same in any worker process or Ray task,
with any number of workers, in any order (`frame_loaders`).

    loading = resolve_loading("auto", "auto", model_device, workers=2)  # data.frame_loaders
    dataset = RawFrameDataset(manifest_rows, SamplingConfig(frames=8), AugmentConfig(), train=True, seed=0,
                              decoder=loading.decoder, device=loading.device)
    loader = frame_loader(dataset, 8, loading, shuffle=True, seed=0)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for batch in loader:
            batch["frames"]  # (B, T, 3, S, S) float32, normalised
            batch["label"], batch["row"]  # (B,) int64

A video that cannot be decoded stops the loader with a DecodeError naming its manifest row
(on_bad_video "stop"), or is left out of its batch (on_bad_video "skip"): every batch is made by
`RawFrameDataset.collate` from the items of its place in the epoch's order, so the other videos keep
their batches, and the batch carries the skipped rows with their errors ("skipped"), which the
loaders collect (`loader.skipped`, row -> error).

`labelled_rows` and `augment_config` are what the fine-tuning stages build their datasets from.

May import: torch, pandas, clipreel.errors, clipreel.pipeline.data.
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.augment import AugmentConfig, augment_clip, stable_generator
from clipreel.pipeline.data.decode import (
    DecodeError,
    choose_decoder,
    make_decoder,
    probe,
)
from clipreel.pipeline.data.preprocess import preprocess
from clipreel.pipeline.data.sampling import SamplingConfig, sample_indices, stable_seed

# What a video that cannot be decoded does: stop the loader (naming its row), or leave it out of its batch.
ON_BAD_VIDEO = ("stop", "skip")


class RawFrameDataset(Dataset):
    """Decoded, sampled and augmented clips of manifest rows (columns `path`, `label`, `video_id`).

    train=True: random TSN-style offsets (`sampling` with random=True, one view) and `augment_clip`;
    item i is {"frames": (T, 3, S, S) float32, "label": int, "row": int}.
    train=False: `sampling` as given (segment centres for tsn) and the evaluation transform (the
    short side resized to `short_side`, default S, before cropping); with V views and `crops`
    (1 centre, 3 along the long side) item i's frames are (V * crops, T, 3, S, S), view-major
    (view 0's crops first), for multi-view testing.

    decoder: "pyav" or "dali" (`clipreel.pipeline.data.decode.make_decoder`) for frames on `device`:
    DALI on "cuda:k" decodes with NVDEC into GPU memory, and the augmentation runs there too, so the
    item's frames are on that GPU; otherwise they are on the CPU. The decoder is built in the process
    that decodes (a DataLoader worker, a Ray task), on first use.

    "row" is the manifest row (the DataFrame's index label), so results map back to the manifest.
    Randomness (frame offsets and augmentation) is seeded by (seed, epoch, video_id): call
    `set_epoch` before each epoch. Items may also be asked for as (epoch, i) pairs, which is how the
    loaders (`clipreel.pipeline.data.frame_loaders`) pass the epoch to workers that hold their own copy of
    the dataset. A file that cannot be decoded raises `DecodeError` naming the row (on_bad_video
    "stop"), or its item is {"error": that message, "label", "row"} (on_bad_video "skip"), which
    `collate` leaves out of the batch.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        sampling: SamplingConfig,
        augment: AugmentConfig,
        train: bool,
        seed: int = 0,
        crops: int = 1,
        decoder: str = "pyav",
        device: str = "cpu",
        short_side: int | None = None,
        on_bad_video: str = "stop",
    ):
        missing = {"path", "label", "video_id"} - set(rows.columns)
        if missing:
            raise ClipreelError(f"the rows given to RawFrameDataset lack the columns {sorted(missing)}: pass manifest rows")
        check_on_bad_video(on_bad_video)
        self.on_bad_video = on_bad_video
        self.paths = rows["path"].astype(str).tolist()
        self.labels = rows["label"].astype(int).tolist()
        self.video_ids = rows["video_id"].astype(str).tolist()
        self.manifest_rows = [int(index) for index in rows.index]
        self.train = train
        self.sampling = dataclasses.replace(sampling, random=True, views=1) if train else sampling
        self.augment = augment
        self.eval_preprocess = dataclasses.replace(augment.preprocess_config, crops=crops, short_side=short_side)
        self.seed = seed
        self.epoch = 0
        self.decoder_name, self.device = choose_decoder(decoder, device), str(device)
        self._decoder = None  # built on first use, in the process that decodes

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict:
        """What goes to worker processes and Ray tasks: everything but the built decoder."""
        return {**self.__dict__, "_decoder": None}

    def set_epoch(self, epoch: int) -> None:
        """Draw the frame offsets and augmentation of `epoch` (each epoch sees new ones)."""
        self.epoch = epoch

    def item_shape(self) -> tuple[int, ...]:
        """The shape of one item's frames: (T, 3, S, S) for training, (V * C, T, 3, S, S) otherwise."""
        clip = (self.sampling.frames, 3, self.augment.image_size, self.augment.image_size)
        return clip if self.train else (self.sampling.views * self.eval_preprocess.crops, *clip)

    def item_nbytes(self) -> int:
        """Bytes of one item's frames (float32)."""
        return 4 * math.prod(self.item_shape())

    def collate(self, items: list[dict]) -> dict:
        """The batch of `items`: {"frames" (B, ...), "label" (B,), "row" (B,)} of the decoded ones, and
        "skipped": [(row, error)] of those that could not be decoded (B may be 0)."""
        decoded = [item for item in items if "error" not in item]
        skipped = [(item["row"], item["error"]) for item in items if "error" in item]
        if decoded:
            return {**default_collate(decoded), "skipped": skipped}
        nothing = torch.zeros(0, dtype=torch.int64)
        return {"frames": torch.zeros((0, *self.item_shape()), device=self.device), "label": nothing,
                "row": nothing.clone(), "skipped": skipped}

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = make_decoder(self.decoder_name, self.device)
        return self._decoder

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        path, video_id = self.paths[index], self.video_ids[index]
        where = f"row {self.manifest_rows[index]} ({video_id})"
        try:
            info = probe(path)
            sampling = dataclasses.replace(self.sampling, seed=_epoch_seed(self.seed, epoch))
            indices = sample_indices(info.num_frames, sampling, video_id)  # (V, T)
            frames = self.decoder.read(path, indices.reshape(-1), info)  # (V * T, H, W, 3) uint8
        except DecodeError as error:
            located = DecodeError(error.path, f"{where}: {error.problem}", error.fix)
            if self.on_bad_video == "stop":
                raise located from error
            return {"error": str(located), "label": self.labels[index], "row": self.manifest_rows[index]}
        views, length = indices.shape
        if self.train:
            generator = stable_generator("augment", self.seed, epoch, video_id)
            clip = augment_clip(frames, self.augment, generator)  # (T, 3, S, S)
        else:
            crops = preprocess(frames, self.eval_preprocess)  # (C, V * T, 3, S, S)
            clip = crops.unflatten(1, (views, length)).transpose(0, 1).flatten(0, 1)  # (V * C, T, 3, S, S)
        return {"frames": clip, "label": self.labels[index], "row": self.manifest_rows[index]}


def _epoch_seed(seed: int, epoch: int) -> int:
    """The sampling seed of an epoch: frame offsets differ between epochs, and are replayable."""
    return stable_seed("frames", seed, epoch) >> 1


def check_on_bad_video(on_bad_video: str) -> None:
    if on_bad_video not in ON_BAD_VIDEO:
        raise ClipreelError(f"--on-bad-video {on_bad_video!r}: choose {' or '.join(ON_BAD_VIDEO)}")


def labelled_rows(manifest: pd.DataFrame, split: str | None) -> pd.DataFrame:
    """The labelled videos of `split` that are not known to be broken (rows keep their manifest index)."""
    if split is None:
        return manifest.iloc[0:0]
    status_ok = manifest["status"] != "failed" if "status" in manifest else True
    return manifest[(manifest["split"] == split) & (manifest["label"] >= 0) & status_ok]


def augment_config(image_size: int, norm: str, settings: dict | None = None) -> AugmentConfig:
    """The training augmentation of a run (and, through its preprocess_config, its evaluation transform),
    with the user's `--augment` settings (names, types and ranges checked)."""
    settings = AugmentConfig.checked_options(settings or {}, "the training augmentation", flag="--augment",
                                             not_options=("image_size", "norm"))
    return AugmentConfig(**settings, image_size=image_size, norm=norm)

