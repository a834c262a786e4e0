"""The raw-frame methods in one place: what each builds around a CLIP, and what it takes as options.

`clipreel finetune METHOD` trains one of these on raw frames (`clipreel.pipeline.finetune`):

- ``vifi``   ViFi-CLIP (`heads.vifi.ViFiCLIP`): both towers fine-tuned, frame-mean pooling;
             options {"variant": "image" | "text"} fine-tune one tower only;
- ``prompt`` bridge-and-prompt (`heads.vifi.BridgePrompt`): deep vision + language prompts in a
             frozen CLIP (usually one ViFi-CLIP fine-tuned);
- ``xclip``  full X-CLIP (`heads.xclip_cct.XCLIP`): cross-frame message tokens, MIT, prompts;
- ``ezclip`` EZ-CLIP (`heads.ezclip.EZCLIPClassifier`): temporal prompts + adapters in a frozen CLIP.

Every method model takes normalised frames (B, T, 3, S, S) and returns a dict with ``logits``
(B, K) against the texts of its class names (and ``frame_embeds``, ``video_embeds``); each has
``trainable_parameter_count()`` and ``set_classnames(names)``, which switches the classes without
touching what was trained (zero-shot transfer, base-to-novel).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from clipreel.errors import ClipreelError
from clipreel.heads.raw.ezclip import EZCLIPClassifier, EZCLIPConfig
from clipreel.heads.raw.vifi import (
    BridgePrompt,
    BridgePromptConfig,
    ViFiCLIP,
    ViFiConfig,
)
from clipreel.heads.raw.xclip import XCLIP, XCLIPConfig

METHODS = ("vifi", "prompt", "xclip", "ezclip")


def build_method_model(
    method: str, clip_model: nn.Module, tokenizer, classnames: Sequence[str], frames: int, options: dict
) -> tuple[nn.Module, dict]:
    """The method's model around `clip_model` (taken over, not copied) -> (model, its config as a dict).

    `options` are the method config's fields (ViFiConfig, BridgePromptConfig, XCLIPConfig,
    EZCLIPConfig; ezclip also "template"). Bridge-and-prompt's prompt depths default to
    min(9, the tower's layers), so the tiny models work with the defaults.
    """
    options = dict(options)
    try:
        if method == "vifi":
            config = ViFiConfig(**options)
            return ViFiCLIP(clip_model, tokenizer, classnames, config), config.to_dict()
        if method == "prompt":
            defaults = BridgePromptConfig()
            options.setdefault("depth_vision", min(defaults.depth_vision, len(clip_model.visual.transformer.resblocks)))
            options.setdefault("depth_text", min(defaults.depth_text, len(clip_model.transformer.resblocks)))
            config = BridgePromptConfig(**options)
            return BridgePrompt(clip_model, tokenizer, classnames, config), config.to_dict()
        if method == "xclip":
            config = XCLIPConfig(frames=frames, **options)
            return XCLIP(clip_model, tokenizer, classnames, config), config.to_dict()
        if method == "ezclip":
            template = options.pop("template", "{}")
            config = EZCLIPConfig(frames=frames, **options)
            model = EZCLIPClassifier(clip_model, tokenizer, classnames, config, template)
            return model, {**config.to_dict(), "template": template}
    except TypeError as error:  # an option the method's config does not have
        raise ClipreelError(f"--options for {method}: {error}; see the method's config class for its options") from None
    raise ClipreelError(f"unknown fine-tuning method {method!r}: choose one of {', '.join(METHODS)}")


def image_size_of(model: nn.Module) -> int:
    """The input size S of the method model's CLIP image tower."""
    for module in model.modules():
        if hasattr(module, "image_size") and hasattr(module, "conv1"):
            size = module.image_size
            return int(size[0] if isinstance(size, (tuple, list)) else size)
    raise ClipreelError(f"{type(model).__name__}: no open_clip image tower found to read the input size from")
