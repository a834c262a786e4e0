"""The writer lease: one process at a time adds rows to a store or rewrites its manifest.

    STORE/writer_lease/000000000007.json    the newest record; older generations are deleted

A record names its holder (what and who, host, pid), when it started, its last heartbeat and its
time to live (TTL). Taking the lease means creating the next generation's record with a
create-if-absent write (objects.StoreObjects.create: a hard link locally, `If-None-Match: *` on
S3): of several processes that try at once exactly one creates it, and the others see its
record. The holder renews its own record (heartbeat) from a background thread every TTL/4 and
marks it released at the end. The newest record decides:

- released, or absent: free;
- its holder ran on this machine and its pid is gone: free at once (no need to wait the TTL);
- heartbeat older than the TTL: expired. The holder is probably dead but could be a stalled
  process on another host, so only `force=True` takes it over;
- otherwise: live. acquire() waits up to `wait_seconds` for it, then refuses naming the holder.

A holder whose lease was taken over (force after it stalled) notices at its next heartbeat, and
`ensure_held()` (called before every manifest write) checks the newest record in storage, so a
stalled writer stops instead of writing over the new holder's manifest. Heartbeats are wall-clock
times (`time.time()`): the hosts' clocks must agree to well within the TTL. Imports only
clipreel.errors and stores.objects.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from clipreel.errors import ClipreelError
from clipreel.stores.objects import StoreObjects

LEASE_FOLDER = "writer_lease"
DEFAULT_TTL_SECONDS = 60.0
POLL_SECONDS = 1.0  # how often a waiting acquire() looks at the lease again
_RECORD_NAME = re.compile(r"(\d{12})\.json")


@dataclass(frozen=True)
class LeaseRecord:
    """One generation of the lease, as stored (JSON)."""

    generation: int
    token: str  # unique per acquisition: tells this holder from any other
    holder: str  # what holds it, e.g. "clipreel extract"
    user: str
    host: str
    pid: int
    machine: str  # boot id and pid namespace: where `pid` names the holder ("" when unknown)
    started: float  # time.time() of the holder
    heartbeat: float
    ttl_seconds: float
    released: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def state(self, now: float) -> str:
        """'released', 'dead' (its process is gone), 'expired' (no heartbeat for a TTL) or 'live'."""
        if self.released:
            return "released"
        if self.runs_here() and not _process_alive(self.pid):
            return "dead"
        if now - self.heartbeat > self.ttl_seconds:
            return "expired"
        return "live"

    def runs_here(self) -> bool:
        """Whether the holder's pid can be looked up from this process (same boot, same pid namespace)."""
        return bool(self.machine) and self.machine == _machine()

    def describe(self, now: float) -> str:
        """Who holds it and how fresh it is, for messages."""
        return (
            f"{self.holder} (user {self.user}) on host {self.host}, pid {self.pid}, started "
            f"{_clock(self.started)}, last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago "
            f"(it expires {self.ttl_seconds:g} s after its last heartbeat)"
        )


class WriterLease:
    """The writer lease of one store, held by this process until release(). Use acquire()."""

    def __init__(self, objects: StoreObjects, record: LeaseRecord):
        self.record = record
        self._objects = objects
        self._lost: str | None = None  # why this process no longer holds it
        self._renewal_error: str | None = None
        self._last_renewal = time.monotonic()
        self._released = False
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_stopped, name="clipreel-lease", daemon=True)
        self._renewer.start()

    @classmethod
    def acquire(
        cls,
        store: Path | str,
        holder: str,
        wait_seconds: float = 0.0,
        force: bool = False,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
    ) -> "WriterLease":
        """Take the writer lease of the store at `store` (a folder or URL; it need not exist yet).

        A live lease is waited for up to `wait_seconds`, then refused (ClipreelError naming the
        holder); an expired one is taken over only with `force`.
        """
        if wait_seconds < 0:
            raise ClipreelError(f"--wait must be 0 or more seconds, got {wait_seconds}")
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        objects = StoreObjects(store)
        deadline = time.monotonic() + wait_seconds
        while True:
            current = newest_record(objects)
            state = current.state(time.time()) if current is not None else "absent"
            if state in ("absent", "released", "dead") or (state == "expired" and force):
                now = time.time()
                record = LeaseRecord(
                    generation=current.generation + 1 if current is not None else 1,
                    token=uuid.uuid4().hex,
                    holder=holder,
                    user=_user(),
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    machine=_machine(),
                    started=now,
                    heartbeat=now,
                    ttl_seconds=float(ttl_seconds),
                )
                if objects.create(_record_name(record.generation), record.to_bytes()):
                    _delete_older_records(objects, record.generation)
                    return cls(objects, record)
                continue  # another process created that generation first: look at its record
            if time.monotonic() >= deadline:
                raise ClipreelError(_refusal(store, current, state, force, wait_seconds))
            time.sleep(max(0.0, min(POLL_SECONDS, deadline - time.monotonic())))

    def ensure_held(self) -> None:
        """Raise ClipreelError unless this process still holds the lease, as storage says now."""
        if self._released:
            raise ValueError("ensure_held() after release()")
        if self._lost is None:
            self._lost = self._takeover(newest_record(self._objects))
        silent = time.monotonic() - self._last_renewal
        if self._lost is None and silent > self.record.ttl_seconds:
            self._lost = (
                f"its heartbeat could not be renewed for {silent:.0f} s ({self._renewal_error}), so "
                "another writer may have taken it over"
            )
        if self._lost is not None:
            raise ClipreelError(
                f"{self._objects.root}: this process no longer holds the store's writer lease: {self._lost}. "
                "It stops here without touching the manifest; the videos it stored stay done. Run the "
                "command again when the other writer has finished."
            )

    def release(self) -> None:
        """Stop the heartbeat and mark the record released (unless another process holds it by now)."""
        if self._released:
            return
        self._stop.set()
        self._renewer.join()
        self._released = True
        if self._takeover(newest_record(self._objects)) is None:
            released = replace(self.record, heartbeat=time.time(), released=True)
            self._objects.replace(_record_name(released.generation), released.to_bytes())
            self.record = released

    def __enter__(self) -> "WriterLease":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _takeover(self, current: LeaseRecord | None) -> str | None:
        """Why `current` (the newest record) shows that another process holds the lease; None if we do."""
        if current is not None and current.token == self.record.token:
            return None
        if current is None:
            return "its record has been deleted"
        return f"it was taken over by {current.describe(time.time())}"

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.record.ttl_seconds / 4):
            try:
                current = newest_record(self._objects)
            except Exception as exc:  # storage unreachable for now: ensure_held() fails once a TTL passes
                self._renewal_error = f"{type(exc).__name__}: {exc}"
                continue
            self._lost = self._takeover(current)
            if self._lost is not None:
                return
            renewed = replace(self.record, heartbeat=time.time())
            try:
                self._objects.replace(_record_name(renewed.generation), renewed.to_bytes())
            except Exception as exc:
                self._renewal_error = f"{type(exc).__name__}: {exc}"
                continue
            self.record = renewed
            self._last_renewal = time.monotonic()


