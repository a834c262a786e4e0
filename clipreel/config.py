"""The base of clipreel's dataclass configs: a JSON round trip that refuses keys it does not know."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from clipreel.errors import ClipreelError


class JsonConfig:
    """Mixed into a `@dataclass` config: `to_dict()` for store attributes and run JSON, `from_dict()` back."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping):
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ClipreelError(
                f"{cls.__name__}: unknown keys {unknown}; the known keys are {sorted(known)}. "
                "It was written by another clipreel version, or edited: fix or remove them."
            )
        return cls(**values)
