"""The CLIP surgery that the cache heads and the raw-frame methods share, written once.

- `FrozenCLIP`: a CLIP shared with the code that loaded it, frozen, always in eval mode, and left out
  of the state dict of whatever module holds it (its weights belong to the CLIP checkpoint the module
  is rebuilt from). It encodes class texts, and it runs its text tower on token embeddings for the
  prompt learners and EZ-CLIP (`text_inputs`, then the blocks, then `text_features`).
- `check_standard_vit`, `check_standard_block`, `check_standard_text_tower`: the one guard of "a
  standard open_clip tower" that the feature taps and every method rely on.
- `patch_stem`, `image_size_of`: a ViT's conv1 + class token + positional embedding (the tokens
  before ln_pre); the input size of a model's image tower.
- `drop_path`, `DropPath`, `drop_path_rates`: stochastic depth and its linear schedule over blocks.
- `call_block`: one transformer block, gradient-checkpointed on request.
- `logit_scale_of`, `cosine_logits`, `classification_loss`: CLIP's temperature read once, scaled
  cosine scores, and the cross-entropy of class ids or soft targets.
- `trainable_parameters`, `trainable_parameter_count`, `one_parameter_group`: what trains is what
  has `requires_grad`.
- `check_clips`, `check_class_count`, `readable_classname`: the input checks and the class-name
  spelling every model uses.

May import: torch, open_clip, clipreel.errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer, text_global_pool
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipreel.errors import ClipreelError

STANDARD_MODELS = "Use a standard open_clip ViT CLIP (e.g. ViT-B-16, ViT-L-14)."


# --------------------------------------------------------------------------- guards


def check_standard_block(block: nn.Module, who: str) -> None:
    """Refuse a block that is not open_clip's ResidualAttentionBlock with a packed, biased q/k/v attention."""
    attn = getattr(block, "attn", None)
    why = None
    if not isinstance(block, ResidualAttentionBlock) or not isinstance(attn, nn.MultiheadAttention):
        why = f"its blocks are {type(block).__name__}, not open_clip ResidualAttentionBlocks with nn.MultiheadAttention"
    elif not attn._qkv_same_embed_dim or attn.in_proj_bias is None:
        why = "its attention has no packed, biased q/k/v projection"
    elif not attn.batch_first:
        why = "its attention is not batch-first"
    if why is not None:
        raise ClipreelError(f"{who}: {why}. {STANDARD_MODELS}")


def check_standard_vit(visual: nn.Module, who: str, *, pooled_by_cls: bool = True) -> None:
    """Refuse image towers that the feature taps and the methods cannot re-run block by block.

    pooled_by_cls: the embedding must be ln_post(CLS) @ proj (every method reads it so); the taps
    only need the blocks' tokens and also accept average pooling.
    """
    why = None
    if not isinstance(visual, VisionTransformer):
        why = f"its image tower is a {type(visual).__name__}, not an open_clip VisionTransformer"
    elif visual.attn_pool is not None or visual.pool_type not in (("tok",) if pooled_by_cls else ("tok", "avg")):
        why = "it does not pool by its class token"
    elif pooled_by_cls and (visual.final_ln_after_pool or visual.proj is None):
        why = "its embedding is not ln_post(CLS) @ proj"
    elif not visual.transformer.batch_first:
        why = "its transformer is not batch-first"
    if why is not None:
        raise ClipreelError(f"{who}: {why}. {STANDARD_MODELS}")
    for block in visual.transformer.resblocks:
        check_standard_block(block, who)


def check_standard_text_tower(clip_model: nn.Module, who: str) -> None:
    """Refuse CLIPs whose text tower cannot be run on token embeddings block by block."""
    if not hasattr(clip_model, "text_pool_type") or not clip_model.transformer.batch_first:
        raise ClipreelError(f"{who}: {type(clip_model).__name__} has no batch-first open_clip text tower. "
                            f"{STANDARD_MODELS}")
    for block in clip_model.transformer.resblocks:
        check_standard_block(block, who)


def check_clips(frames: torch.Tensor, image_size: int, who: str, frames_per_clip: int | None = None) -> None:
    """Refuse clips that are not (B, T, 3, S, S) at the model's image size (and T frames, where the
    model's config fixes T)."""
    length = frames.shape[1] if frames.dim() == 5 else None
    if (frames.dim() != 5 or tuple(frames.shape[2:]) != (3, image_size, image_size)
            or (frames_per_clip is not None and length != frames_per_clip)):
        expected_length = frames_per_clip if frames_per_clip is not None else "T"
        raise ClipreelError(
            f"{who} expects clips shaped (B, {expected_length}, 3, {image_size}, {image_size}), got "
            f"{tuple(frames.shape)}: sample {expected_length} frames per clip (its config fixes T) and "
            f"resize them to its image size {image_size}."
        )


