"""Language-side prompt learning (CoOp / ViFi-CLIP) against the frozen open_clip text encoder.

Instead of a hand-written template ("a photo of a {}."), the words before the class name are
learned vectors: the text tower reads ``[SOS] ctx_1 ... ctx_n classname . [EOS]`` where the
ctx are trainable and every text-tower weight stays frozen. With ``deep_depth = d > 1``, text
layers 1..d-1 also own prompts that replace the hidden states at the ctx positions before the
layer runs (ViFi-CLIP's deep language prompts, `clip/model.py` of ViFi-CLIP).

The video side comes from the cache: the per-frame CLIP embeddings are averaged over frames, as
ViFi-CLIP does, so this head trains without the vision tower.

What is saved: only the learned prompts (and the frozen ``logit_scale`` of the classifier).
The frozen CLIP belongs to the checkpoint the head is rebuilt from (`heads.layers.FrozenCLIP`), and
the class-dependent token buffers are recomputed from the class names.

May import: torch, open_clip, clipreel.errors, clipreel.config, clipreel.heads (layers, registry).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from clipreel.config import SIZE, JsonConfig, ranged
from clipreel.errors import ClipreelError
from clipreel.heads.layers import (
    FrozenCLIP,
    check_standard_text_tower,
    cosine_logits,
    fp16_rounded,
    logit_scale_of,
    readable_classname,
)
from clipreel.heads.registry import HeadEntry, Recipe, register_head

# A one-token word that stands in for each ctx vector while the prompt is tokenized.
PLACEHOLDER_WORD = "X"


@dataclass
class TextPromptConfig(JsonConfig):
    """How the text prompts are shaped and initialised."""

    n_ctx: int = ranged(16, SIZE)  # learned context vectors before the class name
    ctx_init: str | None = None  # e.g. "a photo of a": initial ctx when n_ctx <= 4 (else random)
    deep_depth: int = ranged(1, SIZE)  # 1 = shallow; d > 1 = text layers 1..d-1 get their own prompts
    class_token_position: str = "end"  # where the class name goes; only "end" (CoOp's default)
    # True: the deep prompts are rounded to fp16 as they are used (ViFi-CLIP's `clip/model.py` casts
    # them with .half() in forward; its shallow ctx is not cast)
    fp16_deep_prompts: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.class_token_position != "end":
            raise ClipreelError(
                f"TextPromptConfig: class_token_position {self.class_token_position!r} is not "
                "supported; use 'end' (the class name follows the learned context)."
            )


class TextPromptLearner(nn.Module):
    """Learned text prompts for K class names -> class text embeddings (K, E).

    ``forward()`` assembles ``[SOS] ctx classname . [EOS]`` for every class, runs the frozen
    text tower (replacing the ctx positions with the deep prompts in layers 1..deep_depth-1)
    and pools the EOT token exactly as open_clip's ``encode_text`` does.
    """

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], config: TextPromptConfig):
        super().__init__()
        check_standard_text_tower(clip.model, "prompt learning")
        self.config = config
        self.clip = clip
        n_ctx, width = config.n_ctx, self.width
        text_layers = len(clip.model.transformer.resblocks)
        if config.deep_depth > text_layers:
            raise ClipreelError(
                f"TextPromptConfig: deep_depth {config.deep_depth} exceeds the "
                f"{text_layers} layers of the text tower; use at most that."
            )
        self.set_classnames(classnames)
        self.ctx = nn.Parameter(self._initial_ctx())  # (n_ctx, width)
        # deep_ctx[i] replaces the ctx positions before text layer i + 1.
        self.deep_ctx = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx, width) * 0.02) for _ in range(config.deep_depth - 1)]
        )

    @property
    def width(self) -> int:
        """W, the text tower's width."""
        return self.clip.model.token_embedding.weight.shape[1]

    def _initial_ctx(self) -> torch.Tensor:
        """ctx from the token embeddings of ``ctx_init`` (when n_ctx <= 4), else N(0, 0.02)."""
        n_ctx, ctx_init = self.config.n_ctx, self.config.ctx_init
        embedding = self.clip.model.token_embedding
        if ctx_init is None or n_ctx > 4:
            return torch.randn(n_ctx, self.width, device=embedding.weight.device) * 0.02
        token_ids = self.clip.tokenize([ctx_init])  # (1, C)
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
        if not classnames:
            raise ClipreelError("prompt learning: no class names given; pass the label map's class names.")
        n_ctx = self.config.n_ctx
        placeholder = " ".join([PLACEHOLDER_WORD] * n_ctx)
        texts = [f"{placeholder} {readable_classname(name)}." for name in classnames]
        token_ids = self.clip.tokenize(texts)  # (K, C)
        placeholder_id = self.clip.tokenizer([PLACEHOLDER_WORD])[0, 1].item()
        if not bool((token_ids[:, 1 : 1 + n_ctx] == placeholder_id).all()):
            raise ClipreelError(
                "prompt learning needs a CLIP-style tokenizer ([SOS] first, one token per placeholder "
                f"word {PLACEHOLDER_WORD!r}); the tokenizer of this model does not tokenize that way."
            )
        with torch.no_grad():
            embedded = self.clip.model.token_embedding(token_ids)  # (K, C, width)
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
        model = self.clip.model
        ctx = self.ctx.expand(self.token_prefix.shape[0], -1, -1)  # (K, n_ctx, width)
        x = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (K, C, width)
        x = x + model.positional_embedding
        for layer, block in enumerate(model.transformer.resblocks):
            if 1 <= layer < self.config.deep_depth:
                deep = self.deep_ctx[layer - 1]
                x = self._replace_ctx(x, fp16_rounded(deep) if self.config.fp16_deep_prompts else deep)
            x = block(x, attn_mask=model.attn_mask)  # (K, C, width)
        return self.clip.text_features(x, self.token_ids)  # (K, E)


