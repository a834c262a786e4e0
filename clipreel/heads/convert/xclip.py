"""Official X-CLIP checkpoints (microsoft/VideoX, X-CLIP/) -> clipreel's full X-CLIP.

A released X-CLIP file (`k400_32_8.pth`, `zero.pth`, ...) holds `{"model": ...}` (saved from
`model.module`, so without `module.`; `utils/tools.py: epoch_saving`): a whole OpenAI-layout
CLIP whose vision blocks also carry the cross-frame message modules, plus the MIT (`mit.*`) and
the video-specific prompt generator (`prompts_*`). Nothing comes from a base CLIP.

Where the keys land in clipreel's `XCLIP` (`heads/raw/xclip.py`), whose module names follow the
reference's: `visual.*` stays `visual.*` (message modules included); `mit.*`, `prompts_visual_ln.*`,
`prompts_visual_proj` and `prompts_generator.*` go under `head.`; `logit_scale` becomes the
frozen `head.logit_scale`. The text tower (`token_embedding`, `positional_embedding`,
`transformer.*`, `ln_final`, `text_projection`) and the plain image tower build the CLIP that
`XCLIP` is constructed around; `XCLIP` keeps the text tower frozen and out of its state dict.

The tensors fix the CLIP sizes, T (`mit.positional_embedding`, (1, T, E)), the MIT depth and the
prompt generator depth. The MIT and prompt-generator heads are E / 64 in X-CLIP's code
(`models/mit.py`, `models/prompt.py`), as clipreel's defaults; the message attention uses
width / 64 heads (`models/cct.py`), as clipreel's `CrossFrameBlock`.

May import: torch, clipreel.errors, clipreel.heads.raw.xclip, clipreel.heads.convert.*.
"""

from __future__ import annotations

from collections.abc import Mapping

from clipreel.heads.convert.clip_layout import (
    TextFacts,
    VisionFacts,
    attention_heads,
    block_shapes,
    clip_evidence,
    clip_shapes,
    open_clip_config,
    text_facts,
    vision_facts,
)
from clipreel.heads.convert.common import (
    NO_CHOICES,
    Imported,
    Preprocessing,
    Shape,
    UserChoices,
    as_float32,
    check_layout,
    check_user_value,
    numbered,
    tensor_shape,
    unwrap_checkpoint,
)
from clipreel.heads.raw.xclip import XCLIPConfig

# Checkpoint keys that belong to XCLIP's head (clipreel prefixes them with "head.").
HEAD_PREFIXES = ("mit.", "prompts_visual_ln.", "prompts_visual_proj", "prompts_generator.", "logit_scale")
MESSAGE_MODULES = ("message_fc.", "message_ln.", "message_attn.")
# X-CLIP's final test pass (main.py): 4 clips x 3 crops on frames resized to the crop size.
TEST_VIEWS, TEST_CROPS = 4, 3


def message_shapes(prefix: str, width: int) -> dict[str, Shape]:
    """X-CLIP's cross-frame message modules of one vision block (`models/cct.py: CrossFramelAttentionBlock`)."""
    return {
        f"{prefix}message_fc.weight": (width, width),
        f"{prefix}message_fc.bias": (width,),
        f"{prefix}message_ln.weight": (width,),
        f"{prefix}message_ln.bias": (width,),
        f"{prefix}message_attn.in_proj_weight": (3 * width, width),
        f"{prefix}message_attn.in_proj_bias": (3 * width,),
        f"{prefix}message_attn.out_proj.weight": (width, width),
        f"{prefix}message_attn.out_proj.bias": (width,),
    }


def head_shapes(width: int, embed_dim: int, frames: int, mit_layers: int, prompt_layers: int) -> dict[str, Shape]:
    """The MIT and the prompt generator, X-CLIP's key names (`models/mit.py`, `models/prompt.py`)."""
    shapes: dict[str, Shape] = {
        "mit.positional_embedding": (1, frames, embed_dim),
        "prompts_visual_ln.weight": (width,),
        "prompts_visual_ln.bias": (width,),
        "prompts_visual_proj": (width, embed_dim),
        "prompts_generator.norm.weight": (embed_dim,),
        "prompts_generator.norm.bias": (embed_dim,),
        "prompts_generator.alpha": (embed_dim,),
    }
    for layer in range(mit_layers):
        shapes.update(block_shapes(f"mit.resblocks.{layer}.", embed_dim, 4 * embed_dim))
    for layer in range(prompt_layers):
        prefix = f"prompts_generator.decoder.{layer}."
        for name in ("q_proj", "k_proj", "v_proj"):
            shapes[f"{prefix}cross_attn.{name}.weight"] = (embed_dim, embed_dim)
        shapes[f"{prefix}cross_attn.proj.weight"] = (embed_dim, embed_dim)
        shapes[f"{prefix}cross_attn.proj.bias"] = (embed_dim,)
        for norm in ("norm1", "norm3"):
            shapes[f"{prefix}{norm}.weight"] = (embed_dim,)
            shapes[f"{prefix}{norm}.bias"] = (embed_dim,)
        shapes[f"{prefix}mlp.0.weight"] = (4 * embed_dim, embed_dim)
        shapes[f"{prefix}mlp.0.bias"] = (4 * embed_dim,)
        shapes[f"{prefix}mlp.3.weight"] = (embed_dim, 4 * embed_dim)
        shapes[f"{prefix}mlp.3.bias"] = (embed_dim,)
    return shapes


