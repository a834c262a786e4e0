"""What a video file holds: which pictures a player shows at which frame, at what rate and size.

Every decoder calls `probe` before decoding, so PyAV and DALI agree on what frame index i means:
the picture a player shows at time i / fps from the first picture, fps being the stream's
average rate. Most files hold one picture per frame, and frame i is the i-th picture in
presentation order. Some do not: an AVI stores a frame that repeats the previous picture as an
empty "null" chunk (a player keeps showing the last picture), and variable-rate files space
their pictures unevenly. For those, `VideoInfo.picture_slots` says from which frame on each
picture is shown, and `VideoInfo.pictures` maps frame indices to pictures.

Why demux instead of trusting the header: a header frame count is only a claim. WebM has none,
a truncated file keeps the count of the complete one, and a wrong count breaks the sampling of
every later stage. Demuxing (reading packets without decoding them) costs a few milliseconds and
gives each picture the decoder will deliver with its presentation timestamp: one per packet,
except packets the container marks to be discarded (edit lists), which the decoder drops. The
header's count and declared duration are then used as checks: a file that holds fewer packets
than its header lists and whose pictures stop well before its declared duration, or (without a
header count) whose pictures stop well before its declared duration, is truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from clipreel.errors import ClipreelError

DEFAULT_FIX = "check that the file plays, re-download or re-encode it, or drop its manifest row"

# A stream that ends this much before its declared duration counts as truncated (seconds, and
# frames at the stream's rate); the slack absorbs muxers that round the declared value.
TRUNCATION_SLACK_SECONDS = 0.1
TRUNCATION_SLACK_FRAMES = 2


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` found: frame count and rate, picture size, FFmpeg codec name, and which
    decoded picture each frame shows."""

    num_frames: int  # frames from the first picture to the end of the last, at `fps`
    fps: float
    width: int
    height: int
    codec: str = ""
    # (P,) increasing: the frame from which decoded picture p (in presentation order) is shown,
    # until the next picture's. None: one picture per frame (picture p is frame p).
    picture_slots: np.ndarray | None = field(default=None, compare=False, repr=False)

    def pictures(self, indices: np.ndarray) -> np.ndarray:
        """The decoded picture (its position in presentation order) shown at each frame index."""
        if self.picture_slots is None:
            return indices
        return np.searchsorted(self.picture_slots, indices, side="right") - 1


class DecodeError(ClipreelError):
    """A video file cannot be decoded as asked: the message names the file, the problem, the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str = DEFAULT_FIX):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}: {problem}; {fix}")

    def __reduce__(self):
        # Rebuild from the three parts, so the error survives pickling (Ray ships it between workers).
        return type(self), (self.path, self.problem, self.fix)


def probe(path: str | Path) -> VideoInfo:
    """Open `path` with PyAV, find its pictures and their timestamps (demux only), check it is
    complete, and map its frames to pictures."""
    path = Path(path)
    _check_file(path)
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = video_stream(container, path)
            packets = _scan_packets(container, stream, path)
            header_frames = stream.frames
            declared_seconds = _declared_seconds(stream)
            rate = stream.average_rate or stream.guessed_rate
            time_base = stream.time_base
            width, height = stream.codec_context.width, stream.codec_context.height
            codec = stream.codec_context.name
    except av.error.FFmpegError as error:
        raise DecodeError(
            path, f"FFmpeg cannot read it as a video ({ffmpeg_reason(error)})"
        ) from error

    if not packets.starts:
        raise DecodeError(path, "the video stream holds no frames")
    if width <= 0 or height <= 0:
        raise DecodeError(path, f"the video stream has no picture size ({width}x{height})")
    fps = float(rate or 0)
    end_seconds = float(packets.end * time_base) if packets.end is not None and time_base else None
    if declared_seconds is None and header_frames and fps:
        declared_seconds = header_frames / fps
    packets_missing = header_frames > packets.present
    if end_seconds is not None and declared_seconds is not None and (packets_missing or not header_frames):
        slack = max(TRUNCATION_SLACK_SECONDS, TRUNCATION_SLACK_FRAMES / fps if fps else 0.0)
        if end_seconds < declared_seconds - slack:
            raise DecodeError(
                path,
                f"truncated: the frames stop at {end_seconds:.2f} s "
                f"but the file declares {declared_seconds:.2f} s",
            )
    elif packets_missing:
        raise DecodeError(
            path,
            f"truncated: the header lists {header_frames} frames but only {packets.present} are present",
        )
    num_frames, slots = _frame_slots(packets, Fraction(time_base) if time_base else None,
                                     Fraction(rate) if rate else None)
    return VideoInfo(num_frames=num_frames, fps=fps, width=width, height=height, codec=codec, picture_slots=slots)


def video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    """The stream every decoder reads: the first video stream that is not a cover picture."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise DecodeError(path, "the file has no video stream")


