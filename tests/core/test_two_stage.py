"""The two-stage path of the spatial SVD: band reduction, band eigenvectors by filtered
subspace iteration, and the factors it gives, against independent numpy eigen-solvers.

Spectra come from real data where it matters: the Gram matrix of patches of a mosaic of
sklearn's handwritten digits (a steep image spectrum that needs several rounds and locking) and
kernels whose unfolding holds those patches.
"""
import numpy as np
import pytest

from amct_core.decompose import (
    DecomposeMode,
    band_subspace,
    factorize_kernel,
    two_stage,
    unfold_weight,
)
from amct_core.decompose import spatial_svd as spatial_svd_module
from amct_core.errors import DecompositionError

pytestmark = pytest.mark.skipif(not two_stage.available(np.float32),
                                reason="this SciPy's LAPACK has no two-stage reduction")


def patches(side: int, count: int) -> np.ndarray:
    """``count`` side×side patches, one per row (float64), of a 42 × 42 mosaic of sklearn's
    8×8 handwritten digits."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:42 * 42].astype(np.float64)
    image = digits.reshape(42, 42, 8, 8).transpose(0, 2, 1, 3).reshape(42 * 8, 42 * 8)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, image.shape[0] - side, count)
    cols = rng.integers(0, image.shape[1] - side, count)
    out = np.stack([image[r:r + side, c:c + side].ravel() for r, c in zip(rows, cols, strict=True)])
    return out - out.mean(axis=0)


def dense_band(band: np.ndarray) -> np.ndarray:
    kd, n = band.shape[0] - 1, band.shape[1]
    out = np.zeros((n, n))
    for offset in range(kd + 1):
        j = np.arange(n - offset)
        out[j + offset, j] = band[offset, :n - offset]
        out[j, j + offset] = band[offset, :n - offset]
    return out


def gram_of(data: np.ndarray, dtype) -> np.ndarray:
    return np.asfortranarray((data.T @ data).astype(dtype))


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("bandwidth", [1, 8, 32])
@pytest.mark.parametrize("path", ["blocked", "lapack sy2sb"])
def test_band_reduction_keeps_the_spectrum_and_q1_maps_back(monkeypatch, dtype, tol, bandwidth,
                                                            path):
    # n = 144: with bandwidth 32 the last panel has 16 rows (the geqrf branch), with 8 a full
    # one; bandwidth 1 is the tridiagonal case.
    if path == "lapack sy2sb":
        routines = dict(two_stage._ROUTINES[two_stage._prefix(np.dtype(dtype))])
        routines["blocked"] = None
        monkeypatch.setitem(two_stage._ROUTINES, two_stage._prefix(np.dtype(dtype)), routines)
    elif two_stage._ROUTINES[two_stage._prefix(np.dtype(dtype))]["blocked"] is None:
        pytest.skip("this LAPACK lacks a routine of the blocked reduction")
    g = gram_of(patches(12, 3000), np.float64)
    n = g.shape[0]
    work = np.asfortranarray(g.astype(dtype))
    band, tau = two_stage.reduce_to_band(work, bandwidth)
    assert band.shape == (bandwidth + 1, n) and tau.shape == (n - bandwidth,)
    expected = np.linalg.eigvalsh(g)
    values = two_stage.band_eigenvalues(band)
    assert values.dtype == np.float64 and np.all(np.diff(values) >= 0)
    np.testing.assert_allclose(values, expected, atol=tol * expected[-1])
    q1 = two_stage.apply_band_reflectors(work, tau, bandwidth, np.eye(n, dtype=dtype))
    q1 = q1.astype(np.float64)
    np.testing.assert_allclose(q1.T @ q1, np.eye(n), atol=50 * tol)
    np.testing.assert_allclose(q1 @ dense_band(band.astype(np.float64)) @ q1.T, g,
                               atol=50 * tol * expected[-1])
    # In place: the same values in the caller's C-ordered block; a block it cannot use
    # (Fortran order) is copied and left as it was.
    block = np.random.default_rng(3).standard_normal((n, 5)).astype(dtype)
    expected_block = two_stage.apply_band_reflectors(work, tau, bandwidth, block)
    fortran = np.asfortranarray(block)
    original = block.copy()
    in_place = two_stage.apply_band_reflectors(work, tau, bandwidth, block,
                                               overwrite_vectors=True)
    assert in_place is block
    np.testing.assert_array_equal(in_place, expected_block)
    copied = two_stage.apply_band_reflectors(work, tau, bandwidth, fortran,
                                             overwrite_vectors=True)
    assert copied is not fortran
    np.testing.assert_array_equal(copied, expected_block)
    np.testing.assert_array_equal(fortran, original)


needs_threaded_reduction = pytest.mark.skipif(
    not two_stage.threaded_reduction(np.float32, two_stage.REDUCTION_BAND_WIDTH),
    reason="the C extension amct_core.decompose._band_reduction was not built, or this CPU has "
           "no AVX-512")


@needs_threaded_reduction
@pytest.mark.parametrize("side", [14, 19, 20])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threaded_band_reduction_keeps_the_spectrum_and_q1_maps_back(monkeypatch, side, threads):
    """The extension's reduction (kd = 96, float32) on n = 196 (one panel, then a 4-row panel
    for the LAPACK loop), 361 (last tiles of 9 and 41 rows, a 73-row last panel) and 400 (three
    panels, then 16 rows): the band has the matrix's spectrum, Q1 is orthogonal and
    Q1 B Q1ᵀ = G; nothing above the diagonal is read or written (NaN there stays NaN and
    reaches nothing); the same bits on every run; the same band as OpenBLAS's kernels up to
    rounding."""
    kd = two_stage.REDUCTION_BAND_WIDTH
    monkeypatch.setattr(two_stage, "REDUCTION_THREADS", threads)
    monkeypatch.setattr(two_stage, "_usable_cpus", lambda: 16)  # 3 threads on 2 CPUs too
    g = gram_of(patches(side, 3000), np.float64)
    n = g.shape[0]
    work = np.asfortranarray(g.astype(np.float32))
    upper = np.triu_indices(n, 1)
    work[upper] = np.nan
    band, tau = two_stage.reduce_to_band(work, kd)
    assert np.all(np.isnan(work[upper]))
    assert np.all(np.isfinite(band)) and np.all(np.isfinite(tau))
    expected = np.linalg.eigvalsh(g)
    values = two_stage.band_eigenvalues(band)
    np.testing.assert_allclose(values, expected, atol=2e-5 * expected[-1])
    lower = np.where(np.isnan(work), 0.0, work)
    q1 = two_stage.apply_band_reflectors(lower, tau, kd, np.eye(n, dtype=np.float32))
    q1 = q1.astype(np.float64)
    np.testing.assert_allclose(q1.T @ q1, np.eye(n), atol=1e-4)
    np.testing.assert_allclose(q1 @ dense_band(band.astype(np.float64)) @ q1.T, g,
                               atol=1e-3 * expected[-1])
    again = np.asfortranarray(g.astype(np.float32))
    band_again, tau_again = two_stage.reduce_to_band(again, kd)
    np.testing.assert_array_equal(band_again, band)
    np.testing.assert_array_equal(tau_again, tau)
    monkeypatch.setattr(two_stage, "_band_reduction", None)
    assert not two_stage.threaded_reduction(np.float32, kd)
    blas_band, _ = two_stage.reduce_to_band(np.asfortranarray(g.astype(np.float32)), kd)
    np.testing.assert_allclose(two_stage.band_eigenvalues(blas_band), values,
                               atol=2e-5 * expected[-1])


@needs_threaded_reduction
def test_threaded_band_reduction_checks_its_arguments():
    matrix = np.zeros((200, 200), dtype=np.float32, order="F")
    tau = np.zeros(104, dtype=np.float32)
    geqrt3 = two_stage.ctypes.cast(two_stage._ROUTINES["s"]["blocked"]["geqrt3"],
                                   two_stage.ctypes.c_void_p).value
    reduce = two_stage._band_reduction.reduce
    with pytest.raises(ValueError, match="null address"):
        reduce(0, 200, matrix.ctypes.data, 200, tau.ctypes.data, 2)
    with pytest.raises(ValueError, match="lda < n"):
        reduce(geqrt3, 200, matrix.ctypes.data, 100, tau.ctypes.data, 2)
    # The zero matrix: every panel is already reduced (τ = 0, H = I).
    assert reduce(geqrt3, 200, matrix.ctypes.data, 200, tau.ctypes.data, 2) == (96, 0)
    assert not np.any(matrix) and not np.any(tau)


def test_threaded_band_reduction_only_for_float32_at_its_band_width():
    """Other band widths and float64 take OpenBLAS's kernels (the tests above cover them)."""
    assert not two_stage.threaded_reduction(np.float64, two_stage.REDUCTION_BAND_WIDTH)
    assert not two_stage.threaded_reduction(np.float32, 64)


