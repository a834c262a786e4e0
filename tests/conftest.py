"""Shared fixtures: one local Ray for the whole session, torch on one thread, the tiny CLIP (shared,
or fresh ones free to train, and one training step of a method on it), three real encoded videos,
the synthetic world extracted once into a feature store, a real S3 endpoint on 127.0.0.1, and the
`clipreel` command run in this process."""

from __future__ import annotations

import copy
import logging
import os
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray shared by every test that needs one (start-up dominates small jobs);
    never a cluster that /tmp/ray/ray_current_cluster names."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_clip():
    """The tiny open_clip model (both towers, seeded random init, frozen, eval) and its tokenizer."""
    import open_clip

    from clipreel.heads.clip import load_clip

    model, _ = load_clip("clipreel-tiny", "none")
    return model, open_clip.get_tokenizer("clipreel-tiny")


@pytest.fixture
def fresh_tiny_clip():
    """Makes tiny CLIPs of their own (the tiny_clip fixture's seeded weights), free to train."""
    from clipreel.heads.clip import load_clip

    return lambda: load_clip("clipreel-tiny", "none")[0]


@pytest.fixture
def one_training_step():
    """One SGD step (lr 0.1) of a raw-frame method model on clips (B, T, 3, S, S), by its own loss."""
    import torch

    from clipreel.heads.layers import trainable_parameters

    def step(model, frames, labels) -> None:
        model.train()
        optimizer = torch.optim.SGD(list(trainable_parameters(model).values()), lr=0.1)
        model.loss(model(frames), labels).backward()
        optimizer.step()

    return step


@pytest.fixture(scope="session")
def encoded_videos(tmp_path_factory) -> list[Path]:
    """Three real H.264 files of 48 frames (72 x 96, 25 fps), each with its own moving bar and colours."""
    import numpy as np

    from clipreel.pipeline.data.synth.videofile import write_video

    folder = tmp_path_factory.mktemp("videos")
    rows, cols = np.mgrid[0:72, 0:96]
    paths = []
    for index in range(3):
        frames = []
        for t in range(48):
            image = np.zeros((72, 96, 3), dtype=np.uint8)
            image[..., 0] = (cols * (2 + index) + t * 5) % 256
            image[..., 1] = (rows * 3 + 40 * index) % 256
            image[..., 2] = 40 + 4 * t
            image[:, (2 * t) % 96 : (2 * t) % 96 + 8] = 255
            frames.append(image)
        paths.append(write_video(folder / f"clip{index}.mp4", np.stack(frames)))
    return paths


@dataclass
class SynthStore:
    """A feature store of the synthetic world, and what it was made with."""

    path: Path
    model: str
    # 16 time-reversed pairs (32 classes): enough appearances that zero-shot recognition is not
    # trivially perfect, so that prompt learning has something to improve.
    classes: int = 32


@pytest.fixture(scope="session")
def synth_store(tmp_path_factory) -> SynthStore:
    """The synthetic world extracted like a user would (`clipreel extract`, in this process) with
    clipreel-synth: 32 classes x 8 videos (4 train, 2 val, 2 test each), TSN 8 frames x 2 views.
    Built once per session. Its backbone runs in this process (--runner process): a Ray Data job
    stores the same features (tests/pipeline/test_extract.py) after half a minute of start-up."""
    from typer.testing import CliRunner

    from clipreel.cli import app
    from clipreel.pipeline.data.synth.world import SynthConfig, make_world

    root = tmp_path_factory.getbasetemp() / "synth-store"
    store = SynthStore(path=root / "features.zarr", model="clipreel-synth")
    videos = make_world(root / "world", SynthConfig(classes=store.classes, videos_per_class=8, frames=16, seed=1))
    result = CliRunner().invoke(app, [
        "extract", "--videos", str(videos), "--out", str(store.path), "--model", store.model,
        "--pretrained", "default", "--frames", "8", "--views", "2", "--sampling", "tsn", "--layers", "2",
        "--runner", "process", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    return store


@dataclass
class CliResult:
    """What a `clipreel` command did: its exit code and everything it printed (and, for an uncaught
    exception, the traceback Python would print), whitespace runs as single spaces; and its standard
    output as printed (for --json)."""

    exit_code: int
    output: str
    stdout: str


@pytest.fixture
def clipreel_cli(capsys, monkeypatch):
    """Runs `clipreel ARGS...` in this process through the command's own entry point
    (`clipreel.cli.main`: a ClipreelError prints one message and exits 2) -> CliResult."""
    from cli_runs import run_in_this_process

    from clipreel import cli

    monkeypatch.setenv("COLUMNS", "100000")  # rich wraps long paths only at this width: they stay whole
    monkeypatch.setattr(cli.console, "width", 100000)

    def run(*args) -> CliResult:
        capsys.readouterr()
        uncaught = ""
        try:
            exit_code = run_in_this_process(*args)
        except Exception:  # what the interpreter would print and exit 1 with
            exit_code, uncaught = 1, traceback.format_exc()
        printed = capsys.readouterr()
        return CliResult(exit_code, " ".join((printed.out + printed.err + uncaught).split()), printed.out)

    return run


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server, in a thread of this process): its URL."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (the test extra has it)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def storage_settings_restored():
    """fsspec's configuration (where `--storage-option` items go) and s3fs's cached filesystems are
    put back as they were after the test."""
    import fsspec.config

    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (the test extra has it)")
    saved = copy.deepcopy(fsspec.config.conf)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    fsspec.config.conf.clear()
    fsspec.config.conf.update(saved)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_endpoint(moto_endpoint, monkeypatch, storage_settings_restored) -> str:
    """A fresh bucket on the moto endpoint, reached through the standard AWS variables (as a user
    reaches AWS); returns "s3://BUCKET". fsspec's configuration is restored afterwards."""
    import s3fs

    for name, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ALLOW_HTTP": "true"}.items():
        monkeypatch.setenv(name, value)
    bucket = f"clipreel-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}"
