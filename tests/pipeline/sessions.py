"""Helpers for tests that SIGKILL a clipreel job: the processes of a session (a job started with
`start_new_session=True`: its driver, its local Ray, every worker) and the done flags it has
written so far in a local store."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def session_pids(session_id: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session_id:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def kill_session(session_id: int) -> None:
    """SIGKILL every process of a session (Ray puts each worker in its own process group, but
    they stay in the session)."""
    for pid in session_pids(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def done_chunks(store_path: Path) -> list[Path]:
    """The chunk files of a local store's done array: one per video whose done flag is set."""
    done_dir = store_path / "done"
    return [p for p in done_dir.rglob("*") if p.is_file() and p.name != "zarr.json"] if done_dir.exists() else []
