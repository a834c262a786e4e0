"""Writing real encoded video files with PyAV (used by the synthetic world and by tests)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

# codec name -> (PyAV encoder, container suffix, pixel format)
CODECS = {
    "h264": ("libx264", ".mp4", "yuv420p"),
    "vp9": ("libvpx-vp9", ".webm", "yuv420p"),
    "mjpeg": ("mjpeg", ".avi", "yuvj420p"),
}


def video_suffix(codec: str) -> str:
    """The file suffix clipreel uses for a codec (`.mp4`, `.webm`, `.avi`)."""
    return CODECS[codec][1]


def write_video(path: str | Path, frames: np.ndarray, codec: str = "h264", fps: int = 25) -> Path:
    """Encode `frames` (T, H, W, 3) uint8 RGB into `path`; H and W must be even."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
    encoder, _, pix_fmt = CODECS[codec]
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    _, height, width, _ = frames.shape
    path = Path(path)
    with av.open(str(path), mode="w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "h264":
            stream.options = {"preset": "veryfast", "crf": "18", "bf": "0"}
        elif codec == "vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
        else:
            stream.options = {"q:v": "3"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
