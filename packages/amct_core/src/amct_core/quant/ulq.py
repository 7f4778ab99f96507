"""ULQ: activation fake-quantization with learnable clips, for QAT (reference §3.4).

Notation: ``b`` bits, ``n = 2^b - 1``, ``qmin = -2^(b-1)``, ``qmax = 2^(b-1) - 1``.

**Clips to factors.** The clips are first made to include 0: ``clip_max ← max(clip_max, 0)``,
``clip_min ← min(clip_min, 0)`` (``clip_min = 0`` when ``fixed_min``, i.e. after a ReLU). Then
the asymmetric min-max rule of :func:`~amct_core.quant.scale_offset.scale_offset_from_range`
gives ``s = (clip_max - clip_min) / n`` (float32; a scale below FLT_EPSILON, as when both clips
are 0, becomes 1) and the integer offset ``o = -round(clip_min / s) - 2^(b-1)`` so that
``clip_min`` maps to ``qmin``.

**Forward** (the common formula, reference §3.4): with ``t = x · float32(1/s)`` and
``u = round(t) + o`` (half to even), ``x̂ = (clip(u, qmin, qmax) - o) · s``, bit for bit
:func:`~amct_core.quant.scale_offset.fake_quantize` with ``(s, o)`` (the AMCT fake-quant
graph's ``Mul(1/scale)``). ONNX ``QuantizeLinear`` divides, ``round(x / s)``; the two differ
only where ``x/s`` lies within a float32 rounding of a half-integer (by one step).

**Backward** (the ULQ straight-through gradient, reference §3.4). The masks come from the
integer the forward clips: ``lower = u < qmin``, ``upper = u > qmax``,
``inside = ¬lower ∧ ¬upper``; ``qerr = (round(t) - t) / n`` on ``inside`` (0 elsewhere),
``t = x · float32(1/s)`` as in the forward.
Given the upstream gradient ``g``::

    grad_x        = g · inside
    grad_clip_max = Σ (qerr + upper) · g
    grad_clip_min = Σ (lower - qerr) · g        (0 when fixed_min)

Derivation. Inside the range ``x̂ = round(x/s) · s``; treating ``round`` as the identity in the
derivative (straight-through), ``∂x̂/∂s = round(x/s) - x/s`` and
``∂s/∂clip_max = 1/n = -∂s/∂clip_min``, which gives ``±qerr``. Above the range
``x̂ = (qmax - o) · s ≈ clip_max`` and below it
``x̂ = (qmin - o) · s ≈ clip_min``, which gives the masks. The two ``≈`` hold up to the
rounding of the offset: the full straight-through derivative of the forward adds
``qerr(clip_min) = (round(clip_min/s) - clip_min/s)/n`` (``|·| ≤ 1/(2n)``) to ``∂x̂/∂clip_max``
outside the range and subtracts it from ``∂x̂/∂clip_min`` there; like the reference, these
terms are dropped. They vanish when ``clip_min = 0`` (``fixed_min``).

Where the forward is differentiable (between the jumps of ``round``) its true derivative is
``∂x̂/∂clip_max = q/n = -∂x̂/∂clip_min`` with ``q = clip(round(t), k, k + n)``,
``k = round(clip_min/s)``. It equals the ULQ gradient only above the range with
``clip_min = 0`` (``q = n``, derivative 1); elsewhere the ULQ gradient is a straight-through
estimate, not a derivative (finite differences do not reproduce it).

The gradient reaches the raw clips unchanged through the ``max(·, 0)``/``min(·, 0)`` of the
first step (straight-through), so a clip pushed past 0 can come back.

**Initial clips**: asymmetric IFMR over the first ``batch_num`` batches (reference §3.4, "ULQ:
initialised by IFMR on the first batch"); ``clip_min = (qmin - o)·s``, ``clip_max =
(qmax - o)·s`` of the IFMR factors, so the first ULQ step quantizes as IFMR does (the scale
again up to float32 rounding).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from amct_core.errors import AmctValueError
from amct_core.quant.ifmr import IfmrCalibrator
from amct_core.quant.scale_offset import (
    check_num_bits,
    fake_quantize,
    int_range,
    scale_offset_from_range,
)


def effective_clips(clip_max: float, clip_min: float,
                    fixed_min: bool = False) -> tuple[np.float32, np.float32]:
    """The clips made to include 0, as float32: ``(max(clip_max, 0), min(clip_min, 0))``, with
    ``clip_min = 0`` when ``fixed_min`` (reference §3.4)."""
    hi = np.float32(clip_max)
    lo = np.float32(0.0) if fixed_min else np.float32(clip_min)
    if not (np.isfinite(hi) and np.isfinite(lo)):
        raise AmctValueError(
            f"ULQ clips must be finite, got clip_max={clip_max!r}, clip_min={clip_min!r}; "
            "lower the learning rate or re-initialise the clips.")
    return np.maximum(hi, np.float32(0.0)), np.minimum(lo, np.float32(0.0))


def ulq_scale_offset(clip_max: float, clip_min: float, num_bits: int = 8,
                     fixed_min: bool = False) -> tuple[float, int]:
    """``(scale, offset)`` the clips imply (reference §3.4).

    ``s = (max(clip_max,0) - min(clip_min,0)) / (2^b - 1)`` in float32 (``< FLT_EPSILON`` → 1)
    and ``o = -round(clip_min/s) - 2^(b-1)``; ``clip_min`` is 0 when ``fixed_min``. Returns a
    Python float (a float32 value) and an int.
    """
    bits = check_num_bits(num_bits)
    hi, lo = effective_clips(clip_max, clip_min, fixed_min)
    scale, offset = scale_offset_from_range(lo, hi, bits, symmetric=False)
    return float(scale), int(offset)


def ulq_forward(x: np.ndarray, clip_max: float, clip_min: float, num_bits: int = 8,
                fixed_min: bool = False) -> np.ndarray:
    """ULQ fake-quantization of ``x`` (float32): ``(clip(round(x·(1/s)) + o, qmin, qmax) - o)·s``
    with ``(s, o) = ulq_scale_offset(...)`` (see the module docstring)."""
    scale, offset = ulq_scale_offset(clip_max, clip_min, num_bits, fixed_min)
    return fake_quantize(x, scale, offset, num_bits)


@dataclass(frozen=True)
class UlqGradients:
    """Gradients of the ULQ backward: ``grad_x`` (float32, the shape of ``x``) and the clip
    gradients (float64 sums; ``grad_clip_min`` is 0 when ``fixed_min``)."""

    grad_x: np.ndarray
    grad_clip_max: float
    grad_clip_min: float


def ulq_masks(x: np.ndarray, scale: float, offset: int,
              num_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t, lower, upper)``: ``t = x·float32(1/s)`` (float32) and the masks of the integers the
    forward clips, ``round(t) + o < qmin`` and ``> qmax``."""
    qmin, qmax = int_range(num_bits)
    t = np.asarray(x, dtype=np.float32) * (np.float32(1.0) / np.float32(scale))
    u = np.round(t) + np.float32(offset)
    return t.astype(np.float32), u < qmin, u > qmax