class PromptedClassifier(nn.Module):
    """Frame-mean video embedding vs prompt-learned class text: logits (B, K).

    logits = exp(logit_scale) * cos(mean_T(embeds), prompt_learner()); ``logit_scale`` is the
    CLIP model's, copied into a buffer and frozen (as ViFi-CLIP's prompting stage does).
    """

    def __init__(self, config: TextPromptConfig, clip: FrozenCLIP, classnames: Sequence[str]):
        super().__init__()
        self.config = config
        self.prompt_learner = TextPromptLearner(clip, classnames, config)
        self.register_buffer("logit_scale", logit_scale_of(clip.model))

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify among other classes (base-to-novel, zero-shot transfer) with the same prompts."""
        self.prompt_learner.set_classnames(classnames)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """batch["embeds"] (B, T, E) -> logits (B, K)."""
        text = self.prompt_learner()  # (K, E)
        video = batch["embeds"].to(text.dtype).mean(dim=1)  # (B, E)
        return cosine_logits(video, text, self.logit_scale)  # (B, K)


def store_sizes(layout, provenance: Mapping, num_classes: int, text_model) -> dict:
    """Nothing: the prompts' sizes come from the text tower itself."""
    return {}


register_head(HeadEntry(
    name="text-prompt",
    summary="CoOp / ViFi-CLIP learned text prompts vs the frame-mean embedding",
    config_class=TextPromptConfig,
    head_class=PromptedClassifier,
    reads=("embeds",),
    blocks="last",
    scores_text=True,
    trains=True,
    # ViFi-CLIP's prompting stage (`utils/optimizer.py`, `configs/`): one AdamW group, betas (0.9, 0.98),
    # weight decay 0.001.
    recipe=Recipe(lr=2e-3, weight_decay=0.001, warmup_epochs=1, betas=(0.9, 0.98)),
    store_sizes=store_sizes,
))
