"""EVBMF and the rank rule (reference §2.3)."""
import numpy as np
import pytest

from amct_core.decompose import evbmf_noise_variance, evbmf_rank, make_divisible, select_rank
from amct_core.decompose.rank import rank_bounds


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 16), (3, 16), (23, 32), (24, 32), (54, 64), (64, 64), (100, 96), (2100, 2096),
     (2560, 2560), (17, 16)],
)
def test_make_divisible(value, expected):
    result = make_divisible(value)
    assert result == expected
    assert result % 16 == 0
    assert result >= 0.9 * value


def test_make_divisible_never_drops_more_than_ten_percent():
    for value in range(1, 5000):
        result = make_divisible(value)
        assert result % 16 == 0 and result >= 16 and result >= 0.9 * value


def test_rank_bounds_divisor_switches_at_256_channels():
    assert rank_bounds(128, 128, (3, 3)) == (384 // 7, 384 // 6)
    assert rank_bounds(255, 300, (3, 3)) == (765 // 7, 765 // 6)
    assert rank_bounds(256, 300, (3, 3)) == (768 // 5, 768 // 4)
    assert rank_bounds(2048, 2048, (5, 5)) == (2048, 2560)


def _planted(rows, cols, rank, noise, seed=0):
    rng = np.random.default_rng(seed)
    left = np.linalg.qr(rng.standard_normal((rows, rank)))[0]
    right = np.linalg.qr(rng.standard_normal((cols, rank)))[0]
    strengths = np.linspace(8.0, 4.0, rank) * noise * np.sqrt(cols)
    signal = left @ np.diag(strengths) @ right.T
    return signal + noise * rng.standard_normal((rows, cols))


@pytest.mark.parametrize(("rows", "cols", "rank"), [(200, 300, 20), (384, 384, 40), (100, 900, 5)])
def test_evbmf_recovers_a_planted_rank(rows, cols, rank):
    singular = np.linalg.svd(_planted(rows, cols, rank, noise=0.1), compute_uv=False)
    assert evbmf_rank(singular, rows, cols) == rank


def test_evbmf_noise_variance_of_pure_noise_is_the_true_variance():
    rng = np.random.default_rng(3)
    rows, cols, sigma = 300, 500, 0.05
    singular = np.linalg.svd(sigma * rng.standard_normal((rows, cols)), compute_uv=False)
    estimate = evbmf_noise_variance(singular, rows, cols)
    assert estimate == pytest.approx(sigma**2, rel=0.05)
    assert evbmf_rank(singular, rows, cols) == 0


def test_evbmf_is_scale_invariant():
    singular = np.linalg.svd(_planted(150, 250, 12, noise=1.0, seed=5), compute_uv=False)
    ranks = {evbmf_rank(singular * scale, 150, 250) for scale in (1e-6, 1e-3, 1.0, 1e4)}
    assert ranks == {12}


def test_evbmf_of_zero_matrix_is_zero():
    assert evbmf_rank(np.zeros(10), 10, 20) == 0


def test_evbmf_checks_its_arguments():
    with pytest.raises(ValueError, match="num_rows"):
        evbmf_rank(np.ones(20), 20, 10)
    with pytest.raises(ValueError, match="expected 10 singular values"):
        evbmf_rank(np.ones(5), 10, 20)


def test_select_rank_clamps_and_rounds():
    # 128 -> 128 3x3 (the sample's conv2): any EVBMF rank ends at 64.
    rows, cols = 384, 384
    noise_only = np.linalg.svd(np.random.default_rng(0).standard_normal((rows, cols)),
                               compute_uv=False)
    assert select_rank(noise_only, 128, 128, (3, 3)) == (64, 0)
    full = np.linalg.svd(_planted(rows, cols, 100, noise=0.01), compute_uv=False)
    rank, raw = select_rank(full, 128, 128, (3, 3))
    assert raw == 100 and rank == 64


def test_select_rank_inside_the_clamp_keeps_the_evbmf_rank():
    # 256 -> 256 3x3: sizeL = 768, divisor 4, clamp [153, 192].
    assert rank_bounds(256, 256, (3, 3)) == (153, 192)
    singular = np.linalg.svd(_planted(768, 768, 176, noise=0.05, seed=2), compute_uv=False)
    rank, raw = select_rank(singular, 256, 256, (3, 3))
    assert raw == 176
    assert rank == make_divisible(176) == 176
