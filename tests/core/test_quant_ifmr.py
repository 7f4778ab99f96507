"""IFMR (reference §3.4) against a brute-force search written out plainly: sort for the
percentiles, then per candidate clip, divide, round half to even, multiply, square and sum in
float64."""
import numpy as np
import pytest

from amct_core.errors import AmctValueError, QuantizationError
from amct_core.quant import ifmr as ifmr_module
from amct_core.quant.ifmr import (
    IfmrCalibrator,
    candidate_ratios,
    clipped_round_sse,
    ifmr,
    ifmr_search,
    percentile_rank,
    tail_order_statistics,
)

EPS = float(np.finfo(np.float32).eps)


def brute_ratios(start, end, step):
    # the reference takes torch.arange(start, end, step): numpy's arange has the same length
    # rule, ceil((end - start) / step) in float64
    return np.arange(start, end, step, dtype=np.float64).astype(np.float32)


def brute_ifmr(data, bits=8, symmetric=True, max_p=0.999999, min_p=0.999999,
               search_range=(0.7, 1.3), step=0.01):
    x = np.asarray(data, np.float32).ravel()
    n = x.size
    ordered = np.sort(x)

    def rank(p):
        return 1 if 1.0 - p < EPS else max(n - int(p * n), 1)

    max_init = max(float(ordered[n - rank(max_p)]), 0.0)     # k-th largest
    min_init = min(float(ordered[rank(min_p) - 1]), 0.0)     # k-th smallest
    x64 = x.astype(np.float64)
    if symmetric:
        base = np.float32(max(abs(max_init), abs(min_init)))
        denominator = np.float32(2 ** (bits - 1) if abs(min_init) > abs(max_init)
                                 else 2 ** (bits - 1) - 1)
    else:
        base = np.float32(max_init)
    results = []
    for ratio in brute_ratios(*search_range, step):
        cand = np.float32(ratio * base)
        if symmetric:
            scale, lo = np.float32(cand / denominator), -float(cand)
        else:
            scale = np.float32((cand - np.float32(min_init)) / np.float32(2 ** bits - 1))
            lo = min_init
        if scale < EPS:
            scale = np.float32(1.0)
        q = np.round(np.clip(x64, lo, float(cand)) / float(scale)) * float(scale)
        results.append((float(np.sum((q - x64) ** 2)), float(scale), float(cand)))
    sse = np.array([r[0] for r in results])
    best = int(np.argmin(sse))
    scale = results[best][1]
    offset = 0 if symmetric else int(-np.round(min_init / scale) - 2 ** (bits - 1))
    return {"scale": scale, "offset": offset, "best": best, "mse": sse / n,
            "max_init": max_init, "min_init": min_init,
            "candidates": np.float32([r[2] for r in results])}


