"""The frozen open_clip image tower and its multi-layer taps.

`Backbone` runs a standard open_clip ViT on normalised frames and returns, per frame, the tokens
(CLS first, then the patches row-major) of a few residual blocks plus the projected embedding.

Which blocks are stored: the FEATURE blocks a head reads (`--layers`, default the last four), and
also the block just before each of them. The EVL decoder needs each feature block's attention
q/k; rather than storing q and k (3x the bytes of the tokens), we store the INPUT of each feature
block (= the output of the block before it; block -1 is the output of ln_pre) and recompute
q/k at train time with that block's frozen `ln_1` and the q/k rows of `in_proj` (see
`Backbone.qk_weights`). For the last four blocks that is five stored blocks instead of four.

Weights come from an open_clip tag (downloaded and cached by open_clip), a local checkpoint
file (read here, see `load_clip`), or "none" (random init, for tests and the demo).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import socket
import warnings
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
from open_clip.pretrained import has_hf_hub
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer

from clipreel.errors import ClipreelError
from clipreel.pipeline.devices import resolve_device
from clipreel.pipeline.preprocess import NORMS

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
# Weights shipped in the package (clipreel/weights/), used by --pretrained default:
# model name -> file name. clipreel-synth knows the synthetic world's colours and shapes
# (trained by clipreel.pipeline.synth_clip).
BUILTIN_WEIGHTS = {"clipreel-synth": "clipreel-synth.safetensors"}
TOKEN_LAYOUT = "cls+patches, row-major, outputs of the feature blocks"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # name -> autocast dtype
# OpenAI's released checkpoints are TorchScript archives whose state dict carries these entries;
# they mark a model trained with QuickGELU.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
HUB_PROBE_SECONDS = 3.0  # an offline machine fails this fast instead of ~45 s of download retries
LOCAL_WEIGHTS_HINT = (
    "Pass a local checkpoint file instead (--pretrained /path/to/checkpoint: .pt, .pth, .bin or "
    ".safetensors) or --pretrained none for random weights"
)


@dataclass
class BackboneConfig:
    """Which model, which weights, which blocks to tap, and where and how to run it."""

    model: str = "ViT-B-16"
    pretrained: str = "openai"  # an open_clip tag, a local checkpoint file, or "none" (random init)
    layers: str = "4"  # "4" = the last four blocks; "3,7,11" or "-1,-2" = explicit block indices
    norm: str | None = None  # "clip" | "imagenet"; None = the model's own statistics
    device: str = "cpu"
    precision: str = "auto"  # auto = fp32 on CPU, bf16 autocast on CUDA; or "fp32", "bf16", "fp16"


def register_builtin_models() -> list[str]:
    """Make the configs shipped in clipreel/model_configs known to open_clip; returns their names.

    Safe to call any number of times (the directory is added once).
    """
    names = sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))
    if not set(names) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    return names


def parse_layers(spec: str, num_blocks: int) -> tuple[int, ...]:
    """`--layers` -> sorted absolute block indices.

    A single non-negative number N means the last N blocks ("4" -> 8..11 of 12). A comma list
    means block indices, negative ones counted from the end ("3,7,11", "-1,-2"; one block: "7,").
    A single negative number is one index ("-1" = the last block).
    """
    text = str(spec).strip()
    hint = (
        f"use N for the last N blocks, or block indices such as '3,7,11' or '-1,-2' "
        f"(one block: '7,'); this model has {num_blocks} blocks, 0..{num_blocks - 1}"
    )
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]  # the trailing comma of a one-block list
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        raise ClipreelError(f"--layers {spec!r} is not a number or a list of numbers: {hint}") from None

    if "," not in text and numbers[0] >= 0:
        count = numbers[0]
        if not 1 <= count <= num_blocks:
            raise ClipreelError(f"--layers {spec!r}: cannot take the last {count} blocks: {hint}")
        return tuple(range(num_blocks - count, num_blocks))

    blocks = []
    for number in numbers:
        if not -num_blocks <= number < num_blocks:
            raise ClipreelError(f"--layers {spec!r}: block {number} does not exist: {hint}")
        blocks.append(number % num_blocks)
    if len(set(blocks)) != len(blocks):
        raise ClipreelError(f"--layers {spec!r} names the same block twice: {hint}")
    return tuple(sorted(blocks))


def tapped_blocks(feature_blocks) -> tuple[int, ...]:
    """The blocks whose outputs the backbone taps: each feature block and the one before it.

    The output of block b-1 is the input of feature block b, from which its attention q/k (and so
    EVL's cross-frame attention maps) are computed.

    Block -1 stands for the input of block 0 (the output of ln_pre).
    """
    return tuple(sorted(set(feature_blocks) | {block - 1 for block in feature_blocks}))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def builtin_weights(model_name: str) -> Path | None:
    """The weights file shipped in the package for `model_name` (see BUILTIN_WEIGHTS), or None.

    The path may not exist (a build without the weights): `default_pretrained` checks.
    """
    filename = BUILTIN_WEIGHTS.get(model_name)
    if filename is None:
        return None
    package_dir = resources.files("clipreel")  # a pathlib.Path: clipreel installs as files, never zipped
    return Path(package_dir / "weights" / filename)


def default_pretrained(model_name: str) -> str:
    """What --pretrained default means for `model_name`: its built-in weights file, else "openai".

    Raises ClipreelError when the model has neither (say what to pass instead), or when its
    built-in file is missing from this installation.
    """
    shipped = builtin_weights(model_name)
    if shipped is not None:
        if not shipped.is_file():
            raise ClipreelError(
                f"the built-in weights of {model_name} ({shipped}) are missing from this installation: "
                f"reinstall clipreel, or rebuild them with: python -m clipreel.pipeline.synth_clip --out {shipped}"
            )
        return str(shipped)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if "openai" in tags:
        return "openai"
    known = f"its tags: {', '.join(tags)}" if tags else "it has no download tags"
    raise ClipreelError(
        f"--pretrained default: {model_name} has no built-in weights and no 'openai' tag ({known}). "
        f"{LOCAL_WEIGHTS_HINT}, or name one of its tags. Models with built-in weights: "
        f"{', '.join(BUILTIN_WEIGHTS)}."
    )


def load_clip(
    model_name: str, pretrained: str, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, str | None]:
    """The full open_clip CLIP (both towers), frozen and in eval mode, on `device`.

    Returns (model, checkpoint sha256 or None). `pretrained` is an open_clip tag, a local file,
    "none" or "default" (the model's built-in weights file, else its "openai" tag: see
    `default_pretrained`). Local files are read here rather than by open_clip, because open_clip
    3.3 cannot open OpenAI's TorchScript archives (it loads with weights_only=True) and does not
    notice that OpenAI weights need QuickGELU; for the same reason a tag whose weights were
    trained with QuickGELU (e.g. "openai") gets it, whatever the model config says.
    """
    name = resolve_model_name(model_name)
    sha256 = None
    if pretrained.lower() == "default":
        pretrained = default_pretrained(name)
    if pretrained.lower() == "none":
        # Seeded: every actor of a job, and every re-run, must build the same random model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _untrained_model(name)
    elif Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser()
        model = _model_from_file(name, path)
        sha256 = file_sha256(path)
    elif _looks_like_path(pretrained):
        raise ClipreelError(f"--pretrained {pretrained}: no such file. {LOCAL_WEIGHTS_HINT}.")
    else:
        model = _model_from_tag(name, pretrained)
    model.eval()
    model.requires_grad_(False)
    return model.to(device), sha256


def resolve_model_name(model_name: str) -> str:
    """The open_clip config name for `model_name` ("ViT-B/16" -> "ViT-B-16"), or a helpful error."""
    builtin = register_builtin_models()
    name = model_name.replace("/", "-")
    known = open_clip.list_models()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    raise ClipreelError(
        f"--model {model_name!r} is not an open_clip model. "
        f"Close names: {', '.join(close) or 'none'}. Built-in tiny models: {', '.join(builtin)}. "
        "All names: python -c 'import open_clip; print(open_clip.list_models())'"
    )


def _looks_like_path(pretrained: str) -> bool:
    """A missing file rather than a tag: has a directory part or a checkpoint suffix."""
    suffixes = (".pt", ".pth", ".bin", ".safetensors")
    return os.sep in pretrained or "/" in pretrained or pretrained.lower().endswith(suffixes)


def _model_from_tag(name: str, tag: str) -> torch.nn.Module:
    """open_clip's own download-and-cache path, failing fast and clearly when it cannot download."""
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"its tags: {', '.join(tags)}" if tags else "it has no download tags"
        raise ClipreelError(
            f"--pretrained {tag!r} is neither a file nor a known weights tag of {name} ({known}). "
            f"{LOCAL_WEIGHTS_HINT}."
        )
    host = _unreachable_download_host(tag_cfg)
    if host is not None:
        raise ClipreelError(
            f"cannot download the {tag!r} weights of {name}: {host} is not reachable (no network?). "
            f"{LOCAL_WEIGHTS_HINT}. If the weights are already in your Hugging Face cache, "
            "set HF_HUB_OFFLINE=1 to use them."
        )
    try:
        return open_clip.create_model(
            name, pretrained=tag, force_quick_gelu=tag_cfg.get("quick_gelu", False)
        )
    except RuntimeError as exc:  # open_clip reports every failed download as a RuntimeError
        reason = str(exc).rstrip(". ")
        raise ClipreelError(f"could not load the {tag!r} weights of {name}: {reason}. {LOCAL_WEIGHTS_HINT}.") from exc


def _unreachable_download_host(tag_cfg: dict) -> str | None:
    """The host open_clip would download this tag from, if it cannot be reached; else None.

    Without this check an offline machine spends ~45 s in huggingface_hub's retries before
    failing. The check is skipped when it could be wrong or is not needed: under HF_HUB_OFFLINE
    (open_clip then reads the local cache only), behind a proxy, or for a tag naming a file.
    """
    proxy_set = any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if os.environ.get("HF_HUB_OFFLINE") or proxy_set or tag_cfg.get("file"):
        return None
    if tag_cfg.get("hf_hub") and has_hf_hub():  # open_clip prefers the hub
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    else:
        host = urlparse(tag_cfg.get("url", "")).hostname
    if not host:
        return None
    try:
        with socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS):
            return None
    except OSError:
        return host


