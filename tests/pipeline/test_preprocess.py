"""Preprocessing: output shapes, normalisation values, crop geometry, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipreel.errors import ClipreelError
from clipreel.heads.clip import NORMS
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def thirds(height: int, width: int, frames: int = 2) -> np.ndarray:
    """Frames painted red / green / blue in three equal bands along their long side."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    long_side = max(height, width)
    for band, colour in enumerate((RED, GREEN, BLUE)):
        start, end = band * long_side // 3, (band + 1) * long_side // 3
        if width >= height:
            image[:, start:end] = colour
        else:
            image[start:end, :] = colour
    return np.repeat(image[None], frames, axis=0)


def dominant_colour(pixel: torch.Tensor, cfg: PreprocessConfig) -> int:
    """Which RGB channel is brightest at a (3,) normalised pixel, after undoing the normalisation."""
    rgb = pixel * torch.tensor(cfg.std) + torch.tensor(cfg.mean)
    return int(rgb.argmax())


@pytest.mark.parametrize("crops", [1, 3])
@pytest.mark.parametrize("height,width", [(48, 64), (64, 48), (40, 40), (16, 20), (90, 160)])
def test_output_shape_dtype_and_device(crops, height, width):
    frames = np.random.default_rng(0).integers(0, 256, (5, height, width, 3), dtype=np.uint8)
    cfg = PreprocessConfig(image_size=32, crops=crops)
    out = preprocess(frames, cfg)
    assert out.shape == (crops, 5, 3, 32, 32)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_constant_colour_normalises_to_the_expected_value(norm):
    colour = np.array([200, 100, 50], dtype=np.uint8)
    frames = np.broadcast_to(colour, (3, 50, 70, 3)).copy()
    cfg = PreprocessConfig.from_norm(norm, image_size=24, crops=3)
    out = preprocess(frames, cfg)
    mean, std = NORMS[norm]
    for channel in range(3):
        expected = (colour[channel] / 255 - mean[channel]) / std[channel]
        assert torch.allclose(
            out[:, :, channel], torch.tensor(expected, dtype=torch.float32), atol=1e-5
        )


def test_landscape_three_crops_differ_and_slide_left_to_right():
    cfg = PreprocessConfig(image_size=30, crops=3)
    out = preprocess(thirds(60, 120), cfg)  # resized to 30 x 60; crops start at 0, 15, 30
    start, centre, end = out[:, 0]  # each (3, S, S)
    assert not torch.allclose(start, centre) and not torch.allclose(centre, end)
    assert dominant_colour(start[:, 15, 0], cfg) == 0  # red at the left edge of the frame
    assert dominant_colour(centre[:, 15, 15], cfg) == 1  # green in the middle
    assert dominant_colour(end[:, 15, -1], cfg) == 2  # blue at the right edge


def test_portrait_three_crops_slide_top_to_bottom():
    cfg = PreprocessConfig(image_size=30, crops=3)
    out = preprocess(thirds(120, 60), cfg)  # resized to 60 x 30
    start, centre, end = out[:, 0]
    assert dominant_colour(start[:, 0, 15], cfg) == 0
    assert dominant_colour(centre[:, 15, 15], cfg) == 1
    assert dominant_colour(end[:, -1, 15], cfg) == 2


@pytest.mark.parametrize("height,width", [(60, 120), (120, 60)])
def test_centre_crop_equals_the_middle_of_three_crops(height, width):
    frames = np.random.default_rng(1).integers(0, 256, (4, height, width, 3), dtype=np.uint8)
    one = preprocess(frames, PreprocessConfig(image_size=28, crops=1))
    three = preprocess(frames, PreprocessConfig(image_size=28, crops=3))
    assert torch.equal(one[0], three[1])


def test_centre_crop_keeps_the_middle_of_a_wide_frame():
    cfg = PreprocessConfig(image_size=30)
    out = preprocess(thirds(60, 240), cfg)  # resized to 30 x 120: the centre crop is all green
    assert dominant_colour(out[0, 0, :, 15, 0], cfg) == 1
    assert dominant_colour(out[0, 0, :, 15, -1], cfg) == 1


