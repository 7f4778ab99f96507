"""DMQ balancing (reference §3.4): the factor formula against direct computation, the weight
layouts against plain loops, the float equivalence of (X/s, W·s), and the error reduction on
real images (sklearn's 8×8 digits, whose 64 pixel columns are the input channels, with a few
columns scaled ×50 to make outlier channels)."""
import numpy as np
import pytest

from amct_core.errors import AmctTypeError, AmctValueError, QuantizationError
from amct_core.quant.arq import arq_weight
from amct_core.quant.dmq import (
    activation_channel_abs_max,
    apply_balance,
    balance_activation,
    check_migration_strength,
    dmq_balance_factors,
    weight_in_channel_abs_max,
)
from amct_core.quant.scale_offset import fake_quantize, scale_offset_from_range

# --- factors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.2, 0.35, 0.5, 0.8])
def test_factors_against_direct_computation(alpha):
    act = np.array([4.0, 0.25, 100.0, 0.0, 3.0, 0.0], dtype=np.float32)
    wts = np.array([0.5, 2.0, 0.01, 1.0, 0.0, 0.0], dtype=np.float32)
    got = dmq_balance_factors(act, wts, alpha)
    assert got.dtype == np.float32 and got.shape == (6,)
    for j in range(6):
        if act[j] == 0 or wts[j] == 0:
            expected = 1.0
        else:
            expected = float(act[j]) ** alpha / float(wts[j]) ** (1 - alpha)
        assert got[j] == np.float32(expected)
    # By hand for α = 0.5: sqrt(4) / sqrt(0.5) = 2·sqrt(2).
    if alpha == 0.5:
        assert got[0] == np.float32(2 * np.sqrt(2))


def test_factors_default_and_balanced_maxima():
    act = np.array([8.0, 1.0, 50.0])
    wts = np.array([0.5, 0.5, 0.02])
    s = dmq_balance_factors(act, wts)
    # With α = 0.5 the balanced maxima meet: a/s = w·s = sqrt(a·w).
    np.testing.assert_allclose(act / s, wts * s, rtol=1e-6)
    np.testing.assert_allclose(act / s, np.sqrt(act * wts), rtol=1e-6)


