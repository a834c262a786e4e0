"""A local weights file for the benchmarks: what a user's checkpoint costs to load, without a download."""

from __future__ import annotations

from pathlib import Path


def write_weights_file(model: str, folder: Path) -> Path:
    """The model's seeded random weights (`--pretrained none`) as FOLDER/MODEL.safetensors."""
    from safetensors.torch import save_file

    from clipreel.heads.clip import load_clip, register_builtin_models

    register_builtin_models()
    clip, _ = load_clip(model, "none")
    path = folder / f"{model}.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in clip.state_dict().items()}, path)
    return path
