"""The spatial-SVD solver against an independent numpy SVD (reference §2.1)."""
import numpy as np
import pytest

from amct_core.decompose import (
    DecomposeMode,
    decompose_conv_weight,
    factor_shapes,
    factorize_kernel,
    mrrr,
    select_mode,
    split_conv_attributes,
    unfold_weight,
)
from amct_core.decompose import spatial_svd as spatial_svd_module
from amct_core.errors import AmctError, DecompositionError

SHAPES = {
    DecomposeMode.SCFK: (128, 96, 3, 5),
    DecomposeMode.SCSK: (128, 96, 5, 3),
    DecomposeMode.FCFK: (64, 96, 3, 5),
    DecomposeMode.FCSK: (64, 96, 5, 3),
}


def compose(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """The kernel of the conv `last` applied after the conv `first` (independent of the
    solver): one factor is K×1, the other 1×K."""
    if first.shape[3] == 1:  # first (r, Cin, KH, 1), last (Cout, r, 1, KW)
        return np.einsum("kih,okw->oihw", first[:, :, :, 0], last[:, :, 0, :])
    return np.einsum("kiw,okh->oihw", first[:, :, 0, :], last[:, :, :, 0])


def kernel(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("mode", list(SHAPES))
def test_full_rank_reconstructs_exactly(mode):
    weight = kernel(SHAPES[mode])
    assert select_mode(weight.shape[0], weight.shape[1], weight.shape[2:]) == mode
    full = min(weight.shape[:2]) * min(weight.shape[2:])
    factors = factorize_kernel(weight, mode, rank=full)
    assert (factors.first.shape, factors.last.shape) == factor_shapes(weight.shape, mode, full)
    np.testing.assert_allclose(compose(factors.first, factors.last), weight, atol=1e-10)


@pytest.mark.parametrize("mode", list(SHAPES))
@pytest.mark.parametrize("rank", [1, 17, 64])
def test_error_is_the_eckart_young_optimum(mode, rank):
    weight = kernel(SHAPES[mode], seed=rank)
    factors = factorize_kernel(weight, mode, rank=rank)
    error = np.sum((compose(factors.first, factors.last) - weight) ** 2)
    singular = np.linalg.svd(unfold_weight(weight, mode), compute_uv=False)
    optimal = np.sum(singular[rank:] ** 2)
    assert error == pytest.approx(optimal, rel=1e-9)
    assert factors.residual_energy == pytest.approx(optimal, rel=1e-9)
    np.testing.assert_allclose(factors.singular_values, singular, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", list(SHAPES))
def test_orthonormal_factor_sits_where_the_reference_puts_it(mode):
    factors = factorize_kernel(kernel(SHAPES[mode]), mode, rank=32)
    if mode in (DecomposeMode.SCFK, DecomposeMode.SCSK):
        u = factors.first.reshape(32, -1).T
    else:
        u = factors.last.transpose(1, 0, 2, 3).reshape(32, -1).T
    np.testing.assert_allclose(u.T @ u, np.eye(32), atol=1e-10)


def test_float32_path_stays_within_one_percent_of_the_optimum():
    weight = kernel((256, 256, 3, 3), seed=7, dtype=np.float32)
    factors = factorize_kernel(weight, DecomposeMode.SCFK, rank=160, compute_dtype=np.float32)
    assert factors.first.dtype == np.float32
    error = np.sum((compose(factors.first.astype(np.float64), factors.last.astype(np.float64))
                    - weight.astype(np.float64)) ** 2)
    singular = np.linalg.svd(unfold_weight(weight.astype(np.float64), DecomposeMode.SCFK),
                             compute_uv=False)
    assert error <= 1.01 * np.sum(singular[160:] ** 2)


def test_rank_rule_is_used_when_no_rank_is_given():
    factors = decompose_conv_weight(kernel((128, 128, 3, 3)))
    assert factors.mode == DecomposeMode.SCFK
    assert factors.rank == 64
    assert factors.first.shape == (64, 128, 3, 1)
    assert factors.last.shape == (128, 64, 1, 3)
    assert factors.evbmf_rank is not None


def test_ineligible_conv_gives_none():
    assert decompose_conv_weight(kernel((128, 1, 3, 3))) is None
    assert decompose_conv_weight(kernel((128, 128, 3, 3)), dilation=2) is None
    assert decompose_conv_weight(kernel((128, 64, 3, 3)), groups=2) is None


def test_decompose_is_deterministic():
    weight = kernel((96, 64, 3, 3), seed=4)
    one, two = decompose_conv_weight(weight), decompose_conv_weight(weight)
    np.testing.assert_array_equal(one.first, two.first)
    np.testing.assert_array_equal(one.last, two.last)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(bad):
    weight = kernel((128, 128, 3, 3))
    weight[3, 4, 1, 1] = bad
    with pytest.raises(DecompositionError, match="NaN or Inf"):
        decompose_conv_weight(weight)


@pytest.mark.parametrize("keep_bytes", [None, 0])
def test_non_finite_weights_are_refused_before_any_solve(monkeypatch, keep_bytes):
    # Also through a loader and when the kernel is not kept; and a float32 kernel whose
    # squares overflow (finite values, infinite Gram matrix) is refused with its own message.
    if keep_bytes is not None:
        monkeypatch.setattr(spatial_svd_module, "KEEP_KERNEL_MAX_BYTES", keep_bytes)
    monkeypatch.setattr(spatial_svd_module, "_gram_spectrum_and_top_vectors",
                        lambda *args: pytest.fail("solved a kernel it should refuse"))
    weight = kernel((128, 128, 3, 3)).astype(np.float32)
    weight[100, 7, 2, 0] = np.nan
    with pytest.raises(DecompositionError, match="NaN or Inf"):
        factorize_kernel(lambda: weight.copy(), DecomposeMode.SCFK)
    weight[100, 7, 2, 0] = 3e19
    with pytest.raises(DecompositionError, match="too large for float32 \\(largest \\|w\\| = "
                                                 "3e\\+19\\).*scale the weights down"):
        factorize_kernel(weight, DecomposeMode.SCFK, compute_dtype=np.float32)


def test_non_float_weights_are_refused():
    with pytest.raises(DecompositionError, match="int32"):
        factorize_kernel(np.ones((128, 128, 3, 3), dtype=np.int32), DecomposeMode.SCFK)


def test_bad_shapes_and_ranks_are_refused():
    with pytest.raises(DecompositionError, match="4-D"):
        decompose_conv_weight(np.ones((3, 3)))
    with pytest.raises(DecompositionError, match=r"rank must be in \[1, 384\]"):
        factorize_kernel(kernel((128, 128, 3, 3)), DecomposeMode.SCFK, rank=385)
    with pytest.raises(AmctError, match="does not split"):
        factorize_kernel(kernel((128, 128, 3, 3)), DecomposeMode.UNCHANGE)
    assert issubclass(DecompositionError, ValueError)


def test_split_attributes_keep_each_axis_on_its_own_conv():
    first, last = split_conv_attributes(DecomposeMode.SCFK, (2, 1), (1, 2), 1)
    assert first == {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 1)}
    assert last == {"stride": (1, 1), "padding": (0, 2), "dilation": (1, 1)}
    first, last = split_conv_attributes(DecomposeMode.FCFK, (2, 1), (1, 2), 1)
    assert first == {"stride": (1, 1), "padding": (0, 2), "dilation": (1, 1)}
    assert last == {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 1)}
    first, last = split_conv_attributes(DecomposeMode.SCSK, 1, "same", 1)
    assert first["padding"] == last["padding"] == "same"


@pytest.mark.parametrize("max_rows", [0, 10**9])
def test_both_tridiagonal_methods_give_the_optimum(monkeypatch, max_rows):
    monkeypatch.setattr(spatial_svd_module, "BISECTION_MAX_ROWS", max_rows)
    weight = kernel((96, 64, 3, 3), seed=11)
    factors = factorize_kernel(weight, DecomposeMode.SCFK, rank=40)
    error = np.sum((compose(factors.first, factors.last) - weight) ** 2)
    singular = np.linalg.svd(unfold_weight(weight, DecomposeMode.SCFK), compute_uv=False)
    assert error == pytest.approx(np.sum(singular[40:] ** 2), rel=1e-9)


def test_tridiagonal_fallback_and_double_failure(monkeypatch):
    real_bisection = spatial_svd_module.eigh_tridiagonal
    real_mrrr = mrrr.top_eigenvectors
    calls = []

    def stein_fails(*args):
        calls.append("stein")
        raise np.linalg.LinAlgError("3 eigenvectors did not converge (?stein)")

    def flaky(*args, lapack_driver, **kwargs):
        calls.append(lapack_driver)
        if lapack_driver == "stebz":
            raise np.linalg.LinAlgError("stebz did not converge")
        return real_bisection(*args, lapack_driver=lapack_driver, **kwargs)

    def counted(*args, **kwargs):
        calls.append("mrrr")
        return real_mrrr(*args, **kwargs)

    monkeypatch.setattr(spatial_svd_module, "_inverse_iteration", stein_fails)
    monkeypatch.setattr(spatial_svd_module, "eigh_tridiagonal", flaky)
    monkeypatch.setattr(mrrr, "top_eigenvectors", counted)
    weight = kernel((64, 64, 3, 3), seed=12)
    factors = factorize_kernel(weight, DecomposeMode.SCFK, rank=32)
    assert calls == ["stein", "stebz", "mrrr"]
    np.testing.assert_allclose(np.sum((compose(factors.first, factors.last) - weight) ** 2),
                               factors.residual_energy, rtol=1e-9)

    def broken(*args, lapack_driver="stemr", **kwargs):
        raise np.linalg.LinAlgError(f"{lapack_driver} did not converge")

    monkeypatch.setattr(spatial_svd_module, "eigh_tridiagonal", broken)
    monkeypatch.setattr(mrrr, "top_eigenvectors", broken)
    with pytest.raises(DecompositionError, match="no convergence of the tridiagonal"):
        factorize_kernel(weight, DecomposeMode.SCFK, rank=32)


def _dense_tridiagonal(diag, offdiag):
    return np.diag(diag) + np.diag(offdiag, 1) + np.diag(offdiag, -1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inverse_iteration_from_known_eigenvalues(monkeypatch, dtype):
    rng = np.random.default_rng(21)
    n, rank = 200, 30
    diag, offdiag = rng.standard_normal(n).astype(dtype), rng.standard_normal(n - 1).astype(dtype)
    dense = _dense_tridiagonal(diag.astype(np.float64), offdiag.astype(np.float64))
    values = np.linalg.eigvalsh(dense)[n - rank:]
    monkeypatch.setattr(spatial_svd_module, "_bisection", None)  # must not be reached
    vectors = spatial_svd_module._tridiagonal_top_vectors(diag, offdiag, values.astype(dtype))
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert vectors.shape == (n, rank) and vectors.dtype == dtype
    np.testing.assert_allclose(dense @ vectors, vectors * values, atol=tol * np.abs(values).max())
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(rank), atol=tol)


def test_split_tridiagonal_goes_to_bisection(monkeypatch):
    rng = np.random.default_rng(22)
    n, rank = 120, 50
    diag, offdiag = rng.standard_normal(n), rng.standard_normal(n - 1)
    offdiag[[30, 80]] = 0.0  # three blocks: ?stein from global eigenvalues cannot serve them
    assert spatial_svd_module._splits(diag, offdiag)
    assert not spatial_svd_module._splits(diag, rng.uniform(0.5, 1.0, n - 1))
    dense = _dense_tridiagonal(diag, offdiag)
    values = np.linalg.eigvalsh(dense)[n - rank:]
    calls = []
    real_bisection = spatial_svd_module._bisection

    def counted(*args):
        calls.append("stebz")
        return real_bisection(*args)

    monkeypatch.setattr(spatial_svd_module, "_bisection", counted)
    vectors = spatial_svd_module._tridiagonal_top_vectors(diag, offdiag, values)
    assert calls == ["stebz"]
    np.testing.assert_allclose(dense @ vectors, vectors * values, atol=1e-10)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(rank), atol=1e-10)


