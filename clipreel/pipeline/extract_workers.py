"""What runs on Ray workers during extraction: the decode task and the backbone actor; and the
writer of a batch of videos that both the actor and the driver (a small job, in its own process) run.

Kept apart from `extract.py`, and torch is imported only inside the writer and the actor, so that
a decode worker starts with numpy and PyAV alone (worker start-up dominates small jobs on few
cores). Neither stage raises for a bad video: the error travels on as that video's row.
"""

from __future__ import annotations

import numpy as np

from clipreel.pipeline.data.sampling import SamplingConfig, segment_indices

NO_FRAMES = np.zeros((0, 1, 1, 3), dtype=np.uint8)


def describe_error(exc: BaseException) -> str:
    """One line for the manifest's `error` column."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def decode_video(item: dict, *, sampling: dict, decode: bool) -> dict:
    """Probe one video, sample its frame indices and (unless the actor decodes) read those frames.

    item: {"row", "path", "video_id", "start", "end"} (the segment in seconds, NaN: the whole video) ->
    adds "indices" (V, T), "frames" (V*T, H, W, 3) uint8, "num_frames", "fps" and "error" ("" when all
    went well).
    """
    from clipreel.pipeline.data.decode import PyAVDecoder, probe

    config = SamplingConfig.from_dict(sampling)
    result = {
        **item,
        "indices": np.zeros((config.views, config.frames), dtype=np.int64),
        "frames": NO_FRAMES,
        "num_frames": -1,
        "fps": float("nan"),
        "error": "",
    }
    try:
        info = probe(item["path"])
        result["num_frames"], result["fps"] = info.num_frames, info.fps
        start, end = (None if np.isnan(item[name]) else item[name] for name in ("start", "end"))
        result["indices"] = segment_indices(info.num_frames, info.fps, start, end, config, key=item["video_id"])  # (V, T)
        if decode:
            result["frames"] = PyAVDecoder().read(item["path"], result["indices"].reshape(-1), info)
    except Exception as exc:  # any bad file becomes a failed row, never a failed job
        result["error"] = describe_error(exc)
    return result


class VideoFeatureWriter:
    """One backbone on one device: preprocess a batch of decoded videos, run the backbone, encode the
    features as the store keeps them, and write each video's chunks (done flag last).

    The work of a backbone actor (ExtractActor), and of the driver itself for a small job
    (extract.py runs it in its own process). `writer` names who writes: {"writer_node",
    "writer_host", "writer_pid"}, returned with every row for the store's extract log.
    """

    def __init__(self, backbone, preprocess, store, decoder, writer: dict):
        self.backbone, self.preprocess, self.store, self.decoder, self.writer = backbone, preprocess, store, decoder, writer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from clipreel.pipeline.data.preprocess import preprocess

        rows = batch["row"]
        status = np.array(["failed"] * len(rows), dtype=object)
        errors = np.array([str(e) for e in batch["error"]], dtype=object)
        clips = {}  # position in batch -> (C, V*T, 3, S, S)
        for i in range(len(rows)):
            if errors[i]:
                continue
            try:
                frames = batch["frames"][i]
                if self.decoder is not None:
                    frames = self.decoder.read(batch["path"][i], batch["indices"][i].reshape(-1))
                clips[i] = preprocess(frames, self.preprocess, device=self.backbone.device)
            except Exception as exc:
                errors[i] = describe_error(exc)
        if clips:
            crops, frames_per_video = next(iter(clips.values())).shape[:2]
            views = batch["indices"][next(iter(clips))].shape[0]
            frames = frames_per_video // views
            pixels = torch.cat([clip.unflatten(1, (views, frames)).flatten(0, 1) for clip in clips.values()])
            features = self.backbone.forward_clips(pixels)  # clips (n*C*V, T, 3, S, S) in (video, crop, view) order
            stored = {name: values.cpu().numpy() for name, values in self._as_stored(features).items()}
            per_video = crops * views
            for n, i in enumerate(clips):
                video = {name: _views_first(values[n * per_video : (n + 1) * per_video], crops, views)
                         for name, values in stored.items()}
                self.store.write_video(
                    int(rows[i]),
                    frame_indices=np.repeat(batch["indices"][i], crops, axis=0).astype(np.int32),  # (V*C, T)
                    **video,
                )
                status[i] = "done"
        return {
            "row": rows,
            "status": status,
            "error": errors,
            "num_frames": batch["num_frames"],
            "fps": batch["fps"],
            **{name: np.array([value] * len(rows)) for name, value in self.writer.items()},
        }

    def _as_stored(self, features) -> dict:
        """The backbone's features as the store keeps them, still on the model's device: float16, or
        8-bit codes with their scales (encoded there: a GPU sends a quarter of the float32 bytes)."""
        import torch

        from clipreel.pipeline.data.store_codes import encode_field
        from clipreel.stores.encoding import SCALE_SUFFIX

        dtype = self.store.layout.dtype
        fields = {"tokens": features.tokens}  # (n*C*V, T, K, L, D)
        if features.attention is not None:
            fields["attention"] = features.attention  # (n*C*V, 2, T-1, K, P, P)
        stored = {"embeds": features.embeds.to(torch.float32)}  # (n*C*V, T, E)
        for field, values in fields.items():
            if field in self.store.layout.encoded_fields:
                stored[field], stored[field + SCALE_SUFFIX] = encode_field(field, values, dtype)
            else:
                stored[field] = values.to(torch.float16)
        return stored


class ExtractActor(VideoFeatureWriter):
    """A VideoFeatureWriter in a Ray actor: it builds its backbone on its own device (one GPU, or the
    CPU) and opens the store itself, on whichever node it runs, with the driver's `store_access`
    (storage options and variables: this node's environment need not have them).
    """

    def __init__(self, store_access, backbone: dict, preprocess: dict, decoder: str | None):
        import os
        import socket

        import ray
        import torch

        from clipreel.heads.clip import register_builtin_models
        from clipreel.heads.taps import Backbone, BackboneConfig
        from clipreel.pipeline.data.preprocess import PreprocessConfig
        from clipreel.stores.features import FeatureStore

        gpu = torch.cuda.is_available()
        if not gpu:
            torch.set_num_threads(1)
        register_builtin_models()
        store_access.apply()
        frame_decoder = None
        if decoder is not None:
            from clipreel.pipeline.data.decode import make_decoder

            frame_decoder = make_decoder(decoder, device="cuda" if gpu else "cpu")
        super().__init__(
            backbone=Backbone(BackboneConfig(**{**backbone, "device": "cuda" if gpu else "cpu"})),
            preprocess=PreprocessConfig.from_dict(preprocess),
            store=FeatureStore.open(store_access.location, mode="r+"),
            decoder=frame_decoder,
            writer={"writer_node": ray.get_runtime_context().get_node_id(), "writer_host": socket.gethostname(),
                    "writer_pid": os.getpid()},
        )


def _views_first(values: np.ndarray, crops: int, views: int) -> np.ndarray:
    """(C*V, ...) in crop-major order -> (V*C, ...) with stored view = temporal_view * crops + crop."""
    rest = values.shape[1:]
    values = values.reshape(crops, views, *rest)  # (C, V, ...)
    return np.ascontiguousarray(np.swapaxes(values, 0, 1).reshape(views * crops, *rest))