def check_class_count(num_classes: int, classnames: Sequence[str], who: str) -> None:
    """A closed-set head classifies among exactly the classes it was made for."""
    if len(classnames) != num_classes:
        raise ClipreelError(
            f"{who} made for {num_classes} classes cannot classify {len(classnames)}: evaluate it on the "
            "classes it was trained on (the run's classnames)."
        )


# --------------------------------------------------------------------------- the frozen CLIP


class FrozenCLIP(nn.Module):
    """A whole open_clip CLIP and its tokenizer, frozen in place, kept in eval mode and out of the state dict.

    The CLIP is shared, not copied: holding it registers it as a submodule, so that `.to(device)`
    moves it, but `state_dict()` of the holder (and of every module above it) leaves its weights
    out and `load_state_dict` does not expect them: they belong to the CLIP checkpoint the holding
    module is rebuilt from, and saving them would put a whole CLIP into every run.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor]):
        super().__init__()
        self.model = clip_model
        self.tokenizer = tokenizer
        self.model.requires_grad_(False)
        self.train(False)
        self.register_state_dict_post_hook(_leave_out_frozen_weights)
        self.register_load_state_dict_pre_hook(_supply_frozen_weights)

    def train(self, mode: bool = True):
        """Frozen: stays in eval mode whatever the parent asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> token ids (K, C) on the CLIP's device."""
        return self.tokenizer(list(texts)).to(self.device)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """`encode_text` of each text -> (K, E) float32, not normalised."""
        return encode_texts(self.model, self.tokenizer, texts)

    def text_inputs(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (K, C) -> the text tower's input (K, C, W): token embeddings plus positions, as
        open_clip's `encode_text` starts."""
        model = self.model
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(token_ids).to(cast_dtype)  # (K, C, W)
        return x + model.positional_embedding.to(cast_dtype)

    def text_features(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The text tower's last block output (K, C, W) -> text embeddings (K, E): ln_final, the
        EOT token's features (open_clip's pooling), the text projection; as `encode_text` ends."""
        model = self.model
        x = model.ln_final(x)  # (K, C, W)
        pooled = text_global_pool(x, token_ids, model.text_pool_type, eos_token_id=model.text_eos_id)  # (K, W)
        if isinstance(model.text_projection, nn.Linear):
            return model.text_projection(pooled)
        return pooled @ model.text_projection  # (K, E)


def _leave_out_frozen_weights(module: FrozenCLIP, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook of FrozenCLIP: drop the CLIP's tensors."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        del state_dict[key]


def _supply_frozen_weights(module: FrozenCLIP, state_dict, prefix, *unused) -> None:
    """load_state_dict pre-hook of FrozenCLIP: a saved module holds no CLIP tensors, so the CLIP's
    current ones are handed back to it."""
    for key, value in module.model.state_dict().items():
        state_dict.setdefault(prefix + "model." + key, value)


@torch.no_grad()
def encode_texts(clip_model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], texts: Sequence[str],
                 batch_size: int = 256) -> torch.Tensor:
    """open_clip's `encode_text` of each text, in batches -> (len(texts), E) float32, not normalised.

    A CLIP whose text tower is causal and pools the end-of-text token (open_clip's CLIP class with
    its `attn_mask` and "argmax" or "eos" pooling, as OpenAI's CLIP) runs each batch only up to its
    last end-of-text token: no position after it changes the ones before it, and class texts fill a
    few of the 77 positions. The embeddings equal `encode_text`'s up to float rounding; ViT-B/16
    encodes 16 templates x 4 classes ~10x faster.
    """
    device = clip_model.logit_scale.device
    up_to_end = (isinstance(clip_model, open_clip.CLIP) and clip_model.attn_mask is not None
                 and clip_model.text_pool_type in ("argmax", "eos"))
    chunks = []
    for start in range(0, len(texts), batch_size):
        token_ids = tokenizer(list(texts[start : start + batch_size]))  # (b, C), on the CPU
        if up_to_end:
            if clip_model.text_pool_type == "argmax":  # the end-of-text token has the largest id
                ends = token_ids.argmax(dim=-1)  # (b,)
            else:
                ends = (token_ids == clip_model.text_eos_id).int().argmax(dim=-1)  # (b,)
            prefix = token_ids[:, : int(ends.max()) + 1].to(device)  # (b, n)
            chunks.append(_encode_text_prefix(clip_model, prefix).float())  # (b, E)
        else:
            chunks.append(clip_model.encode_text(token_ids.to(device)).float())  # (b, E)
    return torch.cat(chunks)


def _encode_text_prefix(clip_model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """open_clip's `CLIP.encode_text` (open_clip/model.py) on the first n positions only: token ids
    (b, n), each text's end-of-text token among them -> embeddings (b, E)."""
    length = token_ids.shape[1]
    cast_dtype = clip_model.transformer.get_cast_dtype()
    x = clip_model.token_embedding(token_ids).to(cast_dtype) + clip_model.positional_embedding[:length].to(cast_dtype)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask[:length, :length])  # (b, n, W)
    x = clip_model.ln_final(x)
    pooled = text_global_pool(x, token_ids, clip_model.text_pool_type, eos_token_id=clip_model.text_eos_id)  # (b, W)
    if clip_model.text_projection is None:
        return pooled
    if isinstance(clip_model.text_projection, nn.Linear):
        return clip_model.text_projection(pooled)
    return pooled @ clip_model.text_projection  # (b, E)


def readable_classname(name: str) -> str:
    """Class names from label files often use underscores ("playing_guitar"): text wants spaces."""
    return name.replace("_", " ")


def fp16_rounded(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values rounded to the nearest float16, in its own dtype (gradients pass through):
    what a reference computes with a prompt it casts with `.half()` inside forward."""
    return tensor.half().to(tensor.dtype)


def logit_scale_of(clip_model: nn.Module) -> torch.Tensor:
    """The CLIP's log temperature as a detached 0-d tensor (a copy: the CLIP's own stays untouched)."""
    return clip_model.logit_scale.detach().clone().reshape(())


# --------------------------------------------------------------------------- the image tower


def patch_stem(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (N, 3, S, S) -> tokens (N, 1 + P, D): patches (row-major) after the class token, plus
    the positional embedding; ln_pre is left to the caller (prompts and frame embeddings go in first).

    `visual` is an open_clip VisionTransformer or anything with its conv1, class_embedding and
    positional_embedding.
    """
    x = visual.conv1(images)  # (N, D, g, g)
    x = x.flatten(2).transpose(1, 2)  # (N, P, D), patches row-major
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, D)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (N, 1 + P, D)


