"""The two registries of clipreel's models: cache heads and raw-frame methods.

Each file in `heads/cache/` and `heads/raw/` ends by registering itself (`register_head`,
`register_method`) with everything the stages need to know about it, so that adding a head or a
method touches one new file:

- a cache head (`HeadEntry`): its config class, what it reads from the feature store (arrays and
  feature blocks), whether it scores against class text (it then needs the store's text tower and
  can classify classes it never saw), whether it has anything to train, its recipe defaults, the
  sizes the store fixes, and its class. Every cache head is called as `head(batch) -> logits (B, K)`
  with batch holding what it reads (embeds (B, T, E), tokens (B, T, K, L, D), attention
  (B, 2, T-1, K, P, P)), and has `set_classnames(names)`.
- a raw-frame method (`MethodEntry`): its config class, its recipe defaults (with the input
  normalisation), and its class, a `MethodModel`: built as `Class(clip_model, tokenizer,
  classnames, config)`, called as `model(frames (B, T, 3, S, S)) -> {"logits", "frame_embeds",
  "video_embeds"}`, with `loss(outputs, targets, label_smoothing)`, `parameter_groups(lr,
  weight_decay)` and `set_classnames(names)`.

`list_heads()` / `list_methods()` import the family's package, so every file has registered by then.

May import: torch, clipreel.errors, clipreel.config, clipreel.heads.layers.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from clipreel.errors import ClipreelError
from clipreel.heads.layers import FrozenCLIP, classification_loss, one_parameter_group


class MethodModel(nn.Module):
    """The surface of every raw-frame method model, with the defaults most methods keep.

    Subclasses define `forward(frames (B, T, 3, S, S)) -> {"logits" (B, K), "frame_embeds" (B, T, E),
    "video_embeds" (B, E)}` and `set_classnames(names)` (which switches the classes without touching
    what was trained); they override `loss` or `parameter_groups` where their reference differs.
    """

    def loss(self, outputs: dict, targets, label_smoothing: float = 0.0):
        """Cross-entropy of the class logits against class ids (B,) or mixup's soft targets (B, K)."""
        return classification_loss(outputs["logits"], targets, label_smoothing)

    def parameter_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: one group of everything that trains."""
        return one_parameter_group(self, lr, weight_decay)


@dataclass(frozen=True)
class Recipe:
    """A model's default optimisation recipe, from its reference implementation."""

    lr: float
    weight_decay: float
    warmup_epochs: int
    betas: tuple[float, float] = (0.9, 0.999)
    decay_everything: bool = True  # False: no weight decay on 1-D parameters, biases and positional embeddings


@dataclass(frozen=True)
class MethodRecipe(Recipe):
    """A raw-frame method's recipe, with the input normalisation its reference uses."""

    norm: str = "imagenet"  # "imagenet" or "clip" mean/std


@dataclass(frozen=True)
class HeadEntry:
    """Everything the stages know about one cache head."""

    name: str
    summary: str  # one line for the CLI's help
    config_class: type  # a JsonConfig dataclass
    head_class: type  # Class(config) for closed-set heads, Class(config, FrozenCLIP, classnames) for text heads
    reads: tuple[str, ...]  # the store arrays one batch holds
    blocks: str  # "all" | "last": which feature blocks of tokens/attention it reads
    scores_text: bool  # classifies against class-name text: needs the text tower, can name unseen classes
    trains: bool  # has parameters to train (zero-shot has none)
    recipe: Recipe
    # (store layout, store provenance, number of classes, the store's TextModel or None) -> the config
    # values the store decides, not the user.
    store_sizes: Callable[..., dict]


@dataclass(frozen=True)
class MethodEntry:
    """Everything the stages know about one raw-frame method."""

    name: str
    summary: str
    config_class: type  # a JsonConfig dataclass; a `frames` field, if any, is set from the clip length
    model_class: type  # a MethodModel: Class(clip_model, tokenizer, classnames, config)
    recipe: MethodRecipe
    soft_targets: bool = True  # trains on mixup's soft targets (False: its loss needs class ids)
    # clip_model -> option defaults that depend on the CLIP (e.g. a prompt depth capped by its layers)
    clip_defaults: Callable[[nn.Module], dict] = lambda clip_model: {}


_HEADS: dict[str, HeadEntry] = {}
_METHODS: dict[str, MethodEntry] = {}


def register_head(entry: HeadEntry) -> None:
    """Make a cache head known by its name (called once, at the end of its file)."""
    if entry.name in _HEADS:
        raise ValueError(f"cache head {entry.name!r} is registered twice")
    _HEADS[entry.name] = entry


def register_method(entry: MethodEntry) -> None:
    """Make a raw-frame method known by its name (called once, at the end of its file)."""
    if entry.name in _METHODS:
        raise ValueError(f"raw-frame method {entry.name!r} is registered twice")
    _METHODS[entry.name] = entry