def _untrained_model(name: str, **options) -> torch.nn.Module:
    """open_clip's model without weights, minus its warning that none were loaded (we load them
    ourselves, or chose random init on purpose)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(name, pretrained=None, **options)
    finally:
        root.setLevel(level)


def _model_from_file(name: str, path: Path) -> torch.nn.Module:
    """Build `name` and load a local checkpoint into it (strict: every tensor must fit)."""
    state_dict = _read_state_dict(path)
    openai_format = OPENAI_METADATA_KEYS[0] in state_dict
    for key in OPENAI_METADATA_KEYS:
        state_dict.pop(key, None)
    model = _untrained_model(name, force_quick_gelu=openai_format)
    # TorchScript archives also hold non-persistent buffers (e.g. the text causal mask); the
    # model builds its own.
    rebuilt_buffers = {key for key, _ in model.named_buffers()} - set(model.state_dict())
    for key in rebuilt_buffers:
        state_dict.pop(key, None)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        details = "\n".join(str(exc).splitlines()[:6])
        raise ClipreelError(
            f"{path} does not hold weights for model {name}: check that --model matches the "
            f"checkpoint.\n{details}"
        ) from exc
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file -> its state dict: .safetensors, a torch.save file, or a TorchScript archive.

    Training checkpoints that wrap the weights as {"state_dict": ...} and DDP "module." prefixes
    are unwrapped.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(path, device="cpu")
        elif _is_torchscript_archive(path):
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": still the only reader
                warnings.simplefilter("ignore", FutureWarning)
                state_dict = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ClipreelError(
            f"{path}: cannot read it as a checkpoint ({type(exc).__name__}: {exc}). Expected a "
            "state dict saved with torch.save, a TorchScript archive (OpenAI CLIP) or a .safetensors file."
        ) from exc
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not state_dict:
        raise ClipreelError(f"{path}: holds no state dict (got {type(state_dict).__name__}).")
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips hold a constants.pkl record; torch.save zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(record.split("/")[-1] == "constants.pkl" for record in archive.namelist())


def _check_supported_vit(visual: torch.nn.Module, name: str) -> None:
    """Refuse image towers whose blocks cannot be tapped the way `Backbone` does."""
    why = None
    if not isinstance(visual, VisionTransformer):
        why = f"its image tower is a {type(visual).__name__}, not an open_clip VisionTransformer"
    elif visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        why = "it pools with attention instead of keeping a class token"
    elif not visual.transformer.batch_first:
        why = "its transformer is not batch-first"
    else:
        for block in visual.transformer.resblocks:
            attn = getattr(block, "attn", None)
            if not isinstance(block, ResidualAttentionBlock) or not isinstance(attn, torch.nn.MultiheadAttention):
                why = f"its blocks are {type(block).__name__}, not standard attention blocks"
            elif not attn._qkv_same_embed_dim or attn.in_proj_bias is None:
                why = "its attention has no packed, biased q/k/v projection"
            if why is not None:
                break
    if why is not None:
        raise ClipreelError(
            f"--model {name}: {why}. clipreel taps standard open_clip ViTs (e.g. ViT-B-16, ViT-L-14)."
        )


class ClipFeatures(NamedTuple):
    """One batch of clips as the feature store keeps it (see Backbone.forward_clips)."""

    tokens: torch.Tensor  # (B, T, K, L, D)
    embeds: torch.Tensor  # (B, T, E)
    attention: torch.Tensor | None  # (B, 2, T-1, K, P, P)


class Backbone:
    """A frozen open_clip ViT: tapped block tokens, frame embeddings, EVL's cross-frame attention.

    `forward` works on frames and returns the tokens of the tapped blocks (the feature blocks and
    their inputs); `forward_clips` works on clips and returns what the feature store keeps.

    Read-only facts: model_name, image_size (S), patch_size, num_blocks, width (D), num_heads,
    tokens (L, incl. CLS), embed_dim (E), feature_blocks, tapped_blocks, mean, std, device,
    autocast_dtype (None = plain fp32), checkpoint_sha256, config.
    """

    def __init__(self, cfg: BackboneConfig):
        self.config = cfg
        self.device = resolve_device(cfg.device)
        self.autocast_dtype = _resolve_autocast_dtype(cfg.precision, self.device)
        self.model_name = resolve_model_name(cfg.model)
        self.clip, self.checkpoint_sha256 = load_clip(self.model_name, cfg.pretrained, self.device)
        self.visual = self.clip.visual
        _check_supported_vit(self.visual, self.model_name)

        blocks = self.visual.transformer.resblocks
        height, width = self.visual.image_size
        if height != width:
            raise ClipreelError(f"--model {self.model_name}: non-square input {height}x{width} is not supported.")
        grid_height, grid_width = self.visual.grid_size
        self.image_size = int(height)
        self.patch_size = int(self.visual.patch_size[0])
        self.num_blocks = len(blocks)
        self.width = int(self.visual.transformer.width)
        self.num_heads = int(blocks[0].attn.num_heads)
        self.tokens = grid_height * grid_width + 1
        self.embed_dim = int(self.visual.output_dim)
        self.quick_gelu = isinstance(blocks[0].mlp.gelu, QuickGELU)
        self.feature_blocks = parse_layers(cfg.layers, self.num_blocks)
        self.tapped_blocks = tapped_blocks(self.feature_blocks)
        self.mean, self.std = _resolve_norm(cfg.norm, self.clip)
        self._qk_weights: dict[str, torch.Tensor] | None = None  # on self.device, for forward_clips

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised frames (F, 3, S, S) -> tokens (F, K_s, L, D) and embeddings (F, E), float32.

        tokens[:, k] belongs to tapped_blocks[k]; each frame's tokens are CLS first, then the
        patches row-major. The embeddings are ln_post + proj of CLS, not L2-normalised. Both are
        returned on `self.device`.
        """
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected frames (F, 3, {self.image_size}, {self.image_size}), got {tuple(frames.shape)}"
            )
        frames = frames.to(self.device, dtype=torch.float32, non_blocking=True)
        block_outputs = [block for block in self.tapped_blocks if block >= 0]
        block_zero_inputs = []  # filled by the hook: [(F, L, D)]
        hook = None
        if -1 in self.tapped_blocks:
            hook = self.visual.transformer.resblocks[0].register_forward_pre_hook(
                lambda module, args: block_zero_inputs.append(args[0])
            )
        try:
            with torch.no_grad(), self._autocast():
                out = self.visual.forward_intermediates(
                    frames, indices=block_outputs, output_fmt="NLC", output_extra_tokens=True
                )
        finally:
            if hook is not None:
                hook.remove()
        # forward_intermediates splits each block output into the CLS token (F, 1, D) and the
        # patches (F, L-1, D), in block order.
        outputs = [
            torch.cat([cls, patches], dim=1)  # (F, L, D)
            for cls, patches in zip(out["image_intermediates_prefix"], out["image_intermediates"])
        ]
        tokens = torch.stack(block_zero_inputs + outputs, dim=1).float()  # (F, K_s, L, D)
        embeds = out["image_features"].float()  # (F, E)
        return tokens, embeds

    def forward_clips(self, clips: torch.Tensor) -> ClipFeatures:
        """Normalised clips (B, T, 3, S, S) -> what the feature store keeps for them.

        tokens (B, T, K, L, D): outputs of the feature blocks; embeds (B, T, E); attention
        (B, 2, T-1, K, P, P): EVL's head-averaged cross-frame attention maps of each feature block,
        computed from its input tokens with its frozen ln_1 + q/k projection (None when T == 1).
        All float32 on `self.device`.
        """
        from clipreel.heads.evl import cross_frame_attention_from_inputs

        batch, frames = clips.shape[:2]
        tapped, embeds = self.forward(clips.flatten(0, 1))  # (B*T, K_t, L, D), (B*T, E)
        tapped = tapped.unflatten(0, (batch, frames))  # (B, T, K_t, L, D)
        outputs = [self.tapped_blocks.index(block) for block in self.feature_blocks]
        attention = None
        if frames >= 2:
            if self._qk_weights is None:
                self._qk_weights = {name: torch.as_tensor(value, device=self.device)
                                    for name, value in self.qk_weights().items()}
            inputs = [self.tapped_blocks.index(block - 1) for block in self.feature_blocks]
            attention = cross_frame_attention_from_inputs(tapped[:, :, inputs], self._qk_weights)
        return ClipFeatures(tapped[:, :, outputs], embeds.unflatten(0, (batch, frames)), attention)

    def qk_weights(self) -> dict[str, np.ndarray]:
        """What recomputes each FEATURE block's attention q/k from its stored input, as float32.

        For feature block k with input tokens x (L, D) (= the stored tokens of block b-1):
            h = layer_norm(x, ln_weight[k], ln_bias[k], eps=ln_eps)
            q, k = split(h @ in_proj_weight[k].T + in_proj_bias[k], D)   # (L, D) each
        then view q, k as (L, num_heads, D/num_heads); the attention logits are q.k / sqrt(D/H)
        (q and k here are before that scaling).
        """
        blocks = [self.visual.transformer.resblocks[block] for block in self.feature_blocks]
        rows = 2 * self.width  # the q rows, then the k rows, of the packed q/k/v projection

        def stacked(tensors) -> np.ndarray:
            return torch.stack([tensor.detach().float().cpu() for tensor in tensors]).numpy()

        return {
            "ln_weight": stacked(block.ln_1.weight for block in blocks),  # (K, D)
            "ln_bias": stacked(block.ln_1.bias for block in blocks),  # (K, D)
            "in_proj_weight": stacked(block.attn.in_proj_weight[:rows] for block in blocks),  # (K, 2D, D)
            "in_proj_bias": stacked(block.attn.in_proj_bias[:rows] for block in blocks),  # (K, 2D)
            "ln_eps": np.array(blocks[0].ln_1.eps, dtype=np.float32),
            "num_heads": np.array(self.num_heads, dtype=np.int64),
        }

    def provenance(self) -> dict:
        """Everything that decides what the stored numbers mean, JSON-ready (lists, not tuples)."""
        pretrained = self.config.pretrained
        if Path(pretrained).expanduser().is_file():
            pretrained = Path(pretrained).name
        return {
            "model": self.model_name,
            "pretrained": pretrained,
            "checkpoint_sha256": self.checkpoint_sha256,
            "activation": "quick_gelu" if self.quick_gelu else "gelu",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "width": self.width,
            "num_heads": self.num_heads,
            "tokens": self.tokens,
            "embed_dim": self.embed_dim,
            "num_blocks": self.num_blocks,
            "feature_blocks": list(self.feature_blocks),
            "norm": self.config.norm,
            "mean": list(self.mean),
            "std": list(self.std),
            "token_layout": TOKEN_LAYOUT,
            "precision": self.config.precision,
        }

    def _autocast(self):
        """Mixed precision around the forward when asked for (weights stay fp32)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)




def _resolve_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """auto = fp32 on CPU (bf16 is several times slower there), bf16 on CUDA (fp16 where bf16 is missing)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ClipreelError(f"precision {precision!r}: choose auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def _resolve_norm(norm: str | None, model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a named normalisation, or the model's own (CLIP statistics for CLIP weights)."""
    if norm is None:
        preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
        return tuple(map(float, preprocess_cfg["mean"])), tuple(map(float, preprocess_cfg["std"]))
    if norm not in NORMS:
        raise ClipreelError(f"norm {norm!r} is unknown: choose one of {', '.join(NORMS)}")
    mean, std = NORMS[norm]
    return tuple(mean), tuple(std)
