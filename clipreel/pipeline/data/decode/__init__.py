"""Decoding chosen frames of a video file, behind one interface with two implementations.

- `PyAVDecoder` (CPU, every FFmpeg codec): the default and the reference.
- `DaliDecoder` (NVDEC on a GPU; on the CPU only VP8/VP9/MJPEG).

Both call `probe` first, so a frame index means the same frame for both: the picture a player
shows at time i / fps (the i-th picture in presentation order, counting from 0, in files with
one picture per frame). Both return (n, H, W, 3) uint8 RGB with row i = frame indices[i], and
raise `DecodeError` (a ClipreelError naming the file) on failure.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.decode.dali import DaliDecoder, dali_available
from clipreel.pipeline.data.decode.probe import DecodeError, VideoInfo, probe
from clipreel.pipeline.data.decode.pyav import PyAVDecoder

DECODERS = ("auto", "pyav", "dali")

__all__ = [
    "DECODERS",
    "DaliDecoder",
    "DecodeError",
    "Decoder",
    "PyAVDecoder",
    "VideoInfo",
    "choose_decoder",
    "dali_available",
    "make_decoder",
    "probe",
]


class Decoder(Protocol):
    """What every decoder offers: a name and `read(path, indices, info=None) -> (n, H, W, 3) uint8
    frames`, where `info` is the video's `probe` result when the caller already has it."""

    name: str

    def read(self, path, indices: np.ndarray, info: VideoInfo | None = None): ...


def choose_decoder(name: str = "auto", device: str = "cpu") -> str:
    """Which decoder ("pyav" or "dali") `make_decoder(name, device)` builds, checking `name`.

    "auto" picks DALI (NVDEC) when the model is on a GPU and nvidia.dali imports, else PyAV.
    """
    if name not in DECODERS:
        raise ClipreelError(f"unknown decoder {name!r}: choose one of {', '.join(DECODERS)}")
    on_gpu = str(device).startswith("cuda")  # also accepts a torch.device
    if name == "pyav" or (name == "auto" and not (on_gpu and dali_available())):
        return "pyav"
    if not dali_available():
        raise ClipreelError(
            "--decoder dali: nvidia-dali is not installed (pip install 'clipreel[dali]'), or use --decoder pyav"
        )
    return "dali"


def make_decoder(name: str = "auto", device: str = "cpu") -> Decoder:
    """The decoder called `name` for a model on `device` ("cpu", "cuda" or "cuda:k").

    "dali" on the CPU decodes VP8/VP9/MJPEG only.
    """
    if choose_decoder(name, device) == "pyav":
        return PyAVDecoder()
    device = str(device)
    return DaliDecoder(device_id=_cuda_index(device) if device.startswith("cuda") else None)


def _cuda_index(device: str) -> int:
    """0 for "cuda", k for "cuda:k"."""
    _, _, index = device.partition(":")
    return int(index) if index else 0
