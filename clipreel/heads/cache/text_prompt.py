"""Language-side prompt learning (CoOp / ViFi-CLIP) against the frozen open_clip text encoder.

Instead of a hand-written template ("a photo of a {}."), the words before the class name are
learned vectors: the text tower reads ``[SOS] ctx_1 ... ctx_n classname . [EOS]`` where the
ctx are trainable and every text-tower weight stays frozen. With ``deep_depth = d > 1``, text
layers 1..d-1 also own prompts that replace the hidden states at the ctx positions before the
layer runs (ViFi-CLIP's deep language prompts, METHODS.md 3.2).

The video side comes from the cache: the per-frame CLIP embeddings are averaged over frames, as
ViFi-CLIP does, so this head trains without the vision tower.

What is saved: only the learned prompts (and the frozen ``logit_scale`` of the classifier).
The frozen text tower belongs to the CLIP model the head is rebuilt from, and the class-dependent
token buffers are recomputed from the class names (METHODS.md 7.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from clipreel.config import JsonConfig
from clipreel.errors import ClipreelError
from clipreel.heads.cache.zeroshot import readable_classname

# A one-token word that stands in for each ctx vector while the prompt is tokenized.
PLACEHOLDER_WORD = "X"



@dataclass
class TextPromptConfig(JsonConfig):
    """How the text prompts are shaped and initialised."""

    n_ctx: int = 16  # learned context vectors before the class name
    ctx_init: str | None = None  # e.g. "a photo of a": initial ctx when n_ctx <= 4 (else random)
    deep_depth: int = 1  # 1 = shallow; d > 1 = text layers 1..d-1 get their own prompts
    class_token_position: str = "end"  # where the class name goes; only "end" (CoOp's default)

    def __post_init__(self):
        if self.n_ctx < 1:
            raise ClipreelError(f"TextPromptConfig: n_ctx is {self.n_ctx}; use at least 1.")
        if self.deep_depth < 1:
            raise ClipreelError(f"TextPromptConfig: deep_depth is {self.deep_depth}; use 1 (shallow) or more.")
        if self.class_token_position != "end":
            raise ClipreelError(
                f"TextPromptConfig: class_token_position {self.class_token_position!r} is not "
                "supported; use 'end' (the class name follows the learned context)."
            )


class FrozenTextEncoder(nn.Module):
    """The frozen pieces of an open_clip ``CLIP`` text tower, run on token embeddings.

    The modules are shared with the CLIP model (not copied) and frozen in place. They are
    registered here so that ``.to(device)`` moves them, but they never enter this module's
    ``state_dict()``: they belong to the CLIP model the head is rebuilt from, and saving them
    would put the whole text tower into every run. ``load_state_dict`` therefore does not
    expect them either. The tower always stays in eval mode.
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        if not hasattr(clip_model, "text_pool_type") or not clip_model.transformer.batch_first:
            raise ClipreelError(
                f"{type(clip_model).__name__} is not an open_clip CLIP model with a batch-first text "
                "transformer; prompt learning supports the standard CLIP text tower (e.g. ViT-B-16)."
            )
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.pool_type = clip_model.text_pool_type
        self.eos_id = clip_model.text_eos_id
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()
        self.register_state_dict_post_hook(leave_out_frozen_weights)
        self.register_load_state_dict_pre_hook(supply_frozen_weights)

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.transformer.resblocks)

    def train(self, mode: bool = True):
        """Frozen: stays in eval mode whatever the parent asks."""
        return super().train(False)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """(K, width) -> (K, E), as ``encode_text`` does (a Linear or a matrix, depending on the config)."""
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection


