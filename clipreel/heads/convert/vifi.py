"""ViFi-CLIP checkpoints (muzairkhattak/ViFi-CLIP), fine-tuned or prompted -> clipreel's ViFi-CLIP
or bridge-and-prompt.

A ViFi-CLIP file holds `{"model": ...}` with the DDP state dict (`module.` keys;
`utils/tools.py: epoch_saving`) of `trainers/vificlip.py: ViFiCLIP`:

- `image_encoder.*`: CLIP's image tower, OpenAI keys; `text_encoder.*`: its text transformer,
  `positional_embedding`, `ln_final`, `text_projection`; `logit_scale`;
- class-dependent buffers, recomputed from the class names and dropped here:
  `prompt_learner.complete_text_embeddings` (fine-tuned) or `prompt_learner.token_prefix` /
  `token_suffix` (prompted);
- prompted ("bridge and prompt") checkpoints also: `prompt_learner.ctx` (n_ctx, text width),
  `image_encoder.VPT` (n_ctx, image width) and `VPT_shallow` in blocks 1..depth-1 of each tower
  (`clip/model.py`).

The token embedding is not in the file (ViFi-CLIP embeds the class texts once, outside the
trained model): it comes from the base CLIP (--clip), rounded to fp16 as ViFi-CLIP's embeddings
are (`VLPromptLearner` casts them to the CLIP's fp16 dtype). The prompted model's vision prompts
and deep text prompts are rounded to fp16 as they are used (`clip/model.py` casts them with
`.half()` in forward; the text ctx is not): `BridgePromptConfig.fp16_prompts`, so that further
training of the imported prompts keeps that behaviour. The fine-tuned model's class texts keep the
class names verbatim, underscores included (`ViFiConfig.verbatim_classnames`).

No tensor depends on T, so the frames come from --frames, or default to 32, the setting of
ViFi-CLIP's zero-shot, few-shot and base-to-novel models (its fully supervised K400 models use 16).

May import: torch, clipreel.errors, clipreel.heads.raw.vifi, clipreel.heads.convert.*.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from clipreel.errors import ClipreelError
from clipreel.heads.convert.clip_layout import (
    attention_heads,
    clip_evidence,
    open_clip_config,
    read_base_clip,
    text_facts,
    text_shapes,
    vision_facts,
    vision_shapes,
)
from clipreel.heads.convert.common import (
    NO_CHOICES,
    Imported,
    Preprocessing,
    Shape,
    Tensors,
    UserChoices,
    as_float32,
    check_layout,
    round_to_fp16,
    short_side_256_for,
    tensor_shape,
    unwrap_checkpoint,
)
from clipreel.heads.raw.bridge_prompt import BridgePromptConfig
from clipreel.heads.raw.vifi import ViFiConfig

# Class-dependent buffers of ViFi-CLIP's prompt learner: recomputed from the class names.
CLASS_BUFFERS = (
    "prompt_learner.complete_text_embeddings",
    "prompt_learner.token_prefix",
    "prompt_learner.token_suffix",
)
DEFAULT_FRAMES = 32
IMAGE, TEXT = "image_encoder.", "text_encoder."
VISION_BLOCKS, TEXT_BLOCKS = IMAGE + "transformer.resblocks.", TEXT + "transformer.resblocks."


def prompt_depth(tensors: Mapping, blocks: str) -> int:
    """1 + the last block under `blocks` that owns a `VPT_shallow` (1 when none does)."""
    pattern = re.compile(re.escape(blocks) + r"(\d+)\.VPT_shallow$")
    indices = [int(match.group(1)) for key in tensors if (match := pattern.match(key))]
    return max(indices) + 1 if indices else 1


def prompt_shapes(n_ctx_vision: int, n_ctx_text: int, depth_vision: int, depth_text: int, width: int, text_width: int) -> dict[str, Shape]:
    """The prompts of a bridge-and-prompt checkpoint."""
    shapes: dict[str, Shape] = {"image_encoder.VPT": (n_ctx_vision, width), "prompt_learner.ctx": (n_ctx_text, text_width)}
    shapes.update({f"{VISION_BLOCKS}{i}.VPT_shallow": (n_ctx_vision, width) for i in range(1, depth_vision)})
    shapes.update({f"{TEXT_BLOCKS}{i}.VPT_shallow": (n_ctx_text, text_width) for i in range(1, depth_text)})
    return shapes


def convert_vifi(checkpoint: Mapping, base_clip: Mapping, user: UserChoices = NO_CHOICES, source: str = "the ViFi-CLIP checkpoint") -> Imported:
    """A ViFi-CLIP checkpoint + the base CLIP's token table -> clipreel's `ViFiCLIP` (method "vifi")
    or, for a prompted checkpoint, `BridgePrompt` (method "prompt") around the ViFi-tuned CLIP."""
    tensors = as_float32(unwrap_checkpoint(checkpoint, source))
    trained_classes = None
    for key in CLASS_BUFFERS:
        if key in tensors:
            trained_classes = int(tensors.pop(key).shape[0])
    base = read_base_clip(base_clip)
    if "token_embedding.weight" not in base:
        raise ClipreelError(
            "--clip holds no token_embedding.weight: ViFi-CLIP checkpoints lack the token table, so pass the CLIP "
            "the model was fine-tuned from (OpenAI ViT-B/16 for the released models)."
        )
    token_table = base["token_embedding.weight"].float()
    vision = vision_facts(tensors, IMAGE, source)
    text = text_facts(tensors, TEXT, source, token_table=token_table)
    if token_table.ndim != 2 or token_table.shape[1] != text.width:
        raise ClipreelError(
            f"--clip's token_embedding.weight has shape {tuple(token_table.shape)}, but the checkpoint's text tower has "
            f"width {text.width} (text_encoder.positional_embedding): pass the CLIP the model was fine-tuned from."
        )
    prompted = "prompt_learner.ctx" in tensors or any("VPT" in key for key in tensors)
    expected = {**vision_shapes(vision, IMAGE), **text_shapes(text, TEXT, token_embedding=False), "logit_scale": ()}
    facts_text = f"ViT width {vision.width}, {vision.layers} image and {text.layers} text layers"
    if prompted:
        n_ctx_vision, _ = tensor_shape(tensors, "image_encoder.VPT", source, 2)
        n_ctx_text, _ = tensor_shape(tensors, "prompt_learner.ctx", source, 2)
        depth_vision, depth_text = prompt_depth(tensors, VISION_BLOCKS), prompt_depth(tensors, TEXT_BLOCKS)
        expected.update(prompt_shapes(n_ctx_vision, n_ctx_text, depth_vision, depth_text, vision.width, text.width))
        facts_text += f", prompts {n_ctx_vision}/{n_ctx_text} tokens to depth {depth_vision}/{depth_text}"
    check_layout(tensors, expected, source, facts_text)
    heads = attention_heads(user.model, vision, text, clip_evidence(IMAGE, TEXT, "--clip's token_embedding.weight", vision, text))

    clip_state_dict = _vifi_clip(tensors, token_table)
    frames = user.frames or DEFAULT_FRAMES
    facts = {
        "width": vision.width, "layers": vision.layers, "embed_dim": vision.embed_dim, "image_size": vision.image_size,
        "patch_size": vision.patch_size, "vocab_size": text.vocab_size, "context_length": text.context_length,
        "frames": frames, "frames_from": "--frames" if user.frames else "ViFi-CLIP's 32-frame default",
        "trained_classes": trained_classes, "heads": heads.vision, "heads_from": heads.source,
    }
    conventions = [
        "token table: the --clip token embedding rounded to fp16, as ViFi-CLIP embeds its class texts",
        (
            "no tensor fixes T: 32 frames for the zero-shot, few-shot and base-to-novel models, 16 for the fully "
            "supervised Kinetics-400 ones (pass --frames)"
        ),
        "the reference runs under fp16 autocast; this import computes in float32",
    ]
    if prompted:
        method = "prompt"
        method_config = BridgePromptConfig(
            n_ctx_vision=n_ctx_vision, n_ctx_text=n_ctx_text, depth_vision=depth_vision, depth_text=depth_text, ctx_init=None,
            fp16_prompts=True,
        ).to_dict()
        state_dict = _bridge_prompts(tensors, depth_vision, depth_text)
        facts.update(n_ctx_vision=n_ctx_vision, n_ctx_text=n_ctx_text, depth_vision=depth_vision, depth_text=depth_text)
        conventions.insert(0, "vision prompts and deep text prompts rounded to fp16 as they are used (ViFi-CLIP's .half() in forward)")
        conventions.insert(0, "class texts: 'X ... X {class}.' with learned context, underscores read as spaces")
    else:
        method = "vifi"
        method_config = ViFiConfig(variant="both", template="a photo of a {}.", verbatim_classnames=True).to_dict()
        state_dict = {"clip." + key: value for key, value in clip_state_dict.items()}
        conventions.insert(
            0,
            "class texts: 'a photo of a {class}.' with the class name verbatim, underscores included "
            "(trainers/vificlip.py)",
        )
    return Imported(
        method=method,
        facts=facts,
        clip_config=open_clip_config(vision, text, heads),
        clip_state_dict=clip_state_dict,
        method_config=method_config,
        state_dict=state_dict,
        preprocessing=Preprocessing.named(
            "imagenet", image_size=vision.image_size, short_side=short_side_256_for(vision.image_size), crops=1,
            sampling="tsn", frames=frames, stride=None, views=1, view_scores="sum_softmax",
        ),
        conventions=conventions,
    )


def _vifi_clip(tensors: Mapping, token_table) -> Tensors:
    """The ViFi-tuned CLIP in open_clip's layout: both towers, logit_scale, the fp16-rounded token table."""
    clip = {"token_embedding.weight": round_to_fp16(token_table), "logit_scale": tensors["logit_scale"]}
    for key, value in tensors.items():
        if key.endswith("VPT_shallow") or key == "image_encoder.VPT":
            continue
        if key.startswith(IMAGE):
            clip["visual." + key[len(IMAGE) :]] = value
        elif key.startswith(TEXT):
            clip[key[len(TEXT) :]] = value
    return clip


def _bridge_prompts(tensors: Mapping, depth_vision: int, depth_text: int) -> Tensors:
    """ViFi-CLIP's prompts under `BridgePrompt`'s names (see `heads/raw/bridge_prompt.py`), as stored."""
    prompts = {
        "image_encoder.ctx": tensors["image_encoder.VPT"],
        "prompt_learner.ctx": tensors["prompt_learner.ctx"],
        "logit_scale": tensors["logit_scale"],
    }
    for i in range(1, depth_vision):
        prompts[f"image_encoder.deep_ctx.{i - 1}"] = tensors[f"{VISION_BLOCKS}{i}.VPT_shallow"]
    for i in range(1, depth_text):
        prompts[f"prompt_learner.deep_ctx.{i - 1}"] = tensors[f"{TEXT_BLOCKS}{i}.VPT_shallow"]
    return prompts
