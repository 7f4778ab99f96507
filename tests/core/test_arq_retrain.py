"""Weight fake-quant for QAT (reference §3.4): ARQ retrain equals PTQ's ARQ factors on the
current weight; ULQ retrain's clip gradient."""
from __future__ import annotations

import numpy as np
import pytest

from amct_core.quant.arq import arq_weight, quantize_weight
from amct_core.quant.arq_retrain import (
    arq_retrain_backward,
    arq_retrain_factors,
    arq_retrain_forward,
    ulq_weight_backward,
    ulq_weight_forward,
    ulq_weight_initial_clip,
    ulq_weight_scale,
)


@pytest.mark.parametrize(("shape", "axis", "channel_wise"),
                         [((8, 3, 3, 3), 0, True), ((8, 3, 3, 3), 0, False),
                          ((4, 6, 2, 2), 1, True), ((10, 20), 0, False)])
@pytest.mark.parametrize("bits", [4, 8])
def test_arq_retrain_equals_arq_factors_and_quantized_integers(shape, axis, channel_wise, bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    scale, offset = arq_retrain_factors(w, bits, channel_wise, axis)
    ref_scale, ref_offset = arq_weight(w, bits, channel_wise, axis)
    np.testing.assert_array_equal(scale, ref_scale)
    np.testing.assert_array_equal(offset, ref_offset)
    fq = arq_retrain_forward(w, bits, channel_wise, axis)
    shape_s = [1] * w.ndim
    if scale.size > 1:
        shape_s[axis] = scale.size
    step = scale.reshape(shape_s)
    ints = quantize_weight(w, scale, offset, bits, axis).astype(np.float32)
    np.testing.assert_array_equal(fq, (ints * step).astype(np.float32))
    # min-max: the error is at most half a step, except above qmax·s when |min| > |max|
    # (scale = |min| / 2^(b-1)), where it stays below one step
    unclipped = ints < 2 ** (bits - 1) - 1
    assert np.all(np.abs(fq - w)[unclipped] <= np.broadcast_to(step / 2 * (1 + 1e-6),
                                                               w.shape)[unclipped])
    assert np.all(np.abs(fq - w) <= step * (1 + 1e-6))


def test_arq_retrain_gradient_is_the_identity():
    g = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = arq_retrain_backward(g)
    np.testing.assert_array_equal(out, g)
    assert out is not g


def test_ulq_weight_initial_clip_and_scale():
    w = np.array([[1.0, -3.0], [0.5, 0.25]], dtype=np.float32)
    np.testing.assert_array_equal(ulq_weight_initial_clip(w, True, 0), [3.0, 0.5])
    np.testing.assert_array_equal(ulq_weight_initial_clip(w, False, 0), [3.0])
    np.testing.assert_array_equal(ulq_weight_initial_clip(w, True, 1), [1.0, 3.0])
    np.testing.assert_allclose(ulq_weight_scale(np.array([3.0, 0.0]), 8), [3.0 / 127, 1.0],
                               rtol=1e-7)


def test_ulq_weight_forward_and_gradient_against_the_formula():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 50)).astype(np.float32)
    clip = np.array([1.0, 1.5, 0.8], dtype=np.float32)
    g = rng.standard_normal(w.shape)
    out = ulq_weight_forward(w, clip, 8, axis=0)
    s = (clip / np.float32(127)).astype(np.float32)
    t = (w * (np.float32(1) / s[:, None])).astype(np.float32)
    q = np.clip(np.round(t), -128, 127)
    np.testing.assert_array_equal(out, (q * s[:, None]).astype(np.float32))
    grads = ulq_weight_backward(w, g, clip, 8, axis=0)
    r = np.round(t.astype(np.float64))
    inside = (r >= -128) & (r <= 127)
    expected = np.where(inside, (r - t) / 127, 0) + (r > 127) - (128 / 127) * (r < -128)
    np.testing.assert_allclose(grads.grad_clip, (expected * g).sum(axis=1), rtol=1e-10)
    np.testing.assert_array_equal(grads.grad_weight, (g * inside).astype(np.float32))
    assert np.count_nonzero(~inside) > 0


def test_ulq_weight_clip_gradient_agrees_with_finite_differences_outside():
    """Above the range ŵ = qmax·s = c exactly, so the derivative there is exact."""
    w = np.array([[2.0, 3.0, 2.5]], dtype=np.float32)
    g = np.array([[0.3, -1.2, 0.7]])
    def loss(c):
        return float(np.sum(g * ulq_weight_forward(w, np.array([c]), 8, 0)))
    h = 1e-3
    numeric = (loss(1.0 + h) - loss(1.0 - h)) / (2 * h)
    grads = ulq_weight_backward(w, g, np.array([1.0]), 8, 0)
    assert grads.grad_clip[0] == pytest.approx(numeric, rel=1e-4)
    assert grads.grad_clip[0] == pytest.approx(g.sum())