def test_kernel_with_dead_channels_keeps_the_optimum():
    weight = kernel((96, 64, 3, 3), seed=13)
    weight[:, 10:30] = 0.0  # input channels without weights: G has zero rows, T splits
    factors = factorize_kernel(weight, DecomposeMode.SCFK, rank=40)
    error = np.sum((compose(factors.first, factors.last) - weight) ** 2)
    singular = np.linalg.svd(unfold_weight(weight, DecomposeMode.SCFK), compute_uv=False)
    assert error == pytest.approx(np.sum(singular[40:] ** 2), rel=1e-9)


@pytest.mark.parametrize("n, rank", [(1, 1), (2, 1), (50, 7), (300, 300)])
def test_mrrr_top_eigenvectors_match_a_dense_solver(n, rank):
    rng = np.random.default_rng(n)
    diag, offdiag = rng.standard_normal(n), rng.standard_normal(n - 1)
    values, vectors = mrrr.top_eigenvectors(diag, offdiag, rank)
    dense = np.diag(diag) + np.diag(offdiag, 1) + np.diag(offdiag, -1)
    expected = np.linalg.eigvalsh(dense)[n - rank:]
    np.testing.assert_allclose(values, expected, rtol=1e-10, atol=1e-12)
    assert vectors.shape == (n, rank) and vectors.flags.f_contiguous
    np.testing.assert_allclose(dense @ vectors, vectors * values, atol=1e-10)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(rank), atol=1e-10)
    with pytest.raises(ValueError, match="rank must be in"):
        mrrr.top_eigenvectors(diag, offdiag, n + 1)