def check_indices(path: str | Path, indices: np.ndarray, info: VideoInfo) -> np.ndarray:
    """`indices` as a 1-D int64 array, after checking each one names a frame of the video."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(
            f"frame indices must be a 1-D integer array, got {indices.dtype} {indices.shape}"
        )
    indices = indices.astype(np.int64)
    outside = indices[(indices < 0) | (indices >= info.num_frames)]
    if outside.size:
        raise DecodeError(
            path,
            f"frame index {int(outside[0])} is outside the {info.num_frames} frames of the video "
            f"(0..{info.num_frames - 1})",
            fix="sample indices from probe(path).num_frames",
        )
    return indices


def ffmpeg_reason(error: av.error.FFmpegError) -> str:
    """FFmpeg's explanation without errno and file name (the DecodeError names the file already)."""
    reason = error.strerror or type(error).__name__
    if error.log:  # (level, component, message) of FFmpeg's last log line, when PyAV caught one
        reason += f": {error.log[2].strip()}"
    return reason


def _check_file(path: Path) -> None:
    """Clear messages for the failures FFmpeg would report obscurely."""
    if not path.exists():
        raise DecodeError(path, "no such file", fix="fix the path in the manifest")
    if not path.is_file():
        raise DecodeError(path, "not a regular file", fix="point the manifest at a video file")
    if path.stat().st_size == 0:
        raise DecodeError(path, "the file is empty (0 bytes)")


@dataclass
class _Packets:
    """What demuxing the stream found."""

    present: int  # packets holding data
    starts: list[int | None]  # presentation timestamp (ticks) of each picture the decoder delivers
    end: int | None  # latest pts + duration of any packet (ticks); None without timestamps


def _scan_packets(container: av.container.InputContainer, stream: av.VideoStream, path: Path) -> _Packets:
    """Demux the stream without decoding."""
    found = _Packets(present=0, starts=[], end=None)
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # the empty packet the demuxer yields to flush the decoder at the end
        if packet.is_corrupt:
            raise DecodeError(
                path, f"packet {found.present} is damaged (the file is truncated or corrupt)"
            )
        found.present += 1
        if not packet.is_discard:
            found.starts.append(packet.pts)
        if packet.pts is not None:
            packet_end = packet.pts + (packet.duration or 0)
            found.end = packet_end if found.end is None else max(found.end, packet_end)
    return found


def _frame_slots(
    packets: _Packets, time_base: Fraction | None, rate: Fraction | None
) -> tuple[int, np.ndarray | None]:
    """(frame count, picture slots) from the pictures' timestamps (see VideoInfo).

    Picture p is shown from frame round((pts_p - pts_first) * time_base * rate). A file without
    timestamps or rate gets one frame per picture. Exact rational arithmetic: the pictures of a
    constant-rate file land exactly on consecutive frames, however its time base rounds.
    """
    pictures = len(packets.starts)
    if time_base is None or not rate or any(start is None for start in packets.starts):
        return pictures, None
    starts = np.sort(np.array(packets.starts, dtype=np.int64))  # presentation order
    # ticks -> frames: multiply by time_base * rate = numerator / denominator, then round
    scale = time_base * rate
    numerator, denominator = scale.numerator, scale.denominator
    slots = (2 * (starts - starts[0]) * numerator + denominator) // (2 * denominator)
    last_end = packets.end if packets.end is not None and packets.end > starts[-1] else None
    end_slot = (2 * (last_end - int(starts[0])) * numerator + denominator) // (2 * denominator) if last_end else 0
    num_frames = max(int(slots[-1]) + 1, int(end_slot))
    if num_frames == pictures and np.array_equal(slots, np.arange(pictures)):
        return pictures, None
    return num_frames, slots


def _declared_seconds(stream: av.VideoStream) -> float | None:
    """The stream's duration as the container declares it, if it declares one."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")  # Matroska/WebM muxers write "HH:MM:SS.fffffffff" here
    if tag is None:
        return None
    try:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None
