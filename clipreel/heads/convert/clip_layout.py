"""The OpenAI CLIP layout that every reference checkpoint builds on: what its tensors fix, the
key -> shape table of each tower, the attention heads (which no tensor fixes), the open_clip
CLIP rebuilt from it, and the name its config is registered under.

OpenAI's CLIP state dict (`visual.conv1.weight`, `visual.transformer.resblocks.{i}.attn.in_proj_weight`,
`token_embedding.weight`, `text_projection`, ...) is also open_clip's `CLIP.state_dict()`, so a
base CLIP given as an OpenAI archive's state dict or as an open_clip checkpoint reads the same way.
The reference repositories build every CLIP with QuickGELU and width / 64 heads (OpenAI's
`clip/model.py: build_model`, copied by X-CLIP, ViFi-CLIP and EZ-CLIP; EVL's `vision_transformer.py`
presets), so the rebuilt CLIP uses QuickGELU, and the heads follow width / 64 unless --model names
a config that says otherwise.

May import: torch, open_clip, clipreel.errors, clipreel.heads.clip, clipreel.heads.convert.common.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import open_clip
import torch
from torch import nn

from clipreel.errors import ClipreelError
from clipreel.heads.checkpoints import OPENAI_ARCHIVE_BUFFERS
from clipreel.heads.clip import config_digest, register_model_config, resolve_model_name
from clipreel.heads.convert.common import (
    Shape,
    Tensors,
    numbered,
    tensor_shape,
    unwrap_checkpoint,
)

OPENAI_HEAD_WIDTH = 64  # OpenAI CLIP: heads = width // 64 in both towers (clip/model.py: build_model)


@dataclass(frozen=True)
class VisionFacts:
    """What the image tower's tensors fix."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    mlp_width: int
    embed_dim: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextFacts:
    """What the text tower's tensors fix."""

    context_length: int
    vocab_size: int
    width: int
    layers: int
    mlp_width: int
    embed_dim: int


def vision_facts(tensors: Mapping[str, torch.Tensor], prefix: str, source: str) -> VisionFacts:
    """Read the image tower's sizes from its tensors under `prefix` (e.g. "visual.")."""
    width, channels, patch, patch_width = tensor_shape(tensors, prefix + "conv1.weight", source, 4)
    if channels != 3 or patch != patch_width:
        raise ClipreelError(
            f"{source}: {prefix}conv1.weight has shape {(width, channels, patch, patch_width)}; a CLIP ViT has "
            "(width, 3, patch, patch)."
        )
    tokens, _ = tensor_shape(tensors, prefix + "positional_embedding", source, 2)
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise ClipreelError(
            f"{source}: {prefix}positional_embedding holds {tokens} positions, not 1 + a square grid of patches."
        )
    _, embed_dim = tensor_shape(tensors, prefix + "proj", source, 2)
    mlp_width, _ = tensor_shape(tensors, prefix + "transformer.resblocks.0.mlp.c_fc.weight", source, 2)
    layers = numbered(tensors, prefix + "transformer.resblocks.")
    return VisionFacts(grid * patch, patch, width, layers, mlp_width, embed_dim)


def text_facts(
    tensors: Mapping[str, torch.Tensor], prefix: str, source: str, token_table: torch.Tensor | None = None
) -> TextFacts:
    """Read the text tower's sizes from its tensors under `prefix` ("" in OpenAI's layout).

    `token_table` is the token embedding when the checkpoint does not hold it (ViFi-CLIP).
    """
    if token_table is None:
        vocab_size, _ = tensor_shape(tensors, prefix + "token_embedding.weight", source, 2)
    else:
        vocab_size = token_table.shape[0]
    context_length, width = tensor_shape(tensors, prefix + "positional_embedding", source, 2)
    _, embed_dim = tensor_shape(tensors, prefix + "text_projection", source, 2)
    mlp_width, _ = tensor_shape(tensors, prefix + "transformer.resblocks.0.mlp.c_fc.weight", source, 2)
    layers = numbered(tensors, prefix + "transformer.resblocks.")
    return TextFacts(context_length, vocab_size, width, layers, mlp_width, embed_dim)


# --------------------------------------------------------------------------- key -> shape tables


def block_shapes(prefix: str, width: int, mlp_width: int) -> dict[str, Shape]:
    """One CLIP residual attention block: fused q/k/v attention, two LayerNorms, the MLP."""
    return {
        f"{prefix}ln_1.weight": (width,),
        f"{prefix}ln_1.bias": (width,),
        f"{prefix}attn.in_proj_weight": (3 * width, width),
        f"{prefix}attn.in_proj_bias": (3 * width,),
        f"{prefix}attn.out_proj.weight": (width, width),
        f"{prefix}attn.out_proj.bias": (width,),
        f"{prefix}ln_2.weight": (width,),
        f"{prefix}ln_2.bias": (width,),
        f"{prefix}mlp.c_fc.weight": (mlp_width, width),
        f"{prefix}mlp.c_fc.bias": (mlp_width,),
        f"{prefix}mlp.c_proj.weight": (width, mlp_width),
        f"{prefix}mlp.c_proj.bias": (width,),
    }


