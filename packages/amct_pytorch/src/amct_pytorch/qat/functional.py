"""Autograd Functions of QAT fake-quantization (reference §3.4, §4).

Each Function computes exactly the forward and backward of its amct_core definition:

* :class:`UlqActivationFunction` — :mod:`amct_core.quant.ulq` (ULQ, learnable clips);
* :class:`ArqRetrainFunction` — :func:`amct_core.quant.arq_retrain.arq_retrain_forward`
  (per-step symmetric min-max weight fake-quant, straight-through identity gradient);
* :class:`UlqWeightFunction` — :func:`amct_core.quant.arq_retrain.ulq_weight_forward`
  (learnable symmetric weight clip).

They run on every training step. The ULQ forward is ``round(x·(1/s))`` clamped to
``[qmin - o, qmax - o]``, times ``s`` (the same integers as ``clip(round(x·(1/s)) + o, qmin,
qmax) - o`` because ``o`` is an integer), and the backward recomputes ``round(x·(1/s))`` from
the saved input instead of keeping masks. On CPU float32 tensors the ULQ forward and backward
and the ARQ-retrain forward run as one pass each in the C extension
``amct_pytorch.qat._fused_quant`` (built by the install where a C compiler is found); elsewhere,
or without it, as separate torch operations, with the same results. ``1/s`` is the
float32 reciprocal, as in :func:`amct_core.quant.scale_offset.quantize` and the AMCT
fake-quant graph; ONNX ``QuantizeLinear`` divides by ``s``, which differs only where ``x/s``
lies within a float32 rounding of a half-integer.

For ``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``) each Function has a
``symbolic`` that emits ``QuantizeLinear → DequantizeLinear``. The factors must be constants
of the exported graph, so the QAT modules pass them (read from their state) in the
``export_factors`` argument while exporting; without them the symbolic raises.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from amct_core.errors import QuantizationError
from amct_core.quant.scale_offset import FLT_EPSILON, int_range
from amct_core.quant.ulq import ulq_scale_offset

try:  # the optional C extension (see setup.py); without it the composite torch path runs
    from amct_pytorch.qat import _fused_quant as _FUSED
except ImportError:  # pragma: no cover - depends on the install
    _FUSED = None


def _fusable(*tensors: torch.Tensor) -> bool:
    """True when the fused kernels can take ``tensors``: the extension is built, and they are
    contiguous float32 CPU tensors (not being traced for export, where the torch operations
    must be recorded)."""
    if _FUSED is None or torch.jit.is_tracing():
        return False
    for t in tensors:  # (a loop, not all(...): this runs several times per layer and step)
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            return False
    return True


@dataclass(frozen=True)
class ExportFactors:
    """Constant factors for the ONNX symbolic: ``scales``/``zero_points`` (one value per tensor
    or per channel along ``axis``; ``axis`` None means per tensor) and ``num_bits``."""

    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    axis: int | None
    num_bits: int
    name: str = "QAT layer"


def _qdq_symbolic(g, value, factors: ExportFactors | None, what: str):
    """``QuantizeLinear → DequantizeLinear`` with constant factors (reference §4)."""
    if factors is None:
        raise QuantizationError(
            f"{what} cannot be exported by itself: export the model that holds the QAT module "
            "(Conv2dQAT, LinearQAT, ...), which passes its quantization factors to the graph.")
    opset = int(getattr(g, "opset", 13))
    if factors.num_bits == 4:
        raise QuantizationError(
            f"{factors.name}: INT4 QAT layers cannot be exported to standard ONNX "
            "QuantizeLinear/DequantizeLinear (int4 needs opset 21, beyond what torch.onnx's "
            "TorchScript exporter writes); train with dst_type INT8 to export a QDQ model.")
    if factors.num_bits == 16 and opset < 21:
        raise QuantizationError(
            f"{factors.name}: an INT16 QuantizeLinear needs opset_version >= 21 (got {opset}), "
            "beyond what torch.onnx's TorchScript exporter writes (opset 20); train with "
            "dst_type INT8 to export a QDQ model.")
    if opset < 10:
        raise QuantizationError(
            f"{factors.name}: QuantizeLinear needs opset_version >= 10 (>= 13 for per-channel "
            f"weights), got {opset}; pass opset_version=13 or later to torch.onnx.export.")
    per_channel = factors.axis is not None and len(factors.scales) > 1
    if per_channel and opset < 13:
        raise QuantizationError(
            f"{factors.name}: per-channel (channel_wise) weight quantization exports a "
            f"QuantizeLinear with an axis, which needs opset_version >= 13, got {opset}; pass "
            "opset_version=13 or later to torch.onnx.export.")
    zp_dtype = torch.int8 if factors.num_bits == 8 else torch.int16
    scale_t = torch.tensor(factors.scales, dtype=torch.float32)
    zp_t = torch.tensor(factors.zero_points, dtype=zp_dtype)
    if not per_channel:
        scale_t, zp_t = scale_t.reshape(()), zp_t.reshape(())
    scale_c = g.op("Constant", value_t=scale_t)
    zp_c = g.op("Constant", value_t=zp_t)
    kwargs = {"axis_i": int(factors.axis)} if per_channel else {}
    quantized = g.op("QuantizeLinear", value, scale_c, zp_c, **kwargs)
    return g.op("DequantizeLinear", quantized, scale_c, zp_c, **kwargs)


def ulq_host_factors(clip_max: torch.Tensor, clip_min: torch.Tensor, num_bits: int,
                     fixed_min: bool) -> tuple[float, int]:
    """``(s, o)`` of the clips, the values of :func:`amct_core.quant.ulq.ulq_scale_offset`
    computed with scalar float32 arithmetic (it runs on every step; the element-wise kernels
    are fastest with Python-number operands): ``s = float32(max(c_max,0) - min(c_min,0)) /
    float32(2^b - 1)`` (``< FLT_EPSILON`` → 1), ``o = -round(c_min / s) - 2^(b-1)`` (half to
    even, float64 division)."""
    # While exporting, the factors become constants of the graph on purpose (the symbolic
    # receives them as export_factors): the tracer's warning about .item() is expected.
    exporting = torch.onnx.is_in_onnx_export()
    with warnings.catch_warnings() if exporting else contextlib.nullcontext():
        if exporting:
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
        hi = np.float32(clip_max.item())  # the clips hold one element each
        lo = np.float32(0.0) if fixed_min else np.float32(clip_min.item())
    if not (math.isfinite(hi) and math.isfinite(lo)):
        return ulq_scale_offset(float(hi), float(lo), num_bits, fixed_min)  # raises
    hi = max(hi, np.float32(0.0))
    lo = min(lo, np.float32(0.0))
    scale = np.float32(hi - lo) / np.float32((1 << num_bits) - 1)
    if scale < FLT_EPSILON:
        scale = np.float32(1.0)
    offset = -round(float(lo) / float(scale)) - (1 << (num_bits - 1))
    return float(scale), int(offset)


_SCRATCH = threading.local()
#: The fused mask kernels of the ULQ backward, looked up once.
_HARDTANH_BACKWARD = torch.ops.aten.hardtanh_backward.default
_THRESHOLD_BACKWARD_INTO = torch.ops.aten.threshold_backward.grad_input


def _scratch(like: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``count`` temporary tensors shaped and typed like ``like``, views of buffers kept per
    thread, device and dtype and grown to the largest size asked for.

    The backward of every ULQ layer needs two activation-sized temporaries. Fresh tensors of
    that size come from newly mapped memory on each call (the first write to every page
    faults), which made the backward several times slower than its arithmetic; layers run
    their backward one after another, so one set of buffers serves them all (the memory of
    ``count`` of the largest activation, once per thread). A caller must not keep the views
    beyond its own call.
    """
    key = (like.device, like.dtype)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    held = buffers.get(key, [])
    numel = like.numel()
    if len(held) < count or held[0].numel() < numel:
        held = [torch.empty(max(numel, held[0].numel() if held else 0), dtype=like.dtype,
                            device=like.device) for _ in range(count)]
        buffers[key] = held
    return [buffer[:numel].view(like.shape) for buffer in held[:count]]


