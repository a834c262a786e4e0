"""The torch twins of the store's 8-bit encoding (extraction's encode, the heads' decode) give the
numpy definition's bits, and the heads read a feature block alike from values or from codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipreel.errors import ClipreelError
from clipreel.heads.cache.inputs import block_values, decode_field
from clipreel.pipeline.data.store_codes import as_code_tensor, encode_field
from clipreel.stores import encoding


def _tokens() -> np.ndarray:
    """(3, 4, 64) float32: random magnitudes, a block of zeros, exact ties and float8 midpoints."""
    rng = np.random.default_rng(7)
    tokens = (rng.standard_normal((3, 4, 64)) * rng.uniform(0.01, 50, (3, 4, 1))).astype(np.float32)
    tokens[0, 0, :32] = 0  # a block of zeros: scale 1, codes 0
    tokens[0, 1, :32] = np.linspace(-127, 127, 32).round() + 0.5  # halfway between int8 codes (scale ~127)
    tokens[0, 1, 0] = 127.5
    tokens[0, 2, 32:] = (encoding.E4M3_VALUES[40:72] + encoding.E4M3_VALUES[41:73]) / 2  # float8 midpoints
    tokens[0, 2, 63] = 448
    tokens[1, 0, :3] = [-0.0, 1e-30, -1e-30]
    return tokens


def _attention() -> np.ndarray:
    """(2, 3, 5, 5) softmax rows."""
    logits = np.random.default_rng(8).standard_normal((2, 3, 5, 5)).astype(np.float32) * 4
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


@pytest.mark.parametrize("dtype", ["int8", "float8"])
@pytest.mark.parametrize("field", ["tokens", "attention"])
def test_torch_encodes_and_decodes_bit_for_bit_as_numpy(dtype, field):
    values = _tokens() if field == "tokens" else _attention()
    code = encoding.field_code(dtype, field)
    codes, scales = encoding.encode(field, values, code)
    torch_codes, torch_scales = encode_field(field, torch.from_numpy(values), dtype)
    assert torch_codes.dtype == getattr(torch, code.storage_dtype) and torch_scales.dtype == torch.float16
    np.testing.assert_array_equal(torch_codes.numpy(), codes)
    np.testing.assert_array_equal(torch_scales.numpy(), scales)
    decoded = decode_field(field, as_code_tensor(codes, dtype, field), torch.from_numpy(scales))
    assert decoded.dtype == torch.float16
    np.testing.assert_array_equal(decoded.numpy(), encoding.decode(field, codes, scales, code))
    as_float32 = decode_field(field, as_code_tensor(codes, dtype, field), torch.from_numpy(scales), torch.float32)
    # float16 rounds to 11 bits, and below 2**-14 (small attention values) to steps of 2**-24
    np.testing.assert_allclose(as_float32.numpy(), decoded.numpy().astype(np.float32), rtol=2.0**-10, atol=2.0**-24)


@pytest.mark.parametrize("dtype", ["int8", "float8"])
def test_a_head_reads_a_feature_block_alike_from_values_and_from_codes(dtype):
    tokens = np.random.default_rng(3).standard_normal((2, 3, 4, 5, 64)).astype(np.float32)  # (B, T, K, L, D)
    code = encoding.field_code(dtype, "tokens")
    codes, scales = encoding.encode("tokens", tokens, code)
    decoded = encoding.decode("tokens", codes, scales, code)  # float16, as FeatureStore.read returns
    as_values = {"tokens": torch.from_numpy(decoded)}
    as_codes = {"tokens": as_code_tensor(codes, dtype, "tokens"), "tokens_scale": torch.from_numpy(scales)}
    for position in (0, 3, -1):
        from_values = block_values(as_values, "tokens", position, torch.float32)
        from_codes = block_values(as_codes, "tokens", position, torch.float32)
        assert from_codes.shape == (2, 3, 5, 64) and from_codes.dtype == torch.float32
        # Decoded straight to float32, the codes skip float16's rounding (2**-11 relative).
        torch.testing.assert_close(from_codes, from_values, rtol=2.0**-10, atol=0)
        np.testing.assert_array_equal(block_values(as_codes, "tokens", position, torch.float16).numpy(),
                                      decoded[:, :, position])


def test_encode_field_refuses_what_the_store_cannot_hold():
    with pytest.raises(ClipreelError, match="NaN or inf"):
        encode_field("tokens", torch.full((2, 64), float("inf")), "int8")
    with pytest.raises(ClipreelError, match="beyond float16"):
        encode_field("tokens", torch.full((2, 64), 1e6), "float8")
    with pytest.raises(ClipreelError, match="negative"):
        encode_field("attention", -torch.from_numpy(_attention()), "int8")
