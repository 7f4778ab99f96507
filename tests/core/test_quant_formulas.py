"""Quantization formulas, ARQ, bias quantization and dequant parameter packing (reference §3.4,
§4), checked against hand-computed values and plain re-computations."""
import numpy as np
import pytest

from amct_core.errors import AmctValueError, QuantizationError
from amct_core.quant.arq import arq_weight, quantize_weight
from amct_core.quant.bias import quantize_bias
from amct_core.quant.dequant_param import pack_dequant_param, unpack_dequant_param
from amct_core.quant.scale_offset import (
    FLT_EPSILON,
    dequantize,
    fake_quantize,
    int_range,
    quantize,
    scale_offset_from_range,
)


# ---------------------------------------------------------------- scale_offset_from_range
def test_symmetric_scale_uses_127_when_max_is_the_bound():
    scale, offset = scale_offset_from_range(-1.0, 2.54)
    assert scale.dtype == np.float32 and scale.shape == ()
    assert scale == np.float32(2.54) / np.float32(127)
    assert offset.dtype == np.int64 and offset == 0


def test_symmetric_scale_uses_128_when_min_is_the_bound():
    scale, offset = scale_offset_from_range(-2.56, 1.0)
    assert scale == np.float32(2.56) / np.float32(128)
    assert offset == 0


def test_symmetric_equal_bounds_use_127():
    scale, _ = scale_offset_from_range(-3.0, 3.0)
    assert scale == np.float32(3.0) / np.float32(127)


@pytest.mark.parametrize(("bits", "pos", "neg"), [(4, 7, 8), (8, 127, 128), (16, 32767, 32768)])
def test_symmetric_denominators_per_bit_width(bits, pos, neg):
    assert scale_offset_from_range(-1.0, 6.0, bits)[0] == np.float32(6.0) / np.float32(pos)
    assert scale_offset_from_range(-6.0, 1.0, bits)[0] == np.float32(6.0) / np.float32(neg)


def test_asymmetric_hand_example():
    # [-1, 3]: scale = 4/255; min/scale = -63.75 → round -64 → offset = 64 - 128 = -64
    scale, offset = scale_offset_from_range(-1.0, 3.0, 8, symmetric=False)
    assert scale == np.float32(4.0) / np.float32(255)
    assert offset == -64
    assert int(offset) + round(-1.0 / float(scale)) == -128   # min maps to -128


def test_asymmetric_clamps_range_to_include_zero():
    # all positive: min is clamped to 0 → offset -128; all negative: max clamped to 0 → 127
    scale, offset = scale_offset_from_range(2.0, 5.1, 8, symmetric=False)
    assert scale == np.float32(5.1) / np.float32(255) and offset == -128
    scale, offset = scale_offset_from_range(-5.1, -2.0, 8, symmetric=False)
    assert scale == np.float32(5.1) / np.float32(255) and offset == 127


def test_scale_below_flt_epsilon_becomes_one():
    scale, offset = scale_offset_from_range(0.0, 0.0)
    assert scale == 1.0 and offset == 0
    scale, offset = scale_offset_from_range(-1e-9, 1e-9, 8, symmetric=False)
    assert scale == 1.0 and offset == -128
    tiny = FLT_EPSILON * 127 * 0.5
    assert scale_offset_from_range(-tiny, tiny)[0] == 1.0


def test_scale_offset_broadcasts():
    scale, offset = scale_offset_from_range(np.array([-1.0, -4.0, 0.0]), 2.0)
    assert scale.shape == (3,) and offset.shape == (3,)
    np.testing.assert_array_equal(
        scale, np.float32([2.0 / 127, 4.0 / 128, 2.0 / 127]).astype(np.float32))


@pytest.mark.parametrize("bits", [0, 2, 7, 32, 8.0, True, "8"])
def test_bad_num_bits_is_rejected(bits):
    with pytest.raises(QuantizationError, match="num_bits"):
        scale_offset_from_range(-1.0, 1.0, bits)


def test_non_finite_range_is_rejected():
    with pytest.raises(AmctValueError, match="max_val"):
        scale_offset_from_range(-1.0, np.inf)
    with pytest.raises(AmctValueError, match="min_val"):
        scale_offset_from_range(np.nan, 1.0)


def test_int_range():
    assert int_range(4) == (-8, 7)
    assert int_range(8) == (-128, 127)
    assert int_range(16) == (-32768, 32767)


# ---------------------------------------------------------------- quantize / dequantize
def test_quantize_rounds_half_to_even_and_clips():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 200.0, -200.0, 127.5, -128.5], np.float32)
    q = quantize(x, 1.0, 0, 8)
    np.testing.assert_array_equal(q, [0, 2, 2, -0, -2, 0, 127, -128, 127, -128])
    assert q.dtype == np.float32


def test_quantize_rounds_before_adding_the_offset():
    # the graph is Mul → Round → Add(offset): 0.5 rounds to 0 and then +1, not round(1.5) = 2
    assert quantize(np.float32([0.5]), 1.0, 1, 8)[0] == 1.0
    assert quantize(np.float32([2.5]), 1.0, -3, 8)[0] == -1.0


