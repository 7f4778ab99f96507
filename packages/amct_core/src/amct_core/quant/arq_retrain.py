"""Weight fake-quantization for QAT: ARQ retrain and ULQ retrain (reference §3.4).

Notation: ``b`` bits, ``qmin = -2^(b-1)``, ``qmax = 2^(b-1) - 1``; the weight is seen as rows
``(C, -1)`` with the channel ``axis`` first (axis 0 for Conv/Linear weights, 1 for
ConvTranspose weights, whose layout is ``(Cin, Cout/groups, ...)``).

**ARQ retrain** (``arq_retrain_impl.py``): on every training step the symmetric min-max factors
of the current weight, per channel when ``channel_wise`` (else per tensor), exactly those of
PTQ's :func:`~amct_core.quant.arq.arq_weight`:
``s_c = max(|max_c|, |min_c|) / qmax`` (``/ 2^(b-1)`` when ``|min_c| > |max_c|``), ``o = 0``;
``ŵ = clip(round(w·float32(1/s)), qmin, qmax) · s`` (the common formula,
:func:`~amct_core.quant.scale_offset.quantize`). The min-max range clips at most the
largest weights of a channel whose ``|min| > |max|`` (by less than one step), and the backward
is the straight-through identity ``grad_w = g`` (the factors are not differentiated).

**ULQ retrain** (``ulq_scale_retrain_impl.py``): a learnable symmetric clip ``c`` per channel
(or one), initialised to ``max|w|`` of the channel; ``s = c / qmax`` (``< FLT_EPSILON`` → 1),
``o = 0``, ``ŵ = clip(round(w·float32(1/s)), qmin, qmax) · s``. With ``t = w·float32(1/s)``,
``lower = round(t) < qmin``, ``upper = round(t) > qmax`` and ``inside`` the rest, the gradient
(straight-through on ``round``; ``∂s/∂c = 1/qmax``) is::

    grad_w = g · inside
    grad_c = Σ_channel ((round(t) - t)/qmax · inside + upper + (qmin/qmax) · lower) · g

(above the range ``ŵ = qmax·s = c``, below it ``ŵ = qmin·s = -c·2^(b-1)/qmax``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amct_core.errors import AmctValueError
from amct_core.quant.arq import _weight_rows, arq_weight
from amct_core.quant.scale_offset import FLT_EPSILON, check_num_bits, fake_quantize, int_range


def _along_axis(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    if values.size > 1:
        shape[axis % ndim] = values.size
    return np.asarray(values).reshape(shape)


def arq_retrain_factors(weight: np.ndarray, num_bits: int = 8, channel_wise: bool = True,
                        axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(scale_w, offset_w)`` of one ARQ-retrain step: :func:`~amct_core.quant.arq.arq_weight`
    of the current weight (float32 scales of shape ``(C,)`` or ``(1,)``, int64 zero offsets)."""
    return arq_weight(weight, num_bits, channel_wise, axis)


def arq_retrain_forward(weight: np.ndarray, num_bits: int = 8, channel_wise: bool = True,
                        axis: int = 0) -> np.ndarray:
    """ARQ-retrain fake-quantized weight ``clip(round(w·(1/s)), qmin, qmax)·s`` (float32)."""
    scale, offset = arq_retrain_factors(weight, num_bits, channel_wise, axis)
    data = np.asarray(weight, dtype=np.float32)
    return fake_quantize(data, scale, offset, num_bits, axis if scale.size > 1 else None)


def arq_retrain_backward(grad_output: np.ndarray) -> np.ndarray:
    """ARQ-retrain gradient: the straight-through identity ``grad_w = g``."""
    return np.asarray(grad_output, dtype=np.float32).copy()


def ulq_weight_initial_clip(weight: np.ndarray, channel_wise: bool = True,
                            axis: int = 0) -> np.ndarray:
    """Initial ULQ-retrain clips: ``max|w|`` per channel (shape ``(C,)``) or over the tensor
    (shape ``(1,)``), float32."""
    rows = np.abs(_weight_rows(weight, axis))
    return (rows.max(axis=1) if channel_wise else rows.max().reshape(1)).astype(np.float32)


def ulq_weight_scale(clip: np.ndarray, num_bits: int = 8) -> np.ndarray:
    """``s = |c| / (2^(b-1) - 1)`` in float32; a scale below FLT_EPSILON becomes 1."""
    _, qmax = int_range(check_num_bits(num_bits))
    c = np.abs(np.asarray(clip, dtype=np.float32)).reshape(-1)
    if not np.all(np.isfinite(c)):
        raise AmctValueError(f"ULQ-retrain weight clips must be finite, got {clip!r}.")
    scale = (c / np.float32(qmax)).astype(np.float32)
    return np.where(scale < FLT_EPSILON, np.float32(1.0), scale).astype(np.float32)


def ulq_weight_forward(weight: np.ndarray, clip: np.ndarray, num_bits: int = 8,
                       axis: int = 0) -> np.ndarray:
    """ULQ-retrain fake-quantized weight ``clip(round(w·(1/s)), qmin, qmax)·s`` with
    ``s = ulq_weight_scale(clip)`` laid along ``axis``."""
    scale = ulq_weight_scale(clip, num_bits)
    return fake_quantize(weight, scale, 0, num_bits, axis if scale.size > 1 else None)


@dataclass(frozen=True)
class UlqWeightGradients:
    """``grad_weight`` (float32) and ``grad_clip`` (float64, one per clip)."""

    grad_weight: np.ndarray
    grad_clip: np.ndarray


def ulq_weight_backward(weight: np.ndarray, grad_output: np.ndarray, clip: np.ndarray,
                        num_bits: int = 8, axis: int = 0) -> UlqWeightGradients:
    """ULQ-retrain straight-through gradients (module docstring)."""
    bits = check_num_bits(num_bits)
    qmin, qmax = int_range(bits)
    data = np.asarray(weight, dtype=np.float32)
    clips = np.asarray(clip, dtype=np.float32).reshape(-1)
    s = _along_axis(ulq_weight_scale(clips, bits), data.ndim, axis)
    t = (data * (np.float32(1.0) / s)).astype(np.float32)
    r = np.round(t)
    lower, upper = r < qmin, r > qmax
    inside = ~(lower | upper)
    g = np.asarray(grad_output, dtype=np.float64)
    t64 = t.astype(np.float64)
    local = (np.where(inside, (np.round(t64) - t64) / qmax, 0.0) + upper
             + (qmin / qmax) * lower) * g
    if clips.size == 1:
        grad_clip = np.array([local.sum()])
    else:
        grad_clip = np.moveaxis(local, axis, 0).reshape(clips.size, -1).sum(axis=1)
    return UlqWeightGradients(grad_weight=(g * inside).astype(np.float32), grad_clip=grad_clip)
