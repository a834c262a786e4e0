"""The base of clipreel's dataclass configs, and the defaults several configs and commands share.

`JsonConfig` gives a config its JSON round trip (refusing keys it does not know) and checks every
value it is built with: against the field's annotated type (a bool is a real bool, an int is not a
float, a float may be given as an int and must be finite, `X | None` also takes None, a tuple takes
a list) and against the range a field declares with `ranged` (probabilities in [0, 1), sizes >= 1,
...). `checked_options` applies the same checks to user options (`--option key=value`), with
messages that name the option, the value, what it must be, and the valid keys for unknown ones.

May import: clipreel.errors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass

from clipreel.errors import ClipreelError

# The open_clip model of every command that runs a CLIP (extract, finetune, zero-shot from raw videos,
# the protocols from raw videos): ViT-B/16, the reference methods' backbone.
DEFAULT_MODEL = "ViT-B-16"
# Decode processes of the raw-frame loaders (or concurrent Ray tasks), wherever raw frames are read.
DECODE_WORKERS = 2
# The split the trainers validate on by default; a source without it is trained without validation.
DEFAULT_VAL_SPLIT = "val"


@dataclass(frozen=True)
class Range:
    """The numbers a config field accepts: low <= value (low < value if low_open), and value <= high
    (value < high if high_open); None leaves that side open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


SIZE = Range(low=1)  # counts and sizes: layers, heads, tokens, frames
POSITIVE = Range(low=0, low_open=True)  # ratios and scales
PROBABILITY = Range(low=0, high=1, high_open=True)  # dropout and drop-path rates: 1 would drop everything
CHANCE = Range(low=0, high=1)  # the probability of an augmentation: 1 applies it to every clip


def ranged(default, allowed: Range):
    """A dataclass field with a default that accepts only numbers in `allowed` (None, where the
    field's type allows it, is always accepted)."""
    return dataclasses.field(default=default, metadata={"range": allowed})


class JsonConfig:
    """Mixed into a `@dataclass` config: `to_dict()` for store attributes and run JSON, `from_dict()`
    back, `checked_options()` for user options, and the type and range check of every field when the
    config is built (a subclass with its own `__post_init__` calls `super().__post_init__()` first)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = _problem(type(self), field.name, value)
            if expected:
                raise ClipreelError(f"{type(self).__name__}: {field.name} is {_shown(value)}; it must be {expected}.")

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

    @classmethod
    def checked_options(cls, options: Mapping, what: str, flag: str = "--option", not_options=()) -> dict:
        """User options for this config, checked: each key a field (except `not_options`, which the
        caller sets itself), each value of the field's type and in its range. Returns the values,
        ints given for float fields as floats. `what` names the config's owner ("head mlp")."""
        known = sorted({field.name for field in dataclasses.fields(cls)} - set(not_options))
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ClipreelError(f"{flag} {', '.join(unknown)}: unknown options for {what}; its options are "
                                f"{', '.join(known) or 'none'}.")
        checked = {}
        for name, value in options.items():
            expected = _problem(cls, name, value)
            if expected:
                raise ClipreelError(f"{flag} {name}={_shown(value)}: the {name} of {what} must be {expected}.")
            checked[name] = float(value) if _field_types(cls)[name] is float else value
        return checked


def _problem(config_class: type, name: str, value) -> str | None:
    """What field `name` of `config_class` must be, if `value` is not that; None if it is."""
    annotation = _field_types(config_class)[name]
    if not _accepts(annotation, value):
        return _describe(annotation) + _range_text(config_class, name)
    allowed = _ranges(config_class).get(name)
    if allowed is not None and value is not None and isinstance(value, numbers.Real) and value not in allowed:
        return _describe(annotation) + _range_text(config_class, name)
    return None


@functools.cache
def _field_types(config_class: type) -> dict[str, object]:
    """The fields' annotations, resolved (the config modules use postponed annotations)."""
    hints = typing.get_type_hints(config_class)
    return {field.name: hints[field.name] for field in dataclasses.fields(config_class)}


@functools.cache
def _ranges(config_class: type) -> dict[str, Range]:
    return {field.name: field.metadata["range"] for field in dataclasses.fields(config_class)
            if "range" in field.metadata}


def _range_text(config_class: type, name: str) -> str:
    allowed = _ranges(config_class).get(name)
    return f" {allowed}" if allowed is not None else ""


def _accepts(annotation, value) -> bool:
    """Whether `value` is of the annotated type (the types the configs use; others are not checked)."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(argument, value) for argument in arguments)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and len(arguments) == 2 and arguments[1] is Ellipsis or origin is list:
            return all(_accepts(arguments[0], item) for item in value)
        return len(value) == len(arguments) and all(map(_accepts, arguments, value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _describe(annotation) -> str:
    """What a value of the annotated type is, in the user's words."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(argument) for argument in arguments)
    if origin in (tuple, list):
        if origin is tuple and len(arguments) == 2 and arguments[1] is Ellipsis or origin is list:
            return f"a list of {_plural(_describe(arguments[0]))}"
        return f"a list of {len(arguments)} {_plural(_describe(arguments[0]))}"
    names = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a text", dict: "a mapping"}
    return names.get(annotation, str(annotation))


def _plural(description: str) -> str:
    return description.removeprefix("a ") + "s" if description.startswith("a ") else description


def _shown(value) -> str:
    """A value as the user wrote it: text as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
