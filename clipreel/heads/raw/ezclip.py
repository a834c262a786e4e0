"""EZ-CLIP: temporal visual prompts and adapters inside a frozen CLIP, trained on raw frames.

EZ-CLIP (arXiv 2312.08010; its `clip/model.py`) keeps every CLIP weight frozen and learns:

- **temporal visual prompts** ``T_prompt_embeddings`` (layers, T, D): in vision block i, frame t
  gets one extra token, ``P_i[t] + mean of frame t's tokens``. The T extra tokens of a video first
  attend to each other through the block's own frozen ``ln_1`` + attention (the output replaces
  them, no residual), then each is appended to its frame for the frozen spatial attention, and
  dropped afterwards. This is how information flows between frames;
- (optionally, ``train_temporal_embedding``) the **temporal embedding** EZ-CLIP adds to every token of
  frame t before ``ln_pre``. The shipped configs keep it frozen at zero (the freezing rule trains only
  names with "prompt" or "Adapter"), so order then reaches the video only through the prompts, weakly:
  on clipreel-synth a clip and its reversal give video embeddings 99.9% alike at initialisation and
  even six reversed pairs could not be fitted in 300 steps (lr up to 1e-2). Trained, it is a temporal
  position the frozen tower sees in every token, and the same six pairs fit in 20-40 steps;
- **adapters** in every block of both towers: ``x + fc2(GELU(fc1(x)))`` with a 0.25·width
  bottleneck, placed after the attention residual and before the MLP. ``fc2`` starts at zero,
  so each adapter starts as the identity.

Every block is re-run here from open_clip's own pieces (``ln_1``, ``attention``, ``ls_1``,
``ln_2``, ``mlp``, ``ls_2``); open_clip itself is not modified. Drop path (stochastic depth, linear
from 0 in the first block to ``drop_path`` in the last) acts on the prompt attention and both
residual branches, as in EZ-CLIP. It drops per frame (vision) or per text (text tower); the
reference code, which runs sequence-first, drops per token position across the batch instead.

The video embedding is the mean over frames of ``ln_post(CLS) @ proj``; classes are scored by
``exp(logit_scale) * cos`` against class texts (EZ-CLIP uses one LLM-written description per
class) encoded by the adapted text tower. Training adds ``motion_loss`` to
``contrastive_kl_loss`` with no weighting (EZ-CLIP's `train.py`). `EZCLIPClassifier` pairs `EZCLIP`
with the texts of a class list, so that it answers like the other methods (logits over the classes).

Saving: ``state_dict()`` leaves out the frozen CLIP (`heads.layers.FrozenCLIP`: it belongs to the
model the head is rebuilt from), so a run stores only what EZ-CLIP learns. Its keys map one to one
onto the keys of EZ-CLIP's released checkpoints (its `clip/model.py` names) through ``reference_key``:

    T_prompt_embeddings            <-> visual.transformer.T_prompt_embeddings
    temporal_embedding             <-> visual.temporal_embedding (frozen zeros; kept for loading)
    visual_adapters.{i}.D_fc*.*    <-> visual.transformer.resblocks.{i}.Adapter.D_fc*.*
    text_adapters.{i}.D_fc*.*      <-> transformer.resblocks.{i}.Adapter.D_fc*.*

``load_reference_state_dict`` loads a whole EZ-CLIP checkpoint (CLIP weights + these additions).

May import: torch, open_clip, clipreel.errors, clipreel.config, clipreel.heads (layers, registry).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from clipreel.config import POSITIVE, PROBABILITY, SIZE, JsonConfig, ranged
from clipreel.errors import ClipreelError
from clipreel.heads.layers import (
    FrozenCLIP,
    call_block,
    patch_stem,
    check_clips,
    check_standard_text_tower,
    check_standard_vit,
    cosine_logits,
    drop_path,
    drop_path_rates,
    readable_classname,
)
from clipreel.heads.registry import MethodEntry, MethodModel, MethodRecipe, register_method

# Key renames between this module's state_dict and EZ-CLIP's checkpoints (its `clip/model.py` names).
_REFERENCE_RENAMES = (
    (r"^T_prompt_embeddings$", "visual.transformer.T_prompt_embeddings"),
    (r"^temporal_embedding$", "visual.temporal_embedding"),
    (r"^visual_adapters\.(\d+)\.", r"visual.transformer.resblocks.\1.Adapter."),
    (r"^text_adapters\.(\d+)\.", r"transformer.resblocks.\1.Adapter."),
)
# The temperature CLIP-style contrastive targets are sharpened with (ActionCLIP's KLLoss).
KL_TARGET_SCALE = 10.0


@dataclass
class EZCLIPConfig(JsonConfig):
    """EZ-CLIP's settings (defaults: its `configs/K-400/k400_train.yaml`)."""

    frames: int = ranged(8, SIZE)  # T, fixed by the prompt tensor
    adapter_ratio: float = ranged(0.25, POSITIVE)  # adapter bottleneck = ratio * tower width
    prompt_dropout: float = ranged(0.1, PROBABILITY)  # dropout on the learned prompts before they join the frame means
    drop_path: float = ranged(0.1, PROBABILITY)  # stochastic depth of the last block (linear from 0 in the first)
    deep_prompts: bool = True  # True: prompts in every vision block; False: in block 0 only
    use_prompts: bool = True  # False: adapters only (EZ-CLIP's few-shot HMDB config)
    gradient_checkpointing: bool = False  # recompute each vision block in the backward pass (saves GPU memory)
    # EZ-CLIP's per-frame embedding added to every token of frame t: zeros and frozen in the shipped configs
    # (its freezing rule trains only names with "prompt" or "Adapter"); True trains it, a temporal position.
    train_temporal_embedding: bool = False
    # How a class name becomes its text; EZ-CLIP's own texts are LLM-written class descriptions, tokenized as "{}".
    template: str = "{}"
    # Each class's text by class name, e.g. EZ-CLIP's LLM-written descriptions (its GPT_discription/*.csv):
    # used as they are, instead of the template; classes without one get the template.
    descriptions: dict[str, str] = field(default_factory=dict)
    # None: scores are exp(logit_scale) * cosine; a number s: s * cosine (EZ-CLIP's test.py scores with 100).
    score_scale: float | None = ranged(None, POSITIVE)

    def class_text(self, name: str) -> str:
        """The text a class is scored against: its description, else the template around its readable name."""
        return self.descriptions.get(name) or self.template.format(readable_classname(name))