class UlqActivationFunction(torch.autograd.Function):
    """ULQ activation fake-quant (forward and backward of :mod:`amct_core.quant.ulq`).

    ``apply(x, clip_max, clip_min, num_bits, fixed_min, export_factors=None)``; the clips are
    1-element tensors. Backward: ``grad_x = g·inside``, ``grad_clip_max = Σ(qerr + upper)·g``,
    ``grad_clip_min = Σ(lower - qerr)·g`` (None when ``fixed_min``),
    ``qerr = (round(t) - t)/(2^b - 1)`` inside, ``t = x·float32(1/s)``.

    Implementation: with ``r = round(t)``, ``k_lo = qmin - o`` and ``k_hi = qmax - o`` the
    forward is ``clamp(r, k_lo, k_hi)·s`` (the same integers as ``clip(r + o, qmin, qmax) -
    o`` since ``o`` is an integer). The fused kernels do the forward, and the backward with
    its three sums, in one pass each. Otherwise the forward is four torch passes and the
    backward recomputes ``r`` from the saved input into two shared scratch buffers; torch's
    fused mask kernels give
    ``grad_x = g·[k_lo - ½ < r < k_hi + ½]`` (``hardtanh_backward``; exact, ``r`` is an
    integer) and ``U = g·[r > k_hi + ½]`` (``threshold_backward``); ``Σ qerr·g`` is one dot
    product of ``grad_x`` with ``t - r`` and ``Σ lower·g = Σ g - Σ grad_x - Σ U``. Scalars
    are Python numbers (float32 values), as in the core.
    """

    @staticmethod
    def forward(ctx, x, clip_max, clip_min, num_bits, fixed_min, export_factors=None):
        qmin, qmax = int_range(num_bits)
        scale, offset = ulq_host_factors(clip_max, clip_min, num_bits, fixed_min)
        k_lo, k_hi = float(qmin - offset), float(qmax - offset)
        inverse = float(np.float32(1.0) / np.float32(scale))
        if _fusable(x):
            out = torch.empty_like(x)
            _FUSED.ulq_forward(x.data_ptr(), out.data_ptr(), x.numel(), inverse, k_lo, k_hi,
                               scale, torch.get_num_threads())
        else:
            out = torch.mul(x, inverse)
            out.round_()
            out.clamp_(k_lo, k_hi)
            out.mul_(scale)
        ctx.save_for_backward(x)
        ctx.factors = (inverse, k_lo, k_hi, num_bits)
        ctx.fixed_min = fixed_min
        ctx.clip_shapes = (clip_max.shape, clip_min.shape)
        return out

    @staticmethod
    @once_differentiable  # neither path records its operations for a second derivative
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        inverse, k_lo, k_hi, num_bits = ctx.factors
        g = grad_output.contiguous()
        levels = float((1 << num_bits) - 1)
        want_min = not ctx.fixed_min and ctx.needs_input_grad[2]
        if _fusable(x, g) and x.shape == g.shape:
            grad_x = torch.empty_like(x)
            # Σ inside·g·(t - r) = -n·Σ qerr·g, Σ upper·g, Σ lower·g
            neg_qerr, upper, lower = _FUSED.ulq_backward(
                x.data_ptr(), g.data_ptr(), grad_x.data_ptr(), x.numel(), inverse, k_lo, k_hi,
                torch.get_num_threads())
            grad_max = torch.full(ctx.clip_shapes[0], upper - neg_qerr / levels,
                                  dtype=torch.float32, device=x.device)
            grad_min = None
            if want_min:
                grad_min = torch.full(ctx.clip_shapes[1], lower + neg_qerr / levels,
                                      dtype=torch.float32, device=x.device)
            return grad_x, grad_max, grad_min, None, None, None
        t, r = _scratch(x, 2)
        torch.mul(x, inverse, out=t)
        # Clamped to [k_lo - 1, k_hi + 1] (integers), t keeps the side of the range its
        # rounding falls on and t - round(t) inside it, and stays finite: an infinite
        # activation is then an upper or lower element, not a NaN in the sums.
        t.clamp_(k_lo - 1.0, k_hi + 1.0)
        torch.round(t, out=r)
        # g where k_lo - ½ < r < k_hi + ½, i.e. k_lo <= r <= k_hi (r is an integer): g·inside
        grad_x = _HARDTANH_BACKWARD(g, r, k_lo - 0.5, k_hi + 0.5)
        t.sub_(r)  # t - round(t) = -n·qerr on the inside elements
        neg_qerr_sum = torch.dot(grad_x.view(-1), t.view(-1))  # -n·Σ qerr·g
        _THRESHOLD_BACKWARD_INTO(g, r, k_hi + 0.5, grad_input=r)  # r := g·upper
        upper = r.sum()
        grad_max = torch.add(upper, neg_qerr_sum, alpha=-1.0 / levels)
        grad_min = None
        if want_min:
            # Σ lower·g = Σ g - Σ inside·g - Σ upper·g
            lower = g.sum() - grad_x.sum() - upper
            grad_min = torch.add(lower, neg_qerr_sum, alpha=1.0 / levels)
            grad_min = grad_min.reshape(ctx.clip_shapes[1])
        return grad_x, grad_max.reshape(ctx.clip_shapes[0]), grad_min, None, None, None

    @staticmethod
    def symbolic(g, x, clip_max, clip_min, num_bits, fixed_min, export_factors=None):
        return _qdq_symbolic(g, x, export_factors, "UlqActivationFunction")


