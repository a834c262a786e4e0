"""Frame sampling policies: shapes, ranges, the geometry of each policy, seeding, validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.sampling import POLICIES, SamplingConfig, sample_indices


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("random", [False, True])
@pytest.mark.parametrize("num_frames", [1, 2, 7, 8, 100, 1000])
@pytest.mark.parametrize("frames,views", [(1, 1), (8, 1), (16, 3)])
def test_shape_dtype_and_range(policy, random, num_frames, frames, views):
    cfg = SamplingConfig(policy=policy, frames=frames, stride=4, views=views, random=random)
    indices = sample_indices(num_frames, cfg, key="video-1")
    assert indices.shape == (views, frames)
    assert indices.dtype == np.int64
    assert indices.min() >= 0 and indices.max() <= num_frames - 1


def test_tsn_test_mode_takes_segment_centres():
    # 80 frames in 8 segments of 10: the centre of segment t is frame 10 t + 5.
    indices = sample_indices(80, SamplingConfig(policy="tsn", frames=8), key="v")
    assert indices.tolist() == [[10 * t + 5 for t in range(8)]]


@pytest.mark.parametrize("random", [False, True])
def test_tsn_every_index_stays_in_its_segment(random):
    num_frames, frames = 103, 8
    cfg = SamplingConfig(policy="tsn", frames=frames, views=4, random=random, seed=3)
    segment_starts = np.floor(np.arange(frames) * num_frames / frames)
    segment_ends = np.ceil((np.arange(frames) + 1) * num_frames / frames)  # exclusive
    for key in ["a", "b", "c"]:
        indices = sample_indices(num_frames, cfg, key)
        assert np.all(indices >= segment_starts) and np.all(indices < segment_ends)


def test_tsn_test_views_spread_inside_each_segment():
    # Two views of 4 segments of 20 frames: offsets 1/4 and 3/4 of a segment.
    indices = sample_indices(80, SamplingConfig(policy="tsn", frames=4, views=2), key="v")
    assert indices.tolist() == [[20 * t + 5 for t in range(4)], [20 * t + 15 for t in range(4)]]


def test_tsn_random_offsets_differ_between_views_and_videos():
    cfg = SamplingConfig(policy="tsn", frames=8, views=2, random=True)
    first = sample_indices(1000, cfg, key="a")
    second = sample_indices(1000, cfg, key="b")
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first, second)


def test_dense_test_single_view_is_a_centred_clip_at_the_stride():
    num_frames, frames, stride = 300, 8, 16
    indices = sample_indices(
        num_frames, SamplingConfig(policy="dense", frames=frames, stride=stride), "v"
    )
    span = (frames - 1) * stride + 1
    assert indices[0, 0] == (num_frames - span) // 2
    assert np.all(np.diff(indices[0]) == stride)


def test_dense_test_views_are_evenly_spaced_from_first_to_last_frame():
    cfg = SamplingConfig(policy="dense", frames=8, stride=16, views=3)
    indices = sample_indices(300, cfg, "v")
    assert indices[0, 0] == 0 and indices[-1, -1] == 299
    starts = indices[:, 0]
    assert abs((starts[1] - starts[0]) - (starts[2] - starts[1])) <= 1
    assert np.all(np.diff(indices, axis=1) == 16)


def test_dense_random_starts_keep_the_stride_and_vary():
    cfg = SamplingConfig(policy="dense", frames=8, stride=16, random=True)
    clips = [sample_indices(500, cfg, key=f"video-{i}") for i in range(10)]
    assert all(np.all(np.diff(clip[0]) == 16) for clip in clips)
    assert len({int(clip[0, 0]) for clip in clips}) > 1


@pytest.mark.parametrize("random", [False, True])
def test_dense_short_video_repeats_the_last_frame(random):
    num_frames, stride = 40, 16
    cfg = SamplingConfig(policy="dense", frames=8, stride=stride, random=random)
    indices = sample_indices(num_frames, cfg, "short")
    expected = np.minimum(stride * np.arange(8), num_frames - 1)
    assert indices[0].tolist() == expected.tolist()


def test_uniform_single_view_is_linspace_over_the_whole_video():
    indices = sample_indices(97, SamplingConfig(policy="uniform", frames=8), "v")
    assert indices[0].tolist() == np.round(np.linspace(0, 96, 8)).astype(int).tolist()


def test_uniform_views_shift_forward_by_less_than_one_gap():
    num_frames, frames = 97, 8
    indices = sample_indices(
        num_frames, SamplingConfig(policy="uniform", frames=frames, views=3), "v"
    )
    gap = (num_frames - 1) / (frames - 1)
    shift = indices - indices[0]
    assert np.all(shift >= 0) and np.all(shift <= np.ceil(gap))
    assert not np.array_equal(indices[0], indices[1])


def test_same_seed_and_key_give_the_same_indices_other_seeds_differ():
    cfg = SamplingConfig(policy="tsn", frames=8, views=2, random=True, seed=7)
    assert np.array_equal(sample_indices(1000, cfg, "k"), sample_indices(1000, cfg, "k"))
    other_seed = SamplingConfig(policy="tsn", frames=8, views=2, random=True, seed=8)
    assert not np.array_equal(sample_indices(1000, cfg, "k"), sample_indices(1000, other_seed, "k"))


def test_non_random_sampling_ignores_key_and_seed():
    first = sample_indices(500, SamplingConfig(policy="dense", views=2, seed=1), "a")
    second = sample_indices(500, SamplingConfig(policy="dense", views=2, seed=2), "b")
    assert np.array_equal(first, second)


def test_random_indices_are_identical_in_another_process():
    """The seed hash must not depend on Python's per-process string hashing."""
    cfg = SamplingConfig(policy="dense", frames=8, stride=4, views=2, random=True, seed=11)
    here = sample_indices(900, cfg, "clip/åbc.mp4").tolist()
    script = (
        "import json, sys\n"
        "from clipreel.pipeline.data.sampling import SamplingConfig, sample_indices\n"
        "cfg = SamplingConfig.from_dict(json.loads(sys.argv[1]))\n"
        "print(json.dumps(sample_indices(900, cfg, 'clip/åbc.mp4').tolist()))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cfg.to_dict())],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    assert json.loads(result.stdout) == here


def test_config_round_trips_through_json():
    cfg = SamplingConfig(policy="dense", frames=16, stride=8, views=3, random=True, seed=5)
    assert SamplingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "bad", [{"frames": 0}, {"stride": 0}, {"views": 0}, {"policy": "slowfast"}, {"frames": 2.5}]
)
def test_invalid_config_is_a_clipreel_error(bad):
    with pytest.raises(ClipreelError):
        SamplingConfig(**bad)


def test_unknown_keys_in_a_recorded_config_are_an_error():
    with pytest.raises(ClipreelError, match="unknown keys"):
        SamplingConfig.from_dict({**SamplingConfig().to_dict(), "jitter": 2})


def test_a_video_without_frames_is_a_clipreel_error_naming_it():
    with pytest.raises(ClipreelError, match="empty-video"):
        sample_indices(0, SamplingConfig(), key="empty-video")
