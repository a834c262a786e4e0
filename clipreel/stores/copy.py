"""Copy a feature store between any two locations (local folder, object store), resumably, and check the copy.

`copy_store(source, destination)` makes the destination hold the same objects as the source
(all but the source's writer lease), in an order that keeps the destination a consistent store
at every instant, so an interrupted copy is never read as more than it is:

1. objects the destination has and the source does not (e.g. a done flag that the source's
   repair cleared) are deleted, done flags first;
2. the arrays' metadata (`tokens/zarr.json`, …), then every data chunk;
3. the done flags: a video reads as done in the destination only once all its data is there;
4. `manifest.parquet`, and the root `zarr.json` last: until then the destination is no store
   (`FeatureStore.exists` is False), and an interrupted first copy is no half store.

The metadata and the manifest (a few small objects) are always copied; any other object is
copied when the destination lacks it, when its size differs, or when the source's
copy was modified after the destination's (as `aws s3 sync` decides; by more than
MODIFIED_SLACK_SECONDS, since object stores keep seconds and their own clock), so running the same copy
again sends only what is missing or changed. Each object is written whole (a temporary file and
a rename locally, one PUT on object storage). The copy holds the destination's writer lease and
refuses a source whose writer lease is live (an extraction still writing it).

Then the copy is checked: the destination is listed again and every source object must be there
with its size, and `verify` checks the store (chunk sizes and the manifest against the done
flags; with check_values=True every done video's values too). Imports only stores modules.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from clipreel.errors import ClipreelError
from clipreel.stores.audit import verify
from clipreel.stores.features import MANIFEST_FILE, FeatureStore, provenance_diff
from clipreel.stores.lease import LEASE_FOLDER, WriterLease, lease_status
from clipreel.stores.location import filesystem, store_location
from clipreel.stores.objects import StoreObjects

COPY_THREADS = 8  # objects in flight at once (each is read whole into memory: ~10-14 MB at ViT-B/16)
ROOT_METADATA = "zarr.json"
# Object stores keep modification times to the second and their clock is not this machine's: a
# source object counts as newer only when it is newer by more than this.
MODIFIED_SLACK_SECONDS = 2.0


@dataclass
class CopyReport:
    """What a copy did and what its check found."""

    source: str
    destination: str
    objects: int = 0  # objects the source holds (its lease aside)
    copied: int = 0
    copied_bytes: int = 0
    skipped: int = 0  # already in the destination, same size, not older than the source's
    deleted: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what the check found ([] = a faithful copy)


@dataclass(frozen=True)
class _Object:
    name: str  # relative to the store root, '/'-separated
    size: int
    modified: float | None  # seconds since the epoch, when the filesystem says


def copy_store(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    check_values: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
) -> CopyReport:
    """Copy the store at `source` to `destination` (see the module docstring); returns the report.

    progress(objects_done, objects_total, bytes_copied) is called after each object copied.
    """
    source, destination = store_location(source), store_location(destination)
    if str(source) == str(destination):
        raise ClipreelError(f"clipreel copy: the source and the destination are both {source}")
    if not FeatureStore.exists(source):
        raise ClipreelError(f"{source} is not a feature store (no zarr.json): nothing to copy")
    source_store = FeatureStore.open(source)
    lease = lease_status(source)
    if lease is not None and lease["state"] == "live":
        raise ClipreelError(
            f"{source} is being written: its writer lease is held by {lease['description']}. Copy it once that "
            "run has finished (or stopped), so that the copy is one consistent state of the store."
        )
    with WriterLease.acquire(destination, "clipreel copy"):
        if FeatureStore.exists(destination):
            differences = provenance_diff(FeatureStore.open(destination).provenance, source_store.provenance)
            if differences:
                raise ClipreelError(
                    f"{destination} holds another store (its settings differ: {'; '.join(differences)}). "
                    "Copy into a new location, or delete that store first."
                )
        report = CopyReport(str(source), str(destination))
        source_objects = _list_objects(source)
        report.objects = len(source_objects)
        _delete_extra(destination, source_objects, report)
        _copy_in_order(source, destination, source_objects, report, progress)
    report.problems = _check_copy(source_objects, destination, check_values)
    return report


def _list_objects(location: Path | str) -> dict[str, _Object]:
    """{name: object} of every object under the store but its writer lease and temporary files."""
    fs, root = filesystem(location)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    objects = {}
    for path, info in found.items():
        name = path[len(root) + 1 :]
        if name.startswith(f"{LEASE_FOLDER}/") or name.rsplit("/", 1)[-1].startswith("."):
            continue
        objects[name] = _Object(name, int(info["size"]), _modified(info))
    return objects


def _modified(info: dict) -> float | None:
    """An fsspec info dict's modification time in seconds (local mtime, S3 LastModified, …)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return value.timestamp()
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _phase(name: str) -> int:
    """When an object is written: 0 array metadata, 1 data chunks, 2 done flags, 3 manifest, 4 root."""
    if name == ROOT_METADATA:
        return 4
    if name == MANIFEST_FILE:
        return 3
    if name.endswith("/zarr.json"):
        return 0
    return 2 if name.startswith("done/") else 1


def _delete_extra(destination, source_objects: dict[str, _Object], report: CopyReport) -> None:
    """Delete the destination's objects that the source lacks (done flags first)."""
    extra = [name for name in _list_objects(destination) if name not in source_objects]
    extra.sort(key=lambda name: (not name.startswith("done/"), name))
    objects = StoreObjects(destination)
    for name in extra:
        objects.delete(name)
    report.deleted = extra


def _copy_in_order(source, destination, source_objects: dict[str, _Object], report: CopyReport, progress) -> None:
    """Copy what the destination lacks or holds stale, phase by phase (see _phase)."""
    present = _list_objects(destination)
    source_fs, source_root = filesystem(source)
    source_root = source_root.rstrip("/")
    objects_done = bytes_done = 0
    targets = StoreObjects(destination)

    def copy_one(item: _Object) -> int:
        targets.replace(item.name, source_fs.cat_file(f"{source_root}/{item.name}"))
        return item.size

    with ThreadPoolExecutor(max_workers=COPY_THREADS, thread_name_prefix="clipreel-copy") as pool:
        for phase in range(5):
            batch = sorted((item for item in source_objects.values() if _phase(item.name) == phase),
                           key=lambda item: item.name)
            # Metadata and the manifest are small and may change without changing size: always copied.
            needed = [item for item in batch if phase in (0, 3, 4) or _needs_copy(item, present.get(item.name))]
            report.skipped += len(batch) - len(needed)
            objects_done += len(batch) - len(needed)
            for copied_bytes in pool.map(copy_one, needed):
                report.copied += 1
                report.copied_bytes += copied_bytes
                objects_done += 1
                bytes_done += copied_bytes
                if progress is not None:
                    progress(objects_done, len(source_objects), bytes_done)


def _needs_copy(item: _Object, present: _Object | None) -> bool:
    if present is None or present.size != item.size:
        return True
    if item.modified is None or present.modified is None:
        return False
    return item.modified > present.modified + MODIFIED_SLACK_SECONDS


def _check_copy(source_objects: dict[str, _Object], destination, check_values: bool) -> list[str]:
    """The differences between the source's listing and the destination's, then verify's findings."""
    copied = _list_objects(destination)
    problems = []
    for name, item in sorted(source_objects.items()):
        if name not in copied:
            problems.append(f"{name}: missing in the copy")
        elif copied[name].size != item.size:
            problems.append(f"{name}: {copied[name].size} bytes in the copy, {item.size} in the source")
    if problems:
        return problems
    return verify(FeatureStore.open(destination), check_values=check_values)
