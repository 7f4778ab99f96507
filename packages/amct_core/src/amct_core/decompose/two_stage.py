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
which gives the same tridiagonal matrix bit for bit; for float32 on a CPU with AVX-512, the
extension's own fused kernels, twice as fast as LAPACK's (see :func:`_parallel_tridiagonal`).
Likewise the first stage, for float32 at half-width 96 on such a CPU: the extension
``_band_reduction`` runs the panels of :func:`_blocked_reduce_to_band` on its own threads and
kernels (see :func:`threaded_reduction`).
"""
from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import numpy as np
from scipy.linalg import eigvalsh_tridiagonal
from scipy.linalg.blas import get_blas_funcs
from scipy.linalg.lapack import dtrtri

from amct_core.decompose import blas

_INT = ctypes.c_int
_LEN = ctypes.c_size_t  # gfortran's hidden length of each CHARACTER argument


#: The routines of the blocked dense-to-band reduction (:func:`reduce_to_band`).
_BLOCKED = ("geqrt3", "geqrf", "larft", "symm", "syr2k")


def _load(library: ctypes.CDLL | None) -> dict[str, dict[str, object]]:
    """{'s': {...}, 'd': {...}} from ``library``, or {}: per precision the ctypes functions
    'sy2sb', 'sb2st' and 'sterf' (or None), 'kernels' (the address of ``?sb2st_kernels``, or
    None), 'blocked' (the functions of :data:`_BLOCKED`, or None where one is missing) and
    'omatcopy' (OpenBLAS's out-of-place transpose ``?omatcopy``, an extension of BLAS, or
    None)."""
    if library is None:  # pragma: no cover
        return {}

    def lookup(spelling: str, name: str) -> object | None:
        function = getattr(library, spelling.format(name), None)
        if function is not None:
            function.restype = None
        return function

    found: dict[str, dict[str, object]] = {}
    for prefix in ("s", "d"):
        for spelling in blas.SPELLINGS:
            sy2sb = lookup(spelling, f"{prefix}sytrd_sy2sb")
            sb2st = lookup(spelling, f"{prefix}sytrd_sb2st")
            if sy2sb is None or sb2st is None:
                continue
            kernels = lookup(spelling, f"{prefix}sb2st_kernels")
            blocked = {name: lookup(spelling, prefix + name) for name in _BLOCKED}
            found[prefix] = {
                "sy2sb": sy2sb, "sb2st": sb2st, "sterf": lookup(spelling, f"{prefix}sterf"),
                "kernels": None if kernels is None else ctypes.cast(kernels,
                                                                    ctypes.c_void_p).value,
                "blocked": blocked if all(f is not None for f in blocked.values()) else None,
                "omatcopy": lookup(spelling, f"{prefix}omatcopy")}
            break
    return found


def _load_thread_control(library: ctypes.CDLL | None) -> tuple[object, object] | None:
    """(get, set) of the thread count of the OpenBLAS SciPy links against, or None."""
    if library is None:  # pragma: no cover
        return None
    for prefix in ("scipy_", ""):
        getter = getattr(library, f"{prefix}openblas_get_num_threads", None)
        setter = getattr(library, f"{prefix}openblas_set_num_threads", None)
        if getter is not None and setter is not None:
            getter.restype = ctypes.c_int
            getter.argtypes = []
            setter.restype = None
            setter.argtypes = [ctypes.c_int]
            return getter, setter
    return None  # pragma: no cover - another BLAS


try:
    _LIBRARY = blas.scipy_library()
    _ROUTINES = _load(_LIBRARY)
    _THREAD_CONTROL = _load_thread_control(_LIBRARY)
except Exception:  # pragma: no cover - never let an exotic SciPy build break the import
    _ROUTINES = {}
    _THREAD_CONTROL = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the body with SciPy's OpenBLAS on one thread (then restore the count).

    The bulge-chasing kernels call level-2 BLAS on blocks of about kd × kd; from kd ≈ 96 on,
    OpenBLAS splits each of those microsecond calls over its threads and the chasing becomes
    several times slower (and on two chasing threads, the two contend for one pool).
    """
    if _THREAD_CONTROL is None:  # pragma: no cover - another BLAS
        yield
        return
    getter, setter = _THREAD_CONTROL
    before = int(getter())
    setter(1)
    try:
        yield
    finally:
        setter(before)