def image_size_of(model: nn.Module) -> int:
    """The input size S of the (first) open_clip image tower inside `model`."""
    for module in model.modules():
        if hasattr(module, "image_size") and hasattr(module, "conv1"):
            size = module.image_size
            return int(size[0] if isinstance(size, (tuple, list)) else size)
    raise ValueError(f"{type(model).__name__}: no open_clip image tower found to read the input size from")


def call_block(block: Callable[..., torch.Tensor], *args, checkpointed: bool) -> torch.Tensor:
    """`block(*args)`; checkpointed (and with gradients on), only the inputs are kept and the block's
    activations are recomputed in the backward pass, with the same random state (dropout, drop path)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole rows of x (dim 0) with probability `rate`, rescale the rest by
    1 / (1 - rate) so the expected output is unchanged."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device) < keep
    return x * mask / keep


class DropPath(nn.Module):
    """`drop_path` as a module: it follows the module's training mode."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training)


def drop_path_rates(max_rate: float, blocks: int) -> list[float]:
    """Linear stochastic-depth rates, 0 for the first block to `max_rate` for the last."""
    return [float(rate) for rate in torch.linspace(0.0, max_rate, blocks)]


# --------------------------------------------------------------------------- scoring and training


def cosine_logits(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) * cos(video (B, E), text); text is (K, E) shared by the batch or (B, K, E) per video."""
    video = F.normalize(video, dim=-1)  # (B, E)
    text = F.normalize(text.to(video.dtype), dim=-1)
    if text.dim() == 2:
        return logit_scale.exp() * video @ text.t()  # (B, K)
    return logit_scale.exp() * torch.einsum("be,bke->bk", video, text)  # (B, K)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of logits (B, K) against class ids (B,) (with label smoothing), or against soft
    targets (B, K) (mixup's, already smoothed)."""
    if targets.dtype.is_floating_point:
        return torch.sum(-targets * F.log_softmax(logits.float(), dim=1), dim=1).mean()
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter, for every parameter that trains (requires_grad)."""
    return {name: param for name, param in module.named_parameters() if param.requires_grad}


def trainable_parameter_count(module: nn.Module) -> int:
    """Number of scalars an optimizer updates (frozen parameters and buffers excluded)."""
    return sum(param.numel() for param in trainable_parameters(module).values())


def one_parameter_group(module: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Every trainable parameter of `module` in one optimizer group."""
    return [{"name": "trained", "params": list(trainable_parameters(module).values()), "lr": lr,
             "weight_decay": weight_decay}]
