"""Ray where the user expects it: real `clipreel extract` processes, each starting its own Ray.

- Without --address, a private local Ray: a stale /tmp/ray/ray_current_cluster (left by an
  earlier `ray start`) is not joined. The stale file is written under a private RAY_TMPDIR,
  which is where Ray looks for it (ray._common.utils.get_ray_address_file), so that other Ray
  users of the machine never see it.
- An address where no cluster answers is a clear error, at once.
- SIGKILL of extract leaves no Ray process behind; the first Ctrl-C while Ray starts stops it.

Linux only (process trees are read with ps).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runs import checkout_environment, clipreel_command

from clipreel.pipeline.data.synth.videofile import write_video

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process trees with ps")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """A list of two small real videos."""
    folder = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_video(folder / f"{name}.mp4", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    listing = folder / "videos.csv"
    listing.write_text("path,label\na.mp4,0\nb.mp4,1\n")
    return listing


def extract_command(videos: Path, out: Path, *extra: str) -> list[str]:
    return clipreel_command("extract", "--videos", videos, "--out", out, "--model", "clipreel-tiny",
                            "--pretrained", "none", "--frames", "2", "--layers", "1", "--workers", "1", "--no-progress",
                            "--runner", "ray", *extra)  # these tests are about Ray: a job this small would run in this process


def free_port() -> int:
    """A TCP port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    """This process's environment, with this checkout importable and RAY_ADDRESS unset."""
    return checkout_environment({key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | extra)


def ray_descendants(root: int) -> dict[int, str]:
    """{pid: command} of the live, non-zombie descendants of `root` that run Ray (per `ps`)."""
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True, check=True)
    children: dict[int, list[tuple[int, str, str]]] = {}
    for line in table.stdout.splitlines():
        pid, ppid, state, command = (line.split(None, 3) + [""])[:4]
        children.setdefault(int(ppid), []).append((int(pid), state, command))
    found, waiting = {}, [root]
    while waiting:
        for pid, state, command in children.get(waiting.pop(), []):
            waiting.append(pid)
            if not state.startswith("Z") and (command.startswith("ray::") or "/ray/" in command):
                found[pid] = command
    return found


def still_running(pids) -> list[int]:
    """Those of `pids` that still run (zombies, already dead, are not counted)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            running.append(pid)
    return running


def wait_for(condition, seconds: float, step: float = 0.2):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return condition()


def kill_all(pids) -> None:
    for pid in still_running(pids):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_without_address_a_stale_cluster_file_is_not_joined(videos, tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="cr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        (ray_tmp / "ray").mkdir()
        stale = f"127.0.0.1:{free_port()}"
        (ray_tmp / "ray" / "ray_current_cluster").write_text(stale)
        env = environment(RAY_TMPDIR=str(ray_tmp))
        # The file is real: it is the cluster ray.init(address=None) would try to join.
        would_join = subprocess.run(
            [sys.executable, "-c", "from ray._private.services import canonicalize_bootstrap_address as c; print(c(None))"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert would_join.stdout.strip().endswith(stale.split(":")[1]), would_join.stderr

        result = subprocess.run(extract_command(videos, tmp_path / "store.zarr"), env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "done     2 (2 computed now, by a Ray job)" in result.stdout
        # A good run prints no error line of Ray's (the actors' restart warning among them).
        assert "Traceback" not in result.stderr and "core_worker" not in result.stderr, result.stderr
        assert (ray_tmp / "ray" / "ray_current_cluster").read_text() == stale  # left as it was
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_an_address_where_no_cluster_answers_is_a_clear_error(videos, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run(extract_command(videos, tmp_path / "store.zarr", "--address", address),
                            env=environment(), capture_output=True, text=True, timeout=300)
    message = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot join the Ray cluster of --address {address}" in message and "Traceback" not in message
    assert "drop --address" in message
    assert time.monotonic() - started < 60  # not Ray's minutes of retries


@pytest.mark.slow
def test_sigkill_of_extract_leaves_no_ray_process(videos, tmp_path):
    process = subprocess.Popen(extract_command(videos, tmp_path / "store.zarr"), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    noted: dict[int, str] = {}
    try:
        # Ray is up once the raylet has started its agents.
        ray_up = lambda: any("Agent" in command for command in ray_descendants(process.pid).values())  # noqa: E731
        wait_for(lambda: process.poll() is not None or ray_up(), 180)
        assert process.poll() is None
        time.sleep(2)
        noted = ray_descendants(process.pid)
        process.kill()  # SIGKILL: no handler, no atexit, no ray.shutdown
        process.wait(timeout=30)
        wait_for(lambda: not still_running(noted), 30)
        assert not still_running(noted), {pid: noted[pid] for pid in still_running(noted)}
    finally:
        kill_all([*noted, process.pid])


def start_as_foreground_job(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start `command` as a terminal starts a foreground job: in a process group of its own, with
    SIGINT at its default action.

    A process started with SIGINT ignored keeps ignoring it (the ignoring survives exec, and
    Python then installs no KeyboardInterrupt handler): a shell without job control starts its
    background commands that way, so a test run launched like that would hand the ignoring on.
    A caught signal, by contrast, is reset to its default across exec: so this process catches
    SIGINT while it starts the child.
    """
    own = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, own)


def ignores_sigint(pid: int) -> bool:
    """Whether the process ignores SIGINT (bit SIGINT - 1 of SigIgn in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    raise AssertionError(f"/proc/{pid}/status has no SigIgn line")


@pytest.mark.slow
def test_first_ctrl_c_while_ray_starts_stops_extract(videos, tmp_path):
    process = start_as_foreground_job(extract_command(videos, tmp_path / "store.zarr"), environment())
    noted: dict[int, str] = {}
    try:
        assert not ignores_sigint(process.pid), "extract was started with SIGINT ignored: no Ctrl-C could reach it"
        ray_starting = lambda: any("gcs_server" in command for command in ray_descendants(process.pid).values())  # noqa: E731
        wait_for(lambda: process.poll() is not None or ray_starting(), 180)
        assert process.poll() is None, process.communicate()
        noted = ray_descendants(process.pid)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            noted.update(ray_descendants(process.pid))
            time.sleep(0.1)
        _, err = process.communicate(timeout=5)
        assert process.returncode == 128 + signal.SIGINT, err
        assert "interrupted while Ray was starting" in err
        wait_for(lambda: not still_running(noted), 30)
        assert not still_running(noted), {pid: noted[pid] for pid in still_running(noted)}
    finally:
        kill_all([*noted, process.pid])
