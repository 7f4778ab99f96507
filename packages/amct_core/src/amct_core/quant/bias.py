"""Bias quantization to int32 for the deploy model (reference §4).

``bias_int32 = round(bias / deq_scale)`` with ``deq_scale = scale_w * scale_d`` (float32, one
value per output channel or one for the tensor), round half to even. A value outside the int32
range cannot be deployed: the reference raises ``Do bias quantize failed.``
"""
from __future__ import annotations

import numpy as np

from amct_core.errors import AmctValueError, QuantizationError

_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1


def deq_scale(scale_w: np.ndarray | float, scale_d: float) -> np.ndarray:
    """``scale_w * scale_d`` computed in float32, as a 1-d array (reference §4).

    Both factors must be finite and > 0; raises :class:`AmctValueError` naming the argument.
    """
    scale_w32 = np.asarray(scale_w, dtype=np.float32).reshape(-1)
    scale_d32 = np.asarray(scale_d, dtype=np.float32)
    if scale_w32.size == 0 or not np.all(np.isfinite(scale_w32)) or np.any(scale_w32 <= 0):
        raise AmctValueError(f"scale_w must be finite and > 0, got {scale_w!r}.")
    if scale_d32.size != 1 or not np.isfinite(scale_d32).all() or np.any(scale_d32 <= 0):
        raise AmctValueError(f"scale_d must be one finite value > 0, got {scale_d!r}.")
    return (scale_w32 * scale_d32.reshape(())).astype(np.float32)


def quantize_bias(bias: np.ndarray, scale_w: np.ndarray | float, scale_d: float,
                  layer: str | None = None) -> np.ndarray:
    """``round(bias / (scale_w * scale_d))`` as int32 (reference §4, InsertBiasQuant).

    ``scale_w`` has one value per output channel (``bias.size`` values) or one value;
    ``deq_scale = scale_w * scale_d`` is formed in float32 (the value the dequant node
    carries) and the division is done in float64, rounding half to even. A result outside
    ``[-2^31, 2^31 - 1]`` raises :class:`QuantizationError` whose text starts
    ``"Do bias quantize failed."`` and names ``layer``.
    """
    where = f"layer {layer!r}" if layer is not None else "the layer"
    values = np.asarray(bias)
    if values.dtype.kind not in "fiu" or values.dtype == np.bool_:
        raise AmctValueError(f"bias of {where} must be a real numeric array, got dtype "
                             f"{values.dtype}.")
    values = values.astype(np.float64).reshape(-1)
    if not np.all(np.isfinite(values)):
        raise QuantizationError(f"Do bias quantize failed. The bias of {where} contains NaN or "
                                "Inf.")
    deq = deq_scale(scale_w, scale_d)
    if deq.size not in (1, values.size):
        raise AmctValueError(f"scale_w of {where} has {deq.size} values but the bias has "
                             f"{values.size}; give one value or one per output channel.")
    if np.any(deq < np.finfo(np.float32).tiny):
        raise QuantizationError(f"Do bias quantize failed. scale_w * scale_d of {where} "
                                "underflows float32.")
    quant = np.round(values / deq.astype(np.float64))
    bad = (quant < _INT32_MIN) | (quant > _INT32_MAX)
    if np.any(bad):
        index = int(np.argmax(bad))
        raise QuantizationError(
            f"Do bias quantize failed. Quantized bias {quant[index]:.6g} (channel {index}) of "
            f"{where} exceeds the int32 range [{_INT32_MIN}, {_INT32_MAX}]: the bias is too "
            "large for scale_w * scale_d. Add the layer to skip_layers.")
    return quant.astype(np.int32).reshape(np.shape(bias))