needs_parallel_chase = pytest.mark.skipif(
    two_stage._bulge_chasing is None,
    reason="the C extension amct_core.decompose._bulge_chasing was not built (no C compiler)")


@needs_parallel_chase
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_parallel_bulge_chasing_gives_lapacks_tridiagonal_matrix_bit_for_bit(dtype, threads):
    # Band widths and sizes around the edges of the sweep schedule: a last sweep of one step,
    # sizes just above the band, groups of sweeps that do not fill, and a real spectrum.
    rng = np.random.default_rng(11)
    cases = [(n, kd) for n in (4, 5, 9, 66, 67, 131, 300) for kd in (2, 3, 8, 64, 96)
             if kd + 1 < n]
    for n, kd in cases:
        band = np.asfortranarray(rng.standard_normal((kd + 1, n)).astype(dtype))
        diag, offdiag = two_stage._lapack_tridiagonal(band)
        par_diag, par_offdiag = two_stage._parallel_tridiagonal(band, threads)
        assert np.array_equal(par_diag, diag), (n, kd)
        assert np.array_equal(par_offdiag, offdiag[:n - 1]), (n, kd)
    work = np.asfortranarray(gram_of(patches(16, 2000), dtype))
    band, _ = two_stage.reduce_to_band(work, 16)
    kept = band.copy()
    np.testing.assert_array_equal(two_stage.band_eigenvalues(band, threads=threads),
                                  two_stage.band_eigenvalues(band, threads=1))
    np.testing.assert_array_equal(band, kept)


@needs_parallel_chase
def test_parallel_bulge_chasing_is_the_default_and_checks_its_arguments():
    assert two_stage.bulge_threads(np.float32) == min(two_stage.BULGE_THREADS,
                                                      two_stage._usable_cpus())
    chase = two_stage._bulge_chasing.chase
    with pytest.raises(ValueError, match="null address"):
        chase(1, 4, 10, 3, 0, 7, 1, 1, 1, 16, 2)
    with pytest.raises(ValueError, match="no kernels address"):
        chase(0, 8, 10, 3, 1, 7, 1, 1, 1, 16, 2)  # no fused float64 kernels
    with pytest.raises(ValueError, match="kd >= 2"):
        chase(1, 4, 10, 1, 1, 3, 1, 1, 1, 16, 2)


