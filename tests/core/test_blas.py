"""The solver's matrix products through SciPy's BLAS, against numpy's products."""
import numpy as np
import pytest

from amct_core.decompose import blas


def layouts(matrix: np.ndarray) -> list[np.ndarray]:
    """The matrix C-ordered, Fortran-ordered, as a transposed view, and as a strided slice."""
    wide = np.zeros((matrix.shape[0], 2 * matrix.shape[1]), dtype=matrix.dtype)
    wide[:, ::2] = matrix
    return [np.ascontiguousarray(matrix), np.asfortranarray(matrix),
            np.ascontiguousarray(matrix.T).T, wide[:, ::2]]


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_matmul_equals_numpy_for_every_layout(dtype, tol):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 23)).astype(dtype)
    b = rng.standard_normal((23, 41)).astype(dtype)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    for left in layouts(a):
        for right in layouts(b):
            result = blas.matmul(left, right)
            assert result.flags.c_contiguous and result.dtype == dtype
            np.testing.assert_allclose(result, expected, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_matmul_updates_out_in_place(dtype, tol):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((30, 12)).astype(dtype)
    b = rng.standard_normal((12, 20)).astype(dtype)
    start = rng.standard_normal((30, 20)).astype(dtype)
    out = start.copy()
    returned = blas.matmul(a, b, out=out, alpha=-2.0, beta=0.5)
    assert returned is out
    np.testing.assert_allclose(out, 0.5 * start - 2.0 * (a @ b), rtol=tol, atol=tol * 10)
    # A row block of a larger C-ordered array is C-contiguous: written where it lies.
    big = np.full((50, 20), 7.0, dtype=dtype)
    blas.matmul(a, b, out=big[10:40])
    np.testing.assert_allclose(big[10:40], a @ b, rtol=tol, atol=tol * 10)
    assert np.all(big[:10] == 7.0) and np.all(big[40:] == 7.0)
    # beta = 0 never reads out: NaN there does not leak into the result.
    out = np.full((30, 20), np.nan, dtype=dtype)
    np.testing.assert_allclose(blas.matmul(a, b, out=out), a @ b, rtol=tol, atol=tol * 10)


def test_matmul_rejects_what_it_cannot_compute():
    a = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="do not multiply"):
        blas.matmul(a, a)
    with pytest.raises(ValueError, match="two float32 or two float64"):
        blas.matmul(a, np.ones((4, 2)))
    with pytest.raises(ValueError, match="two float32 or two float64"):
        blas.matmul(a.astype(np.int64), np.ones((4, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="C-contiguous float32 array of shape \\(3, 2\\)"):
        blas.matmul(a, np.ones((4, 2), dtype=np.float32), out=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        blas.matmul(a, np.ones((4, 2), dtype=np.float32),
                    out=np.zeros((2, 3), np.float32).T)
    with pytest.raises(ValueError, match="beta needs out"):
        blas.matmul(a, np.ones((4, 2), dtype=np.float32), beta=1.0)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_gram_is_the_full_symmetric_product(dtype, tol):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 17)).astype(dtype)
    expected = x.astype(np.float64).T @ x.astype(np.float64)
    for layout in layouts(x):
        result = blas.gram(layout)
        assert result.shape == (17, 17) and result.dtype == dtype
        np.testing.assert_array_equal(result, result.T)
        np.testing.assert_allclose(result, expected, rtol=tol, atol=tol * 60)
        for triangle, keep, other in (("upper", np.triu, np.tril), ("lower", np.tril, np.triu)):
            part = blas.gram(layout, triangle=triangle)
            assert part.flags.f_contiguous
            np.testing.assert_allclose(part, keep(expected), rtol=tol, atol=tol * 60)
            assert not np.any(other(part, -1 if triangle == "upper" else 1))
    with pytest.raises(ValueError, match="triangle must be 'both', 'upper' or 'lower', got 'u'"):
        blas.gram(x, triangle="u")


def blocks_of(big: np.ndarray, rows: slice, cols: slice) -> list[np.ndarray]:
    """The block big[rows, cols] of a Fortran-ordered and of a C-ordered copy of ``big``."""
    return [np.asfortranarray(big)[rows, cols], np.ascontiguousarray(big)[rows, cols]]


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5])
def test_matmul_into_writes_a_block_of_a_larger_matrix(dtype, tol, beta):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((19, 11)).astype(dtype)
    b = rng.standard_normal((11, 13)).astype(dtype)
    big = rng.standard_normal((40, 30)).astype(dtype)
    for left in layouts(a):
        for right in layouts(b):
            for block in blocks_of(big, slice(5, 24), slice(7, 20)):
                before = np.array(block.base if block.base is not None else block)
                expected_block = 2.0 * (a.astype(np.float64) @ b) + beta * block
                result = blas.matmul_into(left, right, block, alpha=2.0, beta=beta)
                assert result is block
                np.testing.assert_allclose(block, expected_block, rtol=tol, atol=tol * 10)
                # Nothing outside the block changed.
                owner = block.base if block.base is not None else block
                mask = np.ones(owner.shape, dtype=bool)
                mask[5:24, 7:20] = False
                np.testing.assert_array_equal(np.asarray(owner)[mask], before[mask])


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("lower", [True, False])
def test_gram_into_writes_one_triangle_of_a_block(dtype, tol, lower):
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal((17, 9)).astype(dtype)
    expected = matrix.astype(np.float64).T @ matrix
    pick = np.tril if lower else np.triu
    other = np.triu if lower else np.tril
    for source in layouts(matrix):
        for block in blocks_of(np.full((20, 20), 3.0, dtype=dtype), slice(4, 13), slice(4, 13)):
            blas.gram_into(source, block, beta=0.5, lower=lower)
            np.testing.assert_allclose(pick(block), pick(expected + 1.5), rtol=tol, atol=tol)
            # The other triangle (off its diagonal) keeps its values.
            np.testing.assert_array_equal(other(block, 1 if lower else -1),
                                          other(np.full((9, 9), 3.0), 1 if lower else -1))


def test_into_functions_reject_bad_shapes_and_strides():
    a = np.ones((4, 3))
    with pytest.raises(ValueError, match="do not match"):
        blas.matmul_into(a, np.ones((4, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="one dtype"):
        blas.matmul_into(a, np.ones((3, 2), dtype=np.float32), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="unit stride on one axis"):
        blas.matmul_into(a, np.ones((3, 2)), np.zeros((8, 4))[::2, ::2])
    with pytest.raises(ValueError, match="gram_into: out must be"):
        blas.gram_into(a, np.zeros((4, 4)))


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("parts", [1, 3, 4, 11, 40])
def test_lower_product_is_the_lower_triangle_of_the_product(dtype, tol, parts):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((29, 11)).astype(dtype)
    b = rng.standard_normal((29, 11)).astype(dtype)
    expected = a.astype(np.float64).T @ b.astype(np.float64)
    step = -(-11 // min(parts, 11))
    for left in layouts(a):
        for right in layouts(b):
            result = blas.lower_product(left, right, parts=parts)
            assert result.flags.f_contiguous and result.dtype == dtype
            np.testing.assert_allclose(np.tril(result), np.tril(expected), rtol=tol,
                                       atol=tol * 10)
            # Above the diagonal: the diagonal blocks' upper parts, zero elsewhere.
            for row in range(11):
                for col in range(row + 1, 11):
                    wanted = expected[row, col] if row // step == col // step else 0.0
                    assert result[row, col] == pytest.approx(wanted, rel=tol, abs=tol * 10)
    with pytest.raises(ValueError, match="one shape"):
        blas.lower_product(a, b[:, :5])