try:
    from amct_core.decompose import _bulge_chasing
except ImportError:  # built without a C compiler: LAPACK's sequential bulge chasing
    _bulge_chasing = None

try:
    from amct_core.decompose import _sturm_bisection
except ImportError:  # built without a C compiler: LAPACK's ?sterf
    _sturm_bisection = None

try:
    from amct_core.decompose import _band_reduction
except ImportError:  # built without a C compiler: the panels through OpenBLAS
    _band_reduction = None

#: Most threads of the extension's dense-to-band reduction: it runs on every CPU this process
#: may use, up to this many (as OpenBLAS would).
REDUCTION_THREADS = 16
#: The band half-width the extension's reduction kernels are written for.
REDUCTION_BAND_WIDTH = 96

#: Threads of the parallel bulge chasing (at most the CPUs this process may use); 1 runs
#: LAPACK's own sequential ``?sytrd_sb2st``.
BULGE_THREADS = 2


_usable_cpus = blas.usable_cpus


def fused_chase(dtype: np.dtype | type = np.float32) -> bool:
    """Whether :func:`band_eigenvalues` chases the bulges of a ``dtype`` band with the fused
    float32 kernels of the C extension (built, and an AVX-512 CPU) instead of LAPACK's."""
    return (_bulge_chasing is not None and np.dtype(dtype) == np.float32
            and bool(_bulge_chasing.fused_available()))


def threaded_reduction(dtype: np.dtype | type = np.float32, bandwidth: int = 96) -> bool:
    """Whether :func:`reduce_to_band` reduces a ``dtype`` matrix to a band of half-width
    ``bandwidth`` with the kernels of the C extension ``_band_reduction`` (built, float32,
    half-width :data:`REDUCTION_BAND_WIDTH`, an AVX-512 CPU) instead of OpenBLAS's."""
    routines = _ROUTINES.get(_prefix(np.dtype(dtype)), {})
    return (_band_reduction is not None and np.dtype(dtype) == np.float32
            and int(bandwidth) == REDUCTION_BAND_WIDTH and routines.get("blocked") is not None
            and bool(_band_reduction.available()))


def bulge_threads(dtype: np.dtype | type = np.float32) -> int:
    """Threads :func:`band_eigenvalues` uses for ``dtype``: 1 where the C extension is missing,
    or where it has no fused kernels for ``dtype`` and LAPACK's ``?sb2st_kernels`` is
    missing."""
    routines = _ROUTINES.get(_prefix(np.dtype(dtype)))
    if routines is None or _bulge_chasing is None or (
            routines["kernels"] is None and not fused_chase(dtype)):
        return 1
    return max(1, min(BULGE_THREADS, _usable_cpus()))


