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

`labelled_rows` and `augment_config` are what the fine-tuning stages build their datasets from.

May import: torch, pandas, clipreel.errors, clipreel.pipeline.data.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
from torch.utils.data import Dataset

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


class RawFrameDataset(Dataset):
    """Decoded, sampled and augmented clips of manifest rows (columns `path`, `label`, `video_id`).

    train=True: random TSN-style offsets (`sampling` with random=True, one view) and `augment_clip`;
    item i is {"frames": (T, 3, S, S) float32, "label": int, "row": int}.
    train=False: `sampling` as given (segment centres for tsn) and the evaluation transform; with
    V views and `crops` (1 centre, 3 along the long side) item i's frames are (V * crops, T, 3, S, S),
    view-major (view 0's crops first), for multi-view testing.

    decoder: "pyav" or "dali" (`clipreel.pipeline.data.decode.make_decoder`) for frames on `device`:
    DALI on "cuda:k" decodes with NVDEC into GPU memory, and the augmentation runs there too, so the
    item's frames are on that GPU; otherwise they are on the CPU. The decoder is built in the process
    that decodes (a DataLoader worker, a Ray task), on first use.

    "row" is the manifest row (the DataFrame's index label), so results map back to the manifest.
    Randomness (frame offsets and augmentation) is seeded by (seed, epoch, video_id): call
    `set_epoch` before each epoch. Items may also be asked for as (epoch, i) pairs, which is how the
    loaders (`clipreel.pipeline.data.frame_loaders`) pass the epoch to workers that hold their own copy of
    the dataset. A file that cannot be decoded raises `DecodeError` naming the row.
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
    ):
        missing = {"path", "label", "video_id"} - set(rows.columns)
        if missing:
            raise ClipreelError(f"the rows given to RawFrameDataset lack the columns {sorted(missing)}: pass manifest rows")
        self.paths = rows["path"].astype(str).tolist()
        self.labels = rows["label"].astype(int).tolist()
        self.video_ids = rows["video_id"].astype(str).tolist()
        self.manifest_rows = [int(index) for index in rows.index]
        self.train = train
        self.sampling = dataclasses.replace(sampling, random=True, views=1) if train else sampling
        self.augment = augment
        self.eval_preprocess = dataclasses.replace(augment.preprocess_config, crops=crops)
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

    def item_nbytes(self) -> int:
        """Bytes of one item's frames (float32)."""
        clips = 1 if self.train else self.sampling.views * self.eval_preprocess.crops
        return clips * self.sampling.frames * 3 * self.augment.image_size**2 * 4

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
            raise DecodeError(error.path, f"{where}: {error.problem}", error.fix) from error
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

