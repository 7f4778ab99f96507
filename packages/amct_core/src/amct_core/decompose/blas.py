"""Matrix products of the decomposition solver through the BLAS that SciPy links against.

numpy and SciPy each bring their own OpenBLAS, each with its own pool of threads, and a pool
keeps its threads spinning for tens of milliseconds after each call. The solver's LAPACK
stages (band reduction, eigensolvers, triangular solves) run in SciPy's library; a numpy
product right after one of them shares the cores with SciPy's spinning threads and runs up to
half as fast (a 1536² product: 39 ms after another numpy product, 72 ms right after a SciPy
one, on two cores). So the solver's large products go through SciPy's ``?gemm`` and ``?syrk``
too, on the arrays as they lie (a C-ordered matrix is the transpose of a Fortran-ordered one),
without copies.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg.blas import get_blas_funcs


def _as_fortran(matrix: np.ndarray) -> tuple[np.ndarray, int]:
    """(F, trans) with op(F) = ``matrix``, F Fortran-contiguous: ``matrix`` itself, or the
    transpose of a C-contiguous one with trans = 1 (a copy only for other layouts)."""
    if matrix.flags.f_contiguous:
        return matrix, 0
    if matrix.flags.c_contiguous:
        return matrix.T, 1
    return np.asfortranarray(matrix), 0


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, alpha: float = 1.0,
           beta: float = 0.0) -> np.ndarray:
    """``alpha · a @ b + beta · out`` for 2-D float32/float64 arrays of one dtype, as a
    C-ordered array (``out`` when given, updated in place; it must be C-contiguous).

    Computed as its transpose, (a b)ᵀ = bᵀ aᵀ, in Fortran order, so C-ordered operands and
    result need no copies.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not multiply")
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
        raise ValueError(f"matmul: needs two float32 or two float64 arrays, got {a.dtype} and "
                         f"{b.dtype}")
    left, trans_left = _as_fortran(b.T)
    right, trans_right = _as_fortran(a.T)
    gemm = get_blas_funcs("gemm", (left,))
    if out is None:
        if beta:
            raise ValueError("matmul: beta needs out")
        return gemm(alpha, left, right, trans_a=trans_left, trans_b=trans_right).T
    if out.shape != (a.shape[0], b.shape[1]) or out.dtype != a.dtype \
            or not out.flags.c_contiguous:
        raise ValueError(f"matmul: out must be a C-contiguous {a.dtype} array of shape "
                         f"{(a.shape[0], b.shape[1])}")
    result = gemm(alpha, left, right, beta=beta, c=out.T, trans_a=trans_left,
                  trans_b=trans_right, overwrite_c=1)
    if not np.shares_memory(result, out):  # pragma: no cover - f2py always writes in place
        out[...] = result.T
    return out


def gram(matrix: np.ndarray, triangle: str = "both") -> np.ndarray:
    """``matrixᵀ @ matrix`` (symmetric) by one ``?syrk``: half the flops of a general product,
    at the same speed for the solver's sizes (a 6144² Gram of 6144 columns: 1.2 s against
    1.4-1.5 s for numpy's products on the blocks below the diagonal).

    ``triangle``: "both" sets the whole matrix; "upper" or "lower" only that triangle (the
    other is zero), which is all LAPACK's Cholesky and band reduction read. The result is
    Fortran-ordered.
    """
    if triangle not in ("both", "upper", "lower"):
        raise ValueError(f"gram: triangle must be 'both', 'upper' or 'lower', got {triangle!r}")
    size = matrix.shape[1]
    result = gram_into(matrix, np.zeros((size, size), dtype=matrix.dtype, order="F"),
                       lower=triangle == "lower")
    if triangle == "both":
        upper = np.triu(result)
        return np.asfortranarray(upper + np.triu(result, 1).T)
    return result


def gram_into(matrix: np.ndarray, out: np.ndarray, beta: float = 0.0,
              lower: bool = True) -> np.ndarray:
    """``out ← matrixᵀ @ matrix + beta · out`` in one triangle of ``out`` (lower or upper; the
    other is left as it is), by one ``?syrk``. ``out`` must be a square Fortran-contiguous
    array of the dtype of ``matrix``; it is returned.
    """
    size = matrix.shape[1]
    if out.shape != (size, size) or out.dtype != matrix.dtype or not out.flags.f_contiguous:
        raise ValueError(f"gram_into: out must be a Fortran-contiguous {matrix.dtype} array of "
                         f"shape {(size, size)}")
    left, trans = _as_fortran(matrix)
    syrk = get_blas_funcs("syrk", (left,))
    # syrk(trans=0) is A Aᵀ; with A = op(left) = matrix it is asked for Aᵀ A: trans = 1 on
    # the stored left (a C-ordered matrix is stored as its transpose, so trans flips). Given a
    # calloc'ed ``out``, the triangle not asked for stays 0 and, for a large matrix, its pages
    # are never touched, so it costs no memory (half of a 420 MB Gram).
    result = syrk(1.0, left, beta=beta, c=out, trans=0 if trans else 1, lower=int(lower),
                  overwrite_c=1)
    if not np.shares_memory(result, out):  # pragma: no cover - f2py always writes in place
        out[...] = result
    return out