def vision_shapes(facts: VisionFacts, prefix: str) -> dict[str, Shape]:
    """The image tower's keys under `prefix`, OpenAI layout."""
    width = facts.width
    shapes = {
        f"{prefix}conv1.weight": (width, 3, facts.patch_size, facts.patch_size),
        f"{prefix}class_embedding": (width,),
        f"{prefix}positional_embedding": (facts.grid**2 + 1, width),
        f"{prefix}ln_pre.weight": (width,),
        f"{prefix}ln_pre.bias": (width,),
        f"{prefix}ln_post.weight": (width,),
        f"{prefix}ln_post.bias": (width,),
        f"{prefix}proj": (width, facts.embed_dim),
    }
    for layer in range(facts.layers):
        shapes.update(block_shapes(f"{prefix}transformer.resblocks.{layer}.", width, facts.mlp_width))
    return shapes


def text_shapes(facts: TextFacts, prefix: str, token_embedding: bool = True) -> dict[str, Shape]:
    """The text tower's keys under `prefix`, OpenAI layout (`logit_scale` not included)."""
    width = facts.width
    shapes = {
        f"{prefix}positional_embedding": (facts.context_length, width),
        f"{prefix}ln_final.weight": (width,),
        f"{prefix}ln_final.bias": (width,),
        f"{prefix}text_projection": (width, facts.embed_dim),
    }
    if token_embedding:
        shapes[f"{prefix}token_embedding.weight"] = (facts.vocab_size, width)
    for layer in range(facts.layers):
        shapes.update(block_shapes(f"{prefix}transformer.resblocks.{layer}.", width, facts.mlp_width))
    return shapes


def clip_shapes(vision: VisionFacts, text: TextFacts) -> dict[str, Shape]:
    """A whole CLIP in OpenAI's (= open_clip's) layout."""
    return {**vision_shapes(vision, "visual."), **text_shapes(text, ""), "logit_scale": ()}


# --------------------------------------------------------------------------- heads and the open_clip config


@dataclass(frozen=True)
class Heads:
    """Attention heads of both towers, and where they came from (for the facts record)."""

    vision: int
    text: int
    source: str