@pytest.mark.parametrize("keep_bytes, loads", [(None, 1), (0, 2)])
def test_kernel_loader_gives_the_same_factors(monkeypatch, keep_bytes, loads):
    # A small kernel is kept for the core (one load); above KEEP_KERNEL_MAX_BYTES it is
    # dropped and loaded a second time.
    if keep_bytes is not None:
        monkeypatch.setattr(spatial_svd_module, "KEEP_KERNEL_MAX_BYTES", keep_bytes)
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((64, 96, 3, 3))
    calls = []

    def load():
        calls.append(1)
        return weight.copy()

    from_array = factorize_kernel(weight, DecomposeMode.FCFK)
    from_loader = factorize_kernel(load, DecomposeMode.FCFK)
    assert len(calls) == loads
    np.testing.assert_array_equal(from_loader.first, from_array.first)
    np.testing.assert_array_equal(from_loader.last, from_array.last)
    assert from_loader.rank == from_array.rank


def test_kernel_loader_must_return_the_same_shape(monkeypatch):
    monkeypatch.setattr(spatial_svd_module, "KEEP_KERNEL_MAX_BYTES", 0)
    shapes = iter([(64, 64, 3, 3), (64, 64, 3, 5)])

    def load():
        return np.ones(next(shapes)) + np.eye(64)[:, :, None, None]

    with pytest.raises(DecompositionError, match="returned shape \\(64, 64, 3, 5\\) on its "
                                                 "second call"):
        factorize_kernel(load, DecomposeMode.SCFK)


