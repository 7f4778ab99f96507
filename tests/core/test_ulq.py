"""ULQ activation fake-quant (reference §3.4): factors, forward, straight-through backward and
the IFMR initial clips of amct_core.quant.ulq."""
from __future__ import annotations

import numpy as np
import pytest

from amct_core.errors import AmctValueError, QuantizationError
from amct_core.quant.ifmr import ifmr
from amct_core.quant.scale_offset import fake_quantize
from amct_core.quant.ulq import (
    clips_from_factors,
    effective_clips,
    ifmr_initial_clips,
    ulq_backward,
    ulq_forward,
    ulq_scale_offset,
)


def test_scale_offset_from_clips_follow_the_asymmetric_rule():
    scale, offset = ulq_scale_offset(3.0, -1.0, 8)
    assert scale == pytest.approx(4.0 / 255, rel=1e-7)
    assert offset == -round(-1.0 / np.float32(4.0 / 255)) - 128  # clip_min maps to -128
    assert offset == -128 + 64
    # 4 and 16 bits
    assert ulq_scale_offset(3.0, -1.0, 4)[0] == pytest.approx(4.0 / 15, rel=1e-7)
    assert ulq_scale_offset(3.0, -1.0, 16)[0] == pytest.approx(4.0 / 65535, rel=1e-6)


def test_clips_are_made_to_include_zero_and_fixed_min_zeroes_clip_min():
    assert effective_clips(2.0, 0.5) == (np.float32(2.0), np.float32(0.0))
    assert effective_clips(-1.0, -3.0) == (np.float32(0.0), np.float32(-3.0))
    assert effective_clips(2.0, -3.0, fixed_min=True) == (np.float32(2.0), np.float32(0.0))
    assert ulq_scale_offset(2.0, 0.5, 8) == ulq_scale_offset(2.0, 0.0, 8)
    assert ulq_scale_offset(2.0, -5.0, 8, fixed_min=True) == ulq_scale_offset(2.0, 0.0, 8)
    # both clips at 0: scale below FLT_EPSILON becomes 1
    assert ulq_scale_offset(0.0, 0.0, 8) == (1.0, -128)
    with pytest.raises(AmctValueError, match="finite"):
        ulq_scale_offset(float("nan"), -1.0)
    with pytest.raises(QuantizationError, match="num_bits"):
        ulq_scale_offset(1.0, -1.0, 7)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_forward_equals_fake_quantize_with_the_derived_factors(bits):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(5000) * 2).astype(np.float32)
    scale, offset = ulq_scale_offset(2.5, -1.2, bits)
    out = ulq_forward(x, 2.5, -1.2, bits)
    np.testing.assert_array_equal(out, fake_quantize(x, scale, offset, bits))
    # element by element: clip(round(x·float32(1/s)) + o) - o, times s
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    inv = np.float32(1) / np.float32(scale)
    expected = [np.float32(min(max(round(float(np.float32(v) * inv)) + offset, qmin), qmax)
                           - offset) * np.float32(scale) for v in x]
    np.testing.assert_array_equal(out, np.array(expected, dtype=np.float32))
    # values saturate at the two ends of the range, near the clips
    assert out.max() == pytest.approx(2.5, abs=scale)
    assert out.min() == pytest.approx(-1.2, abs=scale)
    # inside the range the error is at most half a step
    inside = (x > -1.2) & (x < 2.5)
    err = np.abs(out[inside] - x[inside]) - (scale / 2 + 4e-7 * np.abs(x[inside]))
    assert err.max() <= 0


def _direct_gradients(x, g, clip_max, clip_min, bits, fixed_min=False):
    """The reference §3.4 formulas evaluated element by element in float64."""
    n = 2 ** bits - 1
    lo = 0.0 if fixed_min else min(clip_min, 0.0)
    hi = max(clip_max, 0.0)
    s = float(np.float32(np.float32(hi) - np.float32(lo)) / np.float32(n))
    offset = -round(lo / s) - 2 ** (bits - 1)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    gx, gmax, gmin = [], 0.0, 0.0
    inv = np.float32(1) / np.float32(s)
    for xi, gi in zip(x.tolist(), g.tolist(), strict=True):
        t = float(np.float32(xi) * inv)
        u = round(t) + offset
        if u < qmin:
            gx.append(0.0)
            gmin += gi
        elif u > qmax:
            gx.append(0.0)
            gmax += gi
        else:
            qerr = (round(t) - t) / n
            gx.append(gi)
            gmax += qerr * gi
            gmin -= qerr * gi
    return np.array(gx), gmax, (0.0 if fixed_min else gmin)