needs_fused_chase = pytest.mark.skipif(
    not two_stage.fused_chase(np.float32),
    reason="the fused float32 kernels need the C extension and a CPU with AVX-512")


@needs_fused_chase
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_bulge_chasing_keeps_the_spectrum_on_any_thread_count(threads):
    # The same edge cases of the sweep schedule as LAPACK's kernels above; band widths that
    # are and are not multiples of the four columns and sixteen rows the kernels take at once.
    rng = np.random.default_rng(12)
    cases = [(n, kd) for n in (4, 5, 9, 66, 67, 131, 300) for kd in (2, 3, 5, 8, 21, 64, 96)
             if kd + 1 < n]
    for n, kd in cases:
        band = np.asfortranarray(rng.standard_normal((kd + 1, n)).astype(np.float32))
        kept = band.copy()
        diag, offdiag = two_stage._parallel_tridiagonal(band, threads, fused=True)
        np.testing.assert_array_equal(band, kept)
        one_diag, one_offdiag = two_stage._parallel_tridiagonal(band, 1, fused=True)
        assert np.array_equal(diag, one_diag) and np.array_equal(offdiag, one_offdiag), (n, kd)
        values = np.linalg.eigvalsh(np.diag(diag.astype(np.float64))
                                    + np.diag(offdiag.astype(np.float64), -1))
        expected = np.linalg.eigvalsh(dense_band(band.astype(np.float64)))
        np.testing.assert_allclose(values, expected, atol=2e-6 * np.abs(expected).max()
                                   * np.sqrt(n), err_msg=f"n={n}, kd={kd}")
        # The trace is kept, to the rounding of float32 sums (a relative test would fail on
        # the traces near zero that cancellation leaves in some of these random bands).
        trace = float(band[0].astype(np.float64).sum())
        np.testing.assert_allclose(float(diag.astype(np.float64).sum()), trace,
                                   atol=2e-6 * np.sqrt(n * kd) * np.abs(band).max())


@needs_fused_chase
def test_fused_bulge_chasing_is_the_float32_default_on_a_real_spectrum():
    g = gram_of(patches(16, 2000), np.float64)
    band, _ = two_stage.reduce_to_band(np.asfortranarray(g.astype(np.float32)), 64)
    diag, offdiag = two_stage._parallel_tridiagonal(band, 1, fused=True)
    values = two_stage.band_eigenvalues(band)
    np.testing.assert_array_equal(values, two_stage.tridiagonal_eigenvalues(diag, offdiag))
    expected = np.linalg.eigvalsh(g)
    np.testing.assert_allclose(values, expected, atol=2e-5 * expected[-1])


needs_bisection = pytest.mark.skipif(
    not two_stage.bisection_eigenvalues(np.float32),
    reason="the vectorised bisection needs the C extension _sturm_bisection")