@pytest.mark.parametrize("mode", list(SHAPES))
def test_a_tensorflow_layout_kernel_gives_the_same_decomposition(mode):
    # A (KH, KW, Cin, Cout) kernel seen as (Cout, Cin, KH, KW) is read where it lies, an OIHW
    # one is copied: the two solves agree up to float32 rounding (the signs of the singular
    # vectors may differ, so the composed kernels are compared).
    oihw = kernel(SHAPES[mode], seed=3, dtype=np.float32)
    hwio_view = np.transpose(np.ascontiguousarray(oihw.transpose(2, 3, 1, 0)), (3, 2, 0, 1))
    copied = factorize_kernel(oihw, mode, compute_dtype=np.float32)
    in_place = factorize_kernel(hwio_view, mode, compute_dtype=np.float32)
    assert in_place.rank == copied.rank
    np.testing.assert_allclose(in_place.singular_values, copied.singular_values, rtol=1e-4)
    scale = np.max(np.abs(oihw))
    np.testing.assert_allclose(compose(in_place.first, in_place.last),
                               compose(copied.first, copied.last), atol=1e-4 * scale)


@pytest.mark.parametrize("mode", list(SHAPES))
def test_hwio_factors_are_the_oihw_ones_transposed(mode):
    # A TensorFlow kernel (KH, KW, Cin, Cout) passed as its OIHW view.
    cout, cin, kh, kw = SHAPES[mode]
    hwio = np.random.default_rng(int(mode)).standard_normal((kh, kw, cin, cout))
    oihw_view = np.transpose(hwio, (3, 2, 0, 1))
    plain = factorize_kernel(oihw_view, mode, rank=4)
    tf_layout = factorize_kernel(oihw_view, mode, rank=4, layout="HWIO")
    assert plain.layout == "OIHW" and tf_layout.layout == "HWIO"
    for oihw, hwio_factor in ((plain.first, tf_layout.first), (plain.last, tf_layout.last)):
        assert hwio_factor.flags.c_contiguous and oihw.flags.c_contiguous
        np.testing.assert_array_equal(hwio_factor, oihw.transpose(2, 3, 1, 0))
    with pytest.raises(DecompositionError, match="layout must be one of OIHW, HWIO, got 'NHWC'"):
        factorize_kernel(oihw_view, mode, rank=4, layout="NHWC")
