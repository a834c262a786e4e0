"""The feature store's 8-bit codes in torch: encoded where the backbone runs, handed on as code tensors.

The format is stores/encoding.py's (numpy, for any reader of a store); `encode_field` is its torch
twin and gives the same bits, so that the extraction writers encode a batch on the model's device
(a GPU sends 8-bit codes to the CPU, not float32). `as_code_tensor` turns stored codes into the
tensors the training loader hands on; the heads decode them (heads/cache/inputs.py).

    codes, scales = encode_field("tokens", tokens, "int8")   # (..., D) float -> int8 codes, float16 scales
    tensor = as_code_tensor(codes, "float8", "tokens")      # float8 bit patterns -> a float8_e4m3fn tensor

As encoding.encode: the scale is the group's largest magnitude rounded to float16 (1 for a group
of zeros), the step is scale / top in float32, and a code is the scaled value rounded to nearest
even (int8, uint8) or converted to float8 E4M3FN.

May import: torch, clipreel.errors, clipreel.stores (encoding).
"""

from __future__ import annotations

import torch

from clipreel.errors import ClipreelError
from clipreel.stores.encoding import E4M3_MAX, FLOAT8, UINT8, field_code, scale_block


def _groups(field: str, values: torch.Tensor) -> torch.Tensor:
    """The values that share one scale along the last axis: tokens (..., D) -> (..., D / block, block);
    attention maps (..., P, P) as they are (one scale per row)."""
    if field == "tokens":
        width = values.shape[-1]
        return values.unflatten(-1, (width // scale_block(width), scale_block(width)))
    return values


@torch.no_grad()
def encode_field(field: str, values: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float values of `field` (tokens (..., D) or attention (..., P, P)), on any device -> (codes, scales)
    as a store of `dtype` (int8 or float8) keeps them, on the same device (float8 codes as uint8).
    Raises ClipreelError for values that are not finite or beyond float16, or negative attention
    maps in an int8 store."""
    code = field_code(dtype, field)
    values = values.float()
    if not torch.isfinite(values).all():
        raise ClipreelError(f"{field} contains NaN or inf")
    if code == UINT8 and values.numel() and values.min() < 0:
        raise ClipreelError(f"{field} has negative values; its 8-bit codes are unsigned")
    groups = _groups(field, values)  # (..., groups, group size)
    scales = groups.abs().amax(dim=-1).to(torch.float16)  # (..., groups)
    if not torch.isfinite(scales).all():
        raise ClipreelError(f"{field} has values beyond float16's range, which readers return")
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    steps = scales.float() / code.top
    scaled = groups / steps.unsqueeze(-1)
    if code == FLOAT8:
        codes = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        low = 0 if code == UINT8 else -code.top
        codes = scaled.round().clamp(low, code.top).to(torch.int8 if code.storage_dtype == "int8" else torch.uint8)
    return codes.reshape(values.shape), scales


def as_code_tensor(codes, dtype: str, field: str) -> torch.Tensor:
    """Stored codes (a numpy array or tensor) of `field` in a store of `dtype` as a code tensor: float8
    codes viewed as float8_e4m3fn, so that their dtype says how to decode them."""
    codes = torch.as_tensor(codes)
    return codes.view(torch.float8_e4m3fn) if field_code(dtype, field) == FLOAT8 else codes
