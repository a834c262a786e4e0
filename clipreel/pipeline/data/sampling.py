"""Which frames of a video to look at: the temporal sampling policies of the reference methods.

A policy turns a video's frame count into a (V views, T frames) table of frame indices. Every
decoder reads exactly these indices, and the feature store records them, so a run can be
reproduced and audited. Randomness is seeded from (seed, video key) with a stable hash: the same
video gets the same indices in any process, on any machine, in any order.

`segment_indices` samples inside one segment of an untrimmed video (--start/--end, a list's
start,end columns).

Policies:
- ``tsn``: T equal segments (X-CLIP, ViFi-CLIP, EZ-CLIP). Test: segment centres (view v of V
  takes offset (v + 0.5) / V inside each segment). Train: a random offset in each segment.
- ``dense``: T frames ``stride`` apart (EVL). Test: V evenly spaced starts (V = 1: centred clip).
  Train: random starts. Videos shorter than the clip repeat their last frame.
- ``uniform``: T indices evenly spaced over the whole video; view v shifts them forward by v / V
  of the spacing (random: by a random fraction).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from clipreel.config import SIZE, JsonConfig, ranged
from clipreel.errors import ClipreelError

POLICIES = ("tsn", "dense", "uniform")


@dataclass(frozen=True)
class SamplingConfig(JsonConfig):
    """How to pick frames: policy, T frames per view, stride (dense only), V views, randomness."""

    policy: str = "tsn"
    frames: int = ranged(8, SIZE)
    stride: int = ranged(16, SIZE)
    views: int = ranged(1, SIZE)
    random: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy not in POLICIES:
            raise ClipreelError(
                f"sampling policy {self.policy!r} is unknown: choose one of {', '.join(POLICIES)}"
            )



def sample_indices(num_frames: int, cfg: SamplingConfig, key: str) -> np.ndarray:
    """The frame indices to decode for one video: (V, T) int64, every value in [0, num_frames-1].

    `key` identifies the video (its video_id) and seeds the randomness together with `cfg.seed`.
    """
    if num_frames < 1:
        raise ClipreelError(
            f"video {key!r} has {num_frames} frames, so no frame can be sampled: "
            f"check the file decodes, or drop its manifest row"
        )
    rng = np.random.default_rng(stable_seed(cfg.seed, key)) if cfg.random else None
    if cfg.policy == "tsn":
        indices = _tsn(num_frames, cfg.frames, cfg.views, rng)
    elif cfg.policy == "dense":
        indices = _dense(num_frames, cfg.frames, cfg.stride, cfg.views, rng)
    else:
        indices = _uniform(num_frames, cfg.frames, cfg.views, rng)
    return np.clip(indices, 0, num_frames - 1).astype(np.int64)


def segment_indices(num_frames: int, fps: float, start: float | None, end: float | None, cfg: SamplingConfig,
                    key: str) -> np.ndarray:
    """`sample_indices` inside the segment [start, end] seconds of a video (None: its first / last frame).

    Frame i is shown at i / fps: the segment holds frames floor(start * fps) .. ceil(end * fps) - 1
    (at least one). The indices are absolute frame indices of the video, (V, T).
    """
    if start is None and end is None:
        return sample_indices(num_frames, cfg, key)
    if not fps > 0:
        raise ClipreelError(f"video {key!r} declares no frame rate, so the segment {start}..{end} s cannot be placed")
    first = int(np.floor((start or 0.0) * fps))
    stop = num_frames if end is None else min(num_frames, int(np.ceil(end * fps)))
    if first >= num_frames:
        raise ClipreelError(
            f"video {key!r}: the segment starts at {start} s, after the video's end ({num_frames / fps:.2f} s); "
            "give a start inside the video"
        )
    return sample_indices(max(stop, first + 1) - first, cfg, key) + first


def stable_seed(*parts) -> int:
    """A 64-bit seed from `parts` (e.g. seed, video id) that is the same in every process (unlike `hash`)."""
    digest = hashlib.blake2b("\x00".join(str(part) for part in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _tsn(num_frames: int, frames: int, views: int, rng: np.random.Generator | None) -> np.ndarray:
    """Segment sampling: frame t of view v sits at (t + offset[v, t]) segment lengths."""
    segment = num_frames / frames
    if rng is None:
        offsets = np.broadcast_to(((np.arange(views) + 0.5) / views)[:, None], (views, frames))
    else:
        offsets = rng.random((views, frames))  # (V, T), each in [0, 1)
    positions = (np.arange(frames)[None, :] + offsets) * segment  # (V, T)
    return np.floor(positions).astype(np.int64)


def _dense(
    num_frames: int, frames: int, stride: int, views: int, rng: np.random.Generator | None
) -> np.ndarray:
    """Clips of T frames `stride` apart; short videos clamp to (repeat) the last frame."""
    span = (frames - 1) * stride + 1
    slack = max(num_frames - span, 0)  # how far the clip start can slide
    if rng is not None:
        starts = rng.integers(0, slack + 1, size=views)
    elif views == 1:
        starts = np.array([slack // 2])
    else:
        starts = np.round(np.arange(views) * slack / (views - 1)).astype(np.int64)
    return starts[:, None] + stride * np.arange(frames)[None, :]  # (V, T), clamped by the caller


def _uniform(
    num_frames: int, frames: int, views: int, rng: np.random.Generator | None
) -> np.ndarray:
    """T evenly spaced indices from first to last frame; views shift forward by part of a gap."""
    grid = np.linspace(0, num_frames - 1, frames)  # (T,)
    spacing = (num_frames - 1) / (frames - 1) if frames > 1 else 0.0
    if rng is None:
        shifts = np.arange(views) / views
    else:
        shifts = rng.random(views)  # (V,), each in [0, 1)
    positions = grid[None, :] + shifts[:, None] * spacing  # (V, T), clamped by the caller
    return np.round(positions).astype(np.int64)