def test_quantize_multiplies_by_the_float32_reciprocal():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000).astype(np.float32) * 3
    scale = np.float32(0.0237)
    expected = np.clip(np.round(x * (np.float32(1.0) / scale)) + np.float32(5), -128, 127)
    np.testing.assert_array_equal(quantize(x, scale, 5, 8), expected)


def test_quantize_per_channel_along_axis():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    scale = np.float32([1.0, 2.0, 4.0])
    q = quantize(x, scale, np.zeros(3), 8, axis=0)
    np.testing.assert_array_equal(q, np.round(x / scale[:, None]))
    q4 = quantize(x, np.float32([1, 2, 4, 8]), 0, 4, axis=1)
    np.testing.assert_array_equal(q4, np.clip(np.round(x / np.float32([1, 2, 4, 8])), -8, 7))


def test_dequantize_and_fake_quantize():
    q = np.float32([-128, 0, 5, 127])
    np.testing.assert_array_equal(dequantize(q, 0.5, -3), (q + 3) * np.float32(0.5))
    x = np.float32([-1.0, 0.26, 0.74, 10.0])
    np.testing.assert_array_equal(fake_quantize(x, 0.5, 0, 4), np.float32([-1.0, 0.5, 0.5, 3.5]))


@pytest.mark.parametrize("scale", [0.0, -1.0, np.nan, np.inf])
def test_quantize_rejects_bad_scale(scale):
    with pytest.raises(AmctValueError, match="scale"):
        quantize(np.ones(3, np.float32), scale, 0)


def test_quantize_rejects_fractional_offset():
    with pytest.raises(AmctValueError, match="offset"):
        quantize(np.ones(3, np.float32), 1.0, 0.5)


# ---------------------------------------------------------------- ARQ
def test_arq_channel_wise_hand_example():
    w = np.array([[1.27, -0.5, 0.0], [2.0, 1.0, -2.56], [0.0, 0.0, 0.0]], np.float32)
    scale, offset = arq_weight(w)
    np.testing.assert_array_equal(
        scale, [np.float32(1.27) / np.float32(127), np.float32(2.56) / np.float32(128), 1.0])
    np.testing.assert_array_equal(offset, [0, 0, 0])
    assert scale.dtype == np.float32 and offset.dtype == np.int64


def test_arq_per_tensor():
    w = np.array([[0.5, -1.0], [3.0, 1.0]], np.float32)
    scale, offset = arq_weight(w, channel_wise=False)
    assert scale.shape == (1,) and scale[0] == np.float32(3.0) / np.float32(127)
    assert offset.shape == (1,) and offset[0] == 0


def test_arq_axis_one_equals_transposed_axis_zero():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)   # ConvTranspose: (Cin, Cout, ...)
    scale1, _ = arq_weight(w, axis=1)
    scale0, _ = arq_weight(np.swapaxes(w, 0, 1))
    np.testing.assert_array_equal(scale1, scale0)
    rows = np.moveaxis(w, 1, 0).reshape(8, -1)
    bound = np.maximum(rows.max(1), -rows.min(1))
    neg = -rows.min(1) > rows.max(1)
    np.testing.assert_array_equal(
        scale1, (bound / np.where(neg, np.float32(128), np.float32(127))).astype(np.float32))


def test_quantize_weight_matches_plain_computation():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    scale, offset = arq_weight(w)
    q = quantize_weight(w, scale, offset, 8)
    assert q.dtype == np.int8 and q.shape == w.shape
    recip = (np.float32(1.0) / scale).reshape(6, 1, 1, 1)
    np.testing.assert_array_equal(q, np.clip(np.round(w * recip), -128, 127).astype(np.int8))
    assert q.max() <= 127 and q.min() >= -128
    # each channel's bound maps to ±127 (or -128 for a negative bound)
    rows = q.reshape(6, -1).astype(int)
    assert np.all(np.maximum(rows.max(1), -rows.min(1)) >= 127)


def test_quantize_weight_axis_and_dtypes():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 7)).astype(np.float32)       # MatMul K×N, N outputs on axis 1
    scale, offset = arq_weight(w, num_bits=4, axis=1)
    q = quantize_weight(w, scale, offset, 4, axis=1)
    assert q.dtype == np.int8 and q.shape == (5, 7)
    np.testing.assert_array_equal(
        q, np.clip(np.round(w * (np.float32(1.0) / scale)[None, :]), -8, 7))
    scale16, _ = arq_weight(w, num_bits=16, channel_wise=False)
    q16 = quantize_weight(w, scale16, 0, 16)
    assert q16.dtype == np.int16 and np.abs(q16).max() >= 32767


