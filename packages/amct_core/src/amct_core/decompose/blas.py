"""Matrix products of the decomposition solver through the BLAS that SciPy links against.

numpy and SciPy each bring their own OpenBLAS, each with its own pool of threads, and a pool
keeps its threads spinning for tens of milliseconds after each call. The solver's LAPACK
stages (band reduction, eigensolvers, triangular solves) run in SciPy's library; a numpy
product right after one of them shares the cores with SciPy's spinning threads and runs up to
half as fast (a 1536² product: 39 ms after another numpy product, 72 ms right after a SciPy
one, on two cores). So the solver's large products go through SciPy's ``?gemm`` and ``?syrk``
too (called through ``ctypes``), on the arrays as they lie (a C-ordered matrix is the
transpose of a Fortran-ordered one), without copies. :func:`matmul_into` and
:func:`gram_into` also write into a block of a larger matrix in place, with the leading
dimension of that matrix, so a product lands where it belongs without a temporary array.
"""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

#: Symbol spellings of a BLAS or LAPACK routine ``name`` in the LP64 libraries SciPy links
#: against: SciPy's own OpenBLAS build (``scipy_`` prefix), plain gfortran (``name_``) and
#: libraries without the trailing underscore.
SPELLINGS = ("scipy_{}_", "{}_", "{}")

_LEN = ctypes.c_size_t  # gfortran's hidden length of each CHARACTER argument


def scipy_library() -> ctypes.CDLL | None:
    """The BLAS and LAPACK library SciPy uses, or None.

    It is found through SciPy's Cython LAPACK module: a symbol lookup in a loaded library also
    searches the libraries it depends on, and that module depends on the LP64 LAPACK SciPy was
    built with (so the integer width of the arguments is right).
    """
    from scipy.linalg import cython_lapack

    try:
        return ctypes.CDLL(cython_lapack.__file__)
    except OSError:  # pragma: no cover - a SciPy whose Cython LAPACK is not a shared object
        return None


@functools.cache
def _routine(name: str) -> object | None:
    """The ctypes function of the BLAS routine ``name`` (e.g. "sgemm") in SciPy's library."""
    try:
        library = scipy_library()
    except Exception:  # pragma: no cover - never let an exotic SciPy build break the solver
        return None
    for spelling in SPELLINGS:
        function = getattr(library, spelling.format(name), None) if library else None
        if function is not None:
            function.restype = None
            return function
    return None  # pragma: no cover


def usable_cpus() -> int:
    """The number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _layout(matrix: np.ndarray) -> tuple[int, bool] | None:
    """(leading dimension, transposed) of a 2-D array as BLAS can take it in place: Fortran
    layout (unit stride down the columns) or C layout (its transpose in Fortran layout), or
    None for other strides."""
    item = matrix.itemsize
    rows, cols = matrix.shape
    row_stride, col_stride = matrix.strides
    if row_stride == item or rows == 1:
        if col_stride % item == 0 and col_stride // item >= max(rows, 1):
            return col_stride // item, False
        if cols == 1:
            return max(rows, 1), False
    if col_stride == item or cols == 1:
        if row_stride % item == 0 and row_stride // item >= max(cols, 1):
            return row_stride // item, True
        if rows == 1:
            return max(cols, 1), True
    return None


def _scalar(dtype: np.dtype, value: float) -> ctypes._SimpleCData:
    return ctypes.c_double(value) if dtype == np.float64 else ctypes.c_float(value)


def routine_prefix(dtype: np.dtype | type) -> str:
    """The BLAS/LAPACK precision letter of ``dtype``: "s" (float32) or "d" (float64)."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return "s"
    if dtype == np.float64:
        return "d"
    raise TypeError(f"BLAS and LAPACK routines here need float32 or float64, got {dtype}")