def arq_retrain_scale(weight: torch.Tensor, num_bits: int, channel_wise: bool,
                      axis: int) -> torch.Tensor:
    """Symmetric min-max scales of ``weight`` (float32, shape ``(C,)`` or ``(1,)``), the rule of
    :func:`amct_core.quant.arq.arq_weight`: ``max(|max|,|min|)/(2^(b-1)-1)``, ``/2^(b-1)`` when
    ``|min| > |max|``; ``< FLT_EPSILON`` → 1."""
    w = weight.detach()
    if channel_wise:
        rows = w.transpose(0, axis) if axis else w
        rows = rows.reshape(w.shape[axis], -1)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # (faster than aminmax on CPU)
    else:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    half = float(1 << (num_bits - 1))
    neg, pos = lo.abs(), hi.abs()
    scale = torch.where(neg > pos, neg / half, pos / (half - 1.0))
    return scale.masked_fill_(scale < FLT_EPSILON, 1.0)


def _fake_quantize_weight(weight: torch.Tensor, scale: torch.Tensor, num_bits: int, axis: int,
                          per_channel: bool) -> torch.Tensor:
    """``clip(round(w·(1/s)), qmin, qmax)·s`` (offset 0; ``scale`` per channel along ``axis``
    when ``per_channel``; ``1/s`` the float32 reciprocal)."""
    qmin, qmax = int_range(num_bits)
    s = _lay(scale, weight.dim(), axis, per_channel)
    with torch.no_grad():
        out = torch.mul(weight, torch.reciprocal(s))
        return out.round_().clamp_(qmin, qmax).mul_(s)