def newest_record(objects: StoreObjects) -> LeaseRecord | None:
    """The newest lease record of a store, or None when it has never been leased."""
    while True:
        generations = [int(match[1]) for name in objects.list(LEASE_FOLDER) if (match := _RECORD_NAME.fullmatch(name))]
        if not generations:
            return None
        name = _record_name(max(generations))
        data = objects.read(name)
        if data is None:  # deleted since the listing: a newer generation exists, list again
            continue
        try:
            return LeaseRecord(**json.loads(data))
        except (ValueError, TypeError) as exc:
            # Records are written whole, so this one was damaged by hand: it never renews, expires
            # at once, and only force takes it over.
            return LeaseRecord(
                generation=max(generations), token="", holder=f"an unreadable lease record ({name}: {exc})",
                user="?", host="?", pid=0, machine="", started=0.0, heartbeat=0.0, ttl_seconds=0.0,
            )


def lease_status(store: Path | str) -> dict | None:
    """The newest lease record of the store as a dict with its `state`, or None (for `clipreel info`)."""
    record = newest_record(StoreObjects(store))
    if record is None:
        return None
    now = time.time()
    return {**asdict(record), "state": record.state(now), "description": record.describe(now)}


def _record_name(generation: int) -> str:
    return f"{LEASE_FOLDER}/{generation:012d}.json"


def _delete_older_records(objects: StoreObjects, generation: int) -> None:
    """Remove the records of generations before `generation` (never the newest one). Best effort:
    an old record left behind is never read again."""
    with contextlib.suppress(OSError):
        for name in objects.list(LEASE_FOLDER):
            match = _RECORD_NAME.fullmatch(name)
            if match and int(match[1]) < generation:
                objects.delete(f"{LEASE_FOLDER}/{name}")


def _refusal(store, record: LeaseRecord, state: str, force: bool, wait_seconds: float) -> str:
    """The message of a refused acquire()."""
    now = time.time()
    waited = f" (after waiting {wait_seconds:.0f} s)" if wait_seconds else ""
    message = f"{store} has another writer{waited}: its writer lease is held by {record.describe(now)}. "
    if state == "expired" and record.runs_here():
        return message + (
            f"Process {record.pid} still exists but has stopped renewing the lease (stopped or hung?). "
            "End it, or take the lease over with --force once you are sure it no longer writes this store."
        )
    if state == "expired":
        return message + (
            f"The lease has expired, so its holder has probably died, but {socket.gethostname()} cannot "
            f"check a process on {record.host}. If no clipreel process there still writes this store, "
            "take the lease over with --force."
        )
    return message + (
        "Let that run finish, or make this command wait for it with --wait SECONDS. "
        + ("--force takes over only an expired lease, and this one is live." if force
           else "(--force takes over only an expired lease.)")
    )


def _process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine exists and is not a zombie (killed, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _machine() -> str:
    """This process's boot id and pid namespace (Linux), within which a pid names one process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot}/{namespace}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no USER variable (some containers)
        return "unknown"


def _clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