def ulq_backward(x: np.ndarray, grad_output: np.ndarray, clip_max: float, clip_min: float,
                 num_bits: int = 8, fixed_min: bool = False) -> UlqGradients:
    """ULQ straight-through gradients (reference §3.4; derivation in the module docstring).

    ``grad_x = g·inside``, ``grad_clip_max = Σ(qerr + upper)·g``,
    ``grad_clip_min = Σ(lower - qerr)·g`` with ``qerr = (round(t) - t)/(2^b - 1)`` inside the
    range and ``t = x·float32(1/s)``.
    """
    bits = check_num_bits(num_bits)
    scale, offset = ulq_scale_offset(clip_max, clip_min, bits, fixed_min)
    g = np.asarray(grad_output, dtype=np.float64)
    if g.shape != np.shape(x):
        raise AmctValueError(
            f"grad_output has shape {g.shape} but x has shape {np.shape(x)}; they must match.")
    t, lower, upper = ulq_masks(x, scale, offset, bits)
    inside = ~(lower | upper)
    t64 = t.astype(np.float64)
    qerr = np.where(inside, (np.round(t64) - t64) / float((1 << bits) - 1), 0.0)
    grad_clip_max = float(np.sum((qerr + upper) * g))
    grad_clip_min = 0.0 if fixed_min else float(np.sum((lower - qerr) * g))
    return UlqGradients(grad_x=(g * inside).astype(np.float32),
                        grad_clip_max=grad_clip_max, grad_clip_min=grad_clip_min)


def clips_from_factors(scale: float, offset: int, num_bits: int = 8) -> tuple[float, float]:
    """``(clip_max, clip_min) = ((qmax - o)·s, (qmin - o)·s)``: the ends of the range that
    ``(scale, offset)`` represents (float32 arithmetic)."""
    qmin, qmax = int_range(num_bits)
    s = np.float32(scale)
    return (float(np.float32(qmax - int(offset)) * s),
            float(np.float32(qmin - int(offset)) * s))


def ifmr_initial_clips(batches: Iterable[np.ndarray], num_bits: int = 8,
                       fixed_min: bool = False) -> tuple[float, float]:
    """Initial ``(clip_max, clip_min)`` from asymmetric IFMR over ``batches`` (reference §3.4).

    IFMR (defaults of the reference: percentiles 0.999999, search 0.7..1.3 by 0.01) gives
    ``(s, o)``; the clips are the ends of its range, :func:`clips_from_factors`. With
    ``fixed_min`` ``clip_min`` is 0 (and IFMR's range already starts at 0 for non-negative data).
    """
    calibrator = IfmrCalibrator(num_bits=num_bits, symmetric=False)
    for batch in batches:
        calibrator.update(batch)
    scale, offset = calibrator.result()
    clip_max, clip_min = clips_from_factors(scale, offset, num_bits)
    return clip_max, (0.0 if fixed_min else min(clip_min, 0.0))