_prefix = blas.routine_prefix


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

    The blocked reduction of :func:`_blocked_reduce_to_band` where its routines were found,
    else LAPACK's ``?sytrd_sy2sb``; both store Q1 the same way.
    """
    if not matrix.flags.f_contiguous:
        raise ValueError("reduce_to_band needs a Fortran-ordered matrix (it works in place)")
    routines = _ROUTINES[_prefix(matrix.dtype)]
    if routines["blocked"] is not None and int(bandwidth) >= 1:
        return _blocked_reduce_to_band(matrix, int(bandwidth), routines["blocked"],
                                       routines.get("omatcopy"))
    return _lapack_reduce_to_band(matrix, int(bandwidth))


def _at(matrix: np.ndarray, row: int, col: int) -> ctypes.c_void_p:
    """Address of ``matrix[row, col]`` of a Fortran-ordered matrix."""
    return ctypes.c_void_p(matrix.ctypes.data
                           + matrix.itemsize * (row + col * matrix.shape[0]))


def _transposed(matrix: np.ndarray, row: int, col: int, rows: int, cols: int,
                omatcopy: object | None) -> np.ndarray:
    """``matrix[row:row + rows, col:col + cols].T`` copied in Fortran order, by ``?omatcopy``
    where the library has it (a blocked transpose: 0.016 s against NumPy's 0.06 s for the
    panels of a 6144 × 6144 reduction at kd = 96)."""
    if omatcopy is None or rows == 0 or cols == 0:
        return np.array(matrix[row:row + rows, col:col + cols].T, order="F")
    out = np.empty((cols, rows), dtype=matrix.dtype, order="F")
    scalar = ctypes.c_double if matrix.dtype == np.float64 else ctypes.c_float
    by = ctypes.byref
    # A C function (no hidden CHARACTER lengths): order 'C' is column-major.
    omatcopy(b"C", b"T", by(_INT(rows)), by(_INT(cols)), by(scalar(1.0)), _at(matrix, row, col),
             by(_INT(matrix.shape[0])), _ptr(out), by(_INT(cols)))
    return out


def _blocked_reduce_to_band(matrix: np.ndarray, kd: int, routines: dict[str, object],
                            omatcopy: object | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense to band by one panel of ``kd`` columns at a time (the algorithm of
    ``?sytrd_sy2sb``, with faster kernels for its three steps).

    For the panel of columns i..i+kd−1 and the trailing matrix A₂₂ = A[t:, t:], t = i + kd:

        panel = Q R,  Q = I − V T Vᵀ        (``?geqrt3``: recursive QR, T at no extra cost)
        X = A₂₂ V T,  W = X − ½ V (Tᵀ Vᵀ X)
        A₂₂ ← Qᵀ A₂₂ Q = A₂₂ − V Wᵀ − W Vᵀ   (``?syr2k``)

    R goes into the band and V stays below it. The product A₂₂ V, the costly step, is taken as
    Vᵀ A₂₂ (``?symm`` with the symmetric matrix on the right: about 20 % faster in OpenBLAS
    than on the left, as ``?sytrd_sy2sb`` calls it), and the recursive QR needs no thread
    synchronisation per column (``?geqrf`` on these tall panels is five times slower on two
    threads than on one). A last panel shorter than ``kd`` rows is factored by ``?geqrf`` and
    ``?larft``.

    Where :func:`threaded_reduction`, every panel with ``kd`` rows below it runs in the C
    extension ``_band_reduction`` instead (the same steps, the symmetric product and the
    update with its own kernels, on every usable CPU up to :data:`REDUCTION_THREADS`: 1.7 s
    instead of 2.0 s for a 6144 × 6144 matrix on two cores), and this loop finishes a last,
    shorter panel.
    """
    geqrt3, geqrf, larft, symm, syr2k = (routines[name] for name in _BLOCKED)
    n = matrix.shape[0]
    dtype = matrix.dtype
    by = ctypes.byref
    count = max(n - kd, 0)
    tau = np.zeros(max(count, 1), dtype=dtype)
    first = 0
    if threaded_reduction(dtype, kd) and count >= kd:
        # Every panel with kd rows below it, on the extension's threads; the loop below
        # finishes a last, shorter panel.
        with one_blas_thread():
            first, info = _band_reduction.reduce(
                ctypes.cast(geqrt3, ctypes.c_void_p).value, n, matrix.ctypes.data, n,
                tau.ctypes.data, max(1, min(REDUCTION_THREADS, _usable_cpus())))
        if info != 0:
            raise np.linalg.LinAlgError(f"{_prefix(dtype)}geqrt3 failed (info={info})")
    factor = np.zeros((max(kd, 1), max(kd, 1)), dtype=dtype, order="F")
    work = np.zeros(max(64 * kd, 1), dtype=dtype)
    info = _INT(0)
    gemm = get_blas_funcs("gemm", (factor,))
    scalar = ctypes.c_double if dtype == np.float64 else ctypes.c_float
    one, zero, minus_one = scalar(1.0), scalar(0.0), scalar(-1.0)
    for start in range(first, count, kd):
        top = start + kd
        rows = n - top
        width = min(rows, kd)
        panel = _at(matrix, top, start)
        if rows >= kd:
            geqrt3(by(_INT(rows)), by(_INT(kd)), panel, by(_INT(n)), _ptr(factor),
                   by(_INT(kd)), by(info))
            name = "geqrt3"
            tau[start:start + kd] = np.diagonal(factor)
        else:
            tau_ptr = ctypes.c_void_p(tau.ctypes.data + tau.itemsize * start)
            geqrf(by(_INT(rows)), by(_INT(kd)), panel, by(_INT(n)), tau_ptr, _ptr(work),
                  by(_INT(work.size)), by(info))
            name = "geqrf"
            if info.value == 0:
                larft(b"F", b"C", by(_INT(rows)), by(_INT(width)), panel, by(_INT(n)), tau_ptr,
                      _ptr(factor), by(_INT(factor.shape[0])), _LEN(1), _LEN(1))
        if info.value != 0:
            raise np.linalg.LinAlgError(f"{_prefix(dtype)}{name} failed (info={info.value})")
        # Vᵀ (width × rows): the reflectors with their unit diagonal and zeros above it.
        vt = _transposed(matrix, top, start, rows, width, omatcopy)
        vt[np.tril_indices(width, -1)] = 0.0
        vt[np.arange(width), np.arange(width)] = 1.0
        t = np.asfortranarray(factor[:width, :width])
        # Yᵀ = Vᵀ A₂₂, A₂₂ symmetric (lower triangle) on the right.
        yt = np.empty((width, rows), dtype=dtype, order="F")
        symm(b"R", b"L", by(_INT(width)), by(_INT(rows)), by(one), _at(matrix, top, top),
             by(_INT(n)), _ptr(vt), by(_INT(width)), by(zero), _ptr(yt), by(_INT(width)),
             _LEN(1), _LEN(1))
        xt = gemm(1.0, t, yt, trans_a=1)                          # Xᵀ = Tᵀ Yᵀ
        s = gemm(1.0, t, gemm(1.0, vt, xt, trans_b=1), trans_a=1)  # S = Tᵀ Vᵀ X
        wt = gemm(-0.5, s, vt, beta=1.0, c=xt, trans_a=1, overwrite_c=1)  # Wᵀ = Xᵀ − ½ Sᵀ Vᵀ
        # A₂₂ ← A₂₂ − V Wᵀ − W Vᵀ (lower triangle), from Vᵀ and Wᵀ as they are.
        syr2k(b"L", b"T", by(_INT(rows)), by(_INT(width)), by(minus_one), _ptr(vt),
              by(_INT(width)), _ptr(wt), by(_INT(width)), by(one), _at(matrix, top, top),
              by(_INT(n)), _LEN(1), _LEN(1))
    band = np.zeros((kd + 1, n), dtype=dtype, order="F")
    for offset in range(kd + 1):
        band[offset, :n - offset] = np.diagonal(matrix, -offset)
    return band, tau[:count]


