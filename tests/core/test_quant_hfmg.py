"""HFMG (reference §3.4) against plain re-computations: the reference's shrinking loop written
out bin by bin, PyTorch's per-source-bin L2 formula, a numerical integral, hand-made merges."""
import math

import numpy as np
import pytest

from amct_core.errors import AmctValueError, QuantizationError
from amct_core.quant.hfmg import (
    HfmgCalibrator,
    hfmg,
    hfmg_l2_errors,
    hfmg_search_ranges,
    histogram,
    merge_histograms,
)
from amct_core.quant.scale_offset import scale_offset_from_range


def loop_ranges(counts):
    """The reference's candidate loop, one bin at a time."""
    counts = [int(c) for c in counts]
    bins = len(counts)
    step = max(math.ceil(sum(counts) / 1e5), 1)
    min_bins = math.ceil(bins / 4)
    left, right, out = 0, bins - 1, []
    while right - left > min_bins:
        temp_left, temp_right, left_sum, right_sum = left, right, 0, 0
        while temp_left < temp_right and left_sum < step:
            left_sum += counts[temp_left]
            temp_left += 1
        while temp_left < temp_right and right_sum < step:
            right_sum += counts[temp_right]
            temp_right -= 1
        if right - temp_right >= temp_left - left:
            right = temp_right
        else:
            left = temp_left
        out.append((left, right))
    return out


def pytorch_error(counts, bin_width, left, right, dst_bins):
    """PyTorch HistogramObserver._compute_quantization_error, written out for one range."""
    dst_width = bin_width * (right - left + 1) / dst_bins
    if dst_width < np.finfo(np.float32).eps:
        return 0.0
    total = 0.0
    for i, count in enumerate(counts):
        density = count / bin_width
        begin = (i - left) * bin_width
        end = begin + bin_width
        j_begin = min(max(math.floor(begin / dst_width), 0), dst_bins - 1)
        j_end = min(max(math.floor(end / dst_width), 0), dst_bins - 1)
        half = dst_width / 2
        d_begin = begin - (j_begin + 0.5) * dst_width
        d_end = end - (j_end + 0.5) * dst_width
        norm = (half ** 3 - d_begin ** 3) / 3
        norm += (j_end - j_begin - 1) * (half ** 3 - (-half) ** 3) / 3
        norm += (d_end ** 3 - (-half) ** 3) / 3
        total += density * norm
    return total


def integral_error(counts, bin_width, left, right, dst_bins, samples=400):
    """∫ ρ(v)·(v − centre of its clamped destination bin)² dv by the midpoint rule."""
    dst_width = bin_width * (right - left + 1) / dst_bins
    total = 0.0
    offsets = (np.arange(samples) + 0.5) / samples
    for i, count in enumerate(counts):
        if count == 0:
            continue
        v = (i - left + offsets) * bin_width
        j = np.clip(np.floor(v / dst_width), 0, dst_bins - 1)
        total += count / bin_width * np.sum((v - (j + 0.5) * dst_width) ** 2) * (
            bin_width / samples)
    return total


@pytest.mark.parametrize("bins", [1000, 4095, 0, 4096.0, True, "4096"])
def test_num_of_bins_must_be_a_supported_value(bins):
    with pytest.raises(AmctValueError, match="num_of_bins"):
        HfmgCalibrator(num_of_bins=bins)


@pytest.mark.parametrize("bins", [1024, 2048, 4096, 8192])
def test_supported_num_of_bins(bins):
    assert HfmgCalibrator(num_of_bins=bins).num_of_bins == bins


def test_histogram_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(50_000).astype(np.float32)
    low, high = float(x.min()), float(x.max())
    counts = histogram(x, low, high, 1024)
    expected, _ = np.histogram(x.astype(np.float64), bins=1024, range=(low, high))
    assert counts.dtype == np.int64 and counts.sum() == x.size
    assert np.abs(counts - expected).sum() <= 4     # only values on a bin edge may differ
    assert counts[-1] >= 1 and counts[0] >= 1       # the extremes are counted


def test_merge_same_range_adds_bin_by_bin():
    a = np.arange(1024, dtype=np.int64)
    b = np.ones(1024, dtype=np.int64)
    np.testing.assert_array_equal(merge_histograms(a, -1.0, 1.0, b, -1.0, 1.0 + 1e-9), a + 1)


def test_merge_onto_a_doubled_range():
    # old bins [i, i+1) on [0, 1024]; new bins of width 2 on [0, 2048]: old 2k and 2k+1 → new k
    old = np.arange(1, 1025, dtype=np.int64)
    merged = merge_histograms(old, 0.0, 1024.0, np.zeros(1024, np.int64), 0.0, 2048.0)
    expected = np.zeros(1024, np.int64)
    expected[:512] = old[0::2] + old[1::2]
    np.testing.assert_array_equal(merged, expected)


def test_merge_splits_straddling_bins():
    # new range [-0.5, 2047.5], width 2: old bin 1 = [1, 2) straddles 1.5 → half to new bin 0
    # (int(count·0.5)), the rest to new bin 1; old bin 0 = [0, 1) lies in new bin 0
    old = np.zeros(1024, np.int64)
    old[0], old[1], old[3] = 10, 7, 5
    merged = merge_histograms(old, 0.0, 1024.0, np.zeros(1024, np.int64), -0.5, 2047.5)
    assert merged[0] == 10 + 3 and merged[1] == 4 + 2 and merged[2] == 3
    assert merged.sum() == old.sum()


