"""The feature store's 8-bit codes in torch: encoded on the extraction device, decoded on the training one.

The format is stores/encoding.py's (which is numpy, for any reader of a store); these are its
torch twins, giving the same bits: the extraction actors encode a batch where the backbone ran (a
GPU sends 8-bit codes to the CPU, not float32), and the training step decodes a batch where the
head runs (a GPU receives codes, half the bytes of float16, and casts them itself).

    codes, scales = encode_field("tokens", tokens, "int8")   # (B, ..., D) float -> int8 codes, float16 scales
    values = decode_field("tokens", as_code_tensor(codes, "int8", "tokens"), scales)  # -> float16
    batch = batch_to_device(batch, device)                   # a loader batch: moved, 8-bit fields decoded there

A code tensor says its code by its dtype: int8 (tokens of int8 stores), uint8 (attention maps of
int8 stores) or float8_e4m3fn (float8 stores, whose uint8 bit patterns `as_code_tensor` views as
such), so a batch decodes without knowing its store.

Both compute as encoding.encode/decode do: the scale is the group's largest magnitude rounded to
float16 (1 for a group of zeros), the step is scale / top in float32, a code is the scaled value
rounded to nearest even (int8, uint8) or converted to float8 E4M3FN, and a value is code * step
in float32, rounded to float16.

May import: torch, clipreel.errors, clipreel.stores (encoding).
"""

from __future__ import annotations

import torch

from clipreel.errors import ClipreelError
from clipreel.stores.encoding import E4M3_MAX, FLOAT8, INT8, SCALE_SUFFIX, UINT8, field_code, scale_block

CODES = {torch.int8: INT8, torch.uint8: UINT8, torch.float8_e4m3fn: FLOAT8}  # a code tensor's dtype -> its code


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
    as a store of `dtype` (int8 or float8) keeps them, on the same device. Raises ClipreelError for
    values that are not finite or beyond float16, or negative attention maps in an int8 store."""
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
        codes = scaled.round().clamp(low, code.top).to(getattr(torch, code.storage_dtype))
    return codes.reshape(values.shape), scales


def as_code_tensor(codes, dtype: str, field: str) -> torch.Tensor:
    """Stored codes (a numpy array or tensor) of `field` in a store of `dtype` as a code tensor: float8
    codes viewed as float8_e4m3fn, so that their dtype says how to decode them."""
    codes = torch.as_tensor(codes)
    return codes.view(torch.float8_e4m3fn) if field_code(dtype, field) == FLOAT8 else codes


def decode_field(field: str, codes: torch.Tensor, scales: torch.Tensor,
                 out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A code tensor of `field` (see as_code_tensor) and its scales -> values (float16 by default), on
    the codes' device."""
    code = CODES[codes.dtype]
    steps = scales.float() / code.top  # (..., groups)
    numbers = codes.float()  # exact for every code
    values = _groups(field, numbers) * steps.unsqueeze(-1)  # (..., groups, group size)
    return values.reshape(codes.shape).to(out_dtype)


def decode_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch whose 8-bit fields are code tensors with their `FIELD_scale` tensors -> the same batch
    with those fields decoded to float16 (and no scales), where the tensors are."""
    decoded = {name: tensor for name, tensor in batch.items() if not name.endswith(SCALE_SUFFIX)}
    for name in batch:
        if name.endswith(SCALE_SUFFIX):
            field = name.removesuffix(SCALE_SUFFIX)
            decoded[field] = decode_field(field, batch[field], batch[name])
    return decoded


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A loader batch on `device`, its 8-bit fields (if still encoded) decoded there: a GPU receives
    the codes and casts them itself."""
    return decode_batch({name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()})
