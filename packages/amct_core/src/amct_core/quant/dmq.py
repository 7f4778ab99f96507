"""DMQ: data/weight balancing before quantization (reference §3.4, ``dmq_balancer``).

Activations with a few outlier channels quantize badly per tensor, while weights are quantized
per channel. DMQ moves part of the difficulty from the activation to the weight with a
per-input-channel factor ``s``: the layer computes ``(X / s) ⊛ (W · s)``, which equals
``X ⊛ W`` in exact arithmetic because every input channel ``j`` of ``X`` meets only the slice
of ``W`` that multiplies input channel ``j``.

For input channel ``j`` (α = ``migration_strength`` ∈ [0.2, 0.8], default 0.5)::

    s_j = max|X_j|^α / max|W_j|^(1 − α)

where ``max|X_j|`` is over the calibration activations of channel ``j`` and ``max|W_j|`` over
the weight elements that multiply channel ``j``. A channel where either maximum is 0 gets
``s_j = 1`` (nothing to balance, and the formula would give 0 or ∞). The factors are stored in
the record as ``tensor_balance_factor``; the activation is divided by ``s`` and the weight
multiplied by ``s`` (:func:`balance_activation`, :func:`apply_balance`).

Weight layouts (``kind``), PyTorch's:

- ``"linear"``: ``(out, in)``; input channel ``j`` is column ``j``.
- ``"conv"`` (Conv1d/2d/3d): ``(C_out, C_in/g, k...)``; input channel ``j`` of group
  ``i = j // (C_in/g)`` is slice ``[i·C_out/g : (i+1)·C_out/g, j mod (C_in/g), ...]``.
- ``"conv_transpose"``: ``(C_in, C_out/g, k...)``; input channel ``j`` is slice ``[j, ...]``.
"""
from __future__ import annotations

import numbers

import numpy as np

from amct_core.errors import AmctTypeError, AmctValueError, QuantizationError

#: The allowed range of ``migration_strength`` (inclusive), and its default.
MIGRATION_STRENGTH_RANGE = (0.2, 0.8)
DEFAULT_MIGRATION_STRENGTH = 0.5
#: The weight layouts understood by :func:`weight_in_channel_abs_max` and :func:`apply_balance`.
WEIGHT_KINDS = ("conv", "conv_transpose", "linear")


def check_migration_strength(migration_strength: float) -> float:
    """``migration_strength`` as a float, checked to be a real number in [0.2, 0.8]."""
    if isinstance(migration_strength, bool) or not isinstance(migration_strength,
                                                              numbers.Real):
        raise AmctTypeError(
            f"migration_strength must be a real number in [0.2, 0.8], got "
            f"{migration_strength!r}.")
    value = float(migration_strength)
    low, high = MIGRATION_STRENGTH_RANGE
    if not low <= value <= high:
        raise AmctValueError(
            f"migration_strength must be in [{low}, {high}], got {value}.")
    return value


def _real_array(value: np.ndarray, name: str) -> np.ndarray:
    data = np.asarray(value)
    if data.dtype.kind not in "fiu" or data.dtype == np.bool_:
        raise AmctValueError(f"{name} must be a real numeric array, got dtype {data.dtype}.")
    if data.size == 0:
        raise AmctValueError(f"{name} is empty (shape {data.shape}).")
    if not np.all(np.isfinite(data)):
        raise AmctValueError(f"{name} contains NaN or Inf.")
    return data


def _check_abs_max(value: np.ndarray, name: str) -> np.ndarray:
    data = _real_array(value, name)
    if data.ndim != 1:
        raise AmctValueError(f"{name} must be 1-D (one value per channel), got shape "
                             f"{data.shape}.")
    if np.any(data < 0):
        raise AmctValueError(f"{name} must be >= 0 (it is a maximum of absolute values).")
    return data.astype(np.float64)


