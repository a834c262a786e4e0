"""Ends the Ray processes a clipreel process started, once that process has ended, however it ended.

`ray.init` ties its head processes (GCS, raylet, ...) to the process that started them, but not
the raylet's agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`): after a SIGKILL of that
process they notice the raylet is gone, then block for about a minute trying to report it to
the dead GCS, and stay behind. `start_reaper` starts this module as a small process of its own
session (so a Ctrl-C in the terminal does not reach it), holding the read end of a pipe whose
write end only the clipreel process holds. While that process lives, the reaper notes its
descendants that are Ray's (by command line); when the pipe closes (the process has ended: the
kernel closes its descriptors even after SIGKILL), it sends SIGTERM to those still alive, then
SIGKILL to those that remain after a grace period, and exits.

Linux only (it reads /proc); elsewhere `start_reaper` does nothing.

May import: the standard library only (it runs as `python -m clipreel.pipeline.ray_reaper PID`).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")
LOOK_EVERY_SECONDS = 0.5  # how often the reaper notes the descendants (a look costs ~10 ms of CPU)
GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL


def start_reaper() -> subprocess.Popen | None:
    """Start the reaper of this process's Ray processes; None where /proc is missing.

    The returned process's stdin is the pipe: keep the object alive as long as this process
    runs (its write end must stay open until this process ends).
    """
    if not (PROC / str(os.getpid()) / "stat").exists():
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "clipreel.pipeline.ray_reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, or None."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (command)": state, ppid, ...
    if fields[0] == "Z":  # a zombie: already dead, only waiting to be reaped by its parent
        return None
    return int(fields[1]), int(fields[19])


def _is_ray(pid: int) -> bool:
    """Whether the process runs Ray: a Ray binary or script, or a process titled ray::<name>."""
    try:
        command = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return command.startswith(b"ray::") or b"/ray/" in command


def _descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of `root`."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            found = _stat(int(entry.name))
            if found is not None:
                children.setdefault(found[0], []).append((int(entry.name), found[1]))
    result: dict[int, int] = {}
    waiting = [root]
    while waiting:
        for pid, started in children.get(waiting.pop(), []):
            if pid not in result:
                result[pid] = started
                waiting.append(pid)
    return result


def _alive(noted: dict[int, int]) -> list[int]:
    """The noted processes still running (the same process: same pid and start time)."""
    return [pid for pid, started in noted.items() if (_stat(pid) or (0, None))[1] == started]


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            pass  # it ended meanwhile


def reap(parent: int) -> None:
    """Note the Ray descendants of `parent` until stdin closes, then end those still running."""
    noted: dict[int, int] = {}
    me = os.getpid()
    while True:
        for pid, started in _descendants(parent).items():
            if pid != me and pid not in noted and _is_ray(pid):
                noted[pid] = started
        readable, _, _ = select.select([sys.stdin.buffer], [], [], LOOK_EVERY_SECONDS)
        if readable and not sys.stdin.buffer.read1(4096):
            break  # end of file: the parent has ended
    for pid in _alive(noted):  # children of noted processes started since the last look
        noted.update({child: started for child, started in _descendants(pid).items() if _is_ray(child)})
    _signal(_alive(noted), signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while _alive(noted) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(_alive(noted), signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reap(int(sys.argv[1]))
