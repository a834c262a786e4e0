"""Decoding selected frames with NVIDIA DALI: NVDEC on a GPU, or DALI's FFmpeg on the CPU.

DALI's `fn.decoders.video` takes the encoded file bytes and a list of picture positions (any
order, repeats allowed; position p = the p-th decoded picture, which is frame p except in files
with null frames or a variable rate: see probe) and decodes just those pictures, so one
pipeline with two external inputs serves every file: it is built once per decoder and reused.

On the CPU (`device_id=None`) DALI's bundled FFmpeg decodes only VP8, VP9 and MJPEG; on a GPU
("mixed" backend, NVDEC) also H.264, HEVC, AV1 and MPEG-4.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.decode.probe import (
    DecodeError,
    VideoInfo,
    check_indices,
    probe,
)

# FFmpeg codec names (as PyAV's probe reports them) that each DALI backend decodes.
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}


@functools.cache
def dali_available() -> bool:
    """True when `nvidia.dali` imports (the `clipreel[dali]` extra is installed)."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


class DaliDecoder:
    """Reads chosen frames of a video file with DALI.

    `device_id=None` decodes on the CPU and `read` returns a numpy array; `device_id=k` decodes
    with NVDEC on GPU k and `read` returns a torch uint8 tensor on `cuda:k` (same layout), so
    frames go to the model without a trip through host memory.
    """

    name = "dali"

    def __init__(self, device_id: int | None = None):
        if not dali_available():
            raise ClipreelError(
                "the DALI decoder needs nvidia-dali: install clipreel[dali], or use --decoder pyav"
            )
        self.device_id = device_id
        self._pipeline = None  # built on first use, reused after

    @property
    def supported_codecs(self) -> frozenset[str]:
        return CPU_CODECS if self.device_id is None else GPU_CODECS

    def read(self, path: str | Path, indices: np.ndarray, info: VideoInfo | None = None):
        """Frames `indices` of `path`: (n, H, W, 3) uint8 RGB, row i = frame indices[i].

        A numpy array on the CPU, a torch cuda tensor on a GPU. Raises DecodeError like
        PyAVDecoder, and for a codec this DALI backend cannot decode.
        """
        path = Path(path)
        info = info or probe(path)  # callers that sampled from a probe pass it, saving a second pass
        indices = check_indices(path, indices, info)
        if info.codec not in self.supported_codecs:
            where = "on the CPU" if self.device_id is None else f"on GPU {self.device_id}"
            raise DecodeError(
                path,
                f"DALI {where} cannot decode {info.codec} video "
                f"(it handles {', '.join(sorted(self.supported_codecs))})",
                fix="use --decoder pyav for this collection",
            )
        if len(indices) == 0:
            return self._on_device(np.empty((0, info.height, info.width, 3), dtype=np.uint8))

        encoded = np.fromfile(path, dtype=np.uint8)  # (bytes,) the whole encoded file
        pipeline = self._get_pipeline()
        try:
            pipeline.feed_input("encoded", [encoded])
            # DALI counts the decoded pictures (in presentation order), as PyAVDecoder does.
            pipeline.feed_input("frame_indices", [info.pictures(indices).astype(np.int32)])
            (batch,) = pipeline.run()
        except RuntimeError as error:
            self._pipeline = None  # a DALI pipeline that failed cannot run again: rebuild next time
            raise DecodeError(path, f"DALI failed to decode it ({_dali_reason(error)})") from error
        frames = batch[0]  # (n, H, W, 3) uint8, on the GPU for the mixed backend
        if tuple(frames.shape()) != (len(indices), info.height, info.width, 3):
            raise DecodeError(
                path,
                f"DALI returned frames of shape {tuple(frames.shape())}, expected "
                f"{(len(indices), info.height, info.width, 3)}",
                fix="use --decoder pyav for this file",
            )
        if self.device_id is None:
            return np.array(frames)
        return self._gpu_tensor(frames)

    def _on_device(self, frames: np.ndarray):
        """An array made here (not by DALI) in the form `read` returns on this device."""
        if self.device_id is None:
            return frames
        import torch

        return torch.from_numpy(frames).to(f"cuda:{self.device_id}")

    @staticmethod
    def _gpu_tensor(frames):
        """Copy DALI's GPU output into a torch tensor (DALI reuses its buffers on the next run)."""
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        return to_torch_tensor(frames, copy=True)

    def _get_pipeline(self):
        if self._pipeline is None:
            self._pipeline = self._build_pipeline()
        return self._pipeline

    def _build_pipeline(self):
        """One video per run: encoded bytes and frame indices in, the selected frames out."""
        from nvidia.dali import Pipeline, fn, types

        pipeline = Pipeline(
            batch_size=1, num_threads=1, device_id=self.device_id, prefetch_queue_depth=1
        )
        with pipeline:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frame_indices = fn.external_source(name="frame_indices", dtype=types.INT32, ndim=1)
            backend = "cpu" if self.device_id is None else "mixed"
            frames = fn.decoders.video(encoded, device=backend, frames=frame_indices)
            pipeline.set_outputs(frames)
        pipeline.build()
        return pipeline


def _dali_reason(error: Exception) -> str:
    """The informative line of a DALI pipeline error: the first one after "encountered:"."""
    text = str(error)
    _, _, after = text.partition("encountered:")
    lines = [line.strip() for line in (after or text).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
