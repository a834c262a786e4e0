"""Repair: bring a store in any state that a crash or a lost manifest update leaves back to a consistent one.

What `repair_store` does, in order:

1. arrays of different lengths, or shorter than the manifest (an append interrupted between its
   manifest write and the arrays' resize): every array grows to the longest (metadata only);
2. arrays longer than the manifest (the manifest lost rows, e.g. to a writer that saved a stale
   row set): the missing manifest rows come back as orphan placeholders, pending, with their done
   flags cleared, since their data belongs to no known video. `FeatureStore.append` fills
   placeholders first, so extracting the same video list again puts the lost videos back there;
3. recheck: every done video that `verify` rejects (a missing or mis-sized chunk file, NaN or inf,
   frame indices out of range) loses its done flag, so that extract computes it again;
4. the manifest's statuses follow the done flags, and a failed row without an error message
   becomes pending.

`complete_append`, `recheck` and `reconcile_statuses` are the steps that extract runs on its own
(lossless, or asked for with --recheck). Callers hold the store's writer lease; `repair_store_at`
takes it itself. Imports only stores modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pandas as pd

from clipreel.errors import ClipreelError
from clipreel.stores.audit import rejected_videos, verify
from clipreel.stores.features import FeatureStore
from clipreel.stores.lease import WriterLease
from clipreel.stores.manifest import new_manifest, orphan_records


@dataclass
class RepairReport:
    """What a repair changed, one line per action, and the rows whose done flag it cleared."""

    actions: list[str] = field(default_factory=list)
    orphaned_rows: list[int] = field(default_factory=list)
    rechecked_rows: list[int] = field(default_factory=list)


def repair_store(store: FeatureStore, check_values: bool = True) -> RepairReport:
    """Make the store consistent (steps 1-4 of the module docstring); check_values=False skips
    reading every done video (step 3 then checks chunk files only)."""
    report = RepairReport()
    manifest = store.manifest()
    extent = store.arrays_extent()
    videos = max(len(manifest), *extent.values())
    grown = store.grow_arrays(videos)
    if grown:
        sizes = ", ".join(f"{name} {before} -> {after}" for name, (before, after) in grown.items())
        report.actions.append(f"arrays grown to the {videos} rows they must all have: {sizes}")
    report.orphaned_rows = list(range(len(manifest), videos))
    if report.orphaned_rows:
        store.mark_not_done(report.orphaned_rows)
        store.write_manifest(pd.concat([manifest, new_manifest(orphan_records(range(len(manifest), videos)))]))
        span = f"row {videos - 1}" if videos - len(manifest) == 1 else f"rows {len(manifest)}..{videos - 1}"
        report.actions.append(
            f"{span}: restored in the manifest as orphan placeholders (their videos "
            "are unknown; done flags cleared). Extracting the video list again fills them with the videos "
            "not yet in the store."
        )
    rejected = recheck(store, check_values)
    report.rechecked_rows = list(rejected)
    ids = store.manifest()["video_id"]
    for row, problems in rejected.items():
        report.actions.append(f"row {row} ({ids.iloc[row]}): done flag cleared, to be extracted again: {'; '.join(problems)}")
    _, changed = reconcile_statuses(store)
    if changed:
        report.actions.append(f"{changed} manifest statuses set from the done flags")
    return report


def complete_append(store: FeatureStore) -> dict[str, tuple[int, int]]:
    """Grow the arrays that are shorter than the manifest (an interrupted append: nothing is lost).

    Refuses a store whose arrays are longer than its manifest: that needs repair_store, which
    clears done flags. Returns what grew ({array: (rows before, rows after)}).
    """
    manifest_rows = len(store.manifest())
    extent = store.arrays_extent()
    if any(count > manifest_rows for count in extent.values()):
        counts = ", ".join(f"{name} {count}" for name, count in extent.items())
        raise ClipreelError(
            f"{store.path}: the arrays hold more rows ({counts}) than the manifest ({manifest_rows}): the "
            f"manifest has lost videos. Run `clipreel verify --repair {store.path}` (or this command with "
            "--repair): the lost rows become placeholders, which extracting the video list again fills."
        )
    return store.grow_arrays(manifest_rows)


def recheck(store: FeatureStore, check_values: bool = True) -> dict[int, list[str]]:
    """Clear the done flag of every done video that verify rejects; returns {row: why}."""
    rejected = rejected_videos(store, check_values)
    store.mark_not_done(list(rejected))
    return rejected


def reconcile_statuses(store: FeatureStore) -> tuple[pd.DataFrame, int]:
    """Make manifest statuses agree with the done flags (the truth after any crash) and save them.

    Returns the saved manifest and how many statuses changed.
    """
    manifest = store.manifest()
    done = store.done_mask()
    before = manifest["status"].to_numpy().copy()
    was_done = manifest["status"] == "done"
    silent_failure = (manifest["status"] == "failed") & (manifest["error"].str.strip() == "")
    manifest.loc[done, "status"] = "done"
    manifest.loc[done, "error"] = ""
    manifest.loc[(was_done | silent_failure) & ~done, "status"] = "pending"
    changed = int((manifest["status"].to_numpy() != before).sum())
    saved = store.update_manifest(manifest[["video_id", "status", "error"]])
    return saved, changed


def repair_store_at(path: str | os.PathLike, force: bool = False, wait_seconds: float = 0.0) -> tuple[RepairReport, list[str]]:
    """`clipreel verify --repair`: take the store's writer lease, repair the store, and verify it again.

    The second verify checks chunk files but not values: repair has just read every done video.
    Returns the repair report and the problems that remain (provenance contradicting the shapes).
    """
    with WriterLease.acquire(path, "clipreel verify --repair", wait_seconds=wait_seconds, force=force):
        store = FeatureStore.open(path, mode="r+")
        report = repair_store(store)
        return report, verify(store, check_values=False)
