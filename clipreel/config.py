"""The base of clipreel's dataclass configs (a JSON round trip that refuses keys it does not know), and
the defaults several configs and commands share.

May import: clipreel.errors.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from clipreel.errors import ClipreelError

# The open_clip model of every command that runs a CLIP (extract, finetune, zero-shot from raw videos,
# the protocols from raw videos): ViT-B/16, the reference methods' backbone.
DEFAULT_MODEL = "ViT-B-16"
# Decode processes of the raw-frame loaders (or concurrent Ray tasks), wherever raw frames are read.
DECODE_WORKERS = 2


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