def test_arq_errors():
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        arq_weight(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(AmctValueError, match="empty"):
        arq_weight(np.zeros((0, 3), np.float32))
    with pytest.raises(AmctValueError, match="axis"):
        arq_weight(np.ones((2, 3), np.float32), axis=2)
    with pytest.raises(QuantizationError, match="num_bits"):
        arq_weight(np.ones((2, 3), np.float32), num_bits=3)
    with pytest.raises(AmctValueError, match="3 values but the weight has 2 channels"):
        quantize_weight(np.ones((2, 3), np.float32), np.ones(3), 0)
    with pytest.raises(AmctValueError, match="offset"):
        quantize_weight(np.ones((2, 3), np.float32), np.ones(2), 300, 8)


# ---------------------------------------------------------------- bias
def test_quantize_bias_hand_example():
    # deq = 0.5 * 0.25 = 0.125: 1.0 → 8, -0.3 → -2.4 → -2, 0.0625 → 0.5 → 0 (half to even)
    bias = np.array([1.0, -0.3, 0.0625], np.float32)
    q = quantize_bias(bias, 0.5, 0.25)
    assert q.dtype == np.int32
    np.testing.assert_array_equal(q, [8, -2, 0])


def test_quantize_bias_per_channel_scale():
    rng = np.random.default_rng(4)
    bias = rng.standard_normal(16).astype(np.float32)
    scale_w = rng.uniform(0.001, 0.01, 16).astype(np.float32)
    scale_d = 0.0375
    deq = (scale_w * np.float32(scale_d)).astype(np.float32)
    expected = np.round(bias.astype(np.float64) / deq.astype(np.float64)).astype(np.int32)
    np.testing.assert_array_equal(quantize_bias(bias, scale_w, scale_d, "conv1"), expected)


def test_quantize_bias_out_of_int32_range_names_the_layer():
    with pytest.raises(QuantizationError) as info:
        quantize_bias(np.array([0.0, 1e4], np.float32), 1e-4, 1e-4, layer="layer1.0.conv2")
    text = str(info.value)
    assert text.startswith("Do bias quantize failed.")
    assert "layer1.0.conv2" in text and "int32" in text and "channel 1" in text
    # exactly the int32 limits are fine
    assert quantize_bias(np.array([2147483647.0, -2147483648.0]), 1.0, 1.0).tolist() == [
        2147483647, -2147483648]
    with pytest.raises(QuantizationError, match=r"^Do bias quantize failed\."):
        quantize_bias(np.array([2147483648.0]), 1.0, 1.0)


def test_quantize_bias_bad_inputs():
    with pytest.raises(QuantizationError, match="fc1"):
        quantize_bias(np.array([np.nan]), 1.0, 1.0, layer="fc1")
    with pytest.raises(AmctValueError, match="scale_w"):
        quantize_bias(np.ones(3), np.array([1.0, -1.0, 1.0]), 1.0)
    with pytest.raises(AmctValueError, match="scale_d"):
        quantize_bias(np.ones(3), 1.0, 0.0)
    with pytest.raises(AmctValueError, match="2 values but the bias has 3"):
        quantize_bias(np.ones(3), np.ones(2), 1.0)


# ---------------------------------------------------------------- dequant parameter
def test_pack_dequant_param_hand_example():
    # 0.5 * 0.25 = 0.125 = 0x3E000000; offset -1 → 0xFF in bits 40-47; offset 3 → 0x03
    packed = pack_dequant_param(np.float32([0.5, 0.5]), 0.25, np.array([-1, 3]))
    assert packed.dtype == np.uint64
    assert packed.tolist() == [0x3E000000 | (0xFF << 40), 0x3E000000 | (0x03 << 40)]


def test_pack_dequant_param_uses_float32_product():
    rng = np.random.default_rng(5)
    scale_w = rng.uniform(1e-4, 1e-2, 64).astype(np.float32)
    scale_d = 0.0123456789
    packed = pack_dequant_param(scale_w, scale_d, 0)
    deq = (scale_w * np.float32(scale_d)).astype(np.float32)
    expected = [int.from_bytes(v.tobytes(), "little") for v in deq]
    assert packed.tolist() == expected
    assert all(word >> 32 == 0 for word in packed.tolist())


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(6)
    scale_w = rng.uniform(1e-5, 1.0, 100).astype(np.float32)
    offsets = rng.integers(-128, 128, 100)
    packed = pack_dequant_param(scale_w, 0.7, offsets)
    deq, back = unpack_dequant_param(packed)
    np.testing.assert_array_equal(deq, (scale_w * np.float32(0.7)).astype(np.float32))
    np.testing.assert_array_equal(back, offsets)
    assert deq.dtype == np.float32


def test_pack_broadcasts_a_single_scale():
    packed = pack_dequant_param(1.0, 2.0, np.array([0, 1, -128]))
    deq, offsets = unpack_dequant_param(packed)
    np.testing.assert_array_equal(deq, [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(offsets, [0, 1, -128])


def test_pack_dequant_param_errors():
    with pytest.raises(AmctValueError, match="offset_w"):
        pack_dequant_param(1.0, 1.0, 128)
    with pytest.raises(AmctValueError, match="offset_w"):
        pack_dequant_param(1.0, 1.0, 0.5)
    with pytest.raises(AmctValueError, match="scale_w"):
        pack_dequant_param(-1.0, 1.0, 0)
    with pytest.raises(AmctValueError, match="must match"):
        pack_dequant_param(np.ones(3), 1.0, np.zeros(2, int))
    with pytest.raises(AmctValueError, match="uint64"):
        unpack_dequant_param(np.zeros(2, np.int64))