def _data(kind, n, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "relu":
        return np.maximum(rng.standard_normal(n), 0).astype(np.float32)
    if kind == "skewed":
        return (rng.laplace(size=n) * 3 + 1).astype(np.float32)
    if kind == "negative":
        return -np.abs(rng.standard_normal(n)).astype(np.float32) * 5
    if kind == "outliers":   # a few huge values stretch the data range far beyond the percentile
        x = rng.standard_normal(n).astype(np.float32)
        x[:2] = 5e5
        return x
    raise ValueError(kind)


def _assert_same(found, expected, data=None):
    assert found.best_index == expected["best"]
    assert found.scale == expected["scale"]
    assert found.offset == expected["offset"]
    assert found.max_init == expected["max_init"] and found.min_init == expected["min_init"]
    np.testing.assert_array_equal(found.candidates, expected["candidates"])
    # the bucketed sums cancel against Σx², so allow float64 rounding of that size
    atol = 0.0 if data is None else 1e-13 * float(np.mean(np.square(data, dtype=np.float64)))
    np.testing.assert_allclose(found.mse, expected["mse"], rtol=1e-9, atol=atol)


def test_candidate_count_is_end_exclusive():
    assert candidate_ratios().size == 61  # 0.70 ... 1.30, as torch.arange(0.7, 1.3, 0.01)
    np.testing.assert_array_equal(candidate_ratios(), brute_ratios(0.7, 1.3, 0.01))
    assert candidate_ratios()[-1] == np.float32(1.3)
    assert candidate_ratios((0.5, 1.0), 0.1).size == 5
    assert candidate_ratios((0.7, 1.3), 0.007).size == 86
    assert candidate_ratios((0.9, 1.0), 0.05).tolist() == [np.float32(0.9), np.float32(0.95)]


def test_percentile_rank():
    assert percentile_rank(4_000_000, 0.999999) == 4
    assert percentile_rank(100, 0.999999) == 1
    assert percentile_rank(10, 0.5) == 5
    assert percentile_rank(10, 1.0) == 1
    assert percentile_rank(10, 0.8) == 2


@pytest.mark.parametrize("kind", ["normal", "relu", "skewed", "negative"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ifmr_matches_brute_force_small(kind, symmetric):
    x = _data(kind, 5000, seed=1)
    found = ifmr_search(x, 8, symmetric)
    _assert_same(found, brute_ifmr(x, 8, symmetric))
    assert ifmr(x, 8, symmetric) == (found.scale, found.offset)


@pytest.mark.parametrize("kind", ["normal", "relu", "skewed", "outliers"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_search_matches_brute_force(kind, symmetric):
    # 4 bits: 61 candidates × 16 edges, so 40k values already take the bucketed path
    x = _data(kind, 40_000, seed=2)
    expected = brute_ifmr(x, 4, symmetric)
    for method in ("auto", "grid", "direct"):
        _assert_same(ifmr_search(x, 4, symmetric, method=method), expected, x)


@pytest.mark.parametrize("symmetric", [True, False])
def test_outliers_beyond_the_percentile_regrid_the_edges(symmetric, monkeypatch):
    # two values of 5e5 among 40k: the 4th largest (p = 0.9999) ignores them, so a grid over
    # the data would put every edge (all within ±5) into a few cells; the edges' range is
    # gridded instead
    x = _data("outliers", 40_000, seed=7)
    built = []
    original = ifmr_module._Grid.__init__

    def spy(self, low, high, cells, clip=True):
        built.append((low, high, clip))
        original(self, low, high, cells, clip)

    monkeypatch.setattr(ifmr_module._Grid, "__init__", spy)
    found = ifmr_search(x, 4, symmetric, max_percentile=0.9999, min_percentile=0.9999)
    assert built[0][1] >= 5e5 and not built[0][2]
    assert built[-1][2] and built[-1][1] < 10
    _assert_same(found, brute_ifmr(x, 4, symmetric, 0.9999, 0.9999), x)


@pytest.mark.parametrize("kind", ["normal", "relu", "sorted", "spiky"])
@pytest.mark.parametrize(("low_rank", "high_rank"), [(1, 1), (4, 4), (3, 900), (5000, 20)])
def test_tail_order_statistics_are_exact(kind, low_rank, high_rank):
    rng = np.random.default_rng(9)
    x = rng.standard_normal(200_000).astype(np.float32)
    if kind == "relu":
        x = np.maximum(x, 0)                        # the low tail is 100k ties at 0
    elif kind == "sorted":
        x = np.sort(x)
    elif kind == "spiky":                           # a strided sample sees only the small values
        x = np.zeros(200_000, np.float32)
        x[1::2] = 1e3 + np.arange(100_000, dtype=np.float32)
    ordered = np.sort(x)
    low, high = tail_order_statistics(x, low_rank, high_rank)
    assert low == ordered[low_rank - 1]
    assert high == ordered[x.size - high_rank]


def test_tail_order_statistics_retry_and_fallback(monkeypatch):
    # the strided sample (every 18th value) holds exactly the smallest values: the first
    # threshold keeps too few, the retries cannot widen past the sample, and the search falls
    # back to a full partition
    x = np.arange(300_000, dtype=np.float32) + 1e5
    stride = x.size // (1 << 14)
    x[::stride] = np.arange(x[::stride].size, dtype=np.float32)
    calls = []
    original = ifmr_module.order_statistics
    monkeypatch.setattr(ifmr_module, "order_statistics",
                        lambda data, ranks: calls.append(ranks) or original(data, ranks))
    ordered = np.sort(x)
    assert tail_order_statistics(x, 30, 2) == (ordered[29], ordered[-2])
    assert calls == []                               # found after widening the threshold
    assert tail_order_statistics(x, 20_000, 1) == (ordered[19_999], ordered[-1])
    assert len(calls) == 1


def test_grid_search_8_bits_with_percentiles():
    x = _data("skewed", 150_000, seed=3)
    expected = brute_ifmr(x, 8, False, max_p=0.9999, min_p=0.999)
    _assert_same(ifmr_search(x, 8, False, 0.9999, 0.999), expected)
    _assert_same(ifmr_search(x, 8, False, 0.9999, 0.999, method="direct"), expected)


def test_custom_search_range_and_16_bits():
    x = _data("normal", 3000, seed=4)
    expected = brute_ifmr(x, 16, True, search_range=(0.9, 1.1), step=0.02)
    _assert_same(ifmr_search(x, 16, True, search_range=(0.9, 1.1), search_step=0.02), expected)


def test_percentile_bounds_are_top_k_values():
    x = np.float32([5, -7, 3, 9, 1, -2, 8, 0, 4, -1])
    found = ifmr_search(x, 8, False, max_percentile=0.8, min_percentile=0.7)
    assert found.max_init == 8.0      # k = 10 - 8 = 2: second largest
    assert found.min_init == -1.0     # k = 10 - 7 = 3: third smallest
    found = ifmr_search(np.float32([1, 2, 3]), 8, False)
    assert found.max_init == 3.0 and found.min_init == 0.0   # min clamped to ≤ 0


def test_exact_ties_round_half_to_even():
    # scale 0.25: 0.125 = ½·s → 0, 0.375 = 1½·s → 2, -0.625 = -2½·s → -2, 0.875 = 3½·s → 4
    x = np.float32([0.125, 0.375, -0.625, 0.875, 0.3, -0.1] * 50)
    scales = np.float32([0.25, 0.5, 0.125])
    lo, hi = np.float32([-1.0, -0.5, -8.0]), np.float32([1.0, 0.5, 8.0])
    x64 = x.astype(np.float64)
    bounds = zip(lo.astype(float), hi.astype(float), scales.astype(float), strict=True)
    expected = [np.sum((np.round(np.clip(x64, a, b) / s) * s - x64) ** 2) for a, b, s in bounds]
    # round(0.125/0.25) = 0 → error 0.125²; half to even matters for the first candidate
    for method in ("grid", "direct"):
        np.testing.assert_allclose(clipped_round_sse(x, lo, hi, scales, method), expected,
                                   rtol=1e-12)


def test_tied_candidates_on_the_grid_path_keep_the_first(monkeypatch):
    # all values ≤ 0, asymmetric: max_init = 0, so all 61 candidates are the same clip range
    # [min_init, 0]; their exact SSEs tie and the first one wins, as in the brute force
    x = _data("negative", 40_000, seed=8)
    calls = []
    original = ifmr_module._sse_direct

    def spy(data, s64, k_lo, k_hi):
        calls.append(s64.size)
        return original(data, s64, k_lo, k_hi)

    monkeypatch.setattr(ifmr_module, "_sse_direct", spy)
    found = ifmr_search(x, 4, False, method="grid")
    assert calls == [1]                  # recomputed exactly, once for the 61 equal candidates
    assert found.best_index == 0 and np.all(found.mse == found.mse[0])
    _assert_same(found, brute_ifmr(x, 4, False), x)


def test_constant_and_zero_data():
    zeros = np.zeros(1000, np.float32)
    assert ifmr(zeros) == (1.0, 0)
    assert ifmr(zeros, symmetric=False) == (1.0, -128)
    many_zeros = np.zeros(40_000, np.float32)          # scale 1 everywhere: no edges at all
    found = ifmr_search(many_zeros, 4, True, method="grid")
    assert (found.scale, found.offset, found.best_index) == (1.0, 0, 0)
    np.testing.assert_array_equal(found.mse, 0.0)
    const = np.full(200, 2.0, np.float32)
    found = ifmr_search(const, 8, True)
    _assert_same(found, brute_ifmr(const, 8, True))


def test_calibrator_accumulates_batches():
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((4, 3, 10, 10)).astype(np.float32) * (i + 1)
               for i in range(3)]
    calibrator = IfmrCalibrator(num_bits=8, symmetric=False)
    for batch in batches:
        calibrator.update(batch)
    assert calibrator.num_batches == 3 and calibrator.num_elements == 3 * 1200
    joined = np.concatenate([b.ravel() for b in batches])
    assert calibrator.result() == ifmr(joined, symmetric=False)
    expected = brute_ifmr(joined, 8, False)
    assert calibrator.result() == (expected["scale"], expected["offset"])
    calibrator.reset()
    with pytest.raises(QuantizationError, match="update"):
        calibrator.result()


def test_calibrator_copies_batches():
    calibrator = IfmrCalibrator()
    batch = np.linspace(-1, 1, 101).astype(np.float32)
    calibrator.update(batch)
    expected = calibrator.result()
    batch *= 100
    assert calibrator.result() == expected


def test_same_state_means_same_parameters_and_the_same_bits():
    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((2, 50)).astype(np.float32) for _ in range(2)]

    def fed(values=batches, **kwargs):
        calibrator = IfmrCalibrator(**kwargs)
        for batch in values:
            calibrator.update(batch)
        return calibrator

    first = fed(symmetric=False)
    twin = fed([b.copy() for b in batches], symmetric=False)
    assert first.same_state(twin) and twin.same_state(first)
    assert first.result() == twin.result()
    assert not first.same_state(fed(symmetric=True))                       # parameters
    assert not first.same_state(fed(symmetric=False, search_step=0.02))
    assert not first.same_state(fed(batches[:1], symmetric=False))         # batch count
    assert not first.same_state(fed([b.reshape(-1)[:99] for b in batches], symmetric=False))
    changed = [b.copy() for b in batches]
    changed[1][1, 49] = np.nextafter(changed[1][1, 49], np.float32(9))      # one ulp
    assert not first.same_state(fed(changed, symmetric=False))
    signed = [b.copy() for b in batches]
    signed[0][0, 0], signed[1][0, 0] = 0.0, 0.0
    negative = [b.copy() for b in signed]
    negative[0][0, 0] = -0.0                                                  # equal, not same
    assert not fed(signed).same_state(fed(negative))
    assert not first.same_state(object())


def test_bad_data():
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        ifmr(np.float32([1.0, np.nan]))
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        ifmr(np.float32([1.0, -np.inf]))
    with pytest.raises(AmctValueError, match="empty"):
        ifmr(np.zeros(0, np.float32))
    with pytest.raises(AmctValueError, match="numeric"):
        ifmr(np.array(["a", "b"]))
    with pytest.raises(QuantizationError, match="overflow float32"):
        ifmr(np.float32([3e38, 1.0]))
    calibrator = IfmrCalibrator()
    calibrator.update(np.ones(3, np.float32))
    with pytest.raises(QuantizationError, match="batch 2"):
        calibrator.update(np.float32([np.inf]))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_bits": 7}, "num_bits"),
    ({"max_percentile": 0.0}, "max_percentile"),
    ({"min_percentile": 1.5}, "min_percentile"),
    ({"max_percentile": True}, "max_percentile"),
    ({"search_range": (1.3, 0.7)}, "search_range"),
    ({"search_range": (0.0, 1.0)}, "search_range"),
    ({"search_range": (0.7,)}, "search_range"),
    ({"search_step": 0.0}, "search_step"),
    ({"search_step": -0.1}, "search_step"),
    ({"search_step": 1e-9}, "candidates"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises((AmctValueError, QuantizationError), match=match):
        IfmrCalibrator(**kwargs)
    with pytest.raises((AmctValueError, QuantizationError), match=match):
        ifmr(np.ones(10, np.float32), **kwargs)
