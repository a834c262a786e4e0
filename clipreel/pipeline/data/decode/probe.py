"""What a video file holds: how many frames can really be decoded, at what rate and size.

Every decoder calls `probe` before decoding, so PyAV and DALI agree on what frame index i means
(the i-th frame of the video stream in presentation order, 0-based) and on how many exist.

Why count packets instead of trusting the header: a header frame count is only a claim. WebM
has none, a truncated file keeps the count of the complete one, and a wrong count breaks the
sampling of every later stage. Demuxing (reading packets without decoding them) costs a few
milliseconds and gives the number of frames the decoder will deliver: one per packet, except
packets the container marks to be discarded (edit lists), which the decoder drops. The header's
count and declared duration are then used as checks: a file holding fewer packets than its
header lists, or whose packets stop well before its declared duration, is truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """What `probe` found: decodable frame count, frame rate, picture size, FFmpeg codec name."""

    num_frames: int
    fps: float
    width: int
    height: int
    codec: str = ""


class DecodeError(ClipreelError):
    """A video file cannot be decoded as asked: the message names the file, the problem, the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str = DEFAULT_FIX):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}: {problem}; {fix}")

    def __reduce__(self):
        # Rebuild from the three parts, so the error survives pickling (Ray ships it between workers).
        return type(self), (self.path, self.problem, self.fix)


def probe(path: str | Path) -> VideoInfo:
    """Open `path` with PyAV, count its decodable frames (demux only) and check it is complete."""
    path = Path(path)
    _check_file(path)
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = video_stream(container, path)
            decodable, present, end_seconds = _scan_packets(container, stream, path)
            header_frames = stream.frames
            declared_seconds = _declared_seconds(stream)
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            width, height = stream.codec_context.width, stream.codec_context.height
            codec = stream.codec_context.name
    except av.error.FFmpegError as error:
        raise DecodeError(
            path, f"FFmpeg cannot read it as a video ({ffmpeg_reason(error)})"
        ) from error

    if decodable == 0:
        raise DecodeError(path, "the video stream holds no frames")
    if width <= 0 or height <= 0:
        raise DecodeError(path, f"the video stream has no picture size ({width}x{height})")
    if header_frames > present:
        raise DecodeError(
            path,
            f"truncated: the header lists {header_frames} frames but only {present} are present",
        )
    if header_frames == 0 and declared_seconds is not None and end_seconds is not None:
        slack = max(TRUNCATION_SLACK_SECONDS, TRUNCATION_SLACK_FRAMES / fps if fps else 0.0)
        if end_seconds < declared_seconds - slack:
            raise DecodeError(
                path,
                f"truncated: the frames stop at {end_seconds:.2f} s "
                f"but the file declares {declared_seconds:.2f} s",
            )
    return VideoInfo(num_frames=decodable, fps=fps, width=width, height=height, codec=codec)


def video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    """The stream every decoder reads: the first video stream that is not a cover picture."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise DecodeError(path, "the file has no video stream")


def check_indices(path: str | Path, indices: np.ndarray, info: VideoInfo) -> np.ndarray:
    """`indices` as a 1-D int64 array, after checking each one names a decodable frame."""
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
            f"frame index {int(outside[0])} is outside the {info.num_frames} decodable frames "
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


def _scan_packets(
    container: av.container.InputContainer, stream: av.VideoStream, path: Path
) -> tuple[int, int, float | None]:
    """Demux the stream without decoding: (decodable frames, packets present, end time in s)."""
    decodable = present = 0
    end_ticks = None  # latest pts + duration seen, in stream time-base ticks
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # the empty packet the demuxer yields to flush the decoder at the end
        if packet.is_corrupt:
            raise DecodeError(
                path, f"packet {present} is damaged (the file is truncated or corrupt)"
            )
        present += 1
        if not packet.is_discard:
            decodable += 1
        if packet.pts is not None:
            packet_end = packet.pts + (packet.duration or 0)
            end_ticks = packet_end if end_ticks is None else max(end_ticks, packet_end)
    if end_ticks is None or stream.time_base is None:
        return decodable, present, None
    return decodable, present, float(end_ticks * stream.time_base)


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
