"""ViFi-CLIP, trained on raw frames: both CLIP towers fine-tuned, frame-mean pooling.

ViFi-CLIP (Rasheed et al., CVPR 2023; `trainers/vificlip.py`) adds no module to CLIP: every frame
goes through the whole image tower, the frame embeddings are averaged over time, and the video is
classified by its cosine to the text embedding of "a photo of a {class}.". What trains is one or
both CLIP towers:

- "both": the image tower, the text tower and ``logit_scale`` (ViFi-CLIP proper);
- "image": the image tower only; "text": the text tower only.

The token embedding table never trains (ViFi-CLIP embeds the class texts once, outside the
trained model), and ViFi-CLIP's checkpoints do not even hold it. ``state_dict()`` is the CLIP's
under the prefix ``clip.``; ``model.clip.state_dict()`` is a standard open_clip checkpoint, which
`load_clip` reads back: the "bridge" to bridge-and-prompt (`heads.raw.bridge_prompt`).

Frames (B, T, 3, S, S) are normalised with ImageNet statistics, as ViFi-CLIP does.

May import: torch, open_clip, clipreel.errors, clipreel.config, clipreel.heads (layers, registry).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from clipreel.config import JsonConfig
from clipreel.errors import ClipreelError
from clipreel.heads.layers import check_clips, cosine_logits, readable_classname
from clipreel.heads.registry import MethodEntry, MethodModel, MethodRecipe, register_method

VIFI_VARIANTS = ("both", "image", "text")


@dataclass
class ViFiConfig(JsonConfig):
    """Which CLIP towers fine-tune, and the class text template."""

    variant: str = "both"  # "both" (ViFi-CLIP), "image" (image-FT) or "text" (text-FT)
    template: str = "a photo of a {}."
    # True: the class name goes into the template as it is, underscores included, as ViFi-CLIP's
    # `trainers/vificlip.py` does with its label files' names; False: underscores read as spaces.
    verbatim_classnames: bool = False
    gradient_checkpointing: bool = False  # recompute each block of both towers in the backward pass (GPU memory)

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VIFI_VARIANTS:
            raise ClipreelError(
                f"ViFiConfig: variant {self.variant!r} is not one of {', '.join(VIFI_VARIANTS)}; "
                "'both' fine-tunes both towers, 'image' or 'text' only that one."
            )
        if self.template.count("{}") != 1:
            raise ClipreelError(
                f"ViFiConfig: template {self.template!r} needs exactly one '{{}}' where the class "
                "name goes, e.g. 'a photo of a {}.'."
            )


def _clip_part(parameter_name: str) -> str:
    """Which part of an open_clip CLIP a parameter belongs to: image, text, token_embedding or scale."""
    if parameter_name.startswith("visual."):
        return "image"
    if parameter_name.startswith("token_embedding."):
        return "token_embedding"
    if parameter_name in ("logit_scale", "logit_bias"):
        return "scale"
    return "text"  # transformer.*, positional_embedding, ln_final.*, text_projection


# ViFi-CLIP variant -> the parts of CLIP that train.
TRAINED_PARTS = {"both": {"image", "text", "scale"}, "image": {"image"}, "text": {"text"}}


class ViFiCLIP(MethodModel):
    """Fine-tuned CLIP with frame-mean pooling: frames (B, T, 3, S, S) -> class logits (B, K).

    The CLIP model is taken over, not copied: the towers chosen by ``config.variant`` are
    unfrozen in place and trained. Pass a model loaded for this purpose (``load_clip``). It trains
    with cross-entropy on the class logits (ViFi-CLIP's `main.py`) and one AdamW group of everything
    that trains (its `utils/optimizer.py`): `MethodModel`'s defaults.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        classnames: Sequence[str],
        config: ViFiConfig | None = None,
    ):
        super().__init__()
        self.config = config or ViFiConfig()
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.image_size = int(clip_model.visual.image_size[0])
        trained_parts = TRAINED_PARTS[self.config.variant]
        for name, param in self.clip.named_parameters():
            param.requires_grad_(_clip_part(name) in trained_parts)
        self.text_trains = "text" in trained_parts
        self.clip.set_grad_checkpointing(self.config.gradient_checkpointing)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Tokenize the template for each class (class-dependent, so not saved)."""
        if not classnames:
            raise ClipreelError("ViFiCLIP: no class names given: pass the label map's class names.")
        spell = (lambda name: name) if self.config.verbatim_classnames else readable_classname
        texts = [self.config.template.format(spell(name)) for name in classnames]
        device = self.clip.logit_scale.device
        self.classnames = list(classnames)
        self.register_buffer("token_ids", self.tokenizer(texts).to(device), persistent=False)  # (K, C)

    def encode_classes(self) -> torch.Tensor:
        """-> class text embeddings (K, E); without a graph when the text tower is frozen."""
        with nullcontext() if self.text_trains else torch.no_grad():
            return self.clip.encode_text(self.token_ids)  # (K, E)

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames (B, T, 3, S, S) -> logits (B, K), frame_embeds (B, T, E), video_embeds (B, E)."""
        check_clips(frames, self.image_size, "ViFi-CLIP")
        batch, num_frames = frames.shape[:2]
        images = frames.flatten(0, 1).to(self.clip.visual.conv1.weight.dtype)  # (B*T, 3, S, S)
        frame_embeds = self.clip.encode_image(images).view(batch, num_frames, -1)  # (B, T, E)
        video_embeds = frame_embeds.mean(dim=1)  # (B, E)
        logits = cosine_logits(video_embeds, self.encode_classes(), self.clip.logit_scale)  # (B, K)
        return {"logits": logits, "frame_embeds": frame_embeds, "video_embeds": video_embeds}


register_method(MethodEntry(
    name="vifi",
    summary="ViFi-CLIP: both towers fine-tuned, frame-mean pooling",
    config_class=ViFiConfig,
    model_class=ViFiCLIP,
    # ViFi-CLIP's configs: AdamW 8e-6 (ViT-B/16, batches of 64-256), betas (0.9, 0.98), weight decay
    # 0.001, 5 warmup epochs (1 here: short runs); ImageNet mean/std.
    recipe=MethodRecipe(lr=8e-6, weight_decay=0.001, warmup_epochs=1, betas=(0.9, 0.98), norm="imagenet"),
))