def test_a_larger_short_side_crops_the_centre_of_the_resized_frame():
    """X-CLIP / ViFi-CLIP / EZ-CLIP testing: short side to 256, then the centre 224 (here 36 -> 32)."""
    frames = np.random.default_rng(3).integers(0, 256, (2, 45, 60, 3), dtype=np.uint8)
    cfg = PreprocessConfig(image_size=32, short_side=36)
    out = preprocess(frames, cfg)
    assert out.shape == (1, 2, 3, 32, 32)
    resized = preprocess(frames, PreprocessConfig(image_size=36))  # (1, 2, 3, 36, 36): the short side 36, centre square
    wide = preprocess(frames, PreprocessConfig(image_size=36, crops=3))[1]  # same frames, the middle of three crops
    torch.testing.assert_close(resized[0], wide)
    torch.testing.assert_close(out[0], resized[0, :, :, 2:34, 2:34])
    assert "short_side" not in PreprocessConfig(image_size=32).to_dict()  # stores made without it read the same
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ClipreelError, match="short side 30"):
        PreprocessConfig(image_size=32, short_side=30)


def test_torch_and_numpy_inputs_give_the_same_result():
    frames = np.random.default_rng(2).integers(0, 256, (3, 36, 52, 3), dtype=np.uint8)
    cfg = PreprocessConfig(image_size=20, crops=3, interpolation="bicubic")
    assert torch.equal(
        preprocess(frames, cfg), preprocess(torch.from_numpy(frames), cfg, device="cpu")
    )


def test_many_frames_are_processed_in_chunks_like_few():
    frames = np.random.default_rng(3).integers(0, 256, (37, 30, 40, 3), dtype=np.uint8)
    cfg = PreprocessConfig(image_size=16)
    together = preprocess(frames, cfg)
    one_by_one = torch.cat([preprocess(frames[i : i + 1], cfg) for i in range(len(frames))], dim=1)
    assert torch.allclose(together, one_by_one)


def test_no_frames_give_an_empty_batch():
    out = preprocess(
        np.zeros((0, 30, 40, 3), dtype=np.uint8), PreprocessConfig(image_size=16, crops=3)
    )
    assert out.shape == (3, 0, 3, 16, 16)


def test_wrong_input_layout_is_rejected():
    with pytest.raises(ValueError):
        preprocess(np.zeros((2, 3, 30, 40), dtype=np.uint8), PreprocessConfig(image_size=16))
    with pytest.raises(ValueError):
        preprocess(np.zeros((2, 30, 40, 3), dtype=np.float32), PreprocessConfig(image_size=16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu():
    frames = np.random.default_rng(4).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    cfg = PreprocessConfig(image_size=32, crops=3)
    on_gpu = preprocess(torch.from_numpy(frames).cuda(), cfg)
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), preprocess(frames, cfg), atol=1e-4)


def test_from_norm_uses_the_named_statistics():
    cfg = PreprocessConfig.from_norm("imagenet", image_size=112, crops=3)
    assert (cfg.mean, cfg.std) == NORMS["imagenet"]
    assert (cfg.image_size, cfg.crops) == (112, 3)
    with pytest.raises(ClipreelError):
        PreprocessConfig.from_norm("kinetics")


def test_config_round_trips_through_json():
    cfg = PreprocessConfig.from_norm("clip", image_size=64, crops=3)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "bad",
    [
        {"crops": 2},
        {"image_size": 0},
        {"interpolation": "nearest"},
        {"mean": (0.5, 0.5)},
        {"std": (0.2, 0.0, 0.2)},
    ],
)
def test_invalid_config_is_a_clipreel_error(bad):
    with pytest.raises(ClipreelError):
        PreprocessConfig(**bad)


def test_unknown_keys_in_a_recorded_config_are_an_error():
    with pytest.raises(ClipreelError, match="unknown keys"):
        PreprocessConfig.from_dict({**PreprocessConfig().to_dict(), "flip": True})
