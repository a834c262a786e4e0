"""Two `clipreel extract` processes on one store: a second one with more videos is refused or
waits for the first's writer lease; the first is SIGKILLed mid-run; the waiting one then appends
its videos and finishes, and the manifest and the arrays agree, every video done exactly once.

The first extract is a Ray job (Ray's start-up leaves the test time to act); the waiting second
one computes its videos in its own process. The refusal and the final re-run, which only meet the
lease and the store, run in this process."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from cli_runs import checkout_environment, clipreel_command
from sessions import done_chunks, kill_session

from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.stores.features import MANIFEST_FILE, FeatureStore, verify
from clipreel.stores.lease import LEASE_FOLDER


def _wait_for(condition, job: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, "the first extract finished before the test could act; give it more videos"


@pytest.mark.slow
def test_a_second_extract_waits_for_the_lease_then_appends_after_the_first_is_killed(tmp_path, clipreel_cli):
    videos_csv = make_world(tmp_path / "w", SynthConfig(classes=4, videos_per_class=5, frames=16, size=64))
    header, *rows = videos_csv.read_text().splitlines()
    first_list, second_list = videos_csv.parent / "first.csv", videos_csv.parent / "second.csv"
    first_list.write_text("\n".join([header, *rows[:16]]) + "\n")
    second_list.write_text("\n".join([header, *rows]) + "\n")  # the same 16 and 4 more
    store_path = tmp_path / "f.zarr"

    def command(listing: Path, runner: str, *options: str) -> list:
        return ["extract", "--videos", listing, "--out", store_path, "--model", "clipreel-tiny", "--pretrained", "none",
                "--frames", "4", "--batch-size", "1", "--workers", "1", "--no-progress", "--runner", runner, *options]

    first = subprocess.Popen(clipreel_command(*command(first_list, "ray")), env=checkout_environment(),
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = None
    try:
        # The first holds the lease and has made its store (whose manifest is written last).
        _wait_for(lambda: (store_path / MANIFEST_FILE).is_file(), first, 120)
        assert any((store_path / LEASE_FOLDER).iterdir())
        refused = clipreel_cli(*command(second_list, "process"))
        assert refused.exit_code == 2, refused.output
        assert f"pid {first.pid}" in refused.output and "--wait SECONDS" in refused.output

        second = subprocess.Popen(clipreel_command(*command(second_list, "process", "--wait", "600")),
                                  env=checkout_environment(), start_new_session=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: len(done_chunks(store_path)) >= 3, first, 240)
        assert second.poll() is None, second.communicate()  # still waiting for the lease
        kill_session(first.pid)
        first.wait()
        done_before = {path: path.stat().st_mtime_ns for path in done_chunks(store_path)}
        assert 3 <= len(done_before) < 16

        output, errors = second.communicate(timeout=600)
    finally:
        for job in (first, second):
            if job is not None and job.poll() is None:
                kill_session(job.pid)
                job.wait()

    assert second.returncode == 0, output + errors
    assert f"{20 - len(done_before)} computed now" in output
    store = FeatureStore.open(store_path)
    manifest = store.manifest()
    assert len(manifest) == 20 and manifest["video_id"].is_unique
    assert set(manifest["video_id"]) == set(read_sources(str(second_list))["video_id"])
    assert store.arrays_extent() == {name: 20 for name in store.layout.array_names}
    assert store.done_mask().all() and (manifest["status"] == "done").all()
    assert verify(store) == []
    for path, mtime in done_before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path}: a video done before the kill was computed again"

    rerun = clipreel_cli(*command(second_list, "process"))
    assert rerun.exit_code == 0 and "0 computed now" in rerun.output, rerun.output
