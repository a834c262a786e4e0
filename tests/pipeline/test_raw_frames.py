"""Raw-frame streaming: video-consistent augmentation, mixup/cutmix, the dataset and its loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipreel.heads.clip import NORMS
from clipreel.pipeline.data.augment import (
    AugmentConfig,
    augment_clip,
    draw_augmentation,
    eval_clip,
    mix_batch,
)
from clipreel.pipeline.data.decode import DecodeError, PyAVDecoder, probe
from clipreel.pipeline.data.frame_loaders import raw_frame_loader
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
from clipreel.pipeline.data.raw_frames import RawFrameDataset
from clipreel.pipeline.data.sampling import SamplingConfig, sample_indices
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.data.synth.world import SynthConfig, make_world

SIZE = 32  # output crop size of these tests
FRAMES = 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Six real H.264 videos (3 classes x 2) of 16 frames at 64 px, as a manifest."""
    out = tmp_path_factory.mktemp("world")
    videos_csv = make_world(out, SynthConfig(classes=3, videos_per_class=2, frames=16, size=64))
    return read_sources(videos_csv)


def _random_frames(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _pixels(clip: torch.Tensor, norm: str = "clip") -> torch.Tensor:
    """Undo the normalisation: (T, 3, S, S) back to [0, 1] pixels."""
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in NORMS[norm])
    return clip * std + mean


def test_identical_frames_stay_identical_through_every_augmentation():
    frame = _random_frames((1, 48, 64, 3))
    clip = np.repeat(frame, FRAMES, axis=0)  # (T, H, W, 3), every frame the same
    always = AugmentConfig(image_size=SIZE, flip=0.5, color_jitter=1.0, grayscale=0.0)
    for seed in range(6):
        augmented = augment_clip(clip, always, torch.Generator().manual_seed(seed))
        assert augmented.shape == (FRAMES, 3, SIZE, SIZE)
        for t in range(1, FRAMES):
            assert torch.equal(augmented[t], augmented[0])
        # the jitter did act: the same geometry without jitter gives other pixels
        no_jitter = AugmentConfig(image_size=SIZE, flip=0.5, color_jitter=0.0, grayscale=0.0)
        plain = augment_clip(clip, no_jitter, torch.Generator().manual_seed(seed))
        assert not torch.allclose(plain, augmented, atol=1e-3)


def test_first_and_last_frame_get_the_same_crop_and_flip():
    """Frames whose red channel is the x coordinate and green the y coordinate: after augmentation the
    red and green of frame 0 and frame T-1 must match (same box, same flip); blue (the frame number) differs."""
    height, width = 48, 64
    x = np.linspace(0, 255, width).round().astype(np.uint8)
    y = np.linspace(0, 255, height).round().astype(np.uint8)
    clip = np.zeros((FRAMES, height, width, 3), dtype=np.uint8)
    clip[..., 0] = x[None, None, :]
    clip[..., 1] = y[None, :, None]
    clip[..., 2] = (40 + 60 * np.arange(FRAMES))[:, None, None]
    geometry_only = AugmentConfig(image_size=SIZE, color_jitter=0.0, grayscale=0.0)
    flips, boxes = set(), set()
    for seed in range(12):
        draw = draw_augmentation(height, width, geometry_only, torch.Generator().manual_seed(seed))
        pixels = _pixels(augment_clip(clip, geometry_only, torch.Generator().manual_seed(seed)))
        assert torch.allclose(pixels[0, :2], pixels[-1, :2], atol=1e-6)
        assert not torch.allclose(pixels[0, 2], pixels[-1, 2])
        red = pixels[0, 0]  # (S, S): x coordinate of the source pixel, / (width - 1)
        flipped = bool(red[:, 0].mean() > red[:, -1].mean())
        assert flipped == draw.flip
        # the crop shows the drawn box: its x span covers box left .. box right
        _, left, _, box_width = draw.box
        pixel = 1 / (width - 1)
        assert red.min() == pytest.approx(left * pixel, abs=2 * pixel)
        assert red.max() == pytest.approx((left + box_width - 1) * pixel, abs=2 * pixel)
        flips.add(flipped)
        boxes.add(draw.box)
    assert flips == {True, False} and len(boxes) > 3  # the draws really vary between clips


