"""What a cache head reads from a batch: a field, or one feature block of it, as float values.

A batch from a float16 store holds tokens and attention maps as float tensors. A batch from an
8-bit store holds them as code tensors with their scales (`FIELD_scale`, stores/encoding.py), and
the head decodes what it uses, where the batch is (a GPU receives codes, half the bytes of
float16) and straight into its own dtype, one feature block at a time: on a CPU, decoding an int8
block into float32 costs less than casting a float16 block to float32.

    block_values(batch, "tokens", k, torch.float32)   # (B, T, L, D): feature block k, either kind of batch
    decode_field("tokens", codes, scales)             # a whole field, float16 by default

A code tensor says its code by its dtype: int8 (tokens of int8 stores), uint8 (attention maps of
int8 stores) or float8_e4m3fn (float8 stores). Decoding is encoding.decode's arithmetic (value =
code * (scale / top) in float32, then rounded to the output dtype), so float16 output has the
same bits as `FeatureStore.read`.

May import: torch, numpy (through the stores' tables), clipreel.stores.encoding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from clipreel.stores.encoding import (
    E4M3_VALUES,
    FLOAT8,
    INT8,
    SCALE_SUFFIX,
    UINT8,
    scale_block,
)

CODES = {torch.int8: INT8, torch.uint8: UINT8, torch.float8_e4m3fn: FLOAT8}  # a code tensor's dtype -> its code
# Where the feature-block axis K is in a head's batch: tokens (B, T, K, L, D), attention (B, 2, T-1, K, P, P).
BLOCK_AXIS = {"tokens": 2, "attention": 3}


def block_values(batch: Mapping[str, torch.Tensor], field: str, position: int, dtype: torch.dtype) -> torch.Tensor:
    """Feature block `position` (along K) of `field` in `batch`, as `dtype`: cast from float values,
    or decoded from 8-bit codes when the batch carries `FIELD_scale`."""
    axis = BLOCK_AXIS[field]
    values = batch[field].select(axis, position)
    scales = batch.get(field + SCALE_SUFFIX)
    if scales is None:
        return values.to(dtype)
    return decode_field(field, values, scales.select(axis, position), dtype)


def decode_field(field: str, codes: torch.Tensor, scales: torch.Tensor,
                 out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Code tensor of `field` (tokens (..., D) or attention maps (..., P, P)) and its float16 scales
    -> values of `out_dtype`, on the codes' device."""
    code = CODES[codes.dtype]
    if code == FLOAT8 and codes.device.type == "cpu":  # torch converts float8 slowly on a CPU: a table look-up
        numbers = torch.from_numpy(E4M3_VALUES[codes.view(torch.uint8).numpy()])
    else:
        numbers = codes.float()  # exact for every code
    steps = scales.float() / code.top  # (..., groups)
    groups = numbers.unflatten(-1, (codes.shape[-1] // scale_block(codes.shape[-1]), -1)) if field == "tokens" else numbers
    groups.mul_(steps.unsqueeze(-1))  # numbers is a fresh tensor: scaled in place
    return numbers.to(out_dtype)
