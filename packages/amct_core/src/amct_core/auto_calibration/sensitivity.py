"""Per-layer quantization sensitivity for accuracy-based automatic calibration (reference §3.1).

A sensitivity measure compares a layer's float output with the output of the same layer run
with its fake-quant factors on the same cached input activations. Higher means more similar,
that is less sensitive to quantization. The layers that come out least similar are the first
candidates for rolling back (``quant_enable = false``).

The default measure is :class:`CosineSimilarity`, ``0.5 + 0.5·cos(fp32_out, fakequant_out)``,
which lies in ``[0, 1]``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from amct_core.errors import AmctTypeError, AmctValueError


def check_outputs(float_output: np.ndarray, quant_output: np.ndarray) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """Validate a pair of layer outputs and return them flattened as float64.

    Both must be real numeric arrays of the same shape, non-empty and finite; otherwise an
    :class:`~amct_core.errors.AmctValueError` says which argument is at fault.
    """
    arrays = []
    for name, value in (("float_output", float_output), ("quant_output", quant_output)):
        data = np.asarray(value)
        if data.dtype.kind not in "fiu" or data.dtype == np.bool_:
            raise AmctValueError(
                f"{name} must be a real numeric array, got dtype {data.dtype}.")
        if data.size == 0:
            raise AmctValueError(
                f"{name} is empty (shape {data.shape}); a layer output with no elements "
                "cannot be compared.")
        arrays.append(data)
    if arrays[0].shape != arrays[1].shape:
        raise AmctValueError(
            f"float_output and quant_output must have the same shape, got "
            f"{arrays[0].shape} and {arrays[1].shape}.")
    flat = []
    for name, data in zip(("float_output", "quant_output"), arrays, strict=True):
        data64 = data.astype(np.float64).reshape(-1)
        bad = int(np.count_nonzero(~np.isfinite(data64)))
        if bad:
            raise AmctValueError(
                f"{name} contains {bad} NaN or Inf value(s) out of {data64.size}; the layer's "
                "sensitivity cannot be measured. Check the model and the calibration data.")
        flat.append(data64)
    return flat[0], flat[1]


class SensitivityBase(ABC):
    """How similar a layer's fake-quant output is to its float output (reference §3.1).

    Subclasses set :attr:`name` and implement :meth:`compare`, which must return a finite
    float where **higher means more similar** (less sensitive to quantization). Layers are
    ranked in ascending order of this value by :func:`rank_layers`.
    """

    #: Short name, as accepted by the ``sensitivity`` argument of the framework drivers.
    name: str = ""

    @abstractmethod
    def compare(self, float_output: np.ndarray, quant_output: np.ndarray) -> float:
        """Similarity of ``quant_output`` to ``float_output``; higher is more similar."""


class CosineSimilarity(SensitivityBase):
    """``0.5 + 0.5·cos(fp32_out, fakequant_out)`` over the flattened outputs (reference §3.1).

    ``cos(a, b) = Σ aᵢbᵢ / (‖a‖₂·‖b‖₂)``, computed in float64, so the value lies in
    ``[0, 1]``: 1 for outputs pointing the same way, 0.5 for orthogonal ones, 0 for opposite
    ones. The cosine ignores a common positive scale of either output.

    Zero norms: when both outputs are all zeros they are identical and the value is 1.0; when
    exactly one is all zeros the cosine is undefined and is taken as 0 (value 0.5), since the
    fake-quant layer has lost (or invented) the whole signal.
    """

    name = "CosineSimilarity"

    def compare(self, float_output: np.ndarray, quant_output: np.ndarray) -> float:
        """``0.5 + 0.5·cos(float_output, quant_output)``; see the class docstring."""
        a, b = check_outputs(float_output, quant_output)
        # Normalise by the largest magnitude first so the dot product cannot overflow.
        norm_a, norm_b = _scaled_norm(a), _scaled_norm(b)
        if norm_a[1] == 0.0 and norm_b[1] == 0.0:
            return 1.0
        if norm_a[1] == 0.0 or norm_b[1] == 0.0:
            return 0.5
        cos = float(np.dot(norm_a[0], norm_b[0]) / (norm_a[1] * norm_b[1]))
        cos = min(1.0, max(-1.0, cos))
        return 0.5 + 0.5 * cos


def _scaled_norm(x: np.ndarray) -> tuple[np.ndarray, float]:
    """``(x / max|x|, ‖x / max|x|‖₂)``; ``(x, 0.0)`` for an all-zero ``x``."""
    peak = float(np.max(np.abs(x)))
    if peak == 0.0:
        return x, 0.0
    scaled = x / peak
    return scaled, float(np.linalg.norm(scaled))


_SENSITIVITIES: dict[str, type[SensitivityBase]] = {CosineSimilarity.name: CosineSimilarity}


def resolve_sensitivity(sensitivity: str | SensitivityBase) -> SensitivityBase:
    """The measure named by ``sensitivity`` (``'CosineSimilarity'``), or a user object as is.

    User objects must be instances of :class:`SensitivityBase`.
    """
    if isinstance(sensitivity, SensitivityBase):
        return sensitivity
    if isinstance(sensitivity, str):
        try:
            return _SENSITIVITIES[sensitivity]()
        except KeyError:
            raise AmctValueError(
                f"Unknown sensitivity {sensitivity!r}; expected one of "
                f"{sorted(_SENSITIVITIES)} or an instance of a SensitivityBase subclass."
            ) from None
    raise AmctTypeError(
        f"sensitivity must be a name or a SensitivityBase instance, got "
        f"{type(sensitivity).__name__}.")


def rank_layers(similarities: Mapping[str, float]) -> list[tuple[str, float]]:
    """``(layer, similarity)`` pairs in ascending similarity, most sensitive layer first.

    Ties are broken by layer name so the order is deterministic. Names must be strings and
    similarities finite real numbers (reference §3.1, BinarySearchStrategy's ranking).
    """
    if not isinstance(similarities, Mapping):
        raise AmctTypeError(
            f"similarities must be a mapping from layer name to similarity, got "
            f"{type(similarities).__name__}.")
    pairs = []
    for layer, value in similarities.items():
        if not isinstance(layer, str):
            raise AmctTypeError(f"Layer names must be strings, got {layer!r}.")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                              np.floating)):
            raise AmctTypeError(
                f"Similarity of layer {layer!r} must be a real number, got {value!r}.")
        if not math.isfinite(float(value)):
            raise AmctValueError(
                f"Similarity of layer {layer!r} is {value}; it must be finite.")
        pairs.append((layer, float(value)))
    return sorted(pairs, key=lambda pair: (pair[1], pair[0]))