def xclip_shapes(vision: VisionFacts, text: TextFacts, frames: int, mit_layers: int, prompt_layers: int) -> dict[str, Shape]:
    """Every key and shape of an X-CLIP checkpoint with these sizes."""
    shapes = {
        **clip_shapes(vision, text),
        **head_shapes(vision.width, vision.embed_dim, frames, mit_layers, prompt_layers),
    }
    for layer in range(vision.layers):
        shapes.update(message_shapes(f"visual.transformer.resblocks.{layer}.", vision.width))
    return shapes


def layout_facts(vision: VisionFacts, frames: int, mit_layers: int, prompt_layers: int) -> str:
    """The sizes an X-CLIP layout was derived from, in words (for refusals)."""
    return (
        f"ViT width {vision.width}, {vision.layers} image layers, T={frames}, {mit_layers} MIT and "
        f"{prompt_layers} prompt generator layers"
    )


def convert_xclip(checkpoint: Mapping, user: UserChoices = NO_CHOICES, source: str = "the X-CLIP checkpoint") -> Imported:
    """An official X-CLIP checkpoint -> clipreel's `XCLIP` (config, strict state dict) and its CLIP.

    Classes are not fixed by X-CLIP's weights (its classifier is the class names' text), so
    only --frames and --model are checked against the tensors.
    """
    tensors = as_float32(unwrap_checkpoint(checkpoint, source))
    vision = vision_facts(tensors, "visual.", source)
    text = text_facts(tensors, "", source)
    _, frames, _ = tensor_shape(tensors, "mit.positional_embedding", source, 3)
    mit_layers = numbered(tensors, "mit.resblocks.")
    prompt_layers = numbered(tensors, "prompts_generator.decoder.")
    check_layout(
        tensors, xclip_shapes(vision, text, frames, mit_layers, prompt_layers), source,
        layout_facts(vision, frames, mit_layers, prompt_layers),
    )
    check_user_value(
        "--frames", user.frames, frames,
        f"mit.positional_embedding has shape (1, {frames}, {vision.embed_dim}), i.e. {frames} frames",
    )
    heads = attention_heads(user.model, vision, text, clip_evidence("visual.", "", "token_embedding.weight", vision, text))

    clip_state_dict = {key: tensors[key] for key in clip_shapes(vision, text)}
    state_dict = {}
    for key, value in tensors.items():
        if key.startswith("visual."):
            state_dict[key] = value
        elif key.startswith(HEAD_PREFIXES):
            state_dict["head." + key] = value
    config = XCLIPConfig(frames=frames, mit_layers=mit_layers, prompt_layers=prompt_layers)
    preprocessing = Preprocessing.named(
        "imagenet", image_size=vision.image_size, short_side=vision.image_size, crops=TEST_CROPS, sampling="tsn",
        frames=frames, stride=None, views=TEST_VIEWS, view_scores="sum_softmax",
    )
    return Imported(
        method="xclip",
        facts={
            "frames": frames, "mit_layers": mit_layers, "prompt_layers": prompt_layers, "width": vision.width,
            "layers": vision.layers, "embed_dim": vision.embed_dim, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "vocab_size": text.vocab_size, "context_length": text.context_length,
            "heads": heads.vision, "heads_from": heads.source,
        },
        clip_config=open_clip_config(vision, text, heads),
        clip_state_dict=clip_state_dict,
        method_config=config.to_dict(),
        state_dict=state_dict,
        preprocessing=preprocessing,
        conventions=[
            "class texts: the bare class names (template '{}'), shifted per video by the prompt generator",
            (
                "X-CLIP tokenizes class names as they are; clipreel reads underscores as spaces (the released "
                "label files use spaces)"
            ),
            "the test pass X-CLIP reports: TSN segment centres, 4 clips x 3 crops, softmax summed over views",
        ],
    )
