"""How a feature store keeps its tokens and attention maps: float16, or 8-bit codes with scales.

A store's `dtype` (`clipreel extract --dtype`) is one of:

    float16   tokens and attention maps as float16 values (no scales)
    int8      tokens: int8 codes in [-127, 127], value = code / 127 * scale, one scale per block of
              32 channels of a token (the token's largest magnitude in that block);
              attention maps: uint8 codes in [0, 255], value = code / 255 * scale, one scale per
              map row (the row's largest value)
    float8    the same scales, with float8 E4M3 codes (OCP 8-bit floating point, "E4M3FN": 4
              exponent bits, 3 mantissa bits, no infinities, largest finite 448) kept as their
              uint8 bit patterns: value = e4m3(code) / 448 * scale

Scales are float16 arrays of their own (`tokens_scale` (V, T, K, L, D / block),
`attention_scale` (V, 2, T-1, K, P)): the largest magnitude of their block or row, rounded to
float16, and 1 for a block of zeros, so every scale is finite and positive. Decoding is one float32
multiply, code * (scale / top), then a round to float16: readers return float16 values, as a
float16 store holds them. `encode` and `decode` here are the numpy definition; their torch twins
give the same bits: the extraction writers encode on the model's device
(`pipeline/data/store_codes.py`), and the heads decode the codes the training loader hands them,
on their device (`heads/cache/inputs.py`).

Why these choices (measured on clipreel-synth's activations of the synthetic world, see
docs/store.md "8-bit storage"): int8 with a scale per 32 channels kept the relative error of the
tokens at 0.5% and stayed within 1.5% when outliers were injected (a few huge channels in every
token, or huge values in a few tokens), where a scale per token or per channel degraded 2.5x to
30x; float8 errs 4-5x more than int8 at any granularity. Attention rows are softmax rows (values
near 1/P, row maxima from 0.02 to 0.9), so a scale per row puts each row's largest value on the
top code: 0.7% relative error against 1.2% for float8 with the same scales, 2.5% for a fixed
scale.

Imports numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipreel.errors import ClipreelError

STORE_DTYPES = ("float16", "int8", "float8")
DEFAULT_DTYPE = "float16"
SCALE_BLOCK = 32  # channels of a token sharing one scale (widths that 32 does not divide: the whole token)
ENCODED_FIELDS = ("tokens", "attention")  # the fields that 8-bit stores keep as codes + scales
SCALE_SUFFIX = "_scale"  # the array of a field's scales: tokens_scale, attention_scale
FLOAT16_MAX = 65504.0

# The bit pattern -> value table of float8 E4M3FN (1 sign, 4 exponent bits of bias 7, 3 mantissa
# bits; exponent 0 is subnormal; 0x7F and 0xFF are NaN, the format has no infinities).
_E4M3_BITS = np.arange(256, dtype=np.int64)
_E4M3_EXPONENT = (_E4M3_BITS >> 3) & 0xF
_E4M3_MANTISSA = (_E4M3_BITS & 0x7).astype(np.float64)
_E4M3_MAGNITUDE = np.where(
    _E4M3_EXPONENT == 0,
    _E4M3_MANTISSA / 8 * 2.0**-6,
    (1 + _E4M3_MANTISSA / 8) * 2.0 ** (_E4M3_EXPONENT - 7),
)
_E4M3_MAGNITUDE[(_E4M3_EXPONENT == 15) & (_E4M3_MANTISSA == 7)] = np.nan
E4M3_VALUES = np.where(_E4M3_BITS >= 128, -_E4M3_MAGNITUDE, _E4M3_MAGNITUDE).astype(np.float32)  # (256,)
E4M3_NAN_CODES = (0x7F, 0xFF)
E4M3_MAX = 448.0
_E4M3_POSITIVE = E4M3_VALUES[:127]  # codes 0x00..0x7E: 0 up to 448, increasing


@dataclass(frozen=True)
class FieldCode:
    """How one field of a store is kept: its codes' kind and array dtype, and the value of the top code.

    kind: "float16" (plain values), "int8" (signed codes), "uint8" (unsigned codes) or
    "float8_e4m3fn"; top: the code whose value is the scale (127, 255 or 448), None for float16.
    """

    kind: str
    storage_dtype: str
    top: float | None

    @property
    def scaled(self) -> bool:
        return self.top is not None


FLOAT16 = FieldCode("float16", "float16", None)
INT8 = FieldCode("int8", "int8", 127.0)
UINT8 = FieldCode("uint8", "uint8", 255.0)
FLOAT8 = FieldCode("float8_e4m3fn", "uint8", E4M3_MAX)

# store dtype -> field -> how it is kept
FIELD_CODES = {
    "float16": {"tokens": FLOAT16, "attention": FLOAT16},
    "int8": {"tokens": INT8, "attention": UINT8},
    "float8": {"tokens": FLOAT8, "attention": FLOAT8},
}


def checked_dtype(dtype: str, where: str = "--dtype") -> str:
    """`dtype` if it is a store dtype, else a ClipreelError naming the choices."""
    if dtype not in STORE_DTYPES:
        raise ClipreelError(f"{where} {dtype!r} is not a store dtype: choose one of {', '.join(STORE_DTYPES)}")
    return dtype


def field_code(dtype: str, field: str) -> FieldCode:
    """How a store of `dtype` keeps `field` (tokens and attention vary; the other fields never)."""
    return FIELD_CODES[dtype].get(field, FLOAT16) if field in ENCODED_FIELDS else FLOAT16


def scale_block(width: int) -> int:
    """Channels of a token that share one scale: SCALE_BLOCK, or the whole token when it does not divide the width."""
    return SCALE_BLOCK if width % SCALE_BLOCK == 0 else width


def scale_shape(field: str, row_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a field's scales for one video: tokens (V, T, K, L, D) -> (V, T, K, L, D / block);
    attention (V, 2, T-1, K, P, P) -> (V, 2, T-1, K, P) (one scale per row)."""
    if field == "tokens":
        return (*row_shape[:-1], row_shape[-1] // scale_block(row_shape[-1]))
    if field == "attention":
        return tuple(row_shape[:-1])
    raise ValueError(f"{field} has no scales")


def provenance_entries(dtype: str, width: int) -> dict:
    """What a store of `dtype` records about its encoding in its provenance."""
    entries = {
        "dtype": dtype,
        "tokens_dtype": field_code(dtype, "tokens").kind,
        "attention_dtype": field_code(dtype, "attention").kind,
        "embeds_dtype": "float32",
    }
    if dtype != "float16":
        entries["scale_block"] = scale_block(width)
    return entries


# ---------------------------------------------------------------------- encode


def encode(field: str, values: np.ndarray, code: FieldCode) -> tuple[np.ndarray, np.ndarray]:
    """Float values of one field -> (codes, scales) as an 8-bit store keeps them.

    tokens (..., D) are scaled per block of channels, attention maps (..., P) per row. Raises
    ClipreelError for values that are not finite, beyond float16 (what readers return), or
    negative where the codes are unsigned.
    """
    values = np.asarray(values, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ClipreelError(f"{field} contains NaN or inf")
    if code == UINT8 and values.size and values.min() < 0:
        raise ClipreelError(f"{field} has negative values ({values.min():.3g}); its 8-bit codes are unsigned")
    groups = _groups(field, values)  # (..., groups, group size)
    largest = np.abs(groups).max(axis=-1) if groups.size else np.zeros(groups.shape[:-1], np.float32)
    with np.errstate(over="ignore"):  # overflow is checked next
        scales = largest.astype(np.float16)  # (..., groups)
    if not np.isfinite(scales).all():
        raise ClipreelError(f"{field} has values beyond ±{FLOAT16_MAX:.0f}, which the float16 that readers return cannot hold")
    scales[scales == 0] = 1  # a block of zeros (or of values too small for float16): any positive scale
    steps = scales.astype(np.float32) / np.float32(code.top)  # (..., groups)
    scaled = groups / steps[..., None]  # in [-top, top], up to float16's rounding of the scale
    if code == FLOAT8:
        codes = to_e4m3(np.clip(scaled, -E4M3_MAX, E4M3_MAX))
    else:
        low = 0 if code == UINT8 else -code.top
        codes = np.clip(np.rint(scaled), low, code.top).astype(code.storage_dtype)
    return codes.reshape(values.shape), scales


def to_e4m3(values: np.ndarray) -> np.ndarray:
    """float32 values within ±448 -> the uint8 bit patterns of the nearest float8 E4M3FN (ties to even)."""
    magnitude = np.abs(values)
    upper = np.searchsorted(_E4M3_POSITIVE, magnitude)  # the first code whose value >= magnitude
    upper = np.minimum(upper, len(_E4M3_POSITIVE) - 1)
    lower = np.maximum(upper - 1, 0)
    below, above = magnitude - _E4M3_POSITIVE[lower], _E4M3_POSITIVE[upper] - magnitude
    nearest = np.where((below < above) | ((below == above) & (lower % 2 == 0)), lower, upper)
    return (nearest | (np.signbit(values).astype(np.int64) << 7)).astype(np.uint8)


# ---------------------------------------------------------------------- decode


def decode(field: str, codes: np.ndarray, scales: np.ndarray, code: FieldCode) -> np.ndarray:
    """(codes, scales) of one field -> float16 values, code * (scale / top) computed in float32."""
    if code == FLOAT8:
        numbers = E4M3_VALUES[codes]
    else:
        numbers = codes.astype(np.float32)
    steps = scales.astype(np.float32) / np.float32(code.top)  # (..., groups)
    groups = _groups(field, numbers)  # (..., groups, group size)
    return (groups * steps[..., None]).astype(np.float16).reshape(codes.shape)


def _groups(field: str, values: np.ndarray) -> np.ndarray:
    """The values that share one scale, along the last axis: tokens (..., D) -> (..., D / block,
    block), attention maps (..., P, P) as they are (a row shares one scale)."""
    if field == "tokens":
        width = values.shape[-1]
        return values.reshape(*values.shape[:-1], width // scale_block(width), scale_block(width))
    return values


def code_problems(field: str, codes: np.ndarray, scales: np.ndarray | None, code: FieldCode) -> list[str]:
    """What is wrong with stored codes and scales (verify): scales that are not finite or not
    positive, float8 codes that are NaN."""
    problems = []
    if scales is not None:
        bad = int((~np.isfinite(scales)).sum())
        if bad:
            problems.append(f"{field}{SCALE_SUFFIX} has {bad} non-finite values (NaN/inf; or a missing chunk read as NaN)")
        not_positive = int((scales <= 0).sum())
        if not_positive:
            problems.append(f"{field}{SCALE_SUFFIX} has {not_positive} values <= 0 (scales are positive)")
    if code == FLOAT8:
        nan_codes = int(np.isin(codes, E4M3_NAN_CODES).sum())
        if nan_codes:
            problems.append(f"{field} has {nan_codes} float8 NaN codes")
    return problems
