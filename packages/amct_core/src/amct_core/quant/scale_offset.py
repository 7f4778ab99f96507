"""The common quantization formula and the min-max scale/offset rule (reference §3.4).

``int = clip(round(x / scale + offset), -2^(b-1), 2^(b-1) - 1)`` and
``x̂ = (int - offset) * scale``. The quantize step is computed exactly as the fake-quant ONNX
graph does it (reference §4): ``Mul(x, float32(1/scale))`` → ``Round`` (half to even) →
``Add(offset)`` → ``Clip``, all in float32.

The min-max rule turning a range ``[min, max]`` into ``(scale, offset)``:

* symmetric: ``scale = max(|max|, |min|) / (2^(b-1) - 1)``, or ``/ 2^(b-1)`` when
  ``|min| > |max|`` (the negative end may use the extra code -2^(b-1)); ``offset = 0``;
* asymmetric: ``max`` is clamped to ≥ 0 and ``min`` to ≤ 0,
  ``scale = (max - min) / (2^b - 1)``, ``offset = -round(min / scale) - 2^(b-1)`` (an integer,
  so that ``min`` maps to -2^(b-1));
* a scale below ``FLT_EPSILON`` (float32 machine epsilon) is replaced by 1.

Scales are float32 and computed in float32 arithmetic, like the reference's
``calculate_scale_offset``; offsets are int64.
"""
from __future__ import annotations

import numpy as np

from amct_core.errors import AmctValueError, QuantizationError

#: float32 machine epsilon; a scale below it is replaced by 1 (reference §3.4).
FLT_EPSILON = float(np.finfo(np.float32).eps)

#: Bit widths the integer formulas support (record types INT4, INT8, INT16).
SUPPORTED_NUM_BITS = (4, 8, 16)


def check_num_bits(num_bits: int, name: str = "num_bits") -> int:
    """Return ``num_bits`` as an int, or raise :class:`QuantizationError` if it is not one of
    :data:`SUPPORTED_NUM_BITS`."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, (int, np.integer)):
        raise QuantizationError(
            f"{name} must be an integer in {list(SUPPORTED_NUM_BITS)}, got {num_bits!r}.")
    if int(num_bits) not in SUPPORTED_NUM_BITS:
        raise QuantizationError(
            f"{name}={num_bits} is not supported; use one of {list(SUPPORTED_NUM_BITS)} "
            "(INT4, INT8 or INT16).")
    return int(num_bits)


def int_range(num_bits: int) -> tuple[int, int]:
    """``(-2^(b-1), 2^(b-1) - 1)``: the smallest and largest quantized integer."""
    bits = check_num_bits(num_bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def symmetric_scale(abs_max: np.ndarray | float, negative_bound: np.ndarray | bool,
                    num_bits: int) -> np.ndarray:
    """Symmetric scale from the bound magnitude (reference §3.4).

    ``scale = abs_max / (2^(b-1) - 1)``, or ``abs_max / 2^(b-1)`` where ``negative_bound``
    (the bound is the negative end, ``|min| > |max|``); computed in float32; a result below
    ``FLT_EPSILON`` becomes 1. Shared by :func:`scale_offset_from_range` and the IFMR
    candidate search so both apply the same rule.
    """
    bits = check_num_bits(num_bits)
    abs_max = np.asarray(abs_max, dtype=np.float32)
    denominator = np.where(np.asarray(negative_bound, dtype=bool),
                           np.float32(1 << (bits - 1)), np.float32((1 << (bits - 1)) - 1))
    scale = (abs_max / denominator.astype(np.float32)).astype(np.float32)
    return np.where(scale < FLT_EPSILON, np.float32(1.0), scale).astype(np.float32)


def scale_offset_from_range(min_val: np.ndarray | float, max_val: np.ndarray | float,
                            num_bits: int = 8,
                            symmetric: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Min-max ``(scale, offset)`` of the range ``[min_val, max_val]`` (reference §3.4).

    Symmetric: ``scale = max(|max|, |min|) / (2^(b-1) - 1)``, or ``/ 2^(b-1)`` when
    ``|min| > |max|``; ``offset = 0``. Asymmetric: ``max ← max(max, 0)``,
    ``min ← min(min, 0)``, ``scale = (max - min) / (2^b - 1)``,
    ``offset = -round(min / scale) - 2^(b-1)``. ``scale < FLT_EPSILON`` → 1.

    The arguments broadcast against each other; scalars give 0-d arrays. Returns the scale as
    float32 (computed in float32) and the offset as int64.
    """
    bits = check_num_bits(num_bits)
    lo = np.asarray(min_val, dtype=np.float32)
    hi = np.asarray(max_val, dtype=np.float32)
    for name, value in (("min_val", lo), ("max_val", hi)):
        if not np.all(np.isfinite(value)):
            raise AmctValueError(f"{name} must be finite, got {value!r}.")
    lo, hi = np.broadcast_arrays(lo, hi)
    if symmetric:
        abs_max = np.maximum(np.abs(hi), np.abs(lo))
        scale = symmetric_scale(abs_max, np.abs(lo) > np.abs(hi), bits)
        return scale, np.zeros(scale.shape, dtype=np.int64)
    hi = np.maximum(hi, np.float32(0.0))
    lo = np.minimum(lo, np.float32(0.0))
    scale = ((hi - lo) / np.float32((1 << bits) - 1)).astype(np.float32)
    scale = np.where(scale < FLT_EPSILON, np.float32(1.0), scale).astype(np.float32)
    # min/scale of two float32 values, rounded half to even; -2^(b-1) shifts min to qmin.
    steps = np.round(lo.astype(np.float64) / scale.astype(np.float64))
    offset = (-steps - (1 << (bits - 1))).astype(np.int64)
    return scale, offset


