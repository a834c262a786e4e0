"""Zero-shot CLIP video classification: class names through text templates, no training.

A class is represented by the text embedding of its name inside one or more templates; with
several templates the normalised embeddings are averaged (a template ensemble, as in CLIP's
`notebooks/Prompt_Engineering_for_ImageNet.ipynb`). A video is the average of its per-frame
embeddings. Logits are scaled cosine similarities.

The classifier holds the store's CLIP (frozen, left out of its state dict) and recomputes its class
embeddings from the class names, so a saved zero-shot run is its temperature alone and classifies
any class list.

May import: torch, clipreel.errors, clipreel.config, clipreel.heads (layers, registry).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipreel.config import JsonConfig
from clipreel.errors import ClipreelError
from clipreel.heads.layers import FrozenCLIP, encode_texts, logit_scale_of, readable_classname
from clipreel.heads.registry import HeadEntry, Recipe, register_head

TEMPLATES: dict[str, list[str]] = {
    # The bare class name: what X-CLIP, and ViFi-CLIP's vanilla-CLIP baseline, use.
    "none": ["{}"],
    "photo": ["a photo of a {}."],
    "video": [
        "a video of {}.",
        "a video of a person {}.",
        "a clip of someone {}.",
        "a person is {}.",
        "footage of {}.",
    ],
    "ensemble": [
        "{}.",
        "a photo of a {}.",
        "a video of {}.",
        "a video of a person {}.",
        "a video of a person doing {}.",
        "a clip of someone {}.",
        "a short clip of {}.",
        "a person is {}.",
        "a person doing {}.",
        "someone {} in a video.",
        "footage of {}.",
        "footage of a person {}.",
        "the action of {}.",
        "an example of {}.",
        "a blurry video of {}.",
        "a close-up video of {}.",
    ],
}


def templates_named(name: str) -> list[str]:
    """The template set called `name` in TEMPLATES, or `name` itself when it is one template with
    one "{}" where the class name goes ("a video of {}.")."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name.count("{}") == 1:
        return [name]
    raise ClipreelError(
        f"--template {name!r}: neither a template set ({', '.join(TEMPLATES)}) nor a template with one "
        "'{}' where the class name goes, e.g. 'a video of {}.'"
    )


def class_text_embeddings(
    clip_model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """Template-ensembled class embeddings (K, E), L2-normalised.

    For each template, every class name is written into it and encoded; the per-template
    embeddings are normalised, averaged over templates and normalised again.
    """
    if not classnames:
        raise ClipreelError("no class names given: pass the label map's class names.")
    texts = [template.format(readable_classname(name)) for template in templates for name in classnames]
    embeds = encode_texts(clip_model, tokenizer, texts).unflatten(0, (len(templates), len(classnames)))  # (T, K, E)
    mean = F.normalize(embeds, dim=-1).mean(dim=0)  # (K, E)
    return F.normalize(mean, dim=-1)


@dataclass
class ZeroShotConfig(JsonConfig):
    """Shape of a zero-shot classifier and which templates build its class embeddings."""

    embed_dim: int
    num_classes: int  # of the class list it was made for (set_classnames may switch it)
    templates: str = "ensemble"  # a key of TEMPLATES, or one literal template
    logit_scale: float = math.log(100)  # a trained CLIP's log temperature


class ZeroShotClassifier(nn.Module):
    """logits (B, K) = exp(logit_scale) * cos(mean_T(embeds), class_embeds); nothing trainable.

    ``class_embeds`` (K, E) is computed from the class names with the held CLIP and is not saved;
    ``logit_scale`` is a buffer, saved.
    """

    def __init__(self, config: ZeroShotConfig, clip: FrozenCLIP, classnames: Sequence[str]):
        super().__init__()
        self.config = config
        self.clip = clip
        self.register_buffer("logit_scale", torch.tensor(float(config.logit_scale)))
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify among these classes: their template-ensembled text embeddings (not saved)."""
        class_embeds = class_text_embeddings(self.clip.model, self.clip.tokenizer, classnames,
                                             templates_named(self.config.templates))  # (K, E)
        self.config.num_classes = len(classnames)
        self.register_buffer("class_embeds", F.normalize(class_embeds.float(), dim=-1), persistent=False)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """batch["embeds"] (B, T, E) -> logits (B, K)."""
        video = F.normalize(batch["embeds"].to(self.class_embeds.dtype).mean(dim=1), dim=-1)  # (B, E)
        return self.logit_scale.exp() * video @ self.class_embeds.t()  # (B, K)


def store_sizes(layout, provenance: Mapping, num_classes: int, text_model) -> dict:
    """The config values the store fixes: the embedding width, the class count, the CLIP's temperature."""
    return {"embed_dim": layout.embed_dim, "num_classes": num_classes,
            "logit_scale": float(logit_scale_of(text_model.clip))}


register_head(HeadEntry(
    name="zeroshot",
    summary="zero-shot CLIP: frame-mean embedding vs class names in templates (no training)",
    config_class=ZeroShotConfig,
    head_class=ZeroShotClassifier,
    reads=("embeds",),
    blocks="last",
    scores_text=True,
    trains=False,
    recipe=Recipe(lr=0.0, weight_decay=0.0, warmup_epochs=0),  # nothing to train
    store_sizes=store_sizes,
))