def dmq_balance_factors(act_abs_max_per_channel: np.ndarray,
                        weight_abs_max_per_in_channel: np.ndarray,
                        migration_strength: float = DEFAULT_MIGRATION_STRENGTH) -> np.ndarray:
    """Per-input-channel balance factors ``s`` (reference §3.4, DMQ), float32 of shape (C,).

    ``s_j = a_j^α / w_j^(1 − α)`` with ``a_j = max|X_j|``, ``w_j = max|W_j|`` and
    ``α = migration_strength`` ∈ [0.2, 0.8]; ``s_j = 1`` where ``a_j = 0`` or ``w_j = 0``.
    Computed in float64 and rounded to float32; a factor that does not fit float32 as a
    finite positive number raises :class:`~amct_core.errors.QuantizationError`.
    """
    alpha = check_migration_strength(migration_strength)
    act = _check_abs_max(act_abs_max_per_channel, "act_abs_max_per_channel")
    wts = _check_abs_max(weight_abs_max_per_in_channel, "weight_abs_max_per_in_channel")
    if act.shape != wts.shape:
        raise AmctValueError(
            f"act_abs_max_per_channel has {act.shape[0]} channels but "
            f"weight_abs_max_per_in_channel has {wts.shape[0]}; both must count the layer's "
            "input channels.")
    live = (act > 0) & (wts > 0)
    factors = np.ones(act.shape, dtype=np.float64)
    factors[live] = np.power(act[live], alpha) / np.power(wts[live], 1.0 - alpha)
    with np.errstate(over="ignore"):
        out = factors.astype(np.float32)
    bad = ~np.isfinite(out) | (out <= 0)
    if np.any(bad):
        channels = np.flatnonzero(bad)[:8].tolist()
        raise QuantizationError(
            f"DMQ balance factors of channels {channels} do not fit float32 (activation and "
            "weight maxima differ by too many orders of magnitude).")
    return out


def _check_kind(kind: str) -> str:
    if kind not in WEIGHT_KINDS:
        raise AmctValueError(f"kind must be one of {list(WEIGHT_KINDS)}, got {kind!r}.")
    return kind


def _check_groups(groups: int) -> int:
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise AmctValueError(f"groups must be an int >= 1, got {groups!r}.")
    return int(groups)


