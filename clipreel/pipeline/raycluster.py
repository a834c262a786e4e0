"""The Ray a stage runs on: a cluster the user names, this process's Ray, or a private local one.

Which Ray, for `address`:
- None: a private local Ray, started here (`ray.init(address="local")`). `ray.init(address=None)`
  would instead join whatever cluster the file /tmp/ray/ray_current_cluster names (written by any
  earlier `ray start`, and left behind when that cluster died), or any local cluster it finds.
  RAY_ADDRESS, when set (`ray job submit` sets it for its jobs), is joined instead.
- "auto": the cluster `ray start` runs on this machine.
- HOST:PORT (or ray://...): that cluster.

A local Ray started here goes away with this process, however it ends: `ray.shutdown` on a
normal end, and a reaper process (`ray_reaper`) for the rest (SIGKILL, a crash). While Ray
starts, the first Ctrl-C ends the process at once.

May import: ray (inside functions), clipreel.errors, clipreel.pipeline.ray_reaper.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from contextlib import contextmanager

from clipreel.errors import ClipreelError
from clipreel.pipeline.ray_reaper import start_reaper

REACH_SECONDS = 5.0  # how long a cluster's address may take to accept a connection
# The reaper of the local Ray started in this process (its stdin pipe must stay open while the
# process lives, so the Popen object is kept here).
_reaper = None


def ensure_ray(address: str | None = None) -> bool:
    """Join `address`, or reuse this process's Ray, or start a private local one (see the module
    docstring). True if this call started or joined it (the caller then shuts it down when its
    stage ends)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's own INFO/WARNING chatter (start-up notices, per-dataset summaries) would bury the
    # progress bar and the summary; its errors still come through.
    logging.getLogger("ray").setLevel(logging.ERROR)
    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target == "local":
        _start_reaper_once()
    with _exit_on_first_interrupt():
        try:
            if target != "local" and "://" not in target:
                _check_reachable(target)
            ray.init(
                address=target,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}},
            )
        except ConnectionError as exc:
            raise ClipreelError(_connection_advice(address, target, exc)) from None
    return True


def quiet_ray_data(context) -> None:
    """No progress bars or per-dataset INFO lines from Ray Data (a `DataContext`): they would bury
    clipreel's own progress bar and summary. Its errors still come through."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.verbose_stats_logs = False


def _start_reaper_once() -> None:
    global _reaper
    if _reaper is None or _reaper.poll() is not None:
        _reaper = start_reaper()


def _check_reachable(address: str) -> None:
    """Raise ConnectionError at once if nothing answers at the cluster's address ("auto": the one
    Ray would pick), instead of the minutes ray.init spends retrying a dead one."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(address)  # Ray's own reading of "auto" and HOST:PORT
    except ValueError as exc:
        raise ConnectionError(f"{exc}; write HOST:PORT, auto, or ray://HOST:PORT") from None
    host, _, port = resolved.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_SECONDS):
            pass
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {resolved} ({exc.strerror or exc})") from None


def _connection_advice(address: str | None, target: str, exc: ConnectionError) -> str:
    """What to tell the user when the Ray cluster to join cannot be reached."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if address is None:
        where = f"RAY_ADDRESS={target}"
        fix = "start that cluster, or unset RAY_ADDRESS to run on a private local Ray"
    elif target == "auto":
        where = "--address auto (the cluster `ray start` runs on this machine)"
        fix = "start it with `ray start --head`, or drop --address to run on a private local Ray"
    else:
        where = f"--address {target}"
        fix = "check the address and that the cluster runs, or drop --address to run on a private local Ray"
    return f"cannot join the Ray cluster of {where}: {reason}; {fix}."


@contextmanager
def _exit_on_first_interrupt():
    """While this block runs, the first Ctrl-C (SIGINT) ends the process at once, exit code 130.

    `ray.init` can wait inside Ray's C++ code (for instance for a raylet that the same Ctrl-C
    stopped: it runs in the terminal's process group), where Python sees the signal only when
    the wait ends. The signal is seen here through Python's wakeup descriptor, written by the C
    signal handler as the signal arrives, and read by a thread. Nothing of the user's is in
    flight while Ray starts; the reaper ends the Ray processes already started.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers (and so the wakeup descriptor) belong to the main thread
        return
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    previous = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            received = receiver.recv(64)  # one byte per signal number; b"" once the block ends
            if not received:
                return
            if signal.SIGINT in received:
                os.write(2, b"\ninterrupted while Ray was starting\n")
                os._exit(128 + signal.SIGINT)

    watcher = threading.Thread(target=watch, name="clipreel-interrupt-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        sender.close()  # ends the watcher: it reads end of file
        watcher.join()
        receiver.close()