def list_heads() -> list[str]:
    """The names of the cache heads, in registration order."""
    importlib.import_module("clipreel.heads.cache")
    return list(_HEADS)


def list_methods() -> list[str]:
    """The names of the raw-frame methods, in registration order."""
    importlib.import_module("clipreel.heads.raw")
    return list(_METHODS)


def head_entry(name: str) -> HeadEntry:
    """The registry entry of cache head `name`, or a ClipreelError listing the known ones."""
    names = list_heads()
    if name not in _HEADS:
        raise ClipreelError(f"unknown head kind {name!r}: choose one of {', '.join(names)}")
    return _HEADS[name]


def method_entry(name: str) -> MethodEntry:
    """The registry entry of raw-frame method `name`, or a ClipreelError listing the known ones."""
    names = list_methods()
    if name not in _METHODS:
        raise ClipreelError(f"unknown fine-tuning method {name!r}: choose one of {', '.join(names)}")
    return _METHODS[name]


# --------------------------------------------------------------------------- cache heads


def create_head(name: str, *, store_layout, provenance: Mapping, classnames: Sequence[str],
                options: Mapping | None = None, text_model=None) -> tuple[nn.Module, dict]:
    """A new head `name` for a store of `store_layout` and these classes -> (head, its JSON config).

    The store fixes the sizes (width, frames, feature blocks, grid, embedding width); `options` are
    the head's other hyper-parameters (e.g. {"n_ctx": 4} for text-prompt), checked against the head's
    config class (names, types, ranges: `JsonConfig.checked_options`). Heads that score against
    class text need `text_model`, the store's CLIP (`heads.clip.load_text_model`). `rebuild_head`
    turns the config back into the same architecture.
    """
    entry = head_entry(name)
    if not classnames:
        raise ClipreelError("no class names: give a label map (--classes) or label the store's manifest.")
    _check_text_model(entry, text_model)
    sizes = entry.store_sizes(store_layout, provenance, len(classnames), text_model)
    options = dict(options or {})
    fixed = sorted(set(options) & set(sizes))
    if fixed:
        raise ClipreelError(
            f"head options {fixed} of {name} are fixed by the store ({', '.join(f'{k}={sizes[k]}' for k in fixed)}); "
            "remove them, or extract a store with the sizes you want."
        )
    options = entry.config_class.checked_options(options, f"head {name}", not_options=set(sizes))
    config = entry.config_class(**sizes, **options)
    return rebuild_head(name, config.to_dict(), classnames, text_model), config.to_dict()


def rebuild_head(name: str, config: Mapping, classnames: Sequence[str], text_model=None) -> nn.Module:
    """The head `name` described by `config` (from create_head or a run's config.json), freshly
    initialised (load a run's weights into it), classifying among `classnames`.

    Heads that score against class text take any class names (novel classes: their class text is
    computed from the names); closed-set heads need exactly the number of classes they were made for.
    """
    entry = head_entry(name)
    _check_text_model(entry, text_model)
    config = entry.config_class.from_dict(dict(config))
    if entry.scores_text:
        return entry.head_class(config, FrozenCLIP(text_model.clip, text_model.tokenizer), classnames)
    head = entry.head_class(config)
    head.set_classnames(classnames)
    return head


def _check_text_model(entry: HeadEntry, text_model) -> None:
    if entry.scores_text and text_model is None:
        raise ClipreelError(
            f"a {entry.name} head classifies against class-name text: load the store's CLIP with "
            "load_text_model(provenance) and pass it as text_model."
        )


# --------------------------------------------------------------------------- raw-frame methods


def create_method(name: str, clip_model: nn.Module, tokenizer, classnames: Sequence[str], frames: int,
                  options: Mapping | None = None) -> tuple[nn.Module, dict]:
    """The method's model around `clip_model` (taken over, not copied) -> (model, its config as a dict).

    `options` are fields of the method's config class (names, types and ranges checked:
    `JsonConfig.checked_options`); one that the clip length fixes (`frames`) comes from `frames`.
    Option defaults that depend on the CLIP come from the entry.
    """
    entry = method_entry(name)
    options = dict(options or {})
    field_names = {field.name for field in dataclasses.fields(entry.config_class)}
    if "frames" in options:
        raise ClipreelError(f"--option frames: the frames per clip of {name} are --frames; remove the option.")
    options = entry.config_class.checked_options(options, f"method {name}", not_options={"frames"})
    values = {**entry.clip_defaults(clip_model), **options}
    if "frames" in field_names:
        values["frames"] = frames
    config = entry.config_class(**values)
    return entry.model_class(clip_model, tokenizer, classnames, config), config.to_dict()


def rebuild_method(name: str, clip_model: nn.Module, tokenizer, classnames: Sequence[str],
                   config: Mapping) -> nn.Module:
    """The method model described by `config` (a run's method config), freshly initialised around
    `clip_model`: load the run's weights into it."""
    entry = method_entry(name)
    return entry.model_class(clip_model, tokenizer, classnames, entry.config_class.from_dict(dict(config)))

