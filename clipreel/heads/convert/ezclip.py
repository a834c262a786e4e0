"""EZ-CLIP checkpoints (Shahzadnit/EZ-CLIP) -> clipreel's EZ-CLIP.

An EZ-CLIP `.pt` is its training dict `{"epoch", "model_state_dict", "optimizer_state_dict"}`
(`utils/saving.py`; issue #7): the whole `clip/model.py: CLIP`, most weights in fp16 (the model
is `convert_weights`-ed for training), with EZ-CLIP's additions among the OpenAI keys:
`visual.temporal_embedding` (1, T, D), `visual.transformer.T_prompt_embeddings` (blocks or 1, T, D)
and an `Adapter` (`D_fc1`, `D_fc2`) in every block of both towers. `heads.raw.ezclip.reference_key`
maps clipreel's names for the additions onto these keys; the rest is an open_clip CLIP.

The tensors fix the CLIP sizes, T (`T_prompt_embeddings`, or `temporal_embedding` without
prompts), whether the prompts are deep, and the adapters' bottleneck ratio. Weights are converted
to float32: EZ-CLIP's CPU path casts the fp16 model to float as well (`test.py`).

EZ-CLIP scores a video against its class texts with a fixed 100 * cosine (`test.py: validate`),
not with CLIP's learned temperature: the imported config sets `score_scale` to 100, and the
CLIP keeps the checkpoint's own `logit_scale`.

May import: clipreel.errors, clipreel.heads.raw.ezclip, clipreel.heads.convert.*.
"""

from __future__ import annotations

from collections.abc import Mapping

from clipreel.errors import ClipreelError
from clipreel.heads.convert.clip_layout import (
    attention_heads,
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
    short_side_256_for,
    tensor_shape,
    unwrap_checkpoint,
)
from clipreel.heads.raw.ezclip import EZCLIPConfig, reference_key

PROMPTS = "visual.transformer.T_prompt_embeddings"
TEMPORAL_EMBEDDING = "visual.temporal_embedding"
VISUAL_ADAPTER = "visual.transformer.resblocks.0.Adapter.D_fc1.weight"
TEXT_ADAPTER = "transformer.resblocks.0.Adapter.D_fc1.weight"
FIXED_SCORE_SCALE = 100.0  # test.py: similarity = 100.0 * image_features @ text_features.T


def addition_shapes(
    frames: int, prompt_layers: int, width: int, hidden: int, visual_layers: int, text_width: int, text_hidden: int, text_layers: int
) -> dict[str, Shape]:
    """EZ-CLIP's additions under clipreel's names (`EZCLIP.state_dict()`); `prompt_layers` 0 = no prompts."""
    shapes: dict[str, Shape] = {"temporal_embedding": (1, frames, width)}
    if prompt_layers:
        shapes["T_prompt_embeddings"] = (prompt_layers, frames, width)
    for tower, layers, tower_width, tower_hidden in (
        ("visual_adapters", visual_layers, width, hidden),
        ("text_adapters", text_layers, text_width, text_hidden),
    ):
        for i in range(layers):
            shapes[f"{tower}.{i}.D_fc1.weight"] = (tower_hidden, tower_width)
            shapes[f"{tower}.{i}.D_fc1.bias"] = (tower_hidden,)
            shapes[f"{tower}.{i}.D_fc2.weight"] = (tower_width, tower_hidden)
            shapes[f"{tower}.{i}.D_fc2.bias"] = (tower_width,)
    return shapes


