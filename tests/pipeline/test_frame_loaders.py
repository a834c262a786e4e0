"""The raw-frame loaders: the same batches from worker processes, a Ray Data stream and a device thread;
DALI's decode path (its CPU backend on VP9 here; NVDEC where there is a GPU); clear errors for bad videos."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.augment import AugmentConfig
from clipreel.pipeline.data.decode import dali_available
from clipreel.pipeline.data.frame_loaders import (
    FrameLoading,
    epoch_order,
    frame_loader,
    resolve_loading,
)
from clipreel.pipeline.data.raw_frames import RawFrameDataset
from clipreel.pipeline.data.sampling import SamplingConfig
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.data.synth.world import SynthConfig, make_world

SIZE = 32
FRAMES = 4
WORKERS = FrameLoading(decoder="pyav", loader="workers", device="cpu", workers=0)
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Six real VP9 videos (3 classes x 2) of 16 frames at 64 px: both PyAV and DALI's CPU backend read them."""
    out = tmp_path_factory.mktemp("world")
    return read_sources(make_world(out, SynthConfig(classes=3, videos_per_class=2, frames=16, size=64, codec="vp9")))


def _epochs(manifest, loading: FrameLoading, train: bool = True, epochs: int = 2) -> list[list[dict]]:
    """Every batch of `epochs` epochs (shuffled, batch size 4) through `loading`."""
    sampling = SamplingConfig(frames=FRAMES, views=1 if train else 2)
    augment = AugmentConfig(image_size=SIZE)
    dataset = RawFrameDataset(manifest, sampling, augment, train=train, seed=0, decoder=loading.decoder,
                              device=loading.device)
    loader = frame_loader(dataset, 4, loading, shuffle=train, seed=5)
    batches = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        batches.append(list(loader))
        assert len(batches[-1]) == len(loader)
    return batches


def _assert_same_batches(expected: list[list[dict]], got: list[list[dict]]) -> None:
    assert [len(epoch) for epoch in got] == [len(epoch) for epoch in expected]
    for epoch_a, epoch_b in zip(expected, got):
        for batch_a, batch_b in zip(epoch_a, epoch_b):
            for key in ("frames", "label", "row"):
                assert batch_b[key].dtype == batch_a[key].dtype
                assert torch.equal(batch_a[key], batch_b[key].cpu()), key


def test_worker_processes_give_the_batches_of_in_process_decoding(manifest):
    reference = _epochs(manifest, WORKERS)
    _assert_same_batches(reference, _epochs(manifest, dataclasses.replace(WORKERS, workers=2)))
    first, second = ([row for batch in epoch for row in batch["row"].tolist()] for epoch in reference)
    assert sorted(first) == sorted(manifest.index.tolist())  # every video once per epoch
    assert first != second  # reshuffled between epochs
    assert [len(batch["row"]) for batch in reference[0]] == [4, 2]
    assert reference[0][0]["frames"].shape == (4, FRAMES, 3, SIZE, SIZE)


def test_the_device_thread_gives_the_same_batches(manifest):
    device = FrameLoading(decoder="pyav", loader="device", device="cpu")
    _assert_same_batches(_epochs(manifest, WORKERS), _epochs(manifest, device))
    _assert_same_batches(_epochs(manifest, WORKERS, train=False, epochs=1),
                         _epochs(manifest, device, train=False, epochs=1))


def test_the_ray_data_stream_gives_the_same_batches(manifest, ray_local):
    ray_stream = FrameLoading(decoder="pyav", loader="ray", device="cpu", workers=2)
    _assert_same_batches(_epochs(manifest, WORKERS), _epochs(manifest, ray_stream))
    _assert_same_batches(_epochs(manifest, WORKERS, train=False, epochs=1),
                         _epochs(manifest, ray_stream, train=False, epochs=1))


def test_epoch_order_is_a_seeded_permutation():
    assert sorted(epoch_order(10, True, 3, 0)) == list(range(10))
    assert epoch_order(10, True, 3, 0) == epoch_order(10, True, 3, 0)
    assert epoch_order(10, True, 3, 0) != epoch_order(10, True, 3, 1)
    assert epoch_order(10, False, 3, 4) == list(range(10))


@needs_dali
def test_dali_decodes_the_clips_pyav_decodes(manifest):
    """Same frame indices, same augmentation draws: only the two decoders' pixel rounding differs."""
    dali = FrameLoading(decoder="dali", loader="device", device="cpu")
    for train in (True, False):
        for batch_pyav, batch_dali in zip(_epochs(manifest, WORKERS, train, epochs=1)[0],
                                          _epochs(manifest, dali, train, epochs=1)[0]):
            assert torch.equal(batch_pyav["row"], batch_dali["row"])
            assert batch_dali["frames"].shape == batch_pyav["frames"].shape
            # measured: mean |difference| 0.016-0.023 in normalised units (extraction's bound: 0.05)
            assert (batch_dali["frames"] - batch_pyav["frames"]).abs().mean() < 0.05


@needs_dali
@needs_gpu
def test_dali_on_the_gpu_decodes_and_augments_there(manifest):
    loading = resolve_loading("auto", "auto", "cuda:0")
    assert (loading.decoder, loading.loader, loading.device) == ("dali", "device", "cuda:0")
    for batch_pyav, batch_gpu in zip(_epochs(manifest, WORKERS, epochs=1)[0], _epochs(manifest, loading, epochs=1)[0]):
        assert batch_gpu["frames"].is_cuda
        assert (batch_gpu["frames"].cpu() - batch_pyav["frames"]).abs().mean() < 0.05


def test_auto_picks_pyav_and_worker_processes_on_the_cpu():
    loading = resolve_loading("auto", "auto", torch.device("cpu"), workers=3)
    assert (loading.decoder, loading.loader, loading.device, loading.workers) == ("pyav", "workers", "cpu", 3)
    assert resolve_loading("pyav", "ray", "cpu", address="host:6379").address == "host:6379"
    with pytest.raises(ClipreelError, match="unknown frame loader"):
        resolve_loading("auto", "threads", "cpu")


@needs_dali
def test_dali_on_a_gpu_refuses_worker_processes():
    with pytest.raises(ClipreelError, match="--loader device"):
        resolve_loading("dali", "workers", "cuda:0")


def _with_a_broken_video(manifest, tmp_path):
    broken = tmp_path / "broken.webm"
    broken.write_bytes(b"not a video at all" * 10)
    rows = manifest.copy()
    rows.loc[rows.index[3], "path"] = str(broken)
    return rows, rows.index[3]


def test_a_bad_video_in_a_worker_process_is_a_clear_error(manifest, tmp_path):
    rows, bad_row = _with_a_broken_video(manifest, tmp_path)
    with pytest.raises(ClipreelError, match=f"broken.webm: row {bad_row} "):
        _epochs(rows, dataclasses.replace(WORKERS, workers=2), epochs=1)


def test_a_bad_video_in_a_ray_task_is_a_clear_error(manifest, tmp_path, ray_local):
    rows, bad_row = _with_a_broken_video(manifest, tmp_path)
    with pytest.raises(ClipreelError, match=f"broken.webm: row {bad_row} "):
        _epochs(rows, FrameLoading(decoder="pyav", loader="ray", device="cpu", workers=2), epochs=1)