def test_random_resized_crop_box_stays_inside_the_frame():
    cfg = AugmentConfig(image_size=SIZE, crop="rrc")
    for seed in range(20):
        top, left, box_height, box_width = draw_augmentation(48, 64, cfg, torch.Generator().manual_seed(seed)).box
        assert 0 <= top and top + box_height <= 48 and 0 <= left and left + box_width <= 64
        assert box_height * box_width >= 0.08 * 48 * 64 * 0.9  # the area fraction, up to rounding
    clip = augment_clip(_random_frames((FRAMES, 48, 64, 3)), cfg, torch.Generator().manual_seed(0))
    assert clip.shape == (FRAMES, 3, SIZE, SIZE)


def test_augmentation_is_deterministic_under_a_seed():
    clip = _random_frames((FRAMES, 40, 56, 3))
    cfg = AugmentConfig(image_size=SIZE, grayscale=0.5)
    first = augment_clip(clip, cfg, torch.Generator().manual_seed(7))
    again = augment_clip(clip, cfg, torch.Generator().manual_seed(7))
    other = augment_clip(clip, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("norm", ["clip", "imagenet"])
def test_eval_clip_is_the_centre_crop_of_preprocess(norm):
    clip = _random_frames((FRAMES, 48, 64, 3))
    expected = preprocess(clip, PreprocessConfig.from_norm(norm, image_size=SIZE))[0]
    assert torch.equal(eval_clip(clip, AugmentConfig(image_size=SIZE, norm=norm)), expected)


def test_mix_batch_targets_sum_to_one_and_never_leave_the_smoothed_range():
    clips = torch.randn(6, FRAMES, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    original = clips.clone()
    num_classes, smoothing = 5, 0.1
    for seed in range(8):
        mixed, targets = mix_batch(clips, labels, num_classes, generator=torch.Generator().manual_seed(seed))
        assert mixed.shape == clips.shape and targets.shape == (6, num_classes)
        assert torch.allclose(targets.sum(1), torch.ones(6))
        assert targets.min() >= smoothing / num_classes - 1e-6
        assert targets.max() <= 1 - smoothing + smoothing / num_classes + 1e-6
    assert torch.equal(clips, original)  # inputs untouched


def test_mix_batch_of_one_clip_gives_the_smoothed_one_hot():
    clip = torch.randn(1, FRAMES, 3, 8, 8)
    _, targets = mix_batch(clip, torch.tensor([2]), num_classes=4, label_smoothing=0.2)
    expected = torch.full((1, 4), 0.2 / 4)
    expected[0, 2] = 1 - 0.2 + 0.2 / 4
    assert torch.allclose(targets, expected)


def test_cutmix_pastes_one_box_in_every_frame_and_weights_targets_by_its_area():
    batch, num_classes, smoothing = 4, 4, 0.1
    # clip b is filled with the value b, so every pixel tells which clip it came from
    clips = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1, 1).expand(batch, FRAMES, 3, 16, 16).clone()
    labels = torch.arange(batch)
    on, off = 1 - smoothing + smoothing / num_classes, smoothing / num_classes
    seen_boxes = 0
    for seed in range(10):
        mixed, targets = mix_batch(
            clips, labels, num_classes, switch_prob=1.0, label_smoothing=smoothing,
            generator=torch.Generator().manual_seed(seed),
        )
        pasted = mixed != clips  # (B, T, 3, S, S): where another clip's pixels were pasted
        masks = [pasted[b, 0, 0] for b in range(batch) if pasted[b].any()]  # (S, S) each
        for b in range(batch):
            assert torch.equal(pasted[b], pasted[b, :1, :1].expand_as(pasted[b]))  # same box in every frame
        for mask in masks:
            assert torch.equal(mask, masks[0])  # and in every clip of the batch
        if not masks:
            continue
        seen_boxes += 1
        kept = 1 - masks[0].float().mean().item()  # the fraction of each clip that stays its own
        for b in range(batch):
            if pasted[b].any():
                partner = int(mixed[b][pasted[b]][0])  # the pasted pixels carry the partner's index
                assert targets[b, b] == pytest.approx(kept * on + (1 - kept) * off, abs=1e-5)
                assert targets[b, partner] == pytest.approx(kept * off + (1 - kept) * on, abs=1e-5)
    assert seen_boxes > 0


def test_train_dataset_items_are_seeded_by_seed_epoch_and_video(manifest):
    sampling = SamplingConfig(frames=FRAMES)
    augment = AugmentConfig(image_size=SIZE)
    dataset = RawFrameDataset(manifest, sampling, augment, train=True, seed=3)
    item = dataset[1]
    assert item["frames"].shape == (FRAMES, 3, SIZE, SIZE)
    assert item["label"] == manifest["label"].iloc[1] and item["row"] == manifest.index[1]
    assert torch.equal(dataset[1]["frames"], item["frames"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1]["frames"], item["frames"])  # a new epoch, a new draw
    assert torch.equal(dataset[(0, 1)]["frames"], item["frames"])  # epoch 0 can be replayed
    other_seed = RawFrameDataset(manifest, sampling, augment, train=True, seed=4)
    assert not torch.equal(other_seed[1]["frames"], item["frames"])


def test_loader_batches_are_identical_with_two_workers_and_with_none(manifest):
    sampling = SamplingConfig(frames=FRAMES)
    augment = AugmentConfig(image_size=SIZE)
    epochs = {}
    for workers in (0, 2):
        dataset = RawFrameDataset(manifest, sampling, augment, train=True, seed=0)
        loader = raw_frame_loader(dataset, batch_size=4, workers=workers, shuffle=True, seed=5)
        epochs[workers] = []
        for epoch in range(2):
            dataset.set_epoch(epoch)
            epochs[workers].append(list(loader))
    for epoch_batches in zip(epochs[0], epochs[2]):
        for batch_a, batch_b in zip(*epoch_batches):
            assert batch_a["frames"].shape[1:] == (FRAMES, 3, SIZE, SIZE)
            assert batch_a["frames"].dtype == torch.float32 and batch_a["label"].dtype == torch.int64
            for key in ("frames", "label", "row"):
                assert torch.equal(batch_a[key], batch_b[key])
    rows_per_epoch = [torch.cat([batch["row"] for batch in batches]).tolist() for batches in epochs[2]]
    assert sorted(rows_per_epoch[0]) == sorted(manifest.index.tolist())  # every video once per epoch
    assert rows_per_epoch[0] != rows_per_epoch[1]  # reshuffled between epochs
    assert [len(batch["row"]) for batch in epochs[0][0]] == [4, 2]


def test_eval_dataset_gives_every_view_and_crop(manifest):
    sampling = SamplingConfig(frames=FRAMES, views=2)
    augment = AugmentConfig(image_size=SIZE, norm="imagenet")
    dataset = RawFrameDataset(manifest, sampling, augment, train=False, crops=3)
    frames = dataset[0]["frames"]
    assert frames.shape == (2 * 3, FRAMES, 3, SIZE, SIZE)
    num_frames = probe(manifest["path"].iloc[0]).num_frames
    indices = sample_indices(num_frames, sampling, manifest["video_id"].iloc[0])  # (V, T)
    decoded = PyAVDecoder().read(manifest["path"].iloc[0], indices.reshape(-1))  # (V * T, H, W, 3)
    for view in range(2):
        centre = eval_clip(decoded[view * FRAMES : (view + 1) * FRAMES], augment)
        assert torch.equal(frames[view * 3 + 1], centre)  # crop 1 of 3 is the centre
    assert not torch.equal(frames[1], frames[4])  # the two views are different frames


def test_undecodable_file_raises_decode_error_naming_the_row(manifest, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    rows = manifest.iloc[:2].copy()
    rows.loc[rows.index[1], "path"] = str(broken)
    dataset = RawFrameDataset(rows, SamplingConfig(frames=FRAMES), AugmentConfig(image_size=SIZE), train=True)
    with pytest.raises(DecodeError, match=f"row {rows.index[1]} "):
        dataset[1]