def attention_heads(model: str | None, vision: VisionFacts, text: TextFacts, evidence: Mapping[str, str]) -> Heads:
    """The heads of both towers: from the open_clip config `model` (--model), checked against every
    size the tensors fix, or OpenAI's width / 64 without it.

    `evidence` maps the checked sizes ("embed_dim", "vision_width", "patch_size", "image_size",
    "vision_layers", "vision_mlp", "text_width", "context_length", "vocab_size", "text_layers",
    "text_mlp") to the tensor that fixes them, for the refusal message.
    """
    if model is None:
        if vision.width % OPENAI_HEAD_WIDTH or text.width % OPENAI_HEAD_WIDTH:
            raise ClipreelError(
                f"the tower widths ({vision.width} image, {text.width} text) are not multiples of 64, so the "
                "attention heads cannot follow OpenAI's width / 64: pass --model with the open_clip config the "
                "checkpoint was trained with."
            )
        return Heads(vision.width // OPENAI_HEAD_WIDTH, text.width // OPENAI_HEAD_WIDTH, "width / 64 (OpenAI CLIP)")
    name = resolve_model_name(model)
    config = open_clip.get_model_config(name)
    vision_cfg, text_cfg = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if vision_cfg.get("timm_model_name") or text_cfg.get("hf_model_name") or not isinstance(vision_cfg.get("layers", 12), int):
        raise ClipreelError(f"--model {name} is not a plain ViT CLIP (its towers come from timm or transformers).")
    said = {  # what the config says, with open_clip's defaults (model.py: CLIPVisionCfg, CLIPTextCfg)
        "embed_dim": config["embed_dim"],
        "vision_width": vision_cfg.get("width", 768),
        "patch_size": vision_cfg.get("patch_size", 16),
        "image_size": vision_cfg.get("image_size", 224),
        "vision_layers": vision_cfg.get("layers", 12),
        "vision_mlp": int(vision_cfg.get("width", 768) * vision_cfg.get("mlp_ratio", 4.0)),
        "text_width": text_cfg.get("width", 512),
        "context_length": text_cfg.get("context_length", 77),
        "vocab_size": text_cfg.get("vocab_size", 49408),
        "text_layers": text_cfg.get("layers", 12),
        "text_mlp": int(text_cfg.get("width", 512) * text_cfg.get("mlp_ratio", 4.0)),
    }
    fixed = {
        "embed_dim": vision.embed_dim,
        "vision_width": vision.width,
        "patch_size": vision.patch_size,
        "image_size": vision.image_size,
        "vision_layers": vision.layers,
        "vision_mlp": vision.mlp_width,
        "text_width": text.width,
        "context_length": text.context_length,
        "vocab_size": text.vocab_size,
        "text_layers": text.layers,
        "text_mlp": text.mlp_width,
    }
    contradictions = [
        f"{what} {said[what]} (the checkpoint: {fixed[what]}, from {evidence[what]})"
        for what in fixed
        if said[what] != fixed[what]
    ]
    if contradictions:
        raise ClipreelError(
            f"--model {name} contradicts the checkpoint: its config says " + "; ".join(contradictions)
            + ". Pass the open_clip config the checkpoint was trained with (or leave --model out: the heads then "
            "follow OpenAI's width / 64)."
        )
    head_width = vision_cfg.get("head_width", OPENAI_HEAD_WIDTH)
    if vision.width % head_width:
        raise ClipreelError(f"--model {name}: head_width {head_width} does not divide the image width {vision.width}.")
    return Heads(vision.width // head_width, text_cfg.get("heads", 8), f"--model {name}")


def clip_evidence(vision_prefix: str, text_prefix: str, token_key: str, vision: VisionFacts, text: TextFacts) -> dict[str, str]:
    """Which tensor fixes each size, in words, for `attention_heads`' refusals."""
    vision_blocks = f"{vision_prefix}transformer.resblocks.0..{vision.layers - 1}"
    text_blocks = f"{text_prefix}transformer.resblocks.0..{text.layers - 1}"
    return {
        "embed_dim": f"{vision_prefix}proj (width, embed_dim)",
        "vision_width": f"{vision_prefix}conv1.weight (width, 3, patch, patch)",
        "patch_size": f"{vision_prefix}conv1.weight (width, 3, patch, patch)",
        "image_size": f"{vision_prefix}positional_embedding (1 + (size / patch)^2, width)",
        "vision_layers": f"the blocks {vision_blocks}",
        "vision_mlp": f"{vision_prefix}transformer.resblocks.0.mlp.c_fc.weight (mlp width, width)",
        "text_width": f"{text_prefix}positional_embedding (context, width)",
        "context_length": f"{text_prefix}positional_embedding (context, width)",
        "vocab_size": f"{token_key} (vocabulary, width)",
        "text_layers": f"the blocks {text_blocks}",
        "text_mlp": f"{text_prefix}transformer.resblocks.0.mlp.c_fc.weight (mlp width, width)",
    }


def open_clip_config(vision: VisionFacts, text: TextFacts, heads: Heads) -> dict:
    """The open_clip model config (as in open_clip's model_configs/*.json) of the CLIP these facts describe."""
    return {
        "embed_dim": vision.embed_dim,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": vision.image_size,
            "layers": vision.layers,
            "width": vision.width,
            "head_width": vision.width // heads.vision,
            "mlp_ratio": vision.mlp_width / vision.width,
            "patch_size": vision.patch_size,
        },
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": heads.text,
            "layers": text.layers,
            "mlp_ratio": text.mlp_width / text.width,
        },
    }


# --------------------------------------------------------------------------- the base CLIP (--clip)


def read_base_clip(checkpoint: Mapping, source: str = "--clip") -> Tensors:
    """The base CLIP's tensors (OpenAI layout): an OpenAI archive's state dict, a state dict in its
    layout, or an open_clip checkpoint. OpenAI's archive metadata entries and the text causal mask
    (which traced archives keep, and open_clip rebuilds) are dropped."""
    tensors = unwrap_checkpoint(checkpoint, source)
    for key in (*OPENAI_ARCHIVE_BUFFERS, "attn_mask"):
        tensors.pop(key, None)
    return tensors


def build_clip(clip_config: Mapping, clip_state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """The open_clip CLIP of `clip_config` with `clip_state_dict` loaded strictly, frozen, in eval mode."""
    model = open_clip.model.CLIP(**clip_config)
    model.load_state_dict(clip_state_dict, strict=True)
    model.requires_grad_(False)
    return model.eval()


def register_imported_clip(clip_config: Mapping) -> str:
    """Make an imported CLIP's open_clip config known to open_clip, under a name made from its
    content ("imported-" + `config_digest`): the same config always gets the same name, two
    different configs never share one. Returns the name; runs record it with the config
    (`model_config`), from which `register_model_config` rebuilds it in any process.
    """
    return register_model_config(f"imported-{config_digest(clip_config)}", clip_config)
