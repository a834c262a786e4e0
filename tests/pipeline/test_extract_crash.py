"""SIGKILL the whole extraction job mid-run (a Ray job, or a small job in the driver's own process);
the re-run of the same command finishes it and nothing is done twice. The killed job is a process
of its own (a user's `clipreel extract`); the re-run, which only has to find the store as the kill
left it, runs in this process (on the session's Ray for the Ray job)."""

from __future__ import annotations

import subprocess
import time

import pytest
from cli_runs import checkout_environment, clipreel_command
from sessions import done_chunks, kill_session

from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.stores.features import FeatureStore, verify


@pytest.mark.slow
@pytest.mark.parametrize(("runner", "videos_per_class", "size"), [("ray", 5, 64), ("process", 8, 192)])
def test_sigkill_mid_run_then_rerun_completes_exactly_once(tmp_path, request, clipreel_cli, runner, videos_per_class,
                                                          size):
    # In this process the tiny model computes a small video in milliseconds: larger videos (slower
    # to decode) leave the test time to kill the job mid-run.
    videos = make_world(tmp_path / "w", SynthConfig(classes=4, videos_per_class=videos_per_class, frames=16, size=size))
    store_path = tmp_path / "f.zarr"
    command = [
        "extract", "--videos", videos, "--out", store_path, "--model", "clipreel-tiny", "--pretrained", "none",
        "--frames", "4", "--batch-size", "1", "--workers", "1", "--no-progress", "--runner", runner,
    ]
    job = subprocess.Popen(clipreel_command(*command), env=checkout_environment(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(done_chunks(store_path)) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, "the job finished before it could be killed; make it longer"
    kill_session(job.pid)
    job.wait()
    done_before = {p: p.stat().st_mtime_ns for p in done_chunks(store_path)}
    total = 4 * videos_per_class
    assert 3 <= len(done_before) < total

    if runner == "ray":
        request.getfixturevalue("ray_local")  # the re-run's Ray Data job joins it
    rerun = clipreel_cli(*command)
    assert rerun.exit_code == 0, rerun.output
    assert f"{total - len(done_before)} computed now" in rerun.output
    assert ("by a Ray job" if runner == "ray" else "in this process") in rerun.output
    store = FeatureStore.open(store_path)
    assert store.done_mask().all()
    assert (store.manifest()["status"] == "done").all()
    assert verify(store) == []
    for path, mtime in done_before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path}: a done video was recomputed"