def test_search_ranges_match_the_reference_loop():
    rng = np.random.default_rng(1)
    for trial in range(30):
        bins = [1024, 2048][trial % 2]
        counts = rng.integers(0, 60, bins) * (rng.random(bins) < rng.random())
        counts[rng.integers(0, bins, 4)] += rng.integers(0, 2_000_000, 4)
        assert hfmg_search_ranges(counts) == loop_ranges(counts)
    gaussian = histogram(rng.standard_normal(200_000).astype(np.float32), -5.0, 5.0, 2048)
    ranges = hfmg_search_ranges(gaussian)
    assert ranges == loop_ranges(gaussian)
    assert ranges[-1][1] - ranges[-1][0] <= 512 < ranges[-2][1] - ranges[-2][0]


@pytest.mark.parametrize("dst_bins", [16, 256, 65536])
@pytest.mark.parametrize("method", ["source", "destination", "auto"])
def test_l2_errors_match_pytorch_formula(dst_bins, method):
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 500, 1024) * (rng.random(1024) < 0.8)
    width = 0.0173
    ranges = [(0, 1023), (10, 900), (5, 300), (100, 100 + 3 * 256), (3, 258), (0, 511),
              (7, 264), (400, 1023), (511, 512 + 255)]
    expected = [pytorch_error(counts, width, a, b, dst_bins) for a, b in ranges]
    np.testing.assert_allclose(hfmg_l2_errors(counts, width, ranges, dst_bins, method),
                               expected, rtol=1e-10)


def test_l2_error_is_the_integral_of_the_squared_rounding_error():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 9, 1024)
    width = 0.5
    for left, right, dst in [(100, 900, 16), (0, 1023, 256), (300, 700, 256)]:
        found = hfmg_l2_errors(counts, width, [(left, right)], dst)[0]
        assert found == pytest.approx(integral_error(counts, width, left, right, dst), rel=1e-4)


def test_tiny_destination_width_scores_zero():
    counts = np.ones(1024, np.int64)
    errors = hfmg_l2_errors(counts, 1e-12, [(0, 1023), (0, 300)], 256)
    np.testing.assert_array_equal(errors, [0.0, 0.0])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 16])
def test_hfmg_picks_the_argmin_range(symmetric, bits):
    rng = np.random.default_rng(4)
    x = (rng.laplace(size=100_000) * 2 + 0.5).astype(np.float32)
    calibrator = HfmgCalibrator(bits, symmetric, 2048)
    calibrator.update(x)
    found = calibrator.search()
    low, high = float(x.min()), float(x.max())
    counts = histogram(x, low, high, 2048)
    ranges = loop_ranges(counts)
    assert found.ranges == ranges
    width = (high - low) / 2048
    best = int(np.argmin(hfmg_l2_errors(counts, width, ranges, 2 ** bits, "source")))
    assert found.best_index == best
    left, right = ranges[best]
    assert found.clip_min == low + left * width and found.clip_max == low + (right + 1) * width
    scale, offset = scale_offset_from_range(found.clip_min, found.clip_max, bits, symmetric)
    assert (found.scale, found.offset) == (float(scale), int(offset))
    assert calibrator.result() == hfmg(x, bits, symmetric, 2048)
    # the clip range lies inside the data range and keeps most of the data
    assert low <= found.clip_min < 0.5 < found.clip_max <= high
    inside = np.mean((x >= found.clip_min) & (x <= found.clip_max))
    assert inside > 0.999


def test_calibrator_merges_batches():
    rng = np.random.default_rng(5)
    first = rng.standard_normal(20_000).astype(np.float32)
    second = (rng.standard_normal(30_000) * 3 + 1).astype(np.float32)
    calibrator = HfmgCalibrator(8, False, 1024)
    calibrator.update(first)
    calibrator.update(second)
    low = float(min(first.min(), second.min()))
    high = float(max(first.max(), second.max()))
    expected = merge_histograms(histogram(first, float(first.min()), float(first.max()), 1024),
                                float(first.min()), float(first.max()),
                                histogram(second, low, high, 1024), low, high)
    np.testing.assert_array_equal(calibrator.counts, expected)
    assert calibrator.counts.sum() == 50_000
    assert (calibrator.low, calibrator.high, calibrator.num_batches) == (low, high, 2)
    # a batch inside the range re-bins nothing: counts add up bin by bin
    before = calibrator.counts.copy()
    calibrator.update(np.float32([low, high, 0.0]))
    np.testing.assert_array_equal(calibrator.counts - before,
                                  histogram(np.float32([low, high, 0.0]), low, high, 1024))


def test_constant_data():
    assert hfmg(np.full(100, 3.0, np.float32)) == (
        float(np.float32(3.0) / np.float32(127)), 0)
    assert hfmg(np.zeros(10, np.float32), symmetric=False) == (1.0, -128)


def test_bad_inputs():
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        hfmg(np.float32([0.0, np.nan]))
    with pytest.raises(AmctValueError, match="empty"):
        hfmg(np.zeros(0, np.float32))
    with pytest.raises(QuantizationError, match="num_bits"):
        HfmgCalibrator(num_bits=12)
    with pytest.raises(QuantizationError, match="update"):
        HfmgCalibrator().result()
    calibrator = HfmgCalibrator()
    calibrator.update(np.ones(4, np.float32))
    with pytest.raises(QuantizationError, match="batch 2"):
        calibrator.update(np.float32([np.inf]))
    with pytest.raises(AmctValueError, match="method"):
        hfmg_l2_errors(np.ones(1024, np.int64), 1.0, [(0, 10)], 256, "fast")
