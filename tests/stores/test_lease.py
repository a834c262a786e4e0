"""The writer lease: real holder processes (killed, stopped, racing) on real folders, and a real
S3 endpoint (moto's server on 127.0.0.1) when moto and s3fs are installed."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clipreel.errors import ClipreelError
from clipreel.stores.lease import LEASE_FOLDER, WriterLease, lease_status, newest_record
from clipreel.stores.objects import StoreObjects

# A holder process: takes the lease, says so, holds it for argv[3] seconds, then checks that it
# still holds it (exit 3 and the reason if not) and releases it.
_HOLDER = """
import sys, time
from clipreel.errors import ClipreelError
from clipreel.stores.lease import WriterLease
lease = WriterLease.acquire(sys.argv[1], "test holder", ttl_seconds=float(sys.argv[2]))
print("held", flush=True)
time.sleep(float(sys.argv[3]))
try:
    lease.ensure_held()
except ClipreelError as error:
    print("lost:", error, flush=True)
    sys.exit(3)
lease.release()
print("released", flush=True)
"""


def start_holder(store, ttl: float = 60.0, hold: float = 600.0) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(store), str(ttl), str(hold)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def stop(holder: subprocess.Popen) -> None:
    if holder.poll() is None:
        holder.kill()
    holder.wait()


def test_a_live_lease_refuses_a_second_writer_naming_its_holder(tmp_path):
    store = tmp_path / "feats.zarr"
    holder = start_holder(store)
    try:
        with pytest.raises(ClipreelError) as refused:
            WriterLease.acquire(store, "second")
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and f"host {socket.gethostname()}" in message
        assert "test holder" in message and "last heartbeat" in message and "--wait SECONDS" in message

        with pytest.raises(ClipreelError, match="--force takes over only an expired lease, and this one is live"):
            WriterLease.acquire(store, "second", force=True)
    finally:
        stop(holder)


def test_a_killed_holder_frees_the_lease_at_once(tmp_path):
    store = tmp_path / "feats.zarr"
    holder = start_holder(store, ttl=600.0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()

    started = time.monotonic()
    with WriterLease.acquire(store, "next writer") as lease:
        assert time.monotonic() - started < 5  # no waiting for the 600 s TTL
        assert lease.record.generation == 2 and lease.record.pid == os.getpid()
        assert os.listdir(store / LEASE_FOLDER) == ["000000000002.json"]  # the dead holder's record is gone
    assert newest_record(StoreObjects(store)).released


def test_a_stalled_holder_expires_only_force_takes_over_and_the_holder_then_stops(tmp_path):
    store = tmp_path / "feats.zarr"
    holder = start_holder(store, ttl=0.5, hold=2.0)
    try:
        holder.send_signal(signal.SIGSTOP)  # alive, but its heartbeat stops
        time.sleep(1.5)
        with pytest.raises(ClipreelError, match=f"Process {holder.pid} still exists but has stopped renewing"):
            WriterLease.acquire(store, "next writer")

        lease = WriterLease.acquire(store, "next writer", force=True)
        holder.send_signal(signal.SIGCONT)
        output, _ = holder.communicate(timeout=60)
        assert holder.returncode == 3, output
        assert "no longer holds the store's writer lease" in output and "taken over by next writer" in output
        lease.ensure_held()
        lease.release()
    finally:
        stop(holder)


def test_wait_takes_the_lease_once_its_holder_releases_it(tmp_path):
    store = tmp_path / "feats.zarr"
    holder = start_holder(store, hold=2.0)
    try:
        with pytest.raises(ClipreelError, match="after waiting"):
            WriterLease.acquire(store, "impatient", wait_seconds=0.3)
        with WriterLease.acquire(store, "patient", wait_seconds=120) as lease:
            assert holder.wait(timeout=10) == 0
            assert holder.stdout.read().strip() == "released"
            assert lease.record.generation == 2
    finally:
        stop(holder)


def test_the_heartbeat_keeps_a_lease_alive_past_its_ttl(tmp_path):
    store = tmp_path / "feats.zarr"
    with WriterLease.acquire(store, "long job", ttl_seconds=0.4) as lease:
        time.sleep(1.5)
        stored = newest_record(StoreObjects(store))
        assert stored.token == lease.record.token
        assert stored.heartbeat > stored.started + 0.5
        assert stored.state(time.time()) == "live"
        status = lease_status(store)
        assert status["state"] == "live" and "long job" in status["description"]
        lease.ensure_held()
    assert lease_status(store)["state"] == "released"


def _race(store: str, start, finish, results) -> None:
    start.wait()
    try:
        lease = WriterLease.acquire(store, f"racer {os.getpid()}")
    except ClipreelError:
        results.put("refused")
        finish.wait()
        return
    results.put("held")
    finish.wait()  # hold it until every racer has tried
    lease.release()


def test_exactly_one_of_several_simultaneous_writers_gets_the_lease(tmp_path):
    context = multiprocessing.get_context("spawn")
    racers = 4
    start, finish, results = context.Barrier(racers), context.Barrier(racers), context.Queue()
    processes = [
        context.Process(target=_race, args=(str(tmp_path / "feats.zarr"), start, finish, results)) for _ in range(racers)
    ]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=120) for _ in range(racers))
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert outcomes == ["held", "refused", "refused", "refused"]


def test_on_s3_conditional_writes_let_exactly_one_racer_take_the_lease(s3_endpoint):
    store = f"{s3_endpoint}/feats.zarr"
    leases, refusals = [], []
    start = threading.Barrier(4)

    def race() -> None:
        start.wait()
        try:
            leases.append(WriterLease.acquire(store, "racer"))
        except ClipreelError as error:
            refusals.append(str(error))

    threads = [threading.Thread(target=race) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(leases) == 1 and len(refusals) == 3
    assert all(f"pid {os.getpid()}" in refusal for refusal in refusals)
    leases[0].release()

    with WriterLease.acquire(store, "next writer") as lease:
        assert lease.record.generation == 2
        assert StoreObjects(store).list(LEASE_FOLDER) == ["000000000002.json"]
    assert lease_status(store)["state"] == "released"


def test_a_store_can_be_created_in_the_folder_its_lease_lives_in(tmp_path):
    from clipreel.stores.features import FeatureStore, StoreLayout
    from clipreel.stores.manifest import new_manifest

    store = tmp_path / "feats.zarr"
    layout = StoreLayout(videos=2, views=1, frames=2, layers=1, tokens=5, width=8, embed_dim=4)
    with WriterLease.acquire(store, "creator"):
        assert not FeatureStore.exists(store)
        FeatureStore.create(store, layout, {}, new_manifest([{"video_id": f"v{i}", "path": f"/v{i}.mp4"} for i in range(2)]))
        assert FeatureStore.exists(store)
    assert sorted(path.name for path in Path(store).iterdir()) == sorted(
        [LEASE_FOLDER, "attention", "done", "embeds", "frame_indices", "manifest.parquet", "tokens", "zarr.json"]
    )
