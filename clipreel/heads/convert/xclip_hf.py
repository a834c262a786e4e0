"""transformers' X-CLIP checkpoints (`microsoft/xclip-*`, `XCLIPModel`) -> X-CLIP's own layout -> clipreel.

transformers converted the original X-CLIP weights with
`models/x_clip/convert_x_clip_original_pytorch_to_hf.py`; this module is the inverse of that
mapping, checked against `XCLIPModel`'s state dict (`models/x_clip/modeling_x_clip.py`):

- every fused `in_proj_weight` / `in_proj_bias` (text and vision blocks, the message attention,
  the MIT) was split into `q_proj`, `k_proj`, `v_proj`: they are concatenated back, in that order;
- block parts were renamed: `attn.out_proj` -> `self_attn.out_proj` (the message attention keeps
  `message_attn.out_proj`), `ln_1`/`ln_2` -> `layer_norm1`/`layer_norm2`, `mlp.c_fc`/`mlp.c_proj`
  -> `mlp.fc1`/`mlp.fc2`; blocks moved from `transformer.resblocks` to `text_model.encoder.layers`,
  `vision_model.encoder.layers` and `mit.encoder.layers`;
- `visual.proj` and `text_projection` ((in, out) matrices) became Linear weights (out, in):
  they are transposed back;
- stems and norms were renamed (`visual.conv1` -> `vision_model.embeddings.patch_embedding`,
  `ln_pre` -> `pre_layernorm`, `prompts_visual_ln` -> `prompts_visual_layernorm`,
  `mit.positional_embedding` -> `mit.position_embedding`, `prompts_generator.norm` ->
  `prompts_generator.layernorm`, ...).

The expected transformers layout is derived from X-CLIP's (`xclip_shapes`) through the same
mapping, so a refusal names the keys as they appear in the file. Older transformers versions also
saved the `position_ids` buffers of both embeddings; they are dropped.

May import: torch, clipreel.errors, clipreel.heads.convert.*.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from clipreel.heads.convert.clip_layout import TextFacts, VisionFacts
from clipreel.heads.convert.common import (
    NO_CHOICES,
    Imported,
    Shape,
    Tensors,
    UserChoices,
    check_layout,
    numbered,
    tensor_shape,
    unwrap_checkpoint,
)
from clipreel.heads.convert.xclip import convert_xclip, layout_facts, xclip_shapes

# X-CLIP key -> transformers key, for keys outside the transformer blocks (same shape).
RENAMED = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layernorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layernorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "prompts_visual_ln.weight": "prompts_visual_layernorm.weight",
    "prompts_visual_ln.bias": "prompts_visual_layernorm.bias",
    "prompts_visual_proj": "prompts_visual_projection",
    "mit.positional_embedding": "mit.position_embedding",
    "prompts_generator.norm.weight": "prompts_generator.layernorm.weight",
    "prompts_generator.norm.bias": "prompts_generator.layernorm.bias",
}
# X-CLIP (in, out) matrix -> transformers Linear weight (out, in).
TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Where each stack of blocks lives: X-CLIP prefix -> transformers prefix.
BLOCK_STACKS = (
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("mit.resblocks.", "mit.encoder.layers."),
)
# Inside a block: X-CLIP name start -> transformers name start.
BLOCK_PARTS = (
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
# Inside a block: fused X-CLIP attention -> the transformers attention whose q/k/v it was split into.
FUSED = {"attn.in_proj_": "self_attn.", "message_attn.in_proj_": "message_attn."}
# Buffers older transformers versions saved with the weights.
POSITION_ID_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def hf_sources(key: str) -> tuple[str, list[str]]:
    """Where an X-CLIP key's tensor is in transformers' layout: ("same" | "transposed" | "fused", keys)."""
    if key in RENAMED:
        return "same", [RENAMED[key]]
    if key in TRANSPOSED:
        return "transposed", [TRANSPOSED[key]]
    for stack, hf_stack in BLOCK_STACKS:
        if key.startswith(stack):
            layer, part = key[len(stack) :].split(".", 1)
            block = f"{hf_stack}{layer}."
            for fused, attention in FUSED.items():
                if part.startswith(fused):  # e.g. "attn.in_proj_weight" -> self_attn.{q,k,v}_proj.weight
                    kind = part[len(fused) :]
                    return "fused", [f"{block}{attention}{name}_proj.{kind}" for name in ("q", "k", "v")]
            for start, hf_start in BLOCK_PARTS:
                if part.startswith(start):
                    return "same", [block + hf_start + part[len(start) :]]
            return "same", [block + part]  # message_fc, message_ln, message_attn.out_proj
    return "same", [key]  # logit_scale, prompts_generator.alpha and .decoder.*


def hf_shapes(xclip_layout: Mapping[str, Shape]) -> dict[str, Shape]:
    """transformers' keys and shapes for an X-CLIP key -> shape table."""
    shapes = {}
    for key, shape in xclip_layout.items():
        kind, sources = hf_sources(key)
        if kind == "transposed":
            shapes[sources[0]] = tuple(reversed(shape))
        elif kind == "fused":
            shapes.update({source: (shape[0] // 3, *shape[1:]) for source in sources})
        else:
            shapes[sources[0]] = shape
    return shapes


def from_hf(tensors: Mapping[str, torch.Tensor], xclip_layout: Mapping[str, Shape]) -> Tensors:
    """transformers' tensors -> X-CLIP's keys (fused q/k/v, matrices transposed back)."""
    official = {}
    for key in xclip_layout:
        kind, sources = hf_sources(key)
        if kind == "transposed":
            official[key] = tensors[sources[0]].t().contiguous()
        elif kind == "fused":
            official[key] = torch.cat([tensors[source] for source in sources])
        else:
            official[key] = tensors[sources[0]]
    return official


def convert_xclip_hf(state_dict: Mapping, user: UserChoices = NO_CHOICES, source: str = "the transformers X-CLIP checkpoint") -> Imported:
    """A transformers `XCLIPModel` state dict -> clipreel's `XCLIP`, through X-CLIP's own layout."""
    tensors = unwrap_checkpoint(state_dict, source)
    for key in POSITION_ID_BUFFERS:
        tensors.pop(key, None)
    width, _, patch, _ = tensor_shape(tensors, "vision_model.embeddings.patch_embedding.weight", source, 4)
    positions, _ = tensor_shape(tensors, "vision_model.embeddings.position_embedding.weight", source, 2)
    embed_dim, _ = tensor_shape(tensors, "visual_projection.weight", source, 2)
    vision_mlp, _ = tensor_shape(tensors, "vision_model.encoder.layers.0.mlp.fc1.weight", source, 2)
    vocab_size, text_width = tensor_shape(tensors, "text_model.embeddings.token_embedding.weight", source, 2)
    context_length, _ = tensor_shape(tensors, "text_model.embeddings.position_embedding.weight", source, 2)
    text_embed_dim, _ = tensor_shape(tensors, "text_projection.weight", source, 2)
    text_mlp, _ = tensor_shape(tensors, "text_model.encoder.layers.0.mlp.fc1.weight", source, 2)
    _, frames, _ = tensor_shape(tensors, "mit.position_embedding", source, 3)
    grid = round((positions - 1) ** 0.5)
    vision = VisionFacts(grid * patch, patch, width, numbered(tensors, "vision_model.encoder.layers."), vision_mlp, embed_dim)
    text = TextFacts(
        context_length, vocab_size, text_width, numbered(tensors, "text_model.encoder.layers."), text_mlp, text_embed_dim
    )
    mit_layers = numbered(tensors, "mit.encoder.layers.")
    prompt_layers = numbered(tensors, "prompts_generator.decoder.")
    layout = xclip_shapes(vision, text, frames, mit_layers, prompt_layers)
    check_layout(tensors, hf_shapes(layout), source, layout_facts(vision, frames, mit_layers, prompt_layers))

    imported = convert_xclip(from_hf(tensors, layout), user, source)
    imported.facts["layout"] = "transformers"
    imported.conventions.append(
        "transformers' X-CLIP gives the message attention the image tower's head count, X-CLIP's code (and "
        "clipreel) width / 64: the same for every released model"
    )
    imported.conventions.append(
        "transformers' XCLIPProcessor resizes the short side to the crop size and takes one centre crop; the "
        "record above is X-CLIP's own test protocol for these weights"
    )
    return imported