def _grouped_view(weight: np.ndarray, kind: str, groups: int) -> tuple[np.ndarray, int]:
    """``weight`` viewed with the input-channel axes explicit, and the input channel count.

    linear → ``(out, in)``; conv → ``(g, C_out/g, C_in/g, k...)``; conv_transpose →
    ``(C_in, C_out/g, k...)``. Raises if the shape does not fit ``kind``/``groups``.
    """
    shape = weight.shape
    if kind == "linear":
        if weight.ndim != 2:
            raise AmctValueError(f"A linear weight must be 2-D (out, in), got shape {shape}.")
        if groups != 1:
            raise AmctValueError(f"A linear weight has no groups, got groups={groups}.")
        return weight, shape[1]
    if weight.ndim < 3:
        raise AmctValueError(
            f"A {kind} weight must have at least 3 dimensions (channels and kernel), got "
            f"shape {shape}.")
    if kind == "conv":
        if shape[0] % groups:
            raise AmctValueError(
                f"A conv weight's C_out={shape[0]} is not divisible by groups={groups}.")
        view = weight.reshape((groups, shape[0] // groups, *shape[1:]))
        return view, groups * shape[1]
    if shape[0] % groups:
        raise AmctValueError(
            f"A conv_transpose weight's C_in={shape[0]} is not divisible by groups={groups}.")
    return weight, shape[0]


def weight_in_channel_abs_max(weight: np.ndarray, kind: str, groups: int = 1) -> np.ndarray:
    """``max|W_j|`` for every input channel ``j`` of the layer, float32 of shape (C_in,).

    The layouts of ``kind`` (``"conv"``, ``"conv_transpose"``, ``"linear"``) and the slice of
    ``W`` that meets input channel ``j`` are given in the module docstring (reference §3.4).
    """
    _check_kind(kind)
    groups = _check_groups(groups)
    data = _real_array(weight, "weight")
    view, c_in = _grouped_view(np.abs(data.astype(np.float32)), kind, groups)
    if kind == "linear":
        return view.max(axis=0).astype(np.float32)
    if kind == "conv":
        # (g, C_out/g, C_in/g, k...) → max over output channels of the group and the kernel.
        axes = (1, *range(3, view.ndim))
        return view.max(axis=axes).reshape(c_in).astype(np.float32)
    return view.reshape(c_in, -1).max(axis=1).astype(np.float32)


def activation_channel_abs_max(x: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """``max|X_j|`` over every axis but ``channel_axis``, float32 of shape (C,) (reference §3.4).

    Use ``channel_axis=1`` for conv inputs ``(N, C, ...)`` and ``channel_axis=-1`` for linear
    inputs ``(..., in)``.
    """
    data = _real_array(x, "x")
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, numbers.Integral):
        raise AmctTypeError(f"channel_axis must be an int, got {channel_axis!r}.")
    if not -data.ndim <= channel_axis < data.ndim:
        raise AmctValueError(
            f"channel_axis={channel_axis} is out of range for x of shape {data.shape}.")
    moved = np.moveaxis(np.abs(data.astype(np.float32)), channel_axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1).astype(np.float32)


def _check_factors(factors: np.ndarray, count: int) -> np.ndarray:
    data = _real_array(factors, "factors")
    if data.shape != (count,):
        raise AmctValueError(
            f"factors must have shape ({count},) (one per input channel), got {data.shape}.")
    if np.any(data <= 0):
        raise AmctValueError("factors must be > 0.")
    return data


def apply_balance(weight: np.ndarray, factors: np.ndarray, kind: str,
                  groups: int = 1) -> np.ndarray:
    """``W · s`` along the input-channel axis (reference §3.4, ``ApplyDMQBalancerPass``).

    Each slice of ``weight`` that multiplies input channel ``j`` (module docstring) is
    multiplied by ``factors[j]``. The layer's activation must be divided by the same factors
    (:func:`balance_activation`), which leaves the layer's float output unchanged. A floating
    weight keeps its dtype (the product is computed in it); an integer one becomes float32.
    """
    _check_kind(kind)
    groups = _check_groups(groups)
    data = _real_array(weight, "weight")
    dtype = data.dtype if data.dtype.kind == "f" else np.dtype(np.float32)
    data = data.astype(dtype, copy=False)
    view, c_in = _grouped_view(data, kind, groups)
    scale = _check_factors(factors, c_in).astype(dtype)
    if kind == "linear":
        out = view * scale[None, :]
    elif kind == "conv":
        per_group = scale.reshape(groups, 1, c_in // groups)
        out = view * per_group.reshape(per_group.shape + (1,) * (view.ndim - 3))
    else:
        out = view * scale.reshape((c_in,) + (1,) * (view.ndim - 1))
    return out.reshape(data.shape).astype(dtype, copy=False)


def balance_activation(x: np.ndarray, factors: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """``X / s`` along ``channel_axis``: the activation side of DMQ (reference §3.4).

    A floating ``x`` keeps its dtype; an integer one becomes float32.
    """
    data = np.asarray(x)
    if data.dtype.kind not in "fiu" or data.dtype == np.bool_:
        raise AmctValueError(f"x must be a real numeric array, got dtype {data.dtype}.")
    if not -data.ndim <= channel_axis < data.ndim:
        raise AmctValueError(
            f"channel_axis={channel_axis} is out of range for x of shape {data.shape}.")
    dtype = data.dtype if data.dtype.kind == "f" else np.dtype(np.float32)
    scale = _check_factors(factors, data.shape[channel_axis]).astype(dtype)
    shape = [1] * data.ndim
    shape[channel_axis] = scale.shape[0]
    return (data.astype(dtype, copy=False) / scale.reshape(shape)).astype(dtype, copy=False)