def tridiagonals() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tridiagonal matrices that test bisection: the one of a real Gram matrix (digit
    patches), Wilkinson's W⁺₂₁ (pairs of eigenvalues equal to 14 digits), a matrix that splits
    into blocks (zero off-diagonals) with repeated eigenvalues, one with negative and
    positive eigenvalues of very different sizes, and the smallest ones."""
    from scipy.linalg.lapack import dsytrd

    g = gram_of(patches(12, 1500), np.float64)
    _, diag, offdiag, _, _ = dsytrd(g, lower=1)
    w21 = np.abs(np.arange(-10.0, 11.0)), np.ones(20)
    split_d = np.tile(np.array([2.0, 2.0, 5.0]), 40)
    split_e = np.tile(np.array([1.0, 0.0, 0.0]), 40)[:-1]
    rng = np.random.default_rng(3)
    mixed = rng.normal(size=300) * np.logspace(-6, 3, 300), rng.normal(size=299)
    return {"gram": (diag, offdiag), "wilkinson21": w21, "split": (split_d, split_e),
            "mixed": mixed, "n=2": (np.array([1.0, -3.0]), np.array([0.5])),
            "diagonal": (np.array([3.0, -1.0, 2.0]), np.zeros(2)),
            "zero": (np.zeros(5), np.zeros(4))}


@needs_bisection
@pytest.mark.parametrize("name", ["gram", "wilkinson21", "split", "mixed", "n=2", "diagonal",
                                  "zero"])
def test_bisection_finds_every_eigenvalue_to_float32_rounding(name):
    from scipy.linalg import eigvalsh_tridiagonal

    diag, offdiag = tridiagonals()[name]
    expected = eigvalsh_tridiagonal(diag, offdiag)  # float64
    d32, e32 = diag.astype(np.float32), offdiag.astype(np.float32)
    exact = eigvalsh_tridiagonal(d32.astype(np.float64), e32.astype(np.float64))
    kept = d32.copy(), e32.copy()
    values = two_stage.tridiagonal_eigenvalues(d32, e32)
    np.testing.assert_array_equal(d32, kept[0])
    np.testing.assert_array_equal(e32, kept[1])
    assert values.dtype == np.float64 and values.shape == expected.shape
    assert np.all(np.diff(values) >= 0)
    norm = max(np.abs(expected).max(), np.finfo(np.float32).tiny)
    # Within a few ulps of ‖T‖ of the eigenvalues of the float32 matrix.
    np.testing.assert_allclose(values, exact, rtol=0, atol=8 * np.finfo(np.float32).eps * norm)
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-5 * norm)


@needs_bisection
def test_bisection_is_the_same_on_any_number_of_threads_with_or_without_avx512():
    from amct_core.decompose import _sturm_bisection

    diag, offdiag = (v.astype(np.float32) for v in tridiagonals()["gram"])
    n = diag.shape[0]
    results = []
    for threads in (1, 2, 3):
        for vectorised in (True, False):
            out = np.empty(n, dtype=np.float32)
            used = _sturm_bisection.eigenvalues(n, diag.ctypes.data, offdiag.ctypes.data,
                                                out.ctypes.data, threads, vectorised)
            assert used == threads
            results.append(out)
    for out in results[1:]:
        np.testing.assert_array_equal(out, results[0])


@needs_bisection
def test_bisection_is_more_accurate_than_float32_sterf_on_a_real_spectrum():
    # The reason it replaced ?sterf for float32: on the tridiagonal matrix of a real Gram
    # matrix, float32 ?sterf's largest error is many times bisection's.
    from scipy.linalg import eigvalsh_tridiagonal

    diag, offdiag = (v.astype(np.float32) for v in tridiagonals()["gram"])
    exact = eigvalsh_tridiagonal(diag.astype(np.float64), offdiag.astype(np.float64))
    sterf = np.sort(eigvalsh_tridiagonal(diag, offdiag, lapack_driver="sterf"))
    bisection = two_stage.tridiagonal_eigenvalues(diag, offdiag)
    assert np.abs(bisection - exact).max() <= np.abs(sterf - exact).max()


@needs_bisection
@pytest.mark.parametrize("power", [-70, 70])
def test_bisection_of_a_matrix_whose_squared_entries_leave_the_float32_range(power):
    # e² of entries near 2^±70 overflows or underflows float32: the matrix is scaled by a
    # power of two (exact) for the Sturm counts, so the eigenvalues scale exactly with it.
    diag, offdiag = (v.astype(np.float32) for v in tridiagonals()["wilkinson21"])
    values = two_stage.tridiagonal_eigenvalues(diag, offdiag)
    scaled = two_stage.tridiagonal_eigenvalues(np.ldexp(diag, power), np.ldexp(offdiag, power))
    np.testing.assert_array_equal(scaled, np.ldexp(values, power))


@needs_bisection
def test_bisection_refuses_nan():
    diag = np.array([1.0, np.nan, 2.0], dtype=np.float32)
    with pytest.raises(np.linalg.LinAlgError, match="NaN or Inf"):
        two_stage.tridiagonal_eigenvalues(diag, np.ones(2, dtype=np.float32))


def test_float64_and_no_c_extension_take_sterf(monkeypatch):
    from scipy.linalg import eigvalsh_tridiagonal

    diag, offdiag = tridiagonals()["mixed"]
    expected = eigvalsh_tridiagonal(diag, offdiag, lapack_driver="sterf")
    np.testing.assert_array_equal(two_stage.tridiagonal_eigenvalues(diag, offdiag), expected)
    assert not two_stage.bisection_eigenvalues(np.float64)
    monkeypatch.setattr(two_stage, "_sturm_bisection", None)
    assert not two_stage.bisection_eigenvalues(np.float32)
    d32, e32 = diag.astype(np.float32), offdiag.astype(np.float32)
    np.testing.assert_array_equal(
        two_stage.tridiagonal_eigenvalues(d32, e32),
        np.sort(eigvalsh_tridiagonal(d32, e32, lapack_driver="sterf").astype(np.float64)))


def test_bulge_chasing_runs_scipys_blas_on_one_thread_and_restores_it(monkeypatch):
    # The kernels' level-2 BLAS calls on kd × kd blocks must not be split over threads.
    calls = []
    count = [3]

    def getter() -> int:
        return count[0]

    def setter(value: int) -> None:
        calls.append(value)
        count[0] = value

    lapack = two_stage._lapack_tridiagonal

    def chase(band):
        assert count[0] == 1
        return lapack(band)

    monkeypatch.setattr(two_stage, "_THREAD_CONTROL", (getter, setter))
    monkeypatch.setattr(two_stage, "_lapack_tridiagonal", chase)
    g = gram_of(patches(8, 500), np.float64)
    band, _ = two_stage.reduce_to_band(g.copy(order="F"), 8)
    two_stage.band_eigenvalues(band, threads=1)
    assert calls == [1, 3] and count[0] == 3


def test_without_the_c_extension_lapack_chases_the_bulges(monkeypatch):
    monkeypatch.setattr(two_stage, "_bulge_chasing", None)
    assert two_stage.bulge_threads(np.float32) == 1
    g = gram_of(patches(8, 500), np.float64)
    band, _ = two_stage.reduce_to_band(g.copy(order="F"), 8)
    np.testing.assert_allclose(two_stage.band_eigenvalues(band), np.linalg.eigvalsh(g),
                               atol=1e-12 * np.abs(g).sum())


def test_reduce_to_band_needs_fortran_order():
    g = np.ascontiguousarray(gram_of(patches(6, 200), np.float64))
    with pytest.raises(ValueError, match="Fortran"):
        two_stage.reduce_to_band(g, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_panels_transposed_by_omatcopy_or_numpy_give_the_same_reduction(monkeypatch, dtype):
    """The panels' transposed copies come from OpenBLAS's ?omatcopy where the library has it,
    else from NumPy: the same bytes, so the same band and reflectors, bit for bit."""
    routines = two_stage._ROUTINES[two_stage._prefix(np.dtype(dtype))]
    if routines.get("omatcopy") is None or routines["blocked"] is None:
        pytest.skip("this BLAS has no ?omatcopy or no blocked reduction routines")
    matrix = np.asfortranarray(np.arange(7 * 11, dtype=dtype).reshape(7, 11) ** 1.5)
    for row, col, rows, cols in [(0, 0, 7, 11), (2, 3, 5, 4), (6, 10, 1, 1), (3, 2, 0, 4)]:
        fast = two_stage._transposed(matrix, row, col, rows, cols, routines["omatcopy"])
        plain = two_stage._transposed(matrix, row, col, rows, cols, None)
        assert fast.flags.f_contiguous and fast.shape == (cols, rows)
        np.testing.assert_array_equal(fast, matrix[row:row + rows, col:col + cols].T)
        np.testing.assert_array_equal(fast, plain)
    g = gram_of(patches(10, 400), dtype)
    with_copy = two_stage.reduce_to_band(g.copy(order="F"), 16)
    monkeypatch.setitem(routines, "omatcopy", None)
    without = two_stage.reduce_to_band(g.copy(order="F"), 16)
    for got, expected in zip(with_copy, without, strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("slab_rows", [128, 16, 7])
def test_band_operator_product_equals_the_dense_band(monkeypatch, slab_rows):
    # n = 100, kd = 12: one slab, or slabs whose band is cut by the matrix's first and last
    # columns, and a last slab shorter than the others.
    monkeypatch.setattr(band_subspace, "SLAB_ROWS", slab_rows)
    g = gram_of(patches(10, 800), np.float64)
    band, _ = two_stage.reduce_to_band(g, 12)
    x = np.random.default_rng(1).standard_normal((band.shape[1], 7))
    previous = np.random.default_rng(2).standard_normal(x.shape)
    operator = band_subspace._BandOperator(band, np.float64, shift=2.5)
    dense = dense_band(band)
    # In place over the block two steps back, as the Chebyshev recurrence uses it.
    out = operator.step(x, 0.5, previous.copy(), beta=-0.25)
    np.testing.assert_allclose(out, 0.5 * (dense @ x - 2.5 * x) - 0.25 * previous, atol=1e-8)
    np.testing.assert_allclose(operator.product(x, np.empty_like(x)), dense @ x, atol=1e-8)


needs_band_product = pytest.mark.skipif(
    not band_subspace.band_product_kernel(np.float32),
    reason="the C extension amct_core.decompose._band_product was not built, or this CPU has "
           "no AVX-512")


@needs_band_product
@pytest.mark.parametrize("n, kd, k, threads", [(100, 12, 7, 2), (101, 12, 96, 1),
                                               (103, 5, 113, 3), (6, 5, 17, 2), (1, 0, 1, 2)])
def test_band_product_kernel_equals_the_dense_band(n, kd, k, threads, monkeypatch):
    """The C kernel on float32: row counts that are not a multiple of its four-row groups,
    column counts below, at and above its 96-column blocks, a band as wide as the matrix, a
    1 × 1 matrix; the slabs through OpenBLAS give the same product up to rounding."""
    monkeypatch.setattr(band_subspace, "PRODUCT_THREADS", threads)
    monkeypatch.setattr(band_subspace.blas, "usable_cpus", lambda: 16)
    g = gram_of(patches(11, 800), np.float64)[:n, :n]
    band = np.zeros((kd + 1, n))
    for offset in range(min(kd, n - 1) + 1):
        band[offset, :n - offset] = np.diagonal(g, -offset)
    rng = np.random.default_rng(n + k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    previous = rng.standard_normal((n, k)).astype(np.float32)
    operator = band_subspace._BandOperator(band.astype(np.float32), np.float32, shift=2.5)
    assert operator.groups is not None and not operator.slabs
    dense = dense_band(band)
    scale = np.abs(dense).max() * np.abs(x).max() * (2 * kd + 1)
    out = operator.step(x, 0.5, previous.copy(), beta=-0.25)
    expected = 0.5 * (dense @ x - 2.5 * x) - 0.25 * previous
    np.testing.assert_allclose(out, expected, atol=1e-6 * scale)
    np.testing.assert_allclose(operator.product(x, np.empty_like(x)), dense @ x,
                               atol=1e-6 * scale)
    # With beta = 0, out is not read (NaN there does not reach the result).
    unshifted = band_subspace._BandOperator(band.astype(np.float32), np.float32)
    np.testing.assert_allclose(unshifted.step(x, 1.0, np.full_like(x, np.nan)), dense @ x,
                               atol=1e-6 * scale)
    if n > 1 and k > 1:  # a block the kernel cannot take (Fortran order): by the slabs
        fortran = operator.step(np.asfortranarray(x), 0.5, np.asfortranarray(previous),
                                beta=-0.25)
        assert operator.slabs
        np.testing.assert_allclose(fortran, out, atol=1e-6 * scale)
    monkeypatch.setattr(band_subspace, "_band_product", None)
    assert not band_subspace.band_product_kernel(np.float32)
    slabs = band_subspace._BandOperator(band.astype(np.float32), np.float32, shift=2.5)
    assert slabs.groups is None
    np.testing.assert_allclose(slabs.step(x, 0.5, previous.copy(), beta=-0.25), out,
                               atol=1e-6 * scale)


def test_block_size_is_rank_plus_oversampling_in_whole_cache_lines():
    assert band_subspace.block_size(6144, 1232) == 1488  # 1232 + 247, rounded up to 16
    assert band_subspace.block_size(6144, 10) == 32  # 10 + 16
    assert band_subspace.block_size(20, 10) == 20  # never more than n


@needs_band_product
def test_band_product_kernel_checks_its_arguments():
    x = np.zeros((8, 3), dtype=np.float32)
    coef = np.zeros((2, 12, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="out is X"):
        band_subspace._band_product.step(8, 3, 4, coef.ctypes.data, x.ctypes.data,
                                         x.ctypes.data, 1.0, 0.0, 2)
    with pytest.raises(ValueError, match="null address"):
        band_subspace._band_product.step(8, 3, 4, 0, x.ctypes.data, x.ctypes.data + 4, 1.0,
                                         0.0, 2)


def excess_of(vectors: np.ndarray, gram: np.ndarray, rank: int) -> float:
    """Independent measure: (tr G − tr(UᵀGU) − Σ_{h>r} λ_h) / Σ_{h>r} λ_h."""
    values = np.linalg.eigvalsh(gram)[::-1]
    u = vectors.astype(np.float64)
    captured = np.trace(u.T @ gram @ u)
    optimal = values[rank:].sum()
    return (values.sum() - captured - optimal) / optimal


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_orthonormalise_keeps_the_span_of_an_ill_conditioned_block(monkeypatch, dtype):
    """Cholesky QR in float64 (R⁻¹ applied by trmm, on chunks of rows): orthonormal columns
    spanning the block's columns, for a block with κ ≈ 10⁵ as the filter leaves it; a block
    of dependent columns goes through Householder QR instead."""
    monkeypatch.setattr(band_subspace, "ORTHO_ROWS", 70)
    rng = np.random.default_rng(7)
    basis, _ = np.linalg.qr(rng.standard_normal((300, 40)))
    block = (basis * np.logspace(0, 5, 40)) @ np.linalg.qr(rng.standard_normal((40, 40)))[0]
    block = np.ascontiguousarray(block.astype(dtype))
    original = block.astype(np.float64)
    q = band_subspace._orthonormalise(block).astype(np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(40), atol=1e-4 if dtype == np.float32 else 1e-6)
    # the span: the block is reproduced by its projection on Q
    residual = original - q @ (q.T @ original)
    assert np.linalg.norm(residual) <= 1e-5 * np.linalg.norm(original)
    calls = []
    real_qr = band_subspace.qr
    monkeypatch.setattr(band_subspace, "qr", lambda *a, **k: calls.append(1) or real_qr(*a, **k))
    dependent = np.ascontiguousarray(np.repeat(original[:, :20], 2, axis=1).astype(dtype))
    q = band_subspace._orthonormalise(dependent).astype(np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(40), atol=1e-5)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("side, rank", [(12, 29), (16, 48)])
def test_band_eigenvectors_reach_the_tolerance_on_a_steep_real_spectrum(dtype, side, rank):
    g = gram_of(patches(side, 6000), np.float64)
    band, _ = two_stage.reduce_to_band(np.asfortranarray(g.astype(dtype)), 16)
    values = two_stage.band_eigenvalues(band)
    assert values[-1] / values[-rank] > 20  # steep: several rounds, leading vectors locked
    vectors, excess = band_subspace.top_band_eigenvectors(band, values, rank, tolerance=1e-3)
    assert vectors.shape == (g.shape[0], rank) and vectors.dtype == dtype
    u = vectors.astype(np.float64)
    np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-4)
    band_gram = dense_band(band.astype(np.float64))
    independent = excess_of(vectors, band_gram, rank)
    assert 0 <= excess <= 1e-3
    assert independent == pytest.approx(excess, abs=2e-4)
    assert independent <= 1e-3 + 2e-4


def test_repeated_eigenvalues_and_full_block():
    """A spectrum with a plateau across the rank boundary, and a rank whose block is the
    whole matrix: both converge without dividing by a zero gap."""
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.standard_normal((90, 90)))
    values = np.concatenate([np.linspace(50, 10, 20), np.full(50, 4.0), np.linspace(1, 0, 20)])
    g = np.asfortranarray((basis * values) @ basis.T)
    band, _ = two_stage.reduce_to_band(g.copy(order="F"), 6)
    eigenvalues = two_stage.band_eigenvalues(band)
    for rank in (30, 85):
        vectors, excess = band_subspace.top_band_eigenvectors(band, eigenvalues, rank)
        assert excess_of(vectors, dense_band(band), rank) <= 1e-3 + 1e-9
        assert excess <= 1e-3


def test_rounds_stop_at_the_limit_and_report_the_excess(monkeypatch):
    g = gram_of(patches(12, 3000), np.float64)
    band, _ = two_stage.reduce_to_band(g.copy(order="F"), 16)
    values = two_stage.band_eigenvalues(band)
    monkeypatch.setattr(band_subspace, "MAX_ROUNDS", 1)
    monkeypatch.setattr(band_subspace, "MAX_DEGREE", 1)
    vectors, excess = band_subspace.top_band_eigenvectors(band, values, 40, tolerance=1e-12)
    assert excess > 1e-12
    assert excess_of(vectors, dense_band(band), 40) == pytest.approx(excess, rel=1e-3)


def patch_kernel(shape) -> np.ndarray:
    """A (Cout, Cin, KH, KW) kernel whose SCFK unfolding rows hold photograph patches."""
    cout, cin, kh, kw = shape
    rows = cin * kh
    data = patches(int(np.sqrt(cout * kw)) + 1, rows)[:, :cout * kw]
    return np.ascontiguousarray(data.reshape(cin, kh, cout, kw).transpose(2, 0, 1, 3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loader", [False, True])
def test_two_stage_factors_match_the_exact_path(monkeypatch, dtype, loader):
    weight = patch_kernel((96, 48, 3, 3)).astype(dtype)
    mode = DecomposeMode.SCFK
    exact = factorize_kernel(weight, mode, compute_dtype=dtype)
    calls = []
    real = two_stage.reduce_to_band

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(two_stage, "reduce_to_band", spy)
    monkeypatch.setattr(spatial_svd_module, "TWO_STAGE_MIN_ROWS", 64)
    monkeypatch.setattr(spatial_svd_module, "BAND_WIDTH", 8)
    fast = factorize_kernel((lambda: weight) if loader else weight, mode, compute_dtype=dtype)
    assert calls == [8]
    assert (fast.rank, fast.evbmf_rank) == (exact.rank, exact.evbmf_rank)
    assert fast.first.shape == exact.first.shape and fast.last.shape == exact.last.shape
    singular = np.linalg.svd(unfold_weight(weight.astype(np.float64), mode), compute_uv=False)
    np.testing.assert_allclose(fast.singular_values ** 2, singular ** 2,  # eigenvalues of G
                               atol=(1e-12 if dtype == np.float64 else 2e-5) * singular[0] ** 2)
    optimal = np.sum(singular[fast.rank:] ** 2)
    composed = np.einsum("kih,okw->oihw", fast.first[:, :, :, 0].astype(np.float64),
                         fast.last[:, :, 0, :].astype(np.float64))
    error = np.sum((composed - weight.astype(np.float64)) ** 2)
    assert optimal <= error * (1 + 1e-6) and error <= optimal * (1 + 1.5e-3)


def test_without_two_stage_routines_the_one_stage_path_is_used(monkeypatch):
    weight = patch_kernel((96, 48, 3, 3))
    monkeypatch.setattr(spatial_svd_module, "TWO_STAGE_MIN_ROWS", 64)
    monkeypatch.setattr(two_stage, "_ROUTINES", {})
    assert not two_stage.available(np.float32)
    factors = factorize_kernel(weight, DecomposeMode.SCFK, rank=20)
    singular = np.linalg.svd(unfold_weight(weight, DecomposeMode.SCFK), compute_uv=False)
    composed = np.einsum("kih,okw->oihw", factors.first[:, :, :, 0], factors.last[:, :, 0, :])
    assert np.sum((composed - weight) ** 2) == pytest.approx(np.sum(singular[20:] ** 2),
                                                              rel=1e-9)


def low_rank_kernel(kind: str, dtype) -> np.ndarray:
    """A (128, 128, 3, 3) kernel whose unfolding is zero, of rank 10, or of rank 10 plus a tail
    10⁻⁴ times smaller (a layer with a few dominant directions): the spectra where the optimal
    error is at or near the rounding level, and where the top eigenvalues are 10¹⁰ times λ_r."""
    rng = np.random.default_rng(5)
    if kind == "zero":
        unfolded = np.zeros((384, 384))
    else:
        unfolded = rng.standard_normal((384, 10)) @ rng.standard_normal((10, 384))
        if kind == "rank 10 + tail":
            unfolded = unfolded + 1e-4 * rng.standard_normal((384, 384))
    return np.ascontiguousarray(
        unfolded.reshape(128, 3, 128, 3).transpose(2, 0, 1, 3).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["zero", "rank 10", "rank 10 + tail"])
def test_rank_deficient_kernels_converge(monkeypatch, dtype, kind):
    weight = low_rank_kernel(kind, dtype)
    monkeypatch.setattr(spatial_svd_module, "TWO_STAGE_MIN_ROWS", 64)
    monkeypatch.setattr(spatial_svd_module, "BAND_WIDTH", 8)
    results = []
    real = band_subspace.top_band_eigenvectors

    def spy(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(band_subspace, "top_band_eigenvectors", spy)
    factors = factorize_kernel(weight, DecomposeMode.SCFK, compute_dtype=dtype)
    assert [excess <= 1e-3 for _, excess in results] == [True]
    assert np.all(np.isfinite(factors.first)) and np.all(np.isfinite(factors.last))
    wide = weight.astype(np.float64)
    singular = np.linalg.svd(unfold_weight(wide, DecomposeMode.SCFK), compute_uv=False)
    composed = np.einsum("kih,okw->oihw", factors.first[:, :, :, 0].astype(np.float64),
                         factors.last[:, :, 0, :].astype(np.float64))
    error = np.sum((composed - wide) ** 2)
    optimal = np.sum(singular[factors.rank:] ** 2)
    rounding = 1e3 * np.finfo(dtype).eps * np.sum(singular ** 2)
    assert error <= optimal * (1 + 1.5e-3) + rounding


def householder_product(reflectors: np.ndarray, tau: np.ndarray, kd: int) -> np.ndarray:
    """Q1 = H(0) H(1) ⋯ as a dense matrix, one reflector at a time (independent of the blocked
    code)."""
    n = reflectors.shape[0]
    q = np.eye(n)
    for i in range(tau.shape[0]):
        v = np.zeros(n)
        v[kd + i] = 1.0
        v[kd + i + 1:] = reflectors[kd + i + 1:, i]
        q = q - tau[i] * np.outer(q @ v, v)
    return q


@pytest.mark.parametrize("block", [256, 8, 5])
def test_band_reflectors_apply_in_blocks_as_one_at_a_time(monkeypatch, block):
    # Blocks of V are read where they lie below their top rows; a τ = 0 reflector (H = I,
    # as for a zero column) makes its block go through a copy with that column zeroed.
    monkeypatch.setattr(two_stage, "REFLECTOR_BLOCK", block)
    g = gram_of(patches(6, 300), np.float64)
    kd = 3
    work = np.asfortranarray(g.copy())
    _, tau = two_stage.reduce_to_band(work, kd)
    tau = tau.copy()
    tau[[4, 17]] = 0.0
    expected = householder_product(work, tau, kd)
    x = np.random.default_rng(5).standard_normal((g.shape[0], 4))
    blocks = two_stage.reflector_blocks(work, tau, kd)
    trivial = [bool(np.any(tau[start:stop] == 0)) for start, stop, _, _ in blocks]
    assert sum(trivial) >= (1 if block == 256 else 2)
    # A block with a τ = 0 is copied whole, the others only their top rows.
    assert [head.shape[0] for _, _, head, _ in blocks] == [
        g.shape[0] - kd - start if whole else stop - start
        for (start, stop, _, _), whole in zip(blocks, trivial, strict=True)]
    np.testing.assert_allclose(two_stage.apply_band_reflectors(work, tau, kd, x), expected @ x,
                               atol=1e-12)
    np.testing.assert_array_equal(
        two_stage.apply_band_reflectors(work, tau, kd, x, blocks=blocks),
        two_stage.apply_band_reflectors(work, tau, kd, x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tridiagonal_eigenvalues_are_lapacks_sterf(monkeypatch, dtype):
    from scipy.linalg import eigvalsh_tridiagonal

    # The ?sterf path, which float32 takes where the bisection extension was not built.
    monkeypatch.setattr(two_stage, "_sturm_bisection", None)
    rng = np.random.default_rng(6)
    diag, offdiag = rng.standard_normal(300).astype(dtype), rng.standard_normal(299).astype(dtype)
    expected = np.sort(eigvalsh_tridiagonal(diag, offdiag, lapack_driver="sterf")
                       .astype(np.float64))
    kept = diag.copy(), offdiag.copy()
    values = two_stage.tridiagonal_eigenvalues(diag, offdiag)
    assert values.dtype == np.float64
    np.testing.assert_array_equal(values, expected)  # the same routine, through ctypes
    np.testing.assert_array_equal(diag, kept[0])
    np.testing.assert_array_equal(offdiag, kept[1])
    routines = dict(two_stage._ROUTINES[two_stage._prefix(np.dtype(dtype))])
    routines["sterf"] = None
    monkeypatch.setitem(two_stage._ROUTINES, two_stage._prefix(np.dtype(dtype)), routines)
    np.testing.assert_array_equal(two_stage.tridiagonal_eigenvalues(diag, offdiag), expected)


def test_a_failure_of_the_eigenvalues_on_their_thread_reaches_the_caller(monkeypatch):
    def fail(diag, offdiag):
        raise np.linalg.LinAlgError("3 eigenvalues did not converge")

    monkeypatch.setattr(two_stage, "tridiagonal_eigenvalues", fail)
    monkeypatch.setattr(spatial_svd_module, "TWO_STAGE_MIN_ROWS", 16)
    weight = np.random.default_rng(7).standard_normal((40, 30, 3, 3)).astype(np.float32)
    with pytest.raises(DecompositionError, match="two-stage reduction failed .*did not "
                                                 "converge"):
        factorize_kernel(weight, DecomposeMode.FCFK, rank=8)


def test_a_rank_error_on_the_eigenvalue_thread_reaches_the_caller(monkeypatch):
    # The rank is picked on the thread that computes the eigenvalues: a bad rank must still
    # reach the caller as the DecompositionError that names it.
    monkeypatch.setattr(spatial_svd_module, "TWO_STAGE_MIN_ROWS", 16)
    weight = np.random.default_rng(7).standard_normal((40, 30, 3, 3)).astype(np.float32)
    with pytest.raises(DecompositionError, match=r"rank must be in \[1, 120\]"):
        factorize_kernel(weight, DecomposeMode.FCFK, rank=500)


def test_the_start_block_drawn_ahead_is_the_seeded_one():
    g = gram_of(patches(8, 600), np.float32)
    band, _ = two_stage.reduce_to_band(g.copy(order="F"), 8)
    values = two_stage.band_eigenvalues(band)
    alone, excess = band_subspace.top_band_eigenvectors(band, values, 10)
    ahead, excess_ahead = band_subspace.top_band_eigenvectors(
        band, values, 10, start=band_subspace.start_block(64, 10, np.float32))
    np.testing.assert_array_equal(ahead, alone)
    assert excess_ahead == excess
    with pytest.raises(ValueError, match=r"start must be a C-ordered float32 array of shape "
                                         r"\(64, 32\)"):
        band_subspace.top_band_eigenvectors(band, values, 10,
                                            start=np.zeros((64, 10), np.float32))