def test_factor_errors():
    with pytest.raises(AmctValueError, match=r"migration_strength must be in \[0.2, 0.8\], "
                                             r"got 0.9"):
        dmq_balance_factors([1.0], [1.0], 0.9)
    with pytest.raises(AmctValueError, match="got 0.1"):
        check_migration_strength(0.1)
    with pytest.raises(AmctTypeError, match="real number"):
        check_migration_strength("0.5")
    with pytest.raises(AmctTypeError, match="real number"):
        check_migration_strength(True)
    assert check_migration_strength(np.float32(0.25)) == pytest.approx(0.25)
    with pytest.raises(AmctValueError, match="has 2 channels but weight_abs_max_per_in_channel "
                                             "has 3"):
        dmq_balance_factors([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(AmctValueError, match="must be >= 0"):
        dmq_balance_factors([1.0, -2.0], [1.0, 2.0])
    with pytest.raises(AmctValueError, match="contains NaN or Inf"):
        dmq_balance_factors([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(AmctValueError, match="must be 1-D"):
        dmq_balance_factors([[1.0]], [[1.0]])
    with pytest.raises(AmctValueError, match="is empty"):
        dmq_balance_factors([], [])
    with pytest.raises(QuantizationError, match=r"channels \[0\] do not fit float32"):
        dmq_balance_factors([1e38], [1e-45], 0.8)


# --- layouts ---------------------------------------------------------------------------------


def loop_in_channel_max(weight, kind, groups):
    """max|W| per input channel by visiting every element."""
    w = np.abs(np.asarray(weight, dtype=np.float64))
    if kind == "linear":
        out = np.zeros(w.shape[1])
        for o in range(w.shape[0]):
            for j in range(w.shape[1]):
                out[j] = max(out[j], w[o, j])
        return out
    if kind == "conv":
        c_out, c_in_g = w.shape[:2]
        out = np.zeros(groups * c_in_g)
        for o in range(c_out):
            group = o // (c_out // groups)
            for jl in range(c_in_g):
                j = group * c_in_g + jl
                out[j] = max(out[j], w[o, jl].max())
        return out
    return np.array([w[j].max() for j in range(w.shape[0])])


@pytest.mark.parametrize(("kind", "shape", "groups"), [
    ("linear", (5, 7), 1),
    ("conv", (6, 4, 3, 3), 1),
    ("conv", (6, 2, 3, 3), 3),
    ("conv", (4, 1, 3), 4),
    ("conv", (4, 3, 2, 2, 2), 2),
    ("conv_transpose", (6, 5, 3, 3), 1),
    ("conv_transpose", (6, 2, 3, 3), 2),
])
def test_weight_in_channel_abs_max_against_loops(kind, shape, groups):
    weight = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = weight_in_channel_abs_max(weight, kind, groups)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, loop_in_channel_max(weight, kind, groups).astype(
        np.float32))


def test_weight_layout_errors():
    with pytest.raises(AmctValueError, match="kind must be one of"):
        weight_in_channel_abs_max(np.ones((2, 2)), "dense")
    with pytest.raises(AmctValueError, match=r"linear weight must be 2-D \(out, in\)"):
        weight_in_channel_abs_max(np.ones((2, 2, 1)), "linear")
    with pytest.raises(AmctValueError, match="at least 3 dimensions"):
        weight_in_channel_abs_max(np.ones((2, 2)), "conv")
    with pytest.raises(AmctValueError, match="C_out=6 is not divisible by groups=4"):
        weight_in_channel_abs_max(np.ones((6, 1, 3, 3)), "conv", 4)
    with pytest.raises(AmctValueError, match="C_in=5 is not divisible by groups=2"):
        weight_in_channel_abs_max(np.ones((5, 1, 3, 3)), "conv_transpose", 2)
    with pytest.raises(AmctValueError, match="groups must be an int >= 1"):
        weight_in_channel_abs_max(np.ones((6, 1, 3, 3)), "conv", 0)
    with pytest.raises(AmctValueError, match="no groups"):
        weight_in_channel_abs_max(np.ones((2, 2)), "linear", 2)
    with pytest.raises(AmctValueError, match=r"factors must have shape \(4,\)"):
        apply_balance(np.ones((3, 4)), np.ones(3), "linear")
    with pytest.raises(AmctValueError, match="factors must be > 0"):
        apply_balance(np.ones((3, 2)), np.array([1.0, 0.0]), "linear")


def test_activation_channel_abs_max():
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 5))
    np.testing.assert_array_equal(activation_channel_abs_max(x),
                                  np.abs(x).max(axis=(0, 2, 3)).astype(np.float32))
    y = np.random.default_rng(2).normal(size=(2, 6, 7))
    np.testing.assert_array_equal(activation_channel_abs_max(y, channel_axis=-1),
                                  np.abs(y).max(axis=(0, 1)).astype(np.float32))
    with pytest.raises(AmctValueError, match="channel_axis=4 is out of range"):
        activation_channel_abs_max(x, 4)
    with pytest.raises(AmctValueError, match="x contains NaN or Inf"):
        activation_channel_abs_max(np.array([[np.nan]]))


# --- float equivalence -----------------------------------------------------------------------


def conv2d(x, w, groups):
    """Naive grouped 2-D convolution (cross-correlation), stride 1, no padding, float64."""
    n, _, h, wd = x.shape
    c_out, c_in_g, kh, kw = w.shape
    out = np.zeros((n, c_out, h - kh + 1, wd - kw + 1))
    for o in range(c_out):
        group = o // (c_out // groups)
        for jl in range(c_in_g):
            j = group * c_in_g + jl
            for a in range(kh):
                for b in range(kw):
                    out[:, o] += x[:, j, a:a + out.shape[2], b:b + out.shape[3]] * w[o, jl, a, b]
    return out


def conv_transpose1d(x, w, groups):
    """Naive grouped 1-D transposed convolution, stride 1, float64."""
    n, c_in, length = x.shape
    _, c_out_g, k = w.shape
    out = np.zeros((n, groups * c_out_g, length + k - 1))
    for j in range(c_in):
        group = j // (c_in // groups)
        for ol in range(c_out_g):
            for t in range(k):
                out[:, group * c_out_g + ol, t:t + length] += x[:, j] * w[j, ol, t]
    return out


def power_of_two_factors(count, seed):
    return 2.0 ** np.random.default_rng(seed).integers(-4, 5, size=count)


@pytest.mark.parametrize("groups", [1, 2])
def test_balanced_layers_compute_the_same_float_output(groups):
    rng = np.random.default_rng(3)
    # Linear: powers of two make the float64 products bit-identical; general factors agree
    # to float64 rounding.
    x = rng.normal(size=(4, 6))
    w = rng.normal(size=(5, 6))
    for s, exact in ((power_of_two_factors(6, 4), True), (rng.uniform(0.1, 10, size=6), False)):
        got = balance_activation(x, s, channel_axis=-1) @ apply_balance(w, s, "linear").T
        if exact:
            np.testing.assert_array_equal(got, x @ w.T)
        else:
            np.testing.assert_allclose(got, x @ w.T, rtol=1e-13, atol=1e-13)
    # Conv2d with groups.
    x = rng.normal(size=(2, 4, 5, 5))
    w = rng.normal(size=(6, 4 // groups, 3, 3))
    s = power_of_two_factors(4, 5)
    got = conv2d(balance_activation(x, s), apply_balance(w, s, "conv", groups), groups)
    np.testing.assert_array_equal(got, conv2d(x, w, groups))
    s = rng.uniform(0.1, 10, size=4)
    got = conv2d(balance_activation(x, s), apply_balance(w, s, "conv", groups), groups)
    np.testing.assert_allclose(got, conv2d(x, w, groups), rtol=1e-12, atol=1e-12)
    # ConvTranspose with groups.
    x = rng.normal(size=(2, 4, 6))
    w = rng.normal(size=(4, 3, 3))
    s = power_of_two_factors(4, 6)
    got = conv_transpose1d(balance_activation(x, s), apply_balance(w, s, "conv_transpose",
                                                                   groups), groups)
    np.testing.assert_array_equal(got, conv_transpose1d(x, w, groups))


def test_apply_balance_dtypes_and_values():
    w = np.arange(12, dtype=np.float64).reshape(3, 4)
    s = np.array([1.0, 2.0, 4.0, 8.0], dtype=np.float32)
    out = apply_balance(w, s, "linear")
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, w * s)
    assert apply_balance(w.astype(np.int32), s, "linear").dtype == np.float32
    # Grouped conv by hand: C_out=2, groups=2, C_in/g=1 → channel j scales output row j.
    w = np.ones((2, 1, 1, 1), dtype=np.float32)
    np.testing.assert_array_equal(apply_balance(w, np.array([3.0, 5.0]), "conv", 2).ravel(),
                                  [3.0, 5.0])


# --- error reduction on real images ----------------------------------------------------------


def quantized_linear_error(x, w):
    """‖Q(x)·Q(w)ᵀ − x·wᵀ‖ with 8-bit per-tensor activations and per-channel ARQ weights."""
    scale_d, offset_d = scale_offset_from_range(x.min(), x.max(), 8, symmetric=False)
    scale_w, _ = arq_weight(w, 8, channel_wise=True)
    xq = fake_quantize(x, scale_d, offset_d).astype(np.float64)
    wq = fake_quantize(w, scale_w, 0, axis=0).astype(np.float64)
    return float(np.linalg.norm(xq @ wq.T - x.astype(np.float64) @ w.astype(np.float64).T))


def test_dmq_lowers_the_error_for_outlier_channels_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    # Real images: sklearn's digits, 1797 8×8 images with pixel values 0..16; the 64 pixel
    # columns are the linear layer's input channels. Columns 20, 27 and 43 are scaled ×50 to
    # make outlier activation channels.
    x = datasets.load_digits().data.astype(np.float32)
    x[:, [20, 27, 43]] *= 50.0
    w = np.random.default_rng(7).normal(scale=0.1, size=(10, 64)).astype(np.float32)

    plain = quantized_linear_error(x, w)
    act_max = activation_channel_abs_max(x, channel_axis=-1)
    s = dmq_balance_factors(act_max, weight_in_channel_abs_max(w, "linear"), 0.5)
    # Blank pixel columns (always 0 in digits) keep s = 1.
    assert np.all(s[act_max == 0] == 1.0)
    balanced = quantized_linear_error(balance_activation(x, s, channel_axis=-1),
                                      apply_balance(w, s, "linear"))
    # Measured: 90.7 plain, 46.5 balanced (about half); require at least a 30 % reduction.
    assert balanced < 0.7 * plain, (plain, balanced)

    # Without outliers the images quantize well already; DMQ must not be worse than ×2 there.
    x_clean = datasets.load_digits().data.astype(np.float32)
    s_clean = dmq_balance_factors(activation_channel_abs_max(x_clean, -1),
                                  weight_in_channel_abs_max(w, "linear"))
    assert quantized_linear_error(balance_activation(x_clean, s_clean, -1),
                                  apply_balance(w, s_clean, "linear")) < 2 * \
        quantized_linear_error(x_clean, w)
