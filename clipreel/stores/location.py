"""Where a store lives: a local folder or an fsspec URL, and the storage options that reach it.

A store argument is a local path (`feats.zarr`, `/data/feats.zarr`, `file:///data/feats.zarr`)
or any fsspec URL (`s3://bucket/feats.zarr`, `gs://…`, `az://…`, `memory://…`).

Storage options (endpoint URL, anonymous access, region, credentials, …) come from the usual
places, which the storage libraries read themselves: the AWS environment variables and config
files (botocore, behind s3fs), fsspec's configuration (`fsspec.config.conf`, filled from
`FSSPEC_<PROTOCOL>_<KEY>` variables and FSSPEC_CONFIG_DIR files). The CLI's repeatable
`--storage-option key=value` adds to fsspec's configuration of the store's protocol for the
running process (`use_storage_options`), so every fsspec filesystem the process builds for that
protocol (zarr's, the manifest's, the lease's) gets them. Nothing here writes options anywhere:
they hold secrets, and the store, run directories and logs never record them.

A process on another machine (a Ray worker) does not share this process's configuration or
environment, so `StoreAccess` carries what it needs explicitly: the protocol's fsspec options and
the storage variables of this process's environment. Imports fsspec and clipreel.errors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import fsspec.config

from clipreel.errors import ClipreelError

# Environment variables through which the storage clients find credentials, endpoints and regions.
STORAGE_VARIABLE_PREFIXES = ("AWS_", "AZURE_STORAGE_", "GOOGLE_", "GCS_", "FSSPEC_")


def store_location(path: str | os.PathLike) -> Path | str:
    """A local Path, or the URL string for any other fsspec protocol ("file://" becomes local)."""
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if "://" in text:
        return text.rstrip("/")
    return Path(text)


def is_remote(location: Path | str) -> bool:
    """True for a URL of a protocol other than the local filesystem."""
    return not isinstance(location, Path)


def protocol_of(location: Path | str) -> str:
    """'file' for a local path, else the URL's scheme ('s3', 'gs', 'memory', …)."""
    return "file" if isinstance(location, Path) else location.split("://", 1)[0]


def parse_storage_options(items: list[str]) -> dict:
    """`--storage-option key=value` items -> a dict of fsspec keyword arguments.

    Values are read as JSON where they parse (`anon=true` -> True, `default_block_size=1048576` ->
    an int), otherwise kept as text (`endpoint_url=http://127.0.0.1:9000`). A dotted key sets an
    entry of a dict option: `client_kwargs.region_name=eu-west-1`.
    """
    options: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ClipreelError(
                f"--storage-option {item!r}: write key=value, e.g. --storage-option endpoint_url=http://127.0.0.1:9000"
            )
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, name = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ClipreelError(f"--storage-option {item!r}: {parent} was given a value and cannot hold {name}")
        target[name] = value
    return options


def use_storage_options(location: Path | str, options: dict) -> None:
    """Add `options` to fsspec's configuration of the location's protocol, for this process.

    Nested dicts (client_kwargs, config_kwargs) are merged, not replaced. A local path takes none.
    """
    if not options:
        return
    if not is_remote(location):
        raise ClipreelError(
            f"--storage-option is for object-store URLs (s3://, gs://, az://, …); {location} is a local path"
        )
    _merge(fsspec.config.conf.setdefault(protocol_of(location), {}), options)


def apply_storage_option_items(items: list[str], *locations: str | os.PathLike | None) -> None:
    """The CLI's `--storage-option key=value` items: parsed, and added for every URL among `locations`
    (None entries are skipped). Refused when there are items but no URL to apply them to."""
    if not items:
        return
    options = parse_storage_options(items)
    remote = [store_location(location) for location in locations if location is not None]
    remote = [location for location in remote if is_remote(location)]
    if not remote:
        raise ClipreelError(
            "--storage-option is for object-store URLs (s3://, gs://, az://, …), and no store here is one"
        )
    for location in remote:
        use_storage_options(location, options)


def storage_options(location: Path | str) -> dict:
    """The fsspec options this process uses for the location's protocol (a copy; {} when local)."""
    if not is_remote(location):
        return {}
    return json.loads(json.dumps(fsspec.config.conf.get(protocol_of(location), {}), default=str))


def filesystem(location: Path | str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of `location` and the path of its root on it."""
    return fsspec.core.url_to_fs(str(location))


@dataclass(frozen=True)
class StoreAccess:
    """What a process elsewhere (a Ray worker on any node) needs to reach a store as this one does.

    Build it with `StoreAccess.of(location)` on the driver and call `apply()` in the worker before
    opening the store. It holds secrets: pass it in memory (task arguments), never write it out.
    """

    location: str
    options: dict = field(default_factory=dict)  # fsspec options of the location's protocol
    environment: dict = field(default_factory=dict)  # the driver's storage variables (AWS_*, …)

    @classmethod
    def of(cls, location: Path | str) -> "StoreAccess":
        if not is_remote(location):
            return cls(str(location))
        environment = {
            name: value for name, value in os.environ.items() if name.startswith(STORAGE_VARIABLE_PREFIXES)
        }
        return cls(str(location), storage_options(location), environment)

    def apply(self) -> None:
        """Set this access's variables and options in the running process."""
        os.environ.update(self.environment)
        location = store_location(self.location)
        if is_remote(location) and self.options:
            use_storage_options(location, self.options)

    def __repr__(self) -> str:  # never print the values: they may be secrets
        return f"StoreAccess({self.location!r}, options={sorted(self.options)}, environment={sorted(self.environment)})"


def _merge(target: dict, options: dict) -> None:
    for key, value in options.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