@pytest.mark.parametrize(("clip_max", "clip_min", "bits", "fixed_min"),
                         [(2.5, -1.2, 8, False), (1.0, 0.0, 8, True), (3.0, -3.0, 4, False),
                          (0.7, -2.0, 16, False), (1.5, -0.5, 8, True)])
def test_backward_matches_the_formula_element_by_element(clip_max, clip_min, bits, fixed_min):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(3000) * 2).astype(np.float32)
    g = rng.standard_normal(3000)
    grads = ulq_backward(x, g, clip_max, clip_min, bits, fixed_min)
    gx, gmax, gmin = _direct_gradients(x, g, clip_max, clip_min, bits, fixed_min)
    np.testing.assert_array_equal(grads.grad_x, gx.astype(np.float32))
    assert grads.grad_clip_max == pytest.approx(gmax, rel=1e-9, abs=1e-9)
    assert grads.grad_clip_min == pytest.approx(gmin, rel=1e-9, abs=1e-9)
    # outside elements are a real share of the test
    assert 0 < np.count_nonzero(gx == 0) < x.size


def test_clip_max_gradient_agrees_with_finite_differences_above_the_range():
    """With clip_min = 0 (fixed_min) the output above the range is exactly clip_max, so there
    the ULQ gradient (upper mask) is the true derivative: central differences reproduce it."""
    rng = np.random.default_rng(2)
    x = rng.uniform(1.2, 4.0, 400).astype(np.float32)  # all above clip_max = 1.0
    g = rng.standard_normal(400)
    def loss(c):
        return float(np.sum(g * ulq_forward(x, c, 0.0, 8, fixed_min=True).astype(np.float64)))
    h = 1e-3
    numeric = (loss(1.0 + h) - loss(1.0 - h)) / (2 * h)
    grads = ulq_backward(x, g, 1.0, 0.0, 8, fixed_min=True)
    assert grads.grad_clip_max == pytest.approx(numeric, rel=1e-4)
    assert grads.grad_clip_max == pytest.approx(g.sum(), rel=1e-12)
    assert not np.any(grads.grad_x)


def test_below_range_gradient_is_the_lower_mask_and_independent_of_clip_max():
    rng = np.random.default_rng(3)
    x = rng.uniform(-5.0, -2.0, 300).astype(np.float32)  # all below clip_min = -1.5
    g = rng.standard_normal(300)
    grads = ulq_backward(x, g, 2.0, -1.5, 8)
    assert grads.grad_clip_min == pytest.approx(g.sum(), rel=1e-12)
    assert grads.grad_clip_max == 0.0
    assert not np.any(grads.grad_x)
    # the forward there is the lower end of the range, (qmin - o)·s, close to clip_min
    scale, offset = ulq_scale_offset(2.0, -1.5, 8)
    out = ulq_forward(x, 2.0, -1.5, 8)
    np.testing.assert_array_equal(out, np.float32((-128 - offset) * np.float32(scale)))
    assert abs(out[0] + 1.5) <= scale / 2


def test_backward_checks_the_gradient_shape():
    with pytest.raises(AmctValueError, match="grad_output has shape"):
        ulq_backward(np.zeros(4, np.float32), np.zeros(5), 1.0, -1.0)


def test_initial_clips_are_the_ends_of_the_asymmetric_ifmr_range():
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((8, 100)).astype(np.float32) + 0.5 for _ in range(3)]
    clip_max, clip_min = ifmr_initial_clips(batches, 8)
    scale, offset = ifmr(np.concatenate([b.reshape(-1) for b in batches]), 8, symmetric=False)
    assert clip_max == pytest.approx((127 - offset) * scale, rel=1e-6)
    assert clip_min == pytest.approx((-128 - offset) * scale, rel=1e-6)
    assert (clip_max, clip_min) == clips_from_factors(scale, offset, 8)
    # ULQ on these clips reproduces IFMR's factors
    s2, o2 = ulq_scale_offset(clip_max, clip_min, 8)
    assert o2 == offset and s2 == pytest.approx(scale, rel=1e-6)
    # ReLU data: clip_min is 0; fixed_min forces 0
    relu = [np.maximum(b, 0) for b in batches]
    assert ifmr_initial_clips(relu, 8)[1] == 0.0
    assert ifmr_initial_clips(batches, 8, fixed_min=True)[1] == 0.0