def convert_ezclip(checkpoint: Mapping, user: UserChoices = NO_CHOICES, source: str = "the EZ-CLIP checkpoint") -> Imported:
    """An EZ-CLIP training dict (or its `model_state_dict`) -> clipreel's `EZCLIPClassifier` and its CLIP."""
    tensors = as_float32(unwrap_checkpoint(checkpoint, source))
    vision = vision_facts(tensors, "visual.", source)
    text = text_facts(tensors, "", source)
    if PROMPTS in tensors:
        prompt_layers, frames, _ = tensor_shape(tensors, PROMPTS, source, 3)
        frames_evidence = f"{PROMPTS} has shape {tuple(tensors[PROMPTS].shape)}, i.e. {frames} frames"
        if prompt_layers not in (1, vision.layers):
            raise ClipreelError(
                f"{source}: {PROMPTS} has prompts for {prompt_layers} blocks; EZ-CLIP has them in every one of the "
                f"{vision.layers} image blocks (DEEP) or in the first only."
            )
    else:
        prompt_layers = 0
        _, frames, _ = tensor_shape(tensors, TEMPORAL_EMBEDDING, source, 3)
        frames_evidence = f"{TEMPORAL_EMBEDDING} has shape {tuple(tensors[TEMPORAL_EMBEDDING].shape)}, i.e. {frames} frames"
    hidden, _ = tensor_shape(tensors, VISUAL_ADAPTER, source, 2)
    text_hidden, _ = tensor_shape(tensors, TEXT_ADAPTER, source, 2)
    additions = addition_shapes(frames, prompt_layers, vision.width, hidden, vision.layers, text.width, text_hidden, text.layers)
    check_layout(
        tensors, {**clip_shapes(vision, text), **{reference_key(name): shape for name, shape in additions.items()}}, source,
        f"ViT width {vision.width}, {vision.layers} image and {text.layers} text layers, T={frames}, prompts in "
        f"{prompt_layers} blocks, adapters {hidden} / {text_hidden} wide",
    )
    ratio = hidden / vision.width
    if int(text.width * ratio) != text_hidden:
        raise ClipreelError(
            f"{source}: the image adapters are {hidden} wide for width {vision.width} ({VISUAL_ADAPTER}) but the text "
            f"adapters {text_hidden} for width {text.width} ({TEXT_ADAPTER}): clipreel's EZ-CLIP uses one bottleneck "
            "ratio for both towers (EZ-CLIP: 0.25)."
        )
    check_user_value("--frames", user.frames, frames, frames_evidence)
    heads = attention_heads(user.model, vision, text, clip_evidence("visual.", "", "token_embedding.weight", vision, text))

    clip_state_dict = {key: tensors[key] for key in clip_shapes(vision, text)}
    config = EZCLIPConfig(frames=frames, adapter_ratio=ratio, deep_prompts=prompt_layers != 1, use_prompts=prompt_layers > 0,
                          template="{}", score_scale=FIXED_SCORE_SCALE)
    return Imported(
        method="ezclip",
        facts={
            "frames": frames, "prompt_layers": prompt_layers, "adapter_hidden": hidden, "text_adapter_hidden": text_hidden,
            "width": vision.width, "layers": vision.layers, "embed_dim": vision.embed_dim, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "vocab_size": text.vocab_size, "context_length": text.context_length,
            "heads": heads.vision, "heads_from": heads.source,
        },
        clip_config=open_clip_config(vision, text, heads),
        clip_state_dict=clip_state_dict,
        method_config=config.to_dict(),
        state_dict={"ezclip." + name: tensors[reference_key(name)] for name in additions},
        preprocessing=Preprocessing.named(
            "clip", image_size=vision.image_size, short_side=short_side_256_for(vision.image_size), crops=1,
            sampling="tsn", frames=frames, stride=None, views=1, view_scores="mean_softmax",
        ),
        conventions=[
            "scores: 100 * cosine (test.py), not the CLIP's learned temperature",
            (
                "class texts: one LLM-written description per class (--classes with its GPT_discription CSV), "
                "tokenized as it is with template '{}'; a class without one is its name; clipreel's tokenizer "
                "truncates texts beyond the context where EZ-CLIP's refuses them"
            ),
            "the fp16 weights are computed in float32, as EZ-CLIP's CPU path does",
        ],
    )
