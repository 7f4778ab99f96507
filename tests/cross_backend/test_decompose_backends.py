"""Decomposition behaviour that holds for every backend, written once, run against each.

The same kernel must give the same factors whichever framework holds it (both plugins call the
one core solver), and the decomposed layer must compute the conv with the rank-r kernel the
two factors compose to. Kernels are seeded random arrays: both assertions are identities.
"""
from __future__ import annotations

import numpy as np
import pytest
from backends import BACKENDS

from amct_core.decompose import factorize_kernel, select_mode


def _case(shape: tuple[int, int, int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    # A decaying spectrum, as trained kernels have: the rank rule then keeps a rank below full.
    weight += 0.5 * rng.standard_normal((shape[0], 1, 1, 1)) * weight.mean(axis=0, keepdims=True)
    bias = rng.standard_normal(shape[0]) * 0.1
    inputs = rng.standard_normal((2, shape[1], 11, 11))
    return weight, bias, inputs


def _compose(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """The (Cout, Cin, KH, KW) kernel of two stacked convs (first spans H or W)."""
    if first.shape[3] == 1:  # first (r, Cin, KH, 1), last (Cout, r, 1, KW)
        return np.einsum("ric,orw->oicw", first[:, :, :, 0], last[:, :, 0, :])
    return np.einsum("riw,orh->oihw", first[:, :, 0, :], last[:, :, :, 0])


CASES = [((96, 64, 3, 3), 1, "SAME"), ((64, 80, 3, 5), 2, "VALID"), ((64, 64, 5, 3), 1, "SAME")]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("shape, stride, padding", CASES)
def test_same_factors_as_the_core(backend, shape, stride, padding, tmp_path):
    weight, bias, inputs = _case(shape)
    result = BACKENDS[backend](weight, bias, stride, padding, inputs, tmp_path)
    assert result is not None, f"{backend} left an eligible conv {shape} unchanged"
    cout, cin, kh, kw = shape
    expected = factorize_kernel(weight, select_mode(cout, cin, (kh, kw), stride))
    np.testing.assert_allclose(result.first, expected.first, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(result.last, expected.last, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("shape, stride, padding", CASES)
def test_decomposed_layer_is_the_rank_r_conv(backend, shape, stride, padding, tmp_path):
    weight, bias, inputs = _case(shape, seed=1)
    result = BACKENDS[backend](weight, bias, stride, padding, inputs, tmp_path)
    approx = _compose(result.first, result.last)
    # Same layer again, with the composed kernel: an independent run of the same backend.
    reference = BACKENDS[backend](approx, bias, stride, padding, inputs, tmp_path / "again")
    original_of_approx = reference.original_output if reference else None
    assert original_of_approx is not None
    np.testing.assert_allclose(result.decomposed_output, original_of_approx, rtol=1e-7,
                               atol=1e-9)
    assert not np.allclose(result.decomposed_output, result.original_output)


def test_backends_agree_with_each_other(tmp_path):
    pytest.importorskip("amct_pytorch.tensor_decompose")
    pytest.importorskip("amct_tensorflow.tensor_decompose")
    weight, bias, inputs = _case((128, 128, 3, 3), seed=2)
    results = [BACKENDS[name](weight, bias, 1, "SAME", inputs, tmp_path / name)
               for name in ("pytorch", "tensorflow")]
    np.testing.assert_allclose(results[0].first, results[1].first, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(results[0].last, results[1].last, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(results[0].original_output, results[1].original_output,
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(results[0].decomposed_output, results[1].decomposed_output,
                               rtol=1e-9, atol=1e-9)
