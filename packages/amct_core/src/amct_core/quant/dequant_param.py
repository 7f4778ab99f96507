"""The packed dequant parameter of ``AscendDequant`` (reference §4, ``fuse_dequant_param``).

Each output channel gets one uint64: bits 0–31 hold the IEEE float32 bit pattern of
``deq_scale = scale_w * scale_d`` (multiplied in float32) and bits 40–47 hold ``offset_w``
as uint8 (the two's complement of the int8 offset). The other bits are zero.
"""
from __future__ import annotations

import numpy as np

from amct_core.errors import AmctValueError
from amct_core.quant.bias import deq_scale as _deq_scale

_OFFSET_SHIFT = np.uint64(40)


def pack_dequant_param(scale_w: np.ndarray | float, scale_d: float,
                       offset_w: np.ndarray | int = 0) -> np.ndarray:
    """Pack ``(scale_w * scale_d, offset_w)`` per channel into uint64 (reference §4).

    ``packed = bits32(float32(scale_w * scale_d)) | uint8(offset_w) << 40``. ``scale_w`` and
    ``offset_w`` broadcast to one value per channel; ``offset_w`` must be integers in
    [-128, 127]. Returns a 1-d uint64 array.
    """
    deq = _deq_scale(scale_w, scale_d)
    offsets = np.asarray(offset_w).reshape(-1)
    if offsets.size == 0 or offsets.dtype.kind not in "fiu":
        raise AmctValueError(f"offset_w must be integers, got {offset_w!r}.")
    as_float = offsets.astype(np.float64)
    if (not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float))
            or np.any(as_float < -128) or np.any(as_float > 127)):
        raise AmctValueError(f"offset_w must be integers in [-128, 127], got {offset_w!r}.")
    try:
        deq, offsets = np.broadcast_arrays(deq, as_float.astype(np.int8))
    except ValueError as err:
        raise AmctValueError(
            f"scale_w has {deq.size} values and offset_w {offsets.size}; they must match or "
            "one of them must be a single value.") from err
    low = np.ascontiguousarray(deq).view(np.uint32).astype(np.uint64)
    high = np.ascontiguousarray(offsets).view(np.uint8).astype(np.uint64) << _OFFSET_SHIFT
    return (low | high).astype(np.uint64)


def unpack_dequant_param(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_dequant_param`: ``(deq_scale float32, offset_w int64)``."""
    words = np.asarray(packed)
    if words.dtype != np.uint64:
        raise AmctValueError(f"packed must be a uint64 array, got dtype {words.dtype}.")
    words = words.reshape(-1)
    deq = (words & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
    offsets = ((words >> _OFFSET_SHIFT) & np.uint64(0xFF)).astype(np.uint8).view(np.int8)
    return deq.astype(np.float32), offsets.astype(np.int64)
