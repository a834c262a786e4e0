"""One place that knows every head kind: what it reads from the store, how to build it, how to call it.

`clipreel train KIND`, `clipreel eval` and the run directories all go through these functions, so
adding a head kind means adding it here and nowhere else.

    kind           reads (store arrays)                   classifies against
    evl            tokens + attention, all feature blocks  a linear layer (closed set)
    mit            embeds                                  class-name text (frozen text tower)
    xclip-prompt   embeds + tokens of the last block       class-name text shifted per video
    text-prompt    embeds                                  learned prompts around the class names
    linear, mlp    embeds                                  a linear layer / an MLP (closed set)
    zeroshot       embeds                                  class-name text in templates (no training)

The text kinds (TEXT_KINDS) recompute their class-dependent parts from class names whenever a
head is built or rebuilt, so a trained head can be evaluated on classes it never saw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from clipreel.errors import ClipreelError
from clipreel.heads.clip import TextModel

HEAD_KINDS = ("evl", "mit", "xclip-prompt", "text-prompt", "linear", "mlp", "zeroshot")
# Kinds that score a video against class-name text: they can classify classes unseen in training.
TEXT_KINDS = ("mit", "xclip-prompt", "text-prompt", "zeroshot")


@dataclass(frozen=True)
class HeadSpec:
    """What a head kind needs from the feature store."""

    kind: str
    fields: tuple[str, ...]  # the store arrays one batch needs
    layers: str  # "all" | "last": which feature blocks of tokens/attention to read

    def store_layers(self, num_layers: int) -> list[int] | None:
        """The `layers` argument of FeatureStore.read for a store of `num_layers` feature blocks
        (None = all of them)."""
        return None if self.layers == "all" else [num_layers - 1]


_SPECS = {
    "evl": HeadSpec("evl", ("tokens", "attention"), "all"),
    "mit": HeadSpec("mit", ("embeds",), "last"),
    "xclip-prompt": HeadSpec("xclip-prompt", ("embeds", "tokens"), "last"),
    "text-prompt": HeadSpec("text-prompt", ("embeds",), "last"),
    "linear": HeadSpec("linear", ("embeds",), "last"),
    "mlp": HeadSpec("mlp", ("embeds",), "last"),
    "zeroshot": HeadSpec("zeroshot", ("embeds",), "last"),
}


def head_spec(kind: str) -> HeadSpec:
    """The HeadSpec of `kind` (one of HEAD_KINDS)."""
    _check_kind(kind)
    return _SPECS[kind]


# --------------------------------------------------------------------------- the text tower


# --------------------------------------------------------------------------- building heads


def build_head(
    kind: str,
    *,
    store_layout,
    provenance: Mapping,
    classnames: Sequence[str],
    options: Mapping | None = None,
    text_model: TextModel | None = None,
) -> tuple[nn.Module, dict]:
    """A new head of `kind` for a store of `store_layout` and these classes.

    Sizes come from the store (width, frames, feature blocks, grid, embedding width); `options`
    are the head's other hyper-parameters (e.g. {"n_ctx": 4} for text-prompt, {"mlp_dropout": 0.1}
    for evl). Returns the head and its JSON config, which `rebuild_head` turns back into the same
    architecture. Text kinds need `text_model` (see load_text_model).
    """
    _check_kind(kind)
    options = dict(options or {})
    if not classnames:
        raise ClipreelError("no class names: give a label map (--classes) or label the store's manifest.")
    sizes = _sizes_from_store(kind, store_layout, provenance, len(classnames), text_model)
    fixed = sorted(set(options) & set(sizes))
    if fixed:
        raise ClipreelError(
            f"head options {fixed} of {kind} are fixed by the store ({', '.join(f'{k}={sizes[k]}' for k in fixed)}); "
            "remove them, or extract a store with the sizes you want."
        )
    config = _config_class(kind).from_dict({**sizes, **options})
    head = rebuild_head(kind, config.to_dict(), classnames, text_model)
    return head, config.to_dict()


def rebuild_head(
    kind: str, config: Mapping, classnames: Sequence[str], text_model: TextModel | None = None
) -> nn.Module:
    """The head of `kind` described by `config` (from build_head or a run's config.json).

    Weights are freshly initialised: load a run's state dict into it. For TEXT_KINDS the class
    names may differ from training (novel classes): their class text is recomputed here from
    `classnames` with `text_model`. Closed-set kinds need exactly the trained number of classes.
    """
    _check_kind(kind)
    config = _config_class(kind).from_dict(dict(config))
    if kind in TEXT_KINDS and text_model is None:
        raise ClipreelError(
            f"a {kind} head classifies against class-name text: load the store's CLIP with "
            "load_text_model(provenance) and pass it as text_model."
        )
    if kind not in TEXT_KINDS and len(classnames) != config.num_classes:
        raise ClipreelError(
            f"a {kind} head was trained on {config.num_classes} classes and cannot classify "
            f"{len(classnames)}: evaluate it on the classes it was trained on (the run's classnames)."
        )
    if kind == "evl":
        from clipreel.heads.cache.evl import EVLHead

        return EVLHead(config)
    if kind == "linear":
        from clipreel.heads.cache.baselines import LinearProbe

        return LinearProbe(config)
    if kind == "mlp":
        from clipreel.heads.cache.baselines import FrameMeanMLP

        return FrameMeanMLP(config)
    if kind == "mit":
        from clipreel.heads.cache.xclip import MITHead

        return _with_class_texts(MITHead(config), text_model, classnames)
    if kind == "xclip-prompt":
        from clipreel.heads.cache.xclip import XCLIPHead

        return _with_class_texts(XCLIPHead(config), text_model, classnames)
    if kind == "text-prompt":
        from clipreel.heads.cache.text_prompt import PromptedClassifier

        return PromptedClassifier(text_model.clip, text_model.tokenizer, classnames, config)
    return _zeroshot_head(config, text_model, classnames)


def head_logits(kind: str, head: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The head's logits (B, num_classes) for a batch of one view per video.

    batch holds what head_spec(kind).fields names: embeds (B, T, E), tokens (B, T, K, L, D)
    (K = 1 for xclip-prompt: the last feature block), attention (B, 2, T-1, K, P, P).
    `head` may be wrapped in DistributedDataParallel: it is called, never inspected.
    """
    if kind == "evl":
        return head(batch["tokens"], batch["attention"])
    if kind in ("mit", "xclip-prompt"):
        texts = _unwrapped(head).class_text_embeds  # (C, E)
        if kind == "mit":
            return head(batch["embeds"], texts)
        patch_tokens = batch["tokens"][:, :, -1, 1:]  # (B, T, L-1, D): the last block, no CLS
        return head(batch["embeds"], patch_tokens, texts)
    _check_kind(kind)
    return head(batch["embeds"])


def trainable_parameters(head: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer updates (frozen text towers and buffers excluded)."""
    return [parameter for parameter in head.parameters() if parameter.requires_grad]


# --------------------------------------------------------------------------- helpers


def _check_kind(kind: str) -> None:
    if kind not in HEAD_KINDS:
        raise ClipreelError(f"unknown head kind {kind!r}: choose one of {', '.join(HEAD_KINDS)}")


def _config_class(kind: str):
    """The dataclass config of `kind`'s head."""
    if kind == "evl":
        from clipreel.heads.cache.evl import EVLConfig

        return EVLConfig
    if kind == "mit":
        from clipreel.heads.cache.xclip import MITHeadConfig

        return MITHeadConfig
    if kind == "xclip-prompt":
        from clipreel.heads.cache.xclip import XCLIPHeadConfig

        return XCLIPHeadConfig
    if kind == "text-prompt":
        from clipreel.heads.cache.text_prompt import TextPromptConfig

        return TextPromptConfig
    if kind == "linear":
        from clipreel.heads.cache.baselines import LinearProbeConfig

        return LinearProbeConfig
    if kind == "mlp":
        from clipreel.heads.cache.baselines import FrameMeanMLPConfig

        return FrameMeanMLPConfig
    from clipreel.heads.cache.zeroshot import ZeroShotConfig

    return ZeroShotConfig


def _sizes_from_store(kind: str, layout, provenance: Mapping, num_classes: int, text_model) -> dict:
    """The config entries that the store (and the text tower) decide, not the user."""
    if kind == "evl":
        grid = math.isqrt(layout.tokens - 1)
        if grid * grid != layout.tokens - 1:
            raise ClipreelError(
                f"the store's frames have {layout.tokens} tokens, not 1 + a square grid of patches: "
                "EVL needs a square ViT (CLS + g*g patches)."
            )
        if layout.frames < 2:
            raise ClipreelError("EVL models time: extract at least 2 frames per view (--frames 8).")
        if "num_heads" not in provenance:
            raise ClipreelError("the store's provenance has no num_heads; re-extract it with `clipreel extract`.")
        return {
            "width": layout.width,
            "heads": int(provenance["num_heads"]),
            "layers": layout.layers,
            "frames": layout.frames,
            "grid": grid,
            "num_classes": num_classes,
        }
    if kind in ("linear", "mlp"):
        return {"embed_dim": layout.embed_dim, "num_classes": num_classes}
    if text_model is None:
        raise ClipreelError(
            f"a {kind} head classifies against class-name text: load the store's CLIP with "
            "load_text_model(provenance) and pass it as text_model."
        )
    logit_scale = float(text_model.clip.logit_scale.detach().reshape(()))
    if kind == "mit":
        return {"embed_dim": layout.embed_dim, "frames": layout.frames, "logit_scale": logit_scale}
    if kind == "xclip-prompt":
        return {
            "embed_dim": layout.embed_dim,
            "visual_width": layout.width,
            "frames": layout.frames,
            "logit_scale": logit_scale,
        }
    if kind == "zeroshot":
        return {"embed_dim": layout.embed_dim, "num_classes": num_classes, "logit_scale": logit_scale}
    return {}  # text-prompt: its sizes come from the text tower itself


def _with_class_texts(head: nn.Module, text_model: TextModel, classnames: Sequence[str]) -> nn.Module:
    """Attach the class-name text embeddings (C, E) a MIT / X-CLIP head scores against.

    They are X-CLIP's fixed class embeddings: `encode_text` of the bare class names (template
    "{}"), not normalised. A non-persistent buffer: it follows the head to its device but stays out
    of the saved weights, because it is recomputed from the class names on every rebuild.
    """
    from clipreel.heads.cache.zeroshot import encode_texts, readable_classname

    texts = encode_texts(text_model.clip, text_model.tokenizer, [readable_classname(name) for name in classnames])
    head.register_buffer("class_text_embeds", texts.cpu(), persistent=False)
    return head


def _zeroshot_head(config, text_model: TextModel, classnames: Sequence[str]) -> nn.Module:
    """A ZeroShotClassifier for `classnames`, its class embeddings left out of the saved weights
    (they are recomputed from the class names, so novel classes work)."""
    from clipreel.heads.cache.zeroshot import (
        ZeroShotClassifier,
        class_text_embeddings,
        templates_named,
    )

    class_embeds = class_text_embeddings(
        text_model.clip, text_model.tokenizer, classnames, templates_named(config.templates)
    )
    config.num_classes = len(classnames)
    head = ZeroShotClassifier(config, class_embeds.cpu())
    head.register_buffer("class_embeds", head.class_embeds, persistent=False)
    return head


def _unwrapped(head: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the head itself)."""
    return head.module if isinstance(head, nn.parallel.DistributedDataParallel) else head
