"""Official EVL checkpoints (OpenGVLab/efficient-video-recognition) -> clipreel's EVL head.

A released EVL file (`k400_vitb16_8f_dec4x768.pth`, ...) holds `{"model": ...}` with the
DDP-wrapped decoder and classifier only (`checkpoint.py`): `module.decoder.*` and `module.proj.*`.
The frozen backbone is kept out of the state dict (`model.py: EVLTransformer._create_backbone`
stores it in a list), so it comes from the base CLIP the decoder was trained on (--clip), and its
last K blocks are the feature blocks clipreel taps. clipreel's `EVLHead` reproduces the
reference's module names, so the decoder keys load as they are, without `module.`.

The tensors fix: the width D (`decoder.cls_token`), the decoder depth K (`decoder.decoder_layers.*`),
T (`decoder.temporal_pos_embed.0`, (T, D)), the patch grid g (`decoder.cross_attention.0.w1`,
((2g-1)^2, D)), the MLP width, the classes (`proj.2.weight`, (classes, D)) and which temporal
modules exist. The decoder's heads are the backbone's (EVL's scripts pass 12 for ViT-B, 16 for ViT-L).

May import: torch, clipreel.errors, clipreel.heads.cache.evl, clipreel.heads.convert.*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from clipreel.errors import ClipreelError
from clipreel.heads.cache.evl import EVLConfig
from clipreel.heads.convert.clip_layout import (
    attention_heads,
    clip_evidence,
    clip_shapes,
    open_clip_config,
    read_base_clip,
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
    whole_ratio,
)

# EVL's scripts: 8 frames x stride 16 and 16 x 16, 32 frames x stride 8 (scripts/train_*.sh).
DENSE_STRIDE_UP_TO_16_FRAMES = 16
DENSE_STRIDE_32_FRAMES = 8
# Frames assumed when the checkpoint has no temporal position embedding and --frames is not given.
DEFAULT_FRAMES = 8


def evl_shapes(config: EVLConfig) -> dict[str, Shape]:
    """The keys and shapes of an EVL decoder + classifier (= `EVLHead.state_dict()`, and the official
    checkpoint without `module.`)."""
    width, hidden = config.width, round(config.mlp_factor * config.width)
    span = (2 * config.grid - 1) ** 2
    shapes: dict[str, Shape] = {
        "decoder.cls_token": (width,),
        "proj.0.weight": (width,),
        "proj.0.bias": (width,),
        "proj.2.weight": (config.num_classes, width),
        "proj.2.bias": (config.num_classes,),
    }
    for i in range(config.layers):
        layer = f"decoder.decoder_layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}attn.{name}.weight"] = (width, width)
            shapes[f"{layer}attn.{name}.bias"] = (width,)
        shapes[f"{layer}mlp.fc1.weight"] = (hidden, width)
        shapes[f"{layer}mlp.fc1.bias"] = (hidden,)
        shapes[f"{layer}mlp.fc2.weight"] = (width, hidden)
        shapes[f"{layer}mlp.fc2.bias"] = (width,)
        for norm in ("norm1", "norm2", "norm3"):
            shapes[f"{layer}{norm}.weight"] = (width,)
            shapes[f"{layer}{norm}.bias"] = (width,)
        if config.temporal_conv:
            shapes[f"decoder.temporal_conv.{i}.weight"] = (width, 1, 3)
            shapes[f"decoder.temporal_conv.{i}.bias"] = (width,)
        if config.temporal_pos_embed:
            shapes[f"decoder.temporal_pos_embed.{i}"] = (config.frames, width)
        if config.temporal_cross_attention:
            shapes[f"decoder.cross_attention.{i}.w1"] = (span, width)
            shapes[f"decoder.cross_attention.{i}.w2"] = (span, width)
    return shapes


def convert_evl(checkpoint: Mapping, base_clip: Mapping, user: UserChoices = NO_CHOICES, source: str = "the EVL checkpoint") -> Imported:
    """An official EVL checkpoint + the base CLIP it was trained on -> clipreel's EVL head and backbone.

    Refuses a fine-tuned backbone (`backbone.*` keys: its patch embedding has a bias that open_clip's
    has not), a base CLIP whose width or patch grid is not the decoder's, and --frames / --classes
    / --model values that contradict the tensors.
    """
    tensors = unwrap_checkpoint(checkpoint, source)
    backbone_keys = sorted(key for key in tensors if key.startswith("backbone."))
    if backbone_keys:
        raise ClipreelError(
            f"{source} carries a fine-tuned backbone ({len(backbone_keys)} 'backbone.*' keys, e.g. {backbone_keys[0]}): "
            "clipreel's EVL runs on a frozen open_clip backbone, so only frozen-backbone EVL checkpoints (the released "
            "ones) can be imported."
        )
    (width,) = tensor_shape(tensors, "decoder.cls_token", source, 1)
    layers = numbered(tensors, "decoder.decoder_layers.")
    num_classes, _ = tensor_shape(tensors, "proj.2.weight", source, 2)
    hidden, _ = tensor_shape(tensors, "decoder.decoder_layers.0.mlp.fc1.weight", source, 2)
    has_conv = "decoder.temporal_conv.0.weight" in tensors
    has_pos = "decoder.temporal_pos_embed.0" in tensors
    has_cross = "decoder.cross_attention.0.w1" in tensors

    base = read_base_clip(base_clip)
    vision = vision_facts(base, "visual.", "--clip")
    text = text_facts(base, "", "--clip")
    check_layout(base, clip_shapes(vision, text), "--clip", f"ViT width {vision.width}, {vision.layers} image layers")
    heads = attention_heads(user.model, vision, text, clip_evidence("visual.", "", "token_embedding.weight", vision, text))

    if width != vision.width:
        raise ClipreelError(
            f"{source}: decoder.cls_token has width {width}, but the --clip image tower has width {vision.width} "
            "(visual.conv1.weight): pass the CLIP the decoder was trained on (ViT-B/16 for dec4x768, ViT-L/14 for dec4x1024)."
        )
    if layers > vision.layers:
        raise ClipreelError(
            f"{source}: {layers} decoder layers (decoder.decoder_layers.*) read {layers} blocks, but the --clip image "
            f"tower has only {vision.layers}."
        )
    grid = vision.grid
    if has_cross:
        span, _ = tensor_shape(tensors, "decoder.cross_attention.0.w1", source, 2)
        side = math.isqrt(span)
        if side * side != span or side % 2 == 0:
            raise ClipreelError(f"{source}: decoder.cross_attention.0.w1 has {span} rows, not (2g-1)^2 for a grid g.")
        grid = (side + 1) // 2
        if grid != vision.grid:
            raise ClipreelError(
                f"{source}: decoder.cross_attention.0.w1 ({span} rows) is for a {grid}x{grid} patch grid, but the --clip "
                f"image tower has a {vision.grid}x{vision.grid} grid (visual.positional_embedding): pass the CLIP the "
                "decoder was trained on."
            )
    if has_pos:
        frames, _ = tensor_shape(tensors, "decoder.temporal_pos_embed.0", source, 2)
        check_user_value("--frames", user.frames, frames, f"decoder.temporal_pos_embed.0 has shape ({frames}, {width}), i.e. {frames} frames")
    else:
        frames = user.frames or DEFAULT_FRAMES
    check_user_value(
        "--classes", user.num_classes, num_classes, f"proj.2.weight has shape ({num_classes}, {width}), i.e. {num_classes} classes"
    )
    config = EVLConfig(
        width=width,
        heads=heads.vision,
        layers=layers,
        frames=frames,
        grid=grid,
        num_classes=num_classes,
        mlp_factor=whole_ratio(hidden, width, "decoder MLP width / width", source),
        temporal_conv=has_conv,
        temporal_pos_embed=has_pos,
        temporal_cross_attention=has_cross,
    )
    check_layout(tensors, evl_shapes(config), source, f"width {width}, {layers} decoder layers, T={frames}, grid {grid}, {num_classes} classes")

    stride = DENSE_STRIDE_UP_TO_16_FRAMES if frames <= 16 else DENSE_STRIDE_32_FRAMES
    # EVL's eval scripts: 1 centre crop x 3 temporal views at 8 frames, 3 crops x 1 view at 16 and 32.
    views, crops = (3, 1) if frames <= 8 else (1, 3)
    preprocessing = Preprocessing.named(
        "clip", image_size=vision.image_size, short_side=vision.image_size, crops=crops, sampling="dense",
        frames=frames, stride=stride, views=views, view_scores="mean_softmax",
    )
    feature_blocks = list(range(vision.layers - layers, vision.layers))
    return Imported(
        method="evl",
        facts={
            "width": width, "decoder_layers": layers, "frames": frames, "grid": grid, "num_classes": num_classes,
            "image_size": vision.image_size, "patch_size": vision.patch_size, "feature_blocks": feature_blocks,
            "heads": heads.vision, "heads_from": heads.source,
        },
        clip_config=open_clip_config(vision, text, heads),
        clip_state_dict=as_float32(base),
        method_config=config.to_dict(),
        state_dict=as_float32(tensors),
        preprocessing=preprocessing,
        conventions=[
            (
                f"the decoder reads the last {layers} blocks of the frozen CLIP ({feature_blocks[0]}.."
                f"{feature_blocks[-1]}): extract with --layers {layers}"
            ),
            "class order: the checkpoint's (data/k400_class_mappings.json for the Kinetics-400 releases)",
        ],
    )
