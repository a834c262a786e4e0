"""Decoding selected frames on the CPU with PyAV (any codec FFmpeg knows)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from clipreel.pipeline.data.decode.probe import (
    DecodeError,
    VideoInfo,
    check_indices,
    ffmpeg_reason,
    probe,
    video_stream,
)


class PyAVDecoder:
    """Reads chosen frames of a video file as RGB uint8 arrays.

    It decodes sequentially from the start and stops at the last picture needed; only the
    pictures asked for are converted to RGB, so memory holds the output and nothing more.

    `threads`: FFmpeg decoding threads. The default, 1, was measured fastest overall here:
    extraction runs one decode task per core, and even alone on 2 cores FFmpeg's automatic
    threading was 30% slower on a 640x272 clip (11% faster on a 1280x720 one). 0 lets FFmpeg
    choose the count (thread_type AUTO), n > 1 asks for n threads.
    """

    name = "pyav"

    def __init__(self, threads: int = 1):
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.threads = threads

    def read(self, path: str | Path, indices: np.ndarray, info: VideoInfo | None = None) -> np.ndarray:
        """Frames `indices` of `path`: (n, H, W, 3) uint8 RGB, row i = frame indices[i] (the
        picture a player shows at that frame: see probe).

        Indices may repeat and come in any order. Raises DecodeError for a missing, empty,
        truncated, corrupt or non-video file and for an index beyond the video's frames.
        """
        path = Path(path)
        info = info or probe(path)  # callers that sampled from a probe pass it, saving a second pass
        indices = check_indices(path, indices, info)
        # (n, H, W, 3): row i will hold frame indices[i]
        frames = np.empty((len(indices), info.height, info.width, 3), dtype=np.uint8)
        if len(indices) == 0:
            return frames
        rows_of_picture: dict[int, list[int]] = {}  # picture (presentation order) -> output rows that show it
        for row, picture in enumerate(info.pictures(indices).tolist()):
            rows_of_picture.setdefault(picture, []).append(row)
        last_needed = max(rows_of_picture)

        delivered = 0
        try:
            with av.open(str(path), metadata_errors="ignore") as container:
                stream = video_stream(container, path)
                self._configure_threads(stream)
                for position, frame in enumerate(container.decode(stream)):
                    delivered = position + 1
                    rows = rows_of_picture.get(position)
                    if rows is not None:
                        # Frames whose size changed mid-stream are scaled back to the probed size.
                        frames[rows] = frame.to_ndarray(
                            format="rgb24", width=info.width, height=info.height
                        )
                    if position == last_needed:
                        return frames
        except av.error.FFmpegError as error:
            raise DecodeError(
                path, f"decoding failed after {delivered} pictures ({ffmpeg_reason(error)})"
            ) from error
        raise DecodeError(
            path,
            f"the decoder delivered {delivered} pictures but picture {last_needed} was needed "
            f"(probe found {info.num_frames} frames)",
        )

    def _configure_threads(self, stream: av.VideoStream) -> None:
        if self.threads == 1:
            stream.thread_type = "NONE"
            stream.codec_context.thread_count = 1
        else:
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = self.threads  # 0 = FFmpeg picks
