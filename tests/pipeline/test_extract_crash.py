"""SIGKILL the whole extraction job mid-run (a Ray job, or a small job in the driver's own process);
the re-run finishes it and nothing is done twice."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from sessions import done_chunks, kill_session

from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.stores.features import FeatureStore, verify


@pytest.mark.slow
@pytest.mark.parametrize(("runner", "videos_per_class", "size"), [("ray", 5, 64), ("process", 8, 192)])
def test_sigkill_mid_run_then_rerun_completes_exactly_once(tmp_path, runner, videos_per_class, size):
    # In this process the tiny model computes a small video in milliseconds: larger videos (slower
    # to decode) leave the test time to kill the job mid-run.
    videos = make_world(tmp_path / "w", SynthConfig(classes=4, videos_per_class=videos_per_class, frames=16, size=size))
    store_path = tmp_path / "f.zarr"
    command = [
        sys.executable, "-m", "clipreel", "extract", "--videos", str(videos), "--out", str(store_path),
        "--model", "clipreel-tiny", "--pretrained", "none", "--frames", "4", "--batch-size", "1",
        "--workers", "1", "--no-progress", "--runner", runner,
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    job = subprocess.Popen(command, env=env, start_new_session=True,
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

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{total - len(done_before)} computed now" in rerun.stdout
    store = FeatureStore.open(store_path)
    assert store.done_mask().all()
    assert (store.manifest()["status"] == "done").all()
    assert verify(store) == []
    for path, mtime in done_before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path}: a done video was recomputed"