def _lapack_reduce_to_band(matrix: np.ndarray, kd: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense to band by LAPACK's ``?sytrd_sy2sb`` (see :func:`reduce_to_band`)."""
    prefix = _prefix(matrix.dtype)
    sy2sb = _ROUTINES[prefix]["sy2sb"]
    n = matrix.shape[0]
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
    """All eigenvalues (ascending, float64) of the symmetric band matrix in lower band storage:
    :func:`band_tridiagonal`, then :func:`tridiagonal_eigenvalues`. ``band`` is not modified.
    """
    return tridiagonal_eigenvalues(*band_tridiagonal(band, threads))


def band_tridiagonal(band: np.ndarray,
                     threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(diagonal, off-diagonal) of a tridiagonal matrix with the eigenvalues of the symmetric
    band matrix ``band`` (lower band storage, not modified), by bulge chasing: on ``threads``
    threads (:func:`bulge_threads` when None) with the fused kernels where
    :func:`fused_chase`, else with LAPACK's kernels, or LAPACK's ``?sytrd_sb2st`` on one
    thread."""
    kd, n = band.shape[0] - 1, band.shape[1]
    threads = bulge_threads(band.dtype) if threads is None else int(threads)
    fused = fused_chase(band.dtype)
    with one_blas_thread():
        if (threads > 1 or fused) and kd >= 2 and n > kd + 1:
            diag, offdiag = _parallel_tridiagonal(band, threads, fused)
        else:
            diag, offdiag = _lapack_tridiagonal(band)
    return diag, offdiag[:max(n - 1, 0)]


def bisection_eigenvalues(dtype: np.dtype | type = np.float32) -> bool:
    """Whether :func:`tridiagonal_eigenvalues` takes the eigenvalues of a ``dtype`` matrix by
    the vectorised bisection of the C extension ``_sturm_bisection`` (built, and float32)."""
    return _sturm_bisection is not None and np.dtype(dtype) == np.float32


def tridiagonal_eigenvalues(diag: np.ndarray, offdiag: np.ndarray) -> np.ndarray:
    """All eigenvalues (ascending, float64) of the symmetric tridiagonal matrix, in the
    precision of ``diag``.

    For float32 (:func:`bisection_eigenvalues`), bisection on Sturm counts of 64 shifts at a
    time on one thread: 0.05 s on one core for n = 6144 against 0.23 s for LAPACK's
    ``?sterf``, and every eigenvalue within about ulp·‖T‖ of the exact one, where float32
    ``?sterf`` strays up to 10⁻⁴·‖T‖ (measured against float64 on the Gram matrix of a
    (2048, 2048, 3, 3) kernel). Otherwise ``?sterf`` (Pal-Walker-Kahan QR), which in float64
    is faster than the bisection's 50 halvings per eigenvalue.

    Both run without the GIL: the solver computes the eigenvalues on a thread of its own
    while it prepares the back-transform (one core for each).
    """
    n = diag.shape[0]
    if n >= 2 and bisection_eigenvalues(diag.dtype):
        values = np.empty(n, dtype=np.float32)
        d = np.ascontiguousarray(diag, dtype=np.float32)
        e = np.ascontiguousarray(offdiag[:n - 1], dtype=np.float32)
        try:
            _sturm_bisection.eigenvalues(n, d.ctypes.data, e.ctypes.data, values.ctypes.data, 1)
        except ValueError as error:  # NaN or Inf in the matrix
            raise np.linalg.LinAlgError(f"tridiagonal eigenvalues: {error}") from error
        return values.astype(np.float64)
    sterf = _ROUTINES.get(_prefix(diag.dtype), {}).get("sterf")
    if sterf is None or n < 2:
        values = eigvalsh_tridiagonal(diag, offdiag[:max(n - 1, 0)], lapack_driver="sterf")
        return np.sort(values.astype(np.float64))
    values = np.array(diag, order="C", copy=True)
    work = np.zeros(n, dtype=diag.dtype)
    work[:n - 1] = offdiag[:n - 1]
    info = _INT(0)
    sterf(ctypes.byref(_INT(n)), _ptr(values), _ptr(work), ctypes.byref(info))
    if info.value != 0:
        raise np.linalg.LinAlgError(f"{_prefix(diag.dtype)}sterf: {info.value} eigenvalues "
                                    f"did not converge")
    return np.sort(values.astype(np.float64))


def _parallel_tridiagonal(band: np.ndarray, threads: int,
                          fused: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(diagonal, off-diagonal) by the parallel bulge chasing of :mod:`._bulge_chasing` in the
    working layout of ``?sytrd_sb2st``: the band in rows 0..kd of a (2kd+1) × n array, the
    rows below (where the bulges appear) zero; the tridiagonal matrix ends in rows 0 and 1.
    Each step is a call of LAPACK's ``?sb2st_kernels``, or with ``fused`` (float32 only) of
    the extension's own kernels, which do the same transformations in fewer passes over the
    band (twice as fast for kd = 96) and round differently."""
    kd, n = band.shape[0] - 1, band.shape[1]
    dtype = band.dtype
    work_band = np.zeros((2 * kd + 1, n), dtype=dtype, order="F")
    work_band[:kd + 1] = band
    # The kernels keep the reflectors of a sweep at (sweep parity)·n + start column.
    vectors = np.zeros(2 * n + kd + 2, dtype=dtype)
    scalars = np.zeros(2 * n + kd + 2, dtype=dtype)
    per_thread = 4 * kd + 16
    scratch = np.zeros(threads * per_thread, dtype=dtype)
    kernels = 0 if fused else _ROUTINES[_prefix(dtype)]["kernels"]
    _bulge_chasing.chase(kernels, dtype.itemsize, n, kd, work_band.ctypes.data, 2 * kd + 1,
                         vectors.ctypes.data, scalars.ctypes.data, scratch.ctypes.data,
                         per_thread, threads)
    return work_band[0].copy(), work_band[1, :n - 1].copy()


def _lapack_tridiagonal(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(diagonal, off-diagonal) by LAPACK's ``?sytrd_sb2st`` (sequential here)."""
    prefix = _prefix(band.dtype)
    sb2st = _ROUTINES[prefix]["sb2st"]
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


def reflector_blocks(reflectors: np.ndarray, tau: np.ndarray,
                     bandwidth: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """The blocks of Q1 (see :func:`apply_band_reflectors`), last first: (start, stop, head,
    T) for reflectors start..stop−1, T the upper triangular factor of the block's compact WY
    form in the reflectors' dtype, inverted in float64 from T⁻¹ = diag(1/τ) + striu(VᵀV).
    ``head`` is the block's unit lower-triangular top w × w rows (copied; below them the
    reflectors are used where they lie in ``reflectors``), or, where a reflector of the block
    has τ = 0 (H = I), the whole block copied with that reflector zeroed.

    Independent of the vectors Q1 is applied to: the solver computes the blocks while the
    eigenvalues are computed on the other core.
    """
    kd = int(bandwidth)
    count = tau.shape[0]
    dtype = reflectors.dtype
    blocks = []
    block = REFLECTOR_BLOCK
    for start in range((count - 1) // block * block if count else -1, -1, -block):
        stop = min(count, start + block)
        width = stop - start
        scale = tau[start:stop].astype(np.float64)
        trivial = scale == 0.0
        head = _block_copy(reflectors, tau, kd, start, stop) if trivial.any() else \
            _unit_top(reflectors, kd, start, stop)
        product = blas.gram_into(head, np.zeros((width, width), dtype=dtype, order="F"),
                                 lower=False)
        rest = _below_head(reflectors, kd, start, stop, head)
        if rest.shape[0]:
            blas.gram_into(rest, product, beta=1.0, lower=False)
        t_inverse = np.triu(product.astype(np.float64), 1)
        t_inverse[np.arange(width), np.arange(width)] = np.where(
            trivial, 1.0, 1.0 / np.where(trivial, 1.0, scale))
        factor, info = dtrtri(t_inverse, lower=0, unitdiag=0, overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"dtrtri failed on a block of Q1 (info={info})")
        blocks.append((start, stop, head, np.asfortranarray(factor, dtype=dtype)))
    return blocks


def _below_head(reflectors: np.ndarray, kd: int, start: int, stop: int,
                head: np.ndarray) -> np.ndarray:
    """The rows of block start..stop of V below its copied ``head``, where they lie (none when
    the head is the whole block)."""
    return reflectors[kd + start + head.shape[0]:, start:stop]


def _unit_top(reflectors: np.ndarray, kd: int, start: int, stop: int) -> np.ndarray:
    """The top w × w rows of block start..stop of V: unit diagonal, zeros above it."""
    width = stop - start
    top = np.array(reflectors[kd + start:kd + stop, start:stop], order="F", copy=True)
    top[np.triu_indices(width)] = 0.0
    top[np.arange(width), np.arange(width)] = 1.0
    return top


def _block_copy(reflectors: np.ndarray, tau: np.ndarray, kd: int, start: int,
                stop: int) -> np.ndarray:
    """Block start..stop of V whole, with the columns of τ = 0 reflectors zeroed."""
    v = np.array(reflectors[kd + start:, start:stop], order="F", copy=True)
    v[:stop - start] = _unit_top(reflectors, kd, start, stop)
    v[:, tau[start:stop] == 0] = 0.0
    return v


def apply_band_reflectors(reflectors: np.ndarray, tau: np.ndarray, bandwidth: int,
                          vectors: np.ndarray, overwrite_vectors: bool = False,
                          blocks: list | None = None) -> np.ndarray:
    """Return Q1 · ``vectors`` for the Q1 of :func:`reduce_to_band` (``vectors`` is n × r).
    With ``overwrite_vectors``, a C-ordered ``vectors`` of the reflectors' dtype is updated in
    place and returned (no copy of the n × r block). ``blocks``: :func:`reflector_blocks` of
    the same reflectors, when already computed.

    Q1 = H(0) H(1) ⋯ H(n−kd−1), H(i) = I − τ_i v_i v_iᵀ. Blocks of b reflectors are applied as
    I − V T Vᵀ (compact WY form, Schreiber and Van Loan 1989), T inverted from T⁻¹ = diag(1/τ) +
    striu(VᵀV) (Joffrain, Low, Quintana-Ortí, van de Geijn, Van Zee 2006), last block first,
    each with three matrix products, so it runs at matrix-multiply speed. Below its top rows a
    block of V is read where it lies in ``reflectors`` (no copy of the n × b block).
    """
    kd = int(bandwidth)
    dtype = reflectors.dtype
    in_place = overwrite_vectors and vectors.dtype == dtype and vectors.flags.c_contiguous
    result = vectors if in_place else np.array(vectors, dtype=dtype, order="C", copy=True)
    if tau.shape[0] == 0:
        return result
    if blocks is None:
        blocks = reflector_blocks(reflectors, tau, kd)
    below = result[kd:]  # rows the reflectors act on; C order, so .T is Fortran order
    rank = result.shape[1]
    for start, stop, head, factor in blocks:
        width = stop - start
        target = below[start:]
        parts = [(target[:head.shape[0]], head),
                 (target[head.shape[0]:], _below_head(reflectors, kd, start, stop, head))]
        # (Vᵀ C)ᵀ = Cᵀ V (r × width), the orientation OpenBLAS runs fastest (no operand
        # transposed: 172 against 135 GFLOP/s here), summed over the parts of V.
        product = np.empty((rank, width), dtype=dtype, order="F")
        for index, (rows, v) in enumerate(parts):
            if rows.shape[0]:
                blas.matmul_into(rows.T, v, product, beta=float(index > 0))
        # (T Vᵀ C)ᵀ = (Vᵀ C)ᵀ Tᵀ: a product, where a triangular solve with T⁻¹ in float64
        # took 0.08-0.13 s over the blocks of a 6144 × 1232 back-transform.
        coefficients = blas.matmul(product, factor.T)
        # C ← C − V (T Vᵀ C), computed as Cᵀ ← Cᵀ − (T Vᵀ C)ᵀ Vᵀ in place, part by part.
        for rows, v in parts:
            if rows.shape[0]:
                blas.matmul_into(coefficients, v.T, rows.T, alpha=-1.0, beta=1.0)
    return result