def _lay(values: torch.Tensor, ndim: int, axis: int, per_channel: bool) -> torch.Tensor:
    """Per-channel ``values`` shaped to broadcast along ``axis``; one value as a 0-d tensor."""
    if not per_channel:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.numel()
    return values.reshape(shape)


class ArqRetrainFunction(torch.autograd.Function):
    """ARQ-retrain weight fake-quant: ``clip(round(w·(1/s)), qmin, qmax)·s`` with the current
    symmetric min-max ``s`` (per channel along ``axis`` when ``channel_wise``); backward is the
    straight-through identity. ``apply(w, num_bits, channel_wise, axis, export_factors=None)``.
    """

    @staticmethod
    def forward(ctx, weight, num_bits, channel_wise, axis, export_factors=None):
        if _fusable(weight) and weight.numel() and 0 <= axis < weight.dim():
            # the weight as (outer, channels, inner) around the channel axis
            shape = weight.shape
            channels = shape[axis] if channel_wise else 1
            outer = math.prod(shape[:axis]) if channel_wise else 1
            out = torch.empty_like(weight)
            scales = torch.empty(channels, dtype=torch.float32)
            _FUSED.arq_forward(weight.data_ptr(), out.data_ptr(), scales.data_ptr(), outer,
                               channels, weight.numel() // (outer * channels), num_bits)
            return out
        scale = arq_retrain_scale(weight, num_bits, channel_wise, axis)
        return _fake_quantize_weight(weight, scale, num_bits, axis, channel_wise)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None

    @staticmethod
    def symbolic(g, weight, num_bits, channel_wise, axis, export_factors=None):
        return _qdq_symbolic(g, weight, export_factors, "ArqRetrainFunction")


def ulq_weight_scale(clip: torch.Tensor, num_bits: int) -> torch.Tensor:
    """``|c|/(2^(b-1) - 1)`` in float32, ``< FLT_EPSILON`` → 1 (as
    :func:`amct_core.quant.arq_retrain.ulq_weight_scale`)."""
    scale = clip.detach().abs().float() / float((1 << (num_bits - 1)) - 1)
    return torch.where(scale < FLT_EPSILON, torch.ones_like(scale), scale)


class UlqWeightFunction(torch.autograd.Function):
    """ULQ-retrain weight fake-quant with learnable symmetric clips ``c`` (one, or one per
    channel along ``axis``): ``ŵ = clip(round(w·(1/s)), qmin, qmax)·s``, ``s = c/qmax``.
    Backward: ``grad_w = g·inside``, ``grad_c = Σ_channel ((round(t)-t)/qmax·inside + upper +
    (qmin/qmax)·lower)·g``. ``apply(w, clip, num_bits, axis, export_factors=None)``."""

    @staticmethod
    def forward(ctx, weight, clip, num_bits, axis, export_factors=None):
        per_channel = math.prod(clip.shape) > 1
        flat_scale = ulq_weight_scale(clip, num_bits).reshape(-1)
        out = _fake_quantize_weight(weight, flat_scale, num_bits, axis, per_channel)
        scale = _lay(flat_scale, weight.dim(), axis, per_channel)
        ctx.save_for_backward(weight, scale)
        ctx.num_bits, ctx.axis, ctx.clip_shape = num_bits, axis, clip.shape
        return out

    @staticmethod
    def backward(ctx, grad_output):
        weight, scale = ctx.saved_tensors
        qmin, qmax = int_range(ctx.num_bits)
        t = torch.mul(weight, torch.reciprocal(scale))
        r = torch.round(t)
        below, above = r < qmin, r > qmax
        grad_w = grad_output.masked_fill(below | above, 0.0)
        local = grad_w * (r - t) / float(qmax) + grad_output * above \
            + grad_output * below * (qmin / qmax)
        if math.prod(ctx.clip_shape) == 1:
            grad_clip = local.sum()
        else:
            grad_clip = local.transpose(0, ctx.axis).reshape(local.shape[ctx.axis], -1).sum(1)
        return grad_w, grad_clip.reshape(ctx.clip_shape), None, None, None

    @staticmethod
    def symbolic(g, weight, clip, num_bits, axis, export_factors=None):
        return _qdq_symbolic(g, weight, export_factors, "UlqWeightFunction")