class Adapter(nn.Module):
    """Bottleneck residual ``x + D_fc2(GELU(D_fc1(x)))``; ``D_fc2`` is zero at init (identity)."""

    def __init__(self, width: int, ratio: float):
        super().__init__()
        hidden = int(width * ratio)
        self.D_fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.D_fc2 = nn.Linear(hidden, width)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.D_fc2(self.act(self.D_fc1(x)))


def reference_key(name: str) -> str:
    """A key of ``EZCLIP.state_dict()`` -> the same tensor's key in an EZ-CLIP checkpoint."""
    for pattern, replacement in _REFERENCE_RENAMES:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    raise KeyError(f"{name} is not an EZ-CLIP parameter")


class EZCLIP(nn.Module):
    """A frozen open_clip CLIP with EZ-CLIP's temporal prompts and adapters.

    ``forward(frames (B, T, 3, S, S))`` -> ``{"frame_embeds": (B, T, E), "video_embeds": (B, E)}``,
    both unnormalised. ``encode_text(token_ids (K, C))`` -> (K, E). ``logits(video, text)`` -> (B, K).
    Only the prompts and adapters train (and the temporal embedding, when asked); the CLIP stays
    frozen and in eval mode.
    """

    def __init__(self, clip: FrozenCLIP, config: EZCLIPConfig):
        super().__init__()
        check_standard_vit(clip.model.visual, "EZ-CLIP")
        check_standard_text_tower(clip.model, "EZ-CLIP")
        self.config = config
        self.clip = clip

        visual = clip.model.visual
        width = visual.transformer.width
        visual_layers = len(visual.transformer.resblocks)
        text_width = clip.model.transformer.width
        text_layers = len(clip.model.transformer.resblocks)
        self.image_size = int(visual.image_size[0])

        if config.use_prompts:
            prompt_layers = visual_layers if config.deep_prompts else 1
            patch_height, patch_width = visual.patch_size
            bound = math.sqrt(6.0 / (3 * patch_height * patch_width + width))
            self.T_prompt_embeddings = nn.Parameter(torch.empty(prompt_layers, config.frames, width))
            nn.init.uniform_(self.T_prompt_embeddings, -bound, bound)
        else:
            self.T_prompt_embeddings = None
        self.prompt_dropout = nn.Dropout(config.prompt_dropout)
        # EZ-CLIP adds a per-frame embedding before ln_pre; it is zeros and frozen in every shipped
        # config (kept so that a checkpoint that carries values reproduces them), trained on request.
        temporal_embedding = torch.zeros(1, config.frames, width)
        if config.train_temporal_embedding:
            self.temporal_embedding = nn.Parameter(temporal_embedding)
        else:
            self.register_buffer("temporal_embedding", temporal_embedding)
        self.visual_adapters = nn.ModuleList([Adapter(width, config.adapter_ratio) for _ in range(visual_layers)])
        self.text_adapters = nn.ModuleList([Adapter(text_width, config.adapter_ratio) for _ in range(text_layers)])
        self.visual_drop_path = drop_path_rates(config.drop_path, visual_layers)
        self.text_drop_path = drop_path_rates(config.drop_path, text_layers)

    # -- vision tower -----------------------------------------------------------------------

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised frames (B, T, 3, S, S) -> frame_embeds (B, T, E) and video_embeds (B, E)."""
        check_clips(frames, self.image_size, "EZ-CLIP", self.config.frames)
        visual = self.clip.model.visual
        batch = frames.shape[0]
        x = self._embed_frames(frames)  # (B*T, L, D)
        for index, block in enumerate(visual.transformer.resblocks):
            x = call_block(self._visual_block, index, block, x, batch,
                           checkpointed=self.config.gradient_checkpointing)  # (B*T, L, D)
        cls = visual.ln_post(x)[:, 0]  # (B*T, D), as open_clip's "tok" pooling
        frame_embeds = (cls @ visual.proj).unflatten(0, (batch, self.config.frames))  # (B, T, E)
        return {"frame_embeds": frame_embeds, "video_embeds": frame_embeds.mean(dim=1)}

    def _embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) -> tokens (B*T, L, D): patches, CLS, positions, frame embedding, ln_pre."""
        visual = self.clip.model.visual
        batch, steps = frames.shape[:2]
        x = patch_stem(visual, frames.flatten(0, 1))  # (B*T, L, D)
        x = x.unflatten(0, (batch, steps)) + self.temporal_embedding.to(x.dtype)[:, :, None]  # (B, T, L, D)
        x = visual.patch_dropout(x.flatten(0, 1))  # (B*T, L, D)
        return visual.ln_pre(x)

    def _layer_prompt(self, index: int) -> torch.Tensor | None:
        """The learned prompts (T, D) of vision block `index` after prompt dropout, or None."""
        if self.T_prompt_embeddings is None or index >= self.T_prompt_embeddings.shape[0]:
            return None
        return self.prompt_dropout(self.T_prompt_embeddings[index])

    def _visual_block(self, index: int, block: ResidualAttentionBlock, x: torch.Tensor, batch: int) -> torch.Tensor:
        """One frozen vision block with the temporal prompt token and the adapter; x (B*T, L, D)."""
        rate = self.visual_drop_path[index]
        tokens = x.shape[1]
        prompt = self._layer_prompt(index)
        if prompt is not None:
            frame_means = x.mean(dim=1).unflatten(0, (batch, self.config.frames))  # (B, T, D)
            prompt = prompt.to(x.dtype) + frame_means  # (B, T, D)
            # Attention across the T frames of each video, with the block's own frozen weights.
            prompt = drop_path(block.attention(block.ln_1(prompt)), rate, self.training)  # (B, T, D)
            x = torch.cat([x, prompt.flatten(0, 1)[:, None]], dim=1)  # (B*T, L+1, D)
        x = x + drop_path(block.ls_1(block.attention(block.ln_1(x))), rate, self.training)
        x = x[:, :tokens]  # (B*T, L, D): the prompt token is dropped
        x = self.visual_adapters[index](x)
        return x + drop_path(block.ls_2(block.mlp(block.ln_2(x))), rate, self.training)

    # -- text tower -------------------------------------------------------------------------

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (K, C) -> text embeddings (K, E) through the adapted text tower, unnormalised."""
        model = self.clip.model
        x = self.clip.text_inputs(token_ids)  # (K, C, W)
        for index, block in enumerate(model.transformer.resblocks):
            rate = self.text_drop_path[index]
            attended = block.attention(block.ln_1(x), attn_mask=model.attn_mask)
            x = x + drop_path(block.ls_1(attended), rate, self.training)
            x = self.text_adapters[index](x)
            x = x + drop_path(block.ls_2(block.mlp(block.ln_2(x))), rate, self.training)
        return self.clip.text_features(x, token_ids)  # (K, E)

    def logits(self, video_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cos(video (B, E), text (K, E)) -> (B, K), logit_scale CLIP's (frozen);
        or score_scale * cos when the config sets one."""
        if self.config.score_scale is None:
            return cosine_logits(video_embeds, text_embeds, self.clip.model.logit_scale)
        video, text = F.normalize(video_embeds, dim=-1), F.normalize(text_embeds.to(video_embeds.dtype), dim=-1)
        return self.config.score_scale * video @ text.t()  # (B, K)

    # -- EZ-CLIP checkpoints ----------------------------------------------------------------

    def load_reference_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load an EZ-CLIP checkpoint's ``model_state_dict`` (CLIP keys + EZ-CLIP additions).

        The CLIP keys go into the held CLIP (strict), the additions into this module (strict).
        The CLIP must already have the right architecture, including QuickGELU for OpenAI-based
        weights (open_clip's "ViT-B-16-quickgelu").
        """
        own = {name: reference_key(name) for name in self.state_dict()}
        addition_keys = set(own.values())
        clip_state = {key: value for key, value in state_dict.items() if key not in addition_keys}
        missing = sorted(key for key in addition_keys if key not in state_dict)
        if missing:
            raise ClipreelError(
                f"the EZ-CLIP checkpoint lacks {len(missing)} keys of this model (first: {missing[:3]}); "
                f"check that frames ({self.config.frames}), deep_prompts and use_prompts match the checkpoint."
            )
        try:
            self.clip.model.load_state_dict(clip_state, strict=True)
        except RuntimeError as exc:
            details = "\n".join(str(exc).splitlines()[:6])
            raise ClipreelError(f"the EZ-CLIP checkpoint's CLIP weights do not fit this model:\n{details}") from exc
        self.load_state_dict({name: state_dict[key] for name, key in own.items()})


class EZCLIPClassifier(MethodModel):
    """EZ-CLIP plus its class texts, so that it answers like the other methods.

    EZ-CLIP describes each class with one LLM-written sentence tokenized as "{}" (``config.descriptions``);
    a class without one is its name (``config.template`` may dress it). forward(frames) ->
    logits (B, K), frame_embeds (B, T, E), video_embeds (B, E). ``state_dict()`` is EZ-CLIP's under
    ``ezclip.`` (the frozen CLIP left out). Its prompts and adapters train in one AdamW group (EZ-CLIP's
    `utils/solver.py`: `MethodModel`'s parameter_groups), with its own loss.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                 classnames: Sequence[str], config: EZCLIPConfig):
        super().__init__()
        self.ezclip = EZCLIP(FrozenCLIP(clip_model, tokenizer), config)
        self.config = config
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Classify among these classes (zero-shot transfer, base-to-novel): tokenize their texts (not saved)."""
        if not classnames:
            raise ClipreelError("EZ-CLIP: no class names given; pass the label map's class names.")
        self.classnames = list(classnames)
        texts = [self.config.class_text(name) for name in classnames]
        self.register_buffer("token_ids", self.ezclip.clip.tokenize(texts), persistent=False)  # (K, C)

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames (B, T, 3, S, S) -> logits (B, K), frame_embeds (B, T, E), video_embeds (B, E)."""
        outputs = self.ezclip(frames)  # frame_embeds (B, T, E), video_embeds (B, E)
        text_embeds = self.ezclip.encode_text(self.token_ids)  # (K, E)
        return {"logits": self.ezclip.logits(outputs["video_embeds"], text_embeds), **outputs}

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """EZ-CLIP's training loss (its `train.py`): the in-batch KL contrastive loss of the videos
        against their class texts, plus the motion loss. Needs class ids (no mixup); label smoothing
        does not apply.

        Video i against the text of video j's class is column targets[j] of the logits.
        """
        if targets.dtype.is_floating_point:
            raise ClipreelError("EZ-CLIP trains with its contrastive loss on class ids: turn mixup off.")
        logits_per_video = outputs["logits"][:, targets]  # (B, B)
        contrastive = contrastive_kl_loss(logits_per_video, logits_per_video.t(), same_label_matrix(targets))
        return contrastive + motion_loss(outputs["frame_embeds"])


# -- losses ---------------------------------------------------------------------------------


def motion_loss(frame_embeds: torch.Tensor) -> torch.Tensor:
    """EZ-CLIP's motion loss 1 / (C + V + 1) on per-frame embeddings (B, T, E), T >= 2.

    C = mean over (B, T, E) of |e[t+1] - e[t-1]| / 2 (the first and last frames stand in for
    their missing neighbours); V = mean over (B, E) of the unbiased variance across T. Both grow
    when the frame embeddings change over time, so minimising the loss rewards motion.
    Take frame_embeds before normalisation and temporal pooling.
    """
    if frame_embeds.ndim != 3 or frame_embeds.shape[1] < 2:
        raise ValueError(f"motion_loss needs frame embeddings (B, T >= 2, E), got {tuple(frame_embeds.shape)}")
    previous = torch.cat([frame_embeds[:, :1], frame_embeds[:, :-1]], dim=1)  # (B, T, E): e[t-1]
    following = torch.cat([frame_embeds[:, 1:], frame_embeds[:, -1:]], dim=1)  # (B, T, E): e[t+1]
    change = ((following - previous).abs() / 2).mean()
    variance = frame_embeds.var(dim=1, unbiased=True).mean()
    return 1.0 / (change + variance + 1.0)


def same_label_matrix(video_labels: torch.Tensor, text_labels: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) and (B',) labels -> (B, B') float, 1 where video i and text j share a class."""
    text_labels = video_labels if text_labels is None else text_labels
    return (video_labels[:, None] == text_labels[None, :]).float()


def _kl_to_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ActionCLIP's KLLoss: element-mean KL(softmax(10 * targets) || softmax(logits)) * rows."""
    log_probs = F.log_softmax(logits, dim=1)
    target_probs = F.softmax(targets.to(logits.dtype) * KL_TARGET_SCALE, dim=1)
    # KLDivLoss's "mean": the sum over every element divided by their number (not by the rows).
    element_mean = F.kl_div(log_probs, target_probs, reduction="sum") / logits.numel()
    return element_mean * logits.shape[0]


def contrastive_kl_loss(
    logits_per_video: torch.Tensor, logits_per_text: torch.Tensor, same_label: torch.Tensor
) -> torch.Tensor:
    """EZ-CLIP's (ActionCLIP's) in-batch contrastive loss, averaged over both directions.

    logits_per_video (B, B'), logits_per_text (B', B), same_label (B, B') (see
    `same_label_matrix`): every text of the video's class counts as a positive.
    """
    if logits_per_video.shape != same_label.shape or logits_per_text.shape != same_label.t().shape:
        raise ValueError(
            f"expected logits_per_video {tuple(same_label.shape)} and logits_per_text {tuple(same_label.t().shape)}, "
            f"got {tuple(logits_per_video.shape)} and {tuple(logits_per_text.shape)}"
        )
    video_loss = _kl_to_targets(logits_per_video, same_label)
    text_loss = _kl_to_targets(logits_per_text, same_label.t())
    return (video_loss + text_loss) / 2


register_method(MethodEntry(
    name="ezclip",
    summary="EZ-CLIP: temporal visual prompts and adapters in a frozen CLIP, motion loss",
    config_class=EZCLIPConfig,
    model_class=EZCLIPClassifier,
    # EZ-CLIP's `configs/K-400/k400_train.yaml` and `utils/solver.py`: AdamW 1e-4, betas (0.9, 0.98),
    # weight decay 0.2, 5 warmup epochs (1 here: short runs); CLIP mean/std.
    recipe=MethodRecipe(lr=1e-4, weight_decay=0.2, warmup_epochs=1, betas=(0.9, 0.98), norm="clip"),
    soft_targets=False,
))
