"""Whole objects under a store's root, on a local folder or behind any fsspec URL.

The writer lease and the manifest need only operations that object storage offers: read an
object, list a folder, delete, replace an object atomically, and create an object only if it is
absent. Everything goes through an fsspec filesystem (a local folder through fsspec's local
filesystem); the two operations that must be atomic are done per backend:

| operation | local folder | fsspec URL |
|---|---|---|
| replace   | temporary file in the same folder, fsync, `os.replace` | one `pipe_file` (a single PUT replaces the object whole on S3, GCS, Azure) |
| create    | temporary file, fsync, `os.link` to the name (fails if the name exists: atomic, and the object appears with all its bytes) | `pipe_file(mode="create")`: s3fs sends `If-None-Match: *` and the server refuses an existing key; memory:// checks under the interpreter lock |

On filesystems without a conditional write, fsspec's `pipe_file(mode="create")` checks for the
object and then writes it: two creators within that gap can both succeed (docs/store.md says
what the lease then still guarantees). Imports fsspec only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StoreObjects:
    """The objects under one root (a local Path or a URL string); names are '/'-separated and relative."""

    def __init__(self, root: Path | str):
        self.root = root
        self.filesystem, self._root_path = fsspec.core.url_to_fs(str(root))
        self.is_local = isinstance(self.filesystem, LocalFileSystem)

    def path(self, name: str) -> str:
        """The filesystem path of object `name`."""
        return f"{self._root_path.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return bool(self.filesystem.isfile(self.path(name)))

    def read(self, name: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        try:
            return self.filesystem.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    def list(self, folder: str) -> list[str]:
        """Names of the objects directly in `folder` (not their paths); [] when there is none.

        Cached listings are dropped first: another process may have added objects.
        """
        path = self.path(folder)
        self.filesystem.invalidate_cache(path)
        try:
            entries = self.filesystem.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def delete(self, name: str) -> None:
        """Remove the object; nothing happens when it is already gone."""
        try:
            self.filesystem.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def replace(self, name: str, data: bytes) -> None:
        """Write the object atomically: readers see the old bytes or the new ones, never a mix."""
        if not self.is_local:
            self.filesystem.pipe_file(self.path(name), data)
            return
        temporary = self._local_temporary(name, data)
        try:
            os.replace(temporary, self.path(name))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def create(self, name: str, data: bytes) -> bool:
        """Write the object only if it does not exist yet; True if this call created it."""
        if not self.is_local:
            self.filesystem.makedirs(self.path(name).rsplit("/", 1)[0], exist_ok=True)
            try:
                self.filesystem.pipe_file(self.path(name), data, mode="create")
            except FileExistsError:
                return False
            return True
        temporary = self._local_temporary(name, data)
        try:
            os.link(temporary, self.path(name))
        except FileExistsError:
            return False
        finally:
            Path(temporary).unlink(missing_ok=True)
        return True

    def _local_temporary(self, name: str, data: bytes) -> str:
        """A fully written, fsynced temporary file next to where object `name` goes."""
        target = Path(self.path(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return temporary
