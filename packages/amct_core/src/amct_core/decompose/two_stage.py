"""Two-stage reduction of a symmetric matrix: dense → band (``?sytrd_sy2sb``), band →
tridiagonal (``?sytrd_sb2st``), and the band reflectors applied to a block of vectors.

The one-stage reduction (``?sytrd``) spends half its flops in matrix-vector products that are
bound by memory bandwidth; the first stage of the two-stage reduction is all matrix-matrix
work, and the second (bulge chasing) touches only the band (Haidar, Ltaief, Dongarra 2011;
LAPACK 3.7). For the 10240 × 10240 Gram matrix of a (2048, 2048, 5, 5) kernel that is
about 16 s instead of 34 s on two cores. LAPACK has no routine that applies the second
stage's transformations to eigenvectors, so :mod:`.band_subspace` finds the top eigenvectors
of the band matrix itself, and :func:`apply_band_reflectors` maps them back through the first
stage.

SciPy does not wrap these routines, but they are in the LAPACK library SciPy links against
(LAPACK ≥ 3.7; the OpenBLAS in SciPy's wheels exports them as ``scipy_ssytrd_sy2sb_``). They
are called through ``ctypes``; where they cannot be found, :func:`available` is False and the
solver keeps the one-stage path.

The bulge chasing of ``?sytrd_sb2st`` runs in parallel only in an OpenMP build of LAPACK, which
SciPy's OpenBLAS is not. Where the optional C extension ``_bulge_chasing`` was built (by the
install, where a C compiler is found), :func:`band_eigenvalues` runs the same LAPACK kernels
(``?sb2st_kernels``) in the same per-sweep order on :data:`BULGE_THREADS` threads instead,
which gives the same tridiagonal matrix bit for bit.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
from scipy.linalg import eigvalsh_tridiagonal, solve_triangular
from scipy.linalg.blas import get_blas_funcs

_INT = ctypes.c_int
_LEN = ctypes.c_size_t  # gfortran's hidden length of each CHARACTER argument


#: Symbol spellings of a LAPACK routine ``name`` in the LP64 LAPACK libraries SciPy links
#: against: SciPy's own OpenBLAS build (``scipy_`` prefix), plain gfortran (``name_``) and
#: libraries without the trailing underscore.
_SPELLINGS = ("scipy_{}_", "{}_", "{}")


def _load() -> dict[str, tuple[object, object, int | None]]:
    """{'s': (sy2sb, sb2st, address of sb2st_kernels or None), 'd': (...)} from the LAPACK
    library SciPy uses, or {}.

    The library is found through SciPy's Cython LAPACK module: a symbol lookup in a loaded
    library also searches the libraries it depends on, and that module depends on the LP64
    LAPACK SciPy was built with (so the integer width of the arguments is right).
    """
    from scipy.linalg import cython_lapack

    try:
        library = ctypes.CDLL(cython_lapack.__file__)
    except OSError:  # pragma: no cover - a SciPy whose Cython LAPACK is not a shared object
        return {}
    found = {}
    for prefix in ("s", "d"):
        for spelling in _SPELLINGS:
            try:
                sy2sb = getattr(library, spelling.format(f"{prefix}sytrd_sy2sb"))
                sb2st = getattr(library, spelling.format(f"{prefix}sytrd_sb2st"))
            except AttributeError:
                continue
            sy2sb.restype = None
            sb2st.restype = None
            try:
                kernels = getattr(library, spelling.format(f"{prefix}sb2st_kernels"))
                address = ctypes.cast(kernels, ctypes.c_void_p).value
            except AttributeError:  # pragma: no cover - LAPACK 3.7+ always has them
                address = None
            found[prefix] = (sy2sb, sb2st, address)
            break
    return found


try:
    _ROUTINES = _load()
except Exception:  # pragma: no cover - never let an exotic SciPy build break the import
    _ROUTINES = {}

try:
    from amct_core.decompose import _bulge_chasing
except ImportError:  # built without a C compiler: LAPACK's sequential bulge chasing
    _bulge_chasing = None

#: Threads of the parallel bulge chasing (at most the CPUs this process may use); 1 runs
#: LAPACK's own sequential ``?sytrd_sb2st``.
BULGE_THREADS = 2


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def bulge_threads(dtype: np.dtype | type = np.float32) -> int:
    """Threads :func:`band_eigenvalues` uses for ``dtype``: 1 where the C extension or LAPACK's
    ``?sb2st_kernels`` is missing."""
    routines = _ROUTINES.get(_prefix(np.dtype(dtype)))
    if _bulge_chasing is None or routines is None or routines[2] is None:
        return 1
    return max(1, min(BULGE_THREADS, _usable_cpus()))


def _prefix(dtype: np.dtype) -> str:
    if dtype == np.float32:
        return "s"
    if dtype == np.float64:
        return "d"
    raise TypeError(f"two-stage reduction needs float32 or float64, got {dtype}")


def available(dtype: np.dtype | type = np.float32) -> bool:
    """Whether the two-stage routines were found for ``dtype``."""
    return _prefix(np.dtype(dtype)) in _ROUTINES


def _ptr(array: np.ndarray) -> ctypes.c_void_p:
    return array.ctypes.data_as(ctypes.c_void_p)


def reduce_to_band(matrix: np.ndarray, bandwidth: int) -> tuple[np.ndarray, np.ndarray]:
    """Reduce the symmetric ``matrix`` (lower triangle used, Fortran order, float32/64) to a
    band of half-width ``bandwidth``: A = Q1 B Q1ᵀ.

    Returns (band, tau): the band in LAPACK lower band storage (band[i, j] = B[j + i, j]) and
    the reflector scalars. ``matrix`` is overwritten: below the band it holds the reflectors of
    Q1 (reflector i has its unit entry in row i + bandwidth and the rest below it in column i),
    which :func:`apply_band_reflectors` uses.
    """
    if not matrix.flags.f_contiguous:
        raise ValueError("reduce_to_band needs a Fortran-ordered matrix (it works in place)")
    prefix = _prefix(matrix.dtype)
    sy2sb = _ROUTINES[prefix][0]
    n = matrix.shape[0]
    kd = int(bandwidth)
    band = np.zeros((kd + 1, n), dtype=matrix.dtype, order="F")
    tau = np.zeros(max(n - kd, 1), dtype=matrix.dtype)
    work = np.zeros(1, dtype=matrix.dtype)
    info = _INT(0)

    def call(lwork: int) -> None:
        sy2sb(b"L", ctypes.byref(_INT(n)), ctypes.byref(_INT(kd)), _ptr(matrix),
              ctypes.byref(_INT(n)), _ptr(band), ctypes.byref(_INT(kd + 1)), _ptr(tau),
              _ptr(work), ctypes.byref(_INT(lwork)), ctypes.byref(info), _LEN(1))

    call(-1)
    work = np.zeros(max(int(work[0]), 1), dtype=matrix.dtype)
    call(work.size)
    if info.value != 0:
        raise np.linalg.LinAlgError(f"{prefix}sytrd_sy2sb failed (info={info.value})")
    return band, tau[:max(n - kd, 0)]


def band_eigenvalues(band: np.ndarray, threads: int | None = None) -> np.ndarray:
    """All eigenvalues (ascending, float64) of the symmetric band matrix in lower band storage.

    Bulge chasing to a tridiagonal matrix (on ``threads`` threads, :func:`bulge_threads` when
    None; LAPACK's ``?sytrd_sb2st`` on one), then ``?sterf``. ``band`` is not modified.
    """
    kd, n = band.shape[0] - 1, band.shape[1]
    threads = bulge_threads(band.dtype) if threads is None else int(threads)
    if threads > 1 and kd >= 2 and n > kd + 1:
        diag, offdiag = _parallel_tridiagonal(band, threads)
    else:
        diag, offdiag = _lapack_tridiagonal(band)
    values = eigvalsh_tridiagonal(diag, offdiag[:n - 1], lapack_driver="sterf")
    return np.sort(values.astype(np.float64))


def _parallel_tridiagonal(band: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """(diagonal, off-diagonal) by the parallel bulge chasing of :mod:`._bulge_chasing` in the
    working layout of ``?sytrd_sb2st``: the band in rows 0..kd of a (2kd+1) × n array, the
    rows below (where the bulges appear) zero; the tridiagonal matrix ends in rows 0 and 1."""
    kd, n = band.shape[0] - 1, band.shape[1]
    dtype = band.dtype
    work_band = np.zeros((2 * kd + 1, n), dtype=dtype, order="F")
    work_band[:kd + 1] = band
    # The kernels keep the reflectors of a sweep at (sweep parity)·n + start column.
    vectors = np.zeros(2 * n + kd + 2, dtype=dtype)
    scalars = np.zeros(2 * n + kd + 2, dtype=dtype)
    per_thread = 4 * kd + 16
    scratch = np.zeros(threads * per_thread, dtype=dtype)
    _bulge_chasing.chase(_ROUTINES[_prefix(dtype)][2], dtype.itemsize, n, kd,
                         work_band.ctypes.data, 2 * kd + 1, vectors.ctypes.data,
                         scalars.ctypes.data, scratch.ctypes.data, per_thread, threads)
    return work_band[0].copy(), work_band[1, :n - 1].copy()


def _lapack_tridiagonal(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(diagonal, off-diagonal) by LAPACK's ``?sytrd_sb2st`` (sequential here)."""
    prefix = _prefix(band.dtype)
    sb2st = _ROUTINES[prefix][1]
    kd, n = band.shape[0] - 1, band.shape[1]
    work_band = np.array(band, order="F", copy=True)
    diag = np.zeros(n, dtype=band.dtype)
    offdiag = np.zeros(max(n - 1, 1), dtype=band.dtype)
    hous = np.zeros(max(4 * n, 1), dtype=band.dtype)
    work = np.zeros(1, dtype=band.dtype)
    info = _INT(0)

    def call(lwork: int) -> None:
        sb2st(b"Y", b"N", b"L", ctypes.byref(_INT(n)), ctypes.byref(_INT(kd)), _ptr(work_band),
              ctypes.byref(_INT(kd + 1)), _ptr(diag), _ptr(offdiag), _ptr(hous),
              ctypes.byref(_INT(hous.size)), _ptr(work), ctypes.byref(_INT(lwork)),
              ctypes.byref(info), _LEN(1), _LEN(1), _LEN(1))

    call(-1)
    work = np.zeros(max(int(work[0]), 1), dtype=band.dtype)
    call(work.size)
    if info.value != 0:
        raise np.linalg.LinAlgError(f"{prefix}sytrd_sb2st failed (info={info.value})")
    return diag, offdiag


#: Reflectors applied together in :func:`apply_band_reflectors` (compact WY blocks).
REFLECTOR_BLOCK = 256


def apply_band_reflectors(reflectors: np.ndarray, tau: np.ndarray, bandwidth: int,
                          vectors: np.ndarray, overwrite_vectors: bool = False) -> np.ndarray:
    """Return Q1 · ``vectors`` for the Q1 of :func:`reduce_to_band` (``vectors`` is n × r).
    With ``overwrite_vectors``, a C-ordered ``vectors`` of the reflectors' dtype is updated in
    place and returned (no copy of the n × r block).

    Q1 = H(0) H(1) ⋯ H(n−kd−1), H(i) = I − τ_i v_i v_iᵀ. Blocks of b reflectors are applied as
    I − V T Vᵀ (compact WY form, Schreiber and Van Loan 1989) with T⁻¹ = diag(1/τ) +
    striu(VᵀV) (Joffrain, Low, Quintana-Ortí, van de Geijn, Van Zee 2006), last block first,
    each with two matrix products, so it runs at matrix-multiply speed.
    """
    kd = int(bandwidth)
    count = tau.shape[0]
    dtype = reflectors.dtype
    in_place = overwrite_vectors and vectors.dtype == dtype and vectors.flags.c_contiguous
    result = vectors if in_place else np.array(vectors, dtype=dtype, order="C", copy=True)
    if count == 0:
        return result
    below = result[kd:]  # rows the reflectors act on; C order, so .T is Fortran order
    gemm = get_blas_funcs("gemm", (result,))
    block = REFLECTOR_BLOCK
    for start in range((count - 1) // block * block, -1, -block):
        stop = min(count, start + block)
        width = stop - start
        v = np.array(reflectors[kd + start:, start:stop], order="F", copy=True)
        top = v[:width]
        top[np.triu_indices(width)] = 0.0
        top[np.arange(width), np.arange(width)] = 1.0
        scale = tau[start:stop].astype(np.float64)
        trivial = scale == 0.0
        if trivial.any():
            v[:, trivial] = 0.0
        t_inverse = np.triu(gemm(1.0, v, v, trans_a=1).astype(np.float64), 1)
        t_inverse[np.arange(width), np.arange(width)] = np.where(
            trivial, 1.0, 1.0 / np.where(trivial, 1.0, scale))
        target = below[start:]
        product = gemm(1.0, v, target.T, trans_a=1, trans_b=1)  # Vᵀ C, width × r
        coefficients = solve_triangular(t_inverse, product.astype(np.float64), lower=False,
                                        check_finite=False).astype(dtype)
        # C ← C − V (T Vᵀ C), computed as Cᵀ ← Cᵀ − (T Vᵀ C)ᵀ Vᵀ in place.
        gemm(-1.0, coefficients, v, beta=1.0, c=target.T, trans_a=1, trans_b=1,
             overwrite_c=1)
    return result
