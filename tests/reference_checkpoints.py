"""Checkpoints in the layouts the reference repositories save, made from tiny models for the
converter and import tests: OpenAI's CLIP archive, X-CLIP's training checkpoint (and its weights
under transformers' names), ViFi-CLIP's and EZ-CLIP's training checkpoints; and random values for every saved tensor of a model, so that no zero-initialised weight hides a
wrong key. Imports torch and clipreel.heads only."""

from __future__ import annotations

import torch

from clipreel.heads.checkpoints import OPENAI_ARCHIVE_BUFFERS
from clipreel.heads.convert.xclip_hf import hf_sources
from clipreel.heads.raw.ezclip import reference_key

# The CLIP keys of ViFi-CLIP's text_encoder (trainers/vificlip.py, TextEncoder): the text tower
# without its token table, which the prompt learner holds.
VIFI_TEXT_KEYS = ("transformer.", "positional_embedding", "ln_final.", "text_projection")


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Non-trivial values for every saved float tensor (zeros-initialised ones included), in place;
    rebuilt buffers such as the text attention mask are left alone."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():  # views of the parameters and persistent buffers
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)


def openai_state_dict(clip: torch.nn.Module, image_size: int) -> dict:
    """The CLIP as OpenAI's archives hold it: the state dict plus the archive's metadata entries."""
    weights = dict(clip.state_dict())
    weights.update({key: torch.tensor(value) for key, value in zip(OPENAI_ARCHIVE_BUFFERS, (image_size, 77, 49408))})
    return weights


def xclip_official(model: torch.nn.Module, clip: torch.nn.Module) -> dict:
    """X-CLIP's released layout (`{"model": ...}`, no `module.`) of a clipreel XCLIP and its text tower."""
    weights = {key: value for key, value in clip.state_dict().items() if not key.startswith("visual.")}
    for key, value in model.state_dict().items():
        weights[key.removeprefix("head.")] = value
    return {"model": weights, "epoch": 29, "max_accuracy": 0.5}


def xclip_hf_layout(weights: dict) -> dict:
    """X-CLIP's weights under transformers' XCLIPModel names (q/k/v split, Linear projections
    transposed), along the mapping the importer documents; contiguous, as safetensors saves them."""
    hf = {}
    for key, value in weights.items():
        kind, targets = hf_sources(key)
        if kind == "transposed":
            hf[targets[0]] = value.t().contiguous()
        elif kind == "fused":
            hf.update({target: part.contiguous() for target, part in zip(targets, value.chunk(3))})
        else:
            hf[targets[0]] = value.contiguous()
    return hf


def vifi_official(clip: torch.nn.Module, extra: dict) -> dict:
    """ViFi-CLIP's layout (`model`, `module.` keys) of a CLIP: image_encoder, text_encoder (no token
    table), logit_scale; `extra` adds the prompt learner's entries (without `module.`)."""
    weights = {}
    for key, value in clip.state_dict().items():
        if key.startswith("visual."):
            weights["module.image_encoder." + key.removeprefix("visual.")] = value
        elif key.startswith(VIFI_TEXT_KEYS):
            weights["module.text_encoder." + key] = value
    weights["module.logit_scale"] = clip.logit_scale.detach().clone()
    weights.update({"module." + key: value for key, value in extra.items()})
    return {"model": weights, "epoch": 10, "max_accuracy": 0.5}


def round_to_fp16(*modules: torch.nn.Module) -> None:
    """Every float tensor of the modules' state dicts rounded to fp16 values, in place (the values a
    checkpoint saved in fp16 holds exactly)."""
    with torch.no_grad():
        for module in modules:
            for tensor in module.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())


def ezclip_official(clip: torch.nn.Module, model: torch.nn.Module) -> dict:
    """EZ-CLIP's training dict of a clipreel EZCLIPClassifier and its CLIP: `model_state_dict` in fp16
    under EZ-CLIP's key names, beside the epoch and an optimizer state."""
    weights = {key: value.half() for key, value in clip.state_dict().items()}
    weights.update({reference_key(key.removeprefix("ezclip.")): value.half() for key, value in model.state_dict().items()})
    return {"epoch": 42, "model_state_dict": weights, "optimizer_state_dict": {"state": {}, "param_groups": []}}
