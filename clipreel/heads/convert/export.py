"""A fine-tuned model that is still a plain CLIP -> an open_clip checkpoint.

ViFi-CLIP fine-tunes CLIP's towers and adds nothing to them, so its weights (trained in clipreel
or imported) are an open_clip CLIP: `export_open_clip` writes them as a safetensors file that
`open_clip.create_model(NAME, pretrained=FILE)` loads (open_clip's `load_checkpoint` reads
`.safetensors` with `safetensors.torch.load_file` and loads strictly), and the model config
beside it as `FILE` with `.json`, so that `open_clip.add_model_config(JSON)` registers NAME
(the file's stem). The other methods change what the towers compute and are refused with the reason.

May import: torch, safetensors, clipreel.errors, clipreel.heads.convert.*.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file

from clipreel.errors import ClipreelError
from clipreel.heads.convert.clip_layout import TextFacts, VisionFacts, clip_shapes
from clipreel.heads.convert.common import check_layout

EXPORTABLE = ("vifi",)
WHY_NOT = {
    "prompt": "bridge-and-prompt inserts learned prompt tokens inside both towers, which a plain open_clip CLIP has "
    "no place for; export the ViFi-CLIP model it was trained on instead",
    "xclip": "X-CLIP adds cross-frame message tokens inside every image block, a multi-frame transformer and a "
    "video-specific prompt generator, none of which a plain open_clip CLIP has",
    "ezclip": "EZ-CLIP adds temporal prompts and adapters inside every block of both towers, which a plain "
    "open_clip CLIP has no place for",
    "evl": "EVL trains a decoder over the tokens of a frozen CLIP that it never changes: that CLIP is the base "
    "checkpoint itself, and the decoder has no open_clip form",
}
PREFIX = "clip."  # ViFiCLIP.state_dict() keeps the CLIP under `clip`


def export_open_clip(method: str, state_dict: Mapping, clip_config: Mapping, out: str | Path) -> Path:
    """Write a ViFi-CLIP model's CLIP to `out` (.safetensors) and its open_clip config to `out` with
    `.json`; returns the config's path.

    `state_dict` is `ViFiCLIP.state_dict()` (or an import's `state_dict`), `clip_config` the
    open_clip model config of its CLIP (an import's `clip_config`, or the run's model config with
    its activation); every tensor is checked against that config before anything is written.
    """
    if method not in EXPORTABLE:
        reason = WHY_NOT.get(method, "it is not one of clipreel's methods")
        raise ClipreelError(
            f"cannot export a {method!r} model as an open_clip checkpoint: {reason}. Only a ViFi-CLIP model "
            "(fine-tuned in clipreel or imported) is still a plain CLIP."
        )
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ClipreelError(f"--out {out}: the open_clip checkpoint is written as safetensors; name it *.safetensors.")
    weights = {key[len(PREFIX) :]: value for key, value in state_dict.items() if key.startswith(PREFIX)}
    vision, text = _facts_of(clip_config)
    check_layout(
        weights, clip_shapes(vision, text), "the ViFi-CLIP model",
        f"the open_clip config: image width {vision.width}, {vision.layers} image and {text.layers} text layers",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.detach().float().contiguous().clone() for key, value in weights.items()}, str(out))
    config_path = out.with_suffix(".json")
    config_path.write_text(json.dumps(dict(clip_config), indent=2) + "\n")
    return config_path


def _facts_of(clip_config: Mapping) -> tuple[VisionFacts, TextFacts]:
    """The tower sizes an open_clip model config describes (open_clip's defaults where it is silent)."""
    vision_cfg, text_cfg = clip_config["vision_cfg"], clip_config["text_cfg"]
    embed_dim = clip_config["embed_dim"]
    width, text_width = vision_cfg.get("width", 768), text_cfg.get("width", 512)
    vision = VisionFacts(
        vision_cfg.get("image_size", 224), vision_cfg.get("patch_size", 16), width, vision_cfg.get("layers", 12),
        int(width * vision_cfg.get("mlp_ratio", 4.0)), embed_dim,
    )
    text = TextFacts(
        text_cfg.get("context_length", 77), text_cfg.get("vocab_size", 49408), text_width, text_cfg.get("layers", 12),
        int(text_width * text_cfg.get("mlp_ratio", 4.0)), embed_dim,
    )
    return vision, text