def leave_out_frozen_weights(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook of FrozenTextEncoder: drop its (shared, frozen) weights."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        del state_dict[key]


def supply_frozen_weights(module, state_dict, prefix, *unused) -> None:
    """load_state_dict pre-hook of FrozenTextEncoder: its weights are not in a saved head, so
    it hands its current ones back to itself (the text tower holds no persistent buffers)."""
    for name, param in module.named_parameters():
        state_dict.setdefault(prefix + name, param)


class TextPromptLearner(nn.Module):
    """Learned text prompts for K class names -> class text embeddings (K, E).

    ``forward()`` assembles ``[SOS] ctx classname . [EOS]`` for every class, runs the frozen
    text tower (replacing the ctx positions with the deep prompts in layers 1..deep_depth-1)
    and pools the EOT token exactly as open_clip's ``encode_text`` does.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        classnames: Sequence[str],
        config: TextPromptConfig,
    ):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.text_encoder = FrozenTextEncoder(clip_model)
        n_ctx, width = config.n_ctx, self.text_encoder.width
        if config.deep_depth > self.text_encoder.num_layers:
            raise ClipreelError(
                f"TextPromptConfig: deep_depth {config.deep_depth} exceeds the "
                f"{self.text_encoder.num_layers} layers of the text tower; use at most that."
            )
        self.set_classnames(classnames)
        self.ctx = nn.Parameter(self._initial_ctx())  # (n_ctx, width)
        # deep_ctx[i] replaces the ctx positions before text layer i + 1.
        self.deep_ctx = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx, width) * 0.02) for _ in range(config.deep_depth - 1)]
        )

    def _initial_ctx(self) -> torch.Tensor:
        """ctx from the token embeddings of ``ctx_init`` (when n_ctx <= 4), else N(0, 0.02)."""
        n_ctx, ctx_init = self.config.n_ctx, self.config.ctx_init
        embedding = self.text_encoder.token_embedding
        if ctx_init is None or n_ctx > 4:
            return torch.randn(n_ctx, self.text_encoder.width, device=embedding.weight.device) * 0.02
        token_ids = self.tokenizer([ctx_init]).to(embedding.weight.device)  # (1, C)
        words = int(token_ids[0].argmax()) - 1  # tokens between [SOS] and [EOS] (the largest id)
        if words != n_ctx:
            raise ClipreelError(
                f"TextPromptConfig: ctx_init {ctx_init!r} is {words} tokens but n_ctx is {n_ctx}; "
                f"set n_ctx to {words} or choose a {n_ctx}-token ctx_init."
            )
        with torch.no_grad():
            return embedding(token_ids)[0, 1 : 1 + n_ctx].clone()  # (n_ctx, width)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Tokenize "X X ... X classname." per class and keep the frozen embeddings around the Xs.

        The buffers are class-dependent and not saved: a loaded head calls this (through its
        constructor) with the run's class names.
        """
        n_ctx = self.config.n_ctx
        placeholder = " ".join([PLACEHOLDER_WORD] * n_ctx)
        texts = [f"{placeholder} {readable_classname(name)}." for name in classnames]
        device = self.text_encoder.token_embedding.weight.device
        token_ids = self.tokenizer(texts).to(device)  # (K, C)
        placeholder_id = self.tokenizer([PLACEHOLDER_WORD])[0, 1].item()
        if not bool((token_ids[:, 1 : 1 + n_ctx] == placeholder_id).all()):
            raise ClipreelError(
                "prompt learning needs a CLIP-style tokenizer ([SOS] first, one token per placeholder "
                f"word {PLACEHOLDER_WORD!r}); the tokenizer of this model does not tokenize that way."
            )
        with torch.no_grad():
            embedded = self.text_encoder.token_embedding(token_ids)  # (K, C, width)
        self.classnames = list(classnames)
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1].clone(), persistent=False)  # (K, 1, width): SOS
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)  # class . EOS pad

    def _replace_ctx(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """x (K, C, width) with positions 1..n_ctx replaced by ctx (n_ctx, width)."""
        ctx = ctx.to(x.dtype).expand(x.shape[0], -1, -1)  # (K, n_ctx, width)
        return torch.cat([x[:, :1], ctx, x[:, 1 + self.config.n_ctx :]], dim=1)

    def forward(self) -> torch.Tensor:
        """-> class text embeddings (K, E), not normalised (as ``encode_text``)."""
        encoder = self.text_encoder
        ctx = self.ctx.expand(self.token_prefix.shape[0], -1, -1)  # (K, n_ctx, width)
        x = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (K, C, width)
        x = x + encoder.positional_embedding
        for layer, block in enumerate(encoder.transformer.resblocks):
            if 1 <= layer < self.config.deep_depth:
                x = self._replace_ctx(x, self.deep_ctx[layer - 1])
            x = block(x, attn_mask=encoder.attn_mask)  # (K, C, width)
        x = encoder.ln_final(x)
        pooled = text_global_pool(x, self.token_ids, encoder.pool_type, eos_token_id=encoder.eos_id)  # (K, width)
        return encoder.project(pooled)  # (K, E)


class PromptedClassifier(nn.Module):
    """Frame-mean video embedding vs prompt-learned class text: logits (B, K).

    logits = exp(logit_scale) * cos(mean_T(embeds), prompt_learner()); ``logit_scale`` is the
    CLIP model's, copied into a buffer and frozen (as ViFi-CLIP's prompting stage does).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        classnames: Sequence[str],
        config: TextPromptConfig,
    ):
        super().__init__()
        self.config = config
        self.prompt_learner = TextPromptLearner(clip_model, tokenizer, classnames, config)
        self.register_buffer("logit_scale", clip_model.logit_scale.detach().clone().reshape(()))

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify among other classes (base-to-novel, zero-shot transfer) with the same prompts."""
        self.prompt_learner.set_classnames(classnames)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds (B, T, E) -> logits (B, K)."""
        text = F.normalize(self.prompt_learner(), dim=-1)  # (K, E)
        video = F.normalize(embeds.to(text.dtype).mean(dim=1), dim=-1)  # (B, E)
        return self.logit_scale.exp() * video @ text.t()  # (B, K)