def check_scale_offset(scale: np.ndarray | float, offset: np.ndarray | float,
                       num_bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate quantization factors and return them as (float32, float32) arrays.

    The scale must be finite and > 0; the offset finite and integral (and, when ``num_bits``
    is given, within ``[-2^(b-1), 2^(b-1) - 1]`` as a deployable offset must be). Raises
    :class:`AmctValueError` naming the argument.
    """
    scale_arr = np.asarray(scale, dtype=np.float64)
    offset_arr = np.asarray(offset, dtype=np.float64)
    if scale_arr.size == 0 or not np.all(np.isfinite(scale_arr)) or np.any(scale_arr <= 0):
        raise AmctValueError(f"scale must be finite and > 0, got {scale!r}.")
    if not np.all(np.isfinite(offset_arr)) or np.any(offset_arr != np.round(offset_arr)):
        raise AmctValueError(f"offset must be finite integers, got {offset!r}.")
    if num_bits is not None:
        qmin, qmax = int_range(num_bits)
        if np.any(offset_arr < qmin) or np.any(offset_arr > qmax):
            raise AmctValueError(
                f"offset must lie in [{qmin}, {qmax}] for num_bits={num_bits}, got {offset!r}.")
    return scale_arr.astype(np.float32), offset_arr.astype(np.float32)


def _along(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a per-channel vector so that it broadcasts along ``axis`` of an ``ndim`` array."""
    if axis is None or values.ndim == 0 or values.size == 1:
        return values.reshape(()) if values.size == 1 else values
    if not -ndim <= axis < ndim:
        raise AmctValueError(f"axis={axis} is out of range for a {ndim}-d tensor.")
    shape = [1] * ndim
    shape[axis % ndim] = values.size
    return values.reshape(shape)


def quantize(x: np.ndarray, scale: np.ndarray | float, offset: np.ndarray | float = 0,
             num_bits: int = 8, axis: int | None = None) -> np.ndarray:
    """Quantize to integers, returned as a float32 array (reference §3.4, §4).

    ``clip(round(x * float32(1/scale)) + offset, -2^(b-1), 2^(b-1) - 1)`` in float32, with
    ``round`` half to even — exactly the fake-quant graph's ``Mul → Round → Add → Clip``.
    ``scale``/``offset`` broadcast against ``x``; with ``axis`` a per-channel vector is laid
    along that axis. ``x`` itself is not checked (NaN stays NaN).
    """
    bits = check_num_bits(num_bits)
    qmin, qmax = int_range(bits)
    scale32, offset32 = check_scale_offset(scale, offset)
    data = np.asarray(x, dtype=np.float32)
    reciprocal = (np.float32(1.0) / scale32).astype(np.float32)
    reciprocal = _along(reciprocal, data.ndim, axis)
    offset32 = _along(offset32, data.ndim, axis)
    out = np.multiply(data, reciprocal, dtype=np.float32)
    np.round(out, out=out)
    out += offset32
    np.clip(out, np.float32(qmin), np.float32(qmax), out=out)
    return out


def dequantize(q: np.ndarray, scale: np.ndarray | float, offset: np.ndarray | float = 0,
               axis: int | None = None) -> np.ndarray:
    """``(q - offset) * scale`` in float32 (reference §3.4); ``axis`` as in :func:`quantize`."""
    scale32, offset32 = check_scale_offset(scale, offset)
    data = np.asarray(q, dtype=np.float32)
    return ((data - _along(offset32, data.ndim, axis))
            * _along(scale32, data.ndim, axis)).astype(np.float32)


def fake_quantize(x: np.ndarray, scale: np.ndarray | float, offset: np.ndarray | float = 0,
                  num_bits: int = 8, axis: int | None = None) -> np.ndarray:
    """``dequantize(quantize(x))``: the value the fake-quant model computes (reference §4)."""
    return dequantize(quantize(x, scale, offset, num_bits, axis), scale, offset, axis)
