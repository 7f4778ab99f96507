"""ARQ: min-max weight quantization for PTQ (reference §3.4).

The weight is moved so that the channel ``axis`` comes first and reshaped to ``(C, -1)``;
per channel (``channel_wise``) or over the whole tensor the symmetric min-max rule of
:func:`~amct_core.quant.scale_offset.scale_offset_from_range` gives
``scale = max(|max|, |min|) / (2^(b-1) - 1)`` (``/ 2^(b-1)`` when ``|min| > |max|``) and
``offset_w = 0``.
"""
from __future__ import annotations

import numpy as np

from amct_core.errors import AmctValueError, QuantizationError
from amct_core.quant.scale_offset import (
    check_num_bits,
    check_scale_offset,
    quantize,
    scale_offset_from_range,
)


def _weight_rows(weight: np.ndarray, axis: int, name: str = "weight") -> np.ndarray:
    """The weight as float32 ``(C, -1)`` with the channel ``axis`` first; checks it."""
    data = np.asarray(weight)
    if data.dtype.kind not in "fiu" or data.dtype == np.bool_:
        raise AmctValueError(f"{name} must be a real numeric array, got dtype {data.dtype}.")
    if data.ndim == 0 or data.size == 0:
        raise AmctValueError(f"{name} is empty (shape {data.shape}); nothing to quantize.")
    if not -data.ndim <= axis < data.ndim:
        raise AmctValueError(f"axis={axis} is out of range for {name} of shape {data.shape}.")
    data = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        raise QuantizationError(f"{name} contains NaN or Inf; it cannot be quantized.")
    return np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1)


def arq_weight(weight: np.ndarray, num_bits: int = 8, channel_wise: bool = True,
               axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric min-max weight factors (reference §3.4, ARQ).

    Returns ``(scale_w, offset_w)``: float32 and int64 arrays of shape ``(C,)`` with
    ``C = weight.shape[axis]`` when ``channel_wise``, else of shape ``(1,)``; ``offset_w`` is
    all zeros. ``scale_w[c] = max(|max_c|, |min_c|) / (2^(b-1) - 1)``, or ``/ 2^(b-1)`` when
    ``|min_c| > |max_c|``; a scale below FLT_EPSILON (an all-zero channel) becomes 1.
    """
    bits = check_num_bits(num_bits)
    rows = _weight_rows(weight, axis)
    if channel_wise:
        lo, hi = rows.min(axis=1), rows.max(axis=1)
    else:
        lo, hi = rows.min(keepdims=True).reshape(1), rows.max(keepdims=True).reshape(1)
    return scale_offset_from_range(lo, hi, bits, symmetric=True)


def quantize_weight(weight: np.ndarray, scale: np.ndarray | float,
                    offset: np.ndarray | float = 0, num_bits: int = 8,
                    axis: int = 0) -> np.ndarray:
    """Quantized weight integers (reference §3.4, §4).

    ``clip(round(w * float32(1/scale)) + offset, -2^(b-1), 2^(b-1) - 1)`` in float32 with the
    per-channel ``scale``/``offset`` laid along ``axis`` (one value means per tensor). Returns
    int8 for 4 and 8 bits and int16 for 16 bits, in the weight's shape.
    """
    bits = check_num_bits(num_bits)
    rows = _weight_rows(weight, axis)
    scale_arr = np.asarray(scale, dtype=np.float64).reshape(-1)
    offset_arr = np.asarray(offset, dtype=np.float64).reshape(-1)
    check_scale_offset(scale_arr, offset_arr, bits)
    channels = rows.shape[0]
    for name, values in (("scale", scale_arr), ("offset", offset_arr)):
        if values.size not in (1, channels):
            raise AmctValueError(
                f"{name} has {values.size} values but the weight has {channels} channels along "
                f"axis {axis}; give one value or one per channel.")
    q = quantize(rows, scale_arr.reshape(-1, 1), offset_arr.reshape(-1, 1), bits)
    dims = list(np.shape(weight))
    shape = [dims.pop(axis), *dims]
    dtype = np.int8 if bits <= 8 else np.int16
    return np.moveaxis(q.reshape(shape).astype(dtype), 0, axis)