def matmul_into(a: np.ndarray, b: np.ndarray, out: np.ndarray, alpha: float = 1.0,
                beta: float = 0.0) -> np.ndarray:
    """``out ← alpha · a @ b + beta · out`` in place, where ``out`` may be a block of a larger
    matrix (any 2-D view with a unit stride on one axis), by one ``?gemm``. ``a`` and ``b``
    are taken as they lie when they have such strides too, else copied. Returns ``out``.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] \
            or out.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"matmul_into: shapes {a.shape} @ {b.shape} -> {out.shape} do not "
                         f"match")
    dtype = out.dtype
    if a.dtype != dtype or b.dtype != dtype:
        raise ValueError(f"matmul_into: needs arrays of one dtype, got {a.dtype}, {b.dtype} "
                         f"and {dtype}")
    result = out
    if _layout(out) is None:
        raise ValueError("matmul_into: out needs a unit stride on one axis")
    if _layout(out)[1]:  # C layout: compute outᵀ = bᵀ aᵀ in Fortran layout
        a, b, out = b.T, a.T, out.T
    gemm = _routine(routine_prefix(dtype) + "gemm")
    if gemm is None:  # pragma: no cover - SciPy's library always exports ?gemm
        out[...] = alpha * (a @ b) + (beta * out if beta else 0.0)
        return result
    a, (lda, trans_a) = _operand(a)
    b, (ldb, trans_b) = _operand(b)
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return result
    by = ctypes.byref
    gemm(b"T" if trans_a else b"N", b"T" if trans_b else b"N",
         by(ctypes.c_int(m)), by(ctypes.c_int(n)), by(ctypes.c_int(k)),
         by(_scalar(dtype, alpha)), ctypes.c_void_p(a.ctypes.data), by(ctypes.c_int(lda)),
         ctypes.c_void_p(b.ctypes.data), by(ctypes.c_int(ldb)),
         by(_scalar(dtype, beta)), ctypes.c_void_p(out.ctypes.data),
         by(ctypes.c_int(_layout(out)[0])), _LEN(1), _LEN(1))
    return result


def _operand(matrix: np.ndarray) -> tuple[np.ndarray, tuple[int, bool]]:
    """``matrix`` (copied to Fortran order if BLAS cannot take its strides) and its layout."""
    layout = _layout(matrix)
    if layout is None:
        matrix = np.asfortranarray(matrix)
        layout = _layout(matrix)
    return matrix, layout


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, alpha: float = 1.0,
           beta: float = 0.0) -> np.ndarray:
    """``alpha · a @ b + beta · out`` for 2-D float32/float64 arrays of one dtype, as a
    C-ordered array (``out`` when given, updated in place; it must be C-contiguous).

    Computed by :func:`matmul_into` as its transpose, (a b)ᵀ = bᵀ aᵀ, in Fortran order, so
    C-ordered operands and result need no copies.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not multiply")
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
        raise ValueError(f"matmul: needs two float32 or two float64 arrays, got {a.dtype} and "
                         f"{b.dtype}")
    shape = (a.shape[0], b.shape[1])
    if out is None:
        if beta:
            raise ValueError("matmul: beta needs out")
        out = np.empty(shape, dtype=a.dtype)
    elif out.shape != shape or out.dtype != a.dtype or not out.flags.c_contiguous:
        raise ValueError(f"matmul: out must be a C-contiguous {a.dtype} array of shape "
                         f"{shape}")
    return matmul_into(a, b, out, alpha=alpha, beta=beta)


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
    other is left as it is), by one ``?syrk``. ``out`` is square, of the dtype of ``matrix``,
    and may be a block of a larger matrix (a view with a unit stride on one axis); it is
    returned. Given a calloc'ed matrix, the triangle not asked for stays 0 and, for a large
    matrix, its pages are never touched, so it costs no memory (half of a 420 MB Gram).
    """
    size = matrix.shape[1]
    if out.shape != (size, size) or out.dtype != matrix.dtype or _layout(out) is None:
        raise ValueError(f"gram_into: out must be a {matrix.dtype} array of shape "
                         f"{(size, size)} with a unit stride on one axis")
    result = out
    if _layout(out)[1]:  # C layout: outᵀ is the same symmetric matrix, other triangle
        out, lower = out.T, not lower
    syrk = _routine(routine_prefix(out.dtype) + "syrk")
    if syrk is None:  # pragma: no cover - SciPy's library always exports ?syrk
        full = matrix.T @ matrix
        mask = np.tril(np.ones((size, size), dtype=bool)) if lower else \
            np.triu(np.ones((size, size), dtype=bool))
        out[mask] = full[mask] + (beta * out[mask] if beta else 0.0)
        return result
    # syrk(trans="N") is A Aᵀ, syrk(trans="T") is Aᵀ A for the stored A.
    stored, (ld, transposed) = _operand(matrix)
    depth = matrix.shape[0]
    if size == 0:
        return result
    by = ctypes.byref
    syrk(b"L" if lower else b"U", b"N" if transposed else b"T", by(ctypes.c_int(size)),
         by(ctypes.c_int(depth)), by(_scalar(out.dtype, 1.0)),
         ctypes.c_void_p(stored.ctypes.data), by(ctypes.c_int(ld)),
         by(_scalar(out.dtype, beta)), ctypes.c_void_p(out.ctypes.data),
         by(ctypes.c_int(_layout(out)[0])), _LEN(1), _LEN(1))
    return result


#: Column blocks of :func:`lower_product`: the product takes (parts + 1)/(2·parts) of the
#: flops of the full one (a 1479² result of 6144-long columns on two cores: 0.10 s with 4,
#: 0.11 s with 2, 0.14 s for the full product; OpenBLAS's own ``?gemmt`` takes 0.40 s).
LOWER_PRODUCT_PARTS = 4


def lower_product(a: np.ndarray, b: np.ndarray, parts: int = LOWER_PRODUCT_PARTS
                  ) -> np.ndarray:
    """The lower triangle of ``aᵀ @ b`` (k × k, Fortran order) where only that triangle is
    wanted, e.g. of a symmetric result: the k columns in ``parts`` blocks, block j of the
    result from rows j.. of aᵀ only, one ``?gemm`` each. The diagonal blocks are whole (their
    upper part set too); the rest above the diagonal is zero.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"lower_product: needs two matrices of one shape, got {a.shape} and "
                         f"{b.shape}")
    size = a.shape[1]
    out = np.zeros((size, size), dtype=a.dtype, order="F")
    step = max(1, -(-size // max(1, int(parts))))
    for start in range(0, size, step):
        stop = min(size, start + step)
        matmul_into(a[:, start:].T, b[:, start:stop], out[start:, start:stop])
    return out
