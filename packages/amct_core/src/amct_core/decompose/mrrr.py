"""Top eigenvectors of a symmetric tridiagonal matrix by MRRR (LAPACK ``dstemr``), in O(n·r).

``scipy.linalg.eigh_tridiagonal(..., lapack_driver="stemr")`` allocates the eigenvector array
as n × n whatever the number asked for: 0.8 GB for the n = 10240 tridiagonal of a
(2048, 2048, 5, 5) kernel, when only r ≤ n columns are wanted. This module calls the same
LAPACK routine through SciPy's public Cython LAPACK table
(``scipy.linalg.cython_lapack.__pyx_capi__``) with ``NZC = r``, so the eigenvectors take n × r
and the work arrays O(n).
"""
from __future__ import annotations

import ctypes

import numpy as np

_DOUBLE_P = ctypes.POINTER(ctypes.c_double)
_INT_P = ctypes.POINTER(ctypes.c_int)
# void dstemr(char *jobz, char *range, int *n, d *d, d *e, d *vl, d *vu, int *il, int *iu,
#             int *m, d *w, d *z, int *ldz, int *nzc, int *isuppz, bint *tryrac, d *work,
#             int *lwork, int *iwork, int *liwork, int *info)
_PROTOTYPE = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_char_p, _INT_P, _DOUBLE_P, _DOUBLE_P, _DOUBLE_P,
    _DOUBLE_P, _INT_P, _INT_P, _INT_P, _DOUBLE_P, _DOUBLE_P, _INT_P, _INT_P, _INT_P, _INT_P,
    _DOUBLE_P, _INT_P, _INT_P, _INT_P, _INT_P)


def _load_dstemr():
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__["dstemr"]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype = ctypes.c_void_p
        get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        return _PROTOTYPE(get_pointer(capsule, get_name(capsule)))
    except (ImportError, AttributeError, KeyError, ValueError):  # pragma: no cover
        return None


_DSTEMR = _load_dstemr()


def available() -> bool:
    """Whether this SciPy exposes ``dstemr`` in its Cython LAPACK table."""
    return _DSTEMR is not None


def top_eigenvectors(diag: np.ndarray, offdiag: np.ndarray, rank: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors (n × rank, Fortran order, float64) of the
    ``rank`` largest eigenvalues of the symmetric tridiagonal matrix (``diag``, ``offdiag``).

    Raises ``np.linalg.LinAlgError`` when LAPACK reports a failure (INFO ≠ 0), as SciPy's
    drivers do, so callers can fall back to another method.
    """
    if _DSTEMR is None:  # pragma: no cover - every supported SciPy has it
        raise np.linalg.LinAlgError("dstemr is not available in this SciPy")
    n = int(diag.shape[0])
    if not 1 <= rank <= n:
        raise ValueError(f"rank must be in [1, {n}], got {rank}")
    d = np.array(diag, dtype=np.float64)  # overwritten by LAPACK
    e = np.zeros(n, dtype=np.float64)  # length n: LAPACK uses the last entry as workspace
    e[:n - 1] = offdiag
    w = np.zeros(n, dtype=np.float64)
    z = np.zeros((n, rank), dtype=np.float64, order="F")
    isuppz = np.zeros(2 * rank, dtype=np.int32)
    ints = {name: ctypes.c_int(value) for name, value in (
        ("n", n), ("il", n - rank + 1), ("iu", n), ("m", 0), ("ldz", n), ("nzc", rank),
        ("tryrac", 1), ("lwork", -1), ("liwork", -1), ("info", 0))}
    bound = ctypes.c_double(0.0)
    work = np.zeros(1, dtype=np.float64)
    iwork = np.zeros(1, dtype=np.int32)

    def call() -> None:
        _DSTEMR(b"V", b"I", ctypes.byref(ints["n"]), d.ctypes.data_as(_DOUBLE_P),
                e.ctypes.data_as(_DOUBLE_P), ctypes.byref(bound), ctypes.byref(bound),
                ctypes.byref(ints["il"]), ctypes.byref(ints["iu"]), ctypes.byref(ints["m"]),
                w.ctypes.data_as(_DOUBLE_P), z.ctypes.data_as(_DOUBLE_P),
                ctypes.byref(ints["ldz"]), ctypes.byref(ints["nzc"]),
                isuppz.ctypes.data_as(_INT_P), ctypes.byref(ints["tryrac"]),
                work.ctypes.data_as(_DOUBLE_P), ctypes.byref(ints["lwork"]),
                iwork.ctypes.data_as(_INT_P), ctypes.byref(ints["liwork"]),
                ctypes.byref(ints["info"]))

    call()  # workspace query
    if ints["info"].value != 0:
        raise np.linalg.LinAlgError(f"dstemr workspace query failed (info={ints['info'].value})")
    ints["lwork"].value = max(int(work[0]), 1)
    ints["liwork"].value = max(int(iwork[0]), 1)
    work = np.zeros(ints["lwork"].value, dtype=np.float64)
    iwork = np.zeros(ints["liwork"].value, dtype=np.int32)
    call()
    found = ints["m"].value
    if ints["info"].value != 0 or found != rank:
        raise np.linalg.LinAlgError(f"dstemr failed (info={ints['info'].value}, "
                                    f"{found} of {rank} eigenvectors)")
    return w[:rank], z
