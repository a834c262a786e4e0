"""Zero-shot CLIP video classification: class names through text templates, no training.

A class is represented by the text embedding of its name inside one or more templates; with
several templates the normalised embeddings are averaged (a template ensemble, as in CLIP).
A video is the average of its per-frame embeddings. Logits are scaled cosine similarities.
The same text embeddings serve the MIT / X-CLIP heads as their fixed class embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipreel.config import JsonConfig
from clipreel.errors import ClipreelError

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
    """The template list called ``name`` in TEMPLATES."""
    if name not in TEMPLATES:
        raise ClipreelError(f"unknown template set {name!r}; choose one of {', '.join(TEMPLATES)}.")
    return TEMPLATES[name]


def readable_classname(name: str) -> str:
    """Class names from label files often use underscores ("playing_guitar"): text wants spaces."""
    return name.replace("_", " ")


@torch.no_grad()
def encode_texts(
    clip_model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """``encode_text`` of each text, in batches -> (len(texts), E), not normalised.

    ``device`` is where the model lives (default: the device of its parameters).
    """
    device = device if device is not None else next(clip_model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        token_ids = tokenizer(list(texts[start : start + batch_size])).to(device)  # (b, C)
        chunks.append(clip_model.encode_text(token_ids).float())  # (b, E)
    return torch.cat(chunks)


def class_text_embeddings(
    clip_model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Template-ensembled class embeddings (K, E), L2-normalised.

    For each template, every class name is written into it and encoded; the per-template
    embeddings are normalised, averaged over templates and normalised again.
    """
    if not classnames:
        raise ClipreelError("no class names given: pass the label map's class names.")
    per_template = []
    for template in templates:
        texts = [template.format(readable_classname(name)) for name in classnames]
        embeds = encode_texts(clip_model, tokenizer, texts, device, batch_size)  # (K, E)
        per_template.append(F.normalize(embeds, dim=-1))
    mean = torch.stack(per_template).mean(dim=0)  # (K, E)
    return F.normalize(mean, dim=-1)


@dataclass
class ZeroShotConfig(JsonConfig):
    """Shape of a zero-shot classifier and which templates built its class embeddings."""

    embed_dim: int
    num_classes: int
    templates: str = "ensemble"  # a key of TEMPLATES
    logit_scale: float = math.log(100)  # a trained CLIP's log temperature


class ZeroShotClassifier(nn.Module):
    """logits (B, K) = exp(logit_scale) * cos(mean_T(embeds), class_embeds); nothing trainable.

    ``class_embeds`` and ``logit_scale`` are buffers, so a saved classifier evaluates again
    without the CLIP model.
    """

    def __init__(self, config: ZeroShotConfig, class_embeds: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        if class_embeds is None:
            class_embeds = torch.zeros(config.num_classes, config.embed_dim)  # filled by load_state_dict
        if tuple(class_embeds.shape) != (config.num_classes, config.embed_dim):
            raise ClipreelError(
                f"class embeddings have shape {tuple(class_embeds.shape)}, the config says "
                f"({config.num_classes}, {config.embed_dim}); rebuild them for this model and label map."
            )
        self.register_buffer("class_embeds", F.normalize(class_embeds.float(), dim=-1))  # (K, E)
        self.register_buffer("logit_scale", torch.tensor(float(config.logit_scale)))

    @classmethod
    def from_clip(
        cls,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        classnames: Sequence[str],
        templates: str = "ensemble",
        device: torch.device | str | None = None,
        batch_size: int = 256,
    ) -> "ZeroShotClassifier":
        """Encode the class names with the model's text tower; take its temperature."""
        class_embeds = class_text_embeddings(
            clip_model, tokenizer, classnames, templates_named(templates), device, batch_size
        )
        config = ZeroShotConfig(
            embed_dim=class_embeds.shape[1],
            num_classes=class_embeds.shape[0],
            templates=templates,
            logit_scale=float(clip_model.logit_scale.detach().reshape(())),
        )
        return cls(config, class_embeds)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds (B, T, E) -> logits (B, K)."""
        video = F.normalize(embeds.to(self.class_embeds.dtype).mean(dim=1), dim=-1)  # (B, E)
        return self.logit_scale.exp() * video @ self.class_embeds.t()  # (B, K)
