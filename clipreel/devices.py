"""Naming the torch device a stage runs on."""

from __future__ import annotations

import torch

from clipreel.errors import ClipreelError


def resolve_device(name: str) -> torch.device:
    """"auto" (cuda if there is a GPU, else cpu), "cpu", "cuda" or "cuda:N" -> a torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ClipreelError(f"--device {name!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClipreelError(f"--device {name!r}: no CUDA GPU is available here; use --device cpu")
    return device
