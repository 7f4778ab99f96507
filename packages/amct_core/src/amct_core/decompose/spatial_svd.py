"""Spatial-separable SVD of a conv kernel (reference §2.1, Jaderberg et al. 2014).

A kernel W of shape (Cout, Cin, KH, KW) is unfolded into an L×M matrix Y whose rows index the
smaller channel axis together with the smaller kernel axis (L = min(C)·min(K),
M = max(C)·max(K)). With Y = U S Vᵀ and U_r its top-r left singular vectors,

    Y ≈ U_r (U_rᵀ Y),

the best rank-r approximation (Eckart–Young): ‖Y − U_r U_rᵀ Y‖²_F = Σ_{h>r} s_h². One factor
is U_r, the other the core U_rᵀ Y; folded back they are a KH×1 conv and a 1×KW conv (or the
other way round) whose composition reconstructs W exactly at full rank:

    mode  condition           first conv         last conv
    SCFK  Cout≥Cin, KH≤KW     (r, Cin, KH, 1)    (Cout, r, 1, KW)   U_r in the first conv
    SCSK  Cout≥Cin, KH>KW     (r, Cin, 1, KW)    (Cout, r, KH, 1)   U_r in the first conv
    FCFK  Cout<Cin, KH≤KW     (r, Cin, 1, KW)    (Cout, r, KH, 1)   U_r in the last conv
    FCSK  Cout<Cin, KH>KW     (r, Cin, KH, 1)    (Cout, r, 1, KW)   U_r in the last conv

The solver never forms V. It builds the L×L Gram matrix G = Y Yᵀ and takes every eigenvalue
s_h² of G (the EVBMF rank rule needs the spectrum) and only the top r eigenvectors:

* below :data:`TWO_STAGE_MIN_ROWS` rows, one reduction of G to tridiagonal form (LAPACK
  ``sytrd``), all eigenvalues from it (``sterf``), the top r eigenvectors of the tridiagonal
  matrix (inverse iteration from those eigenvalues; bisection or MRRR where the matrix splits
  or that fails) mapped back through the reflectors: exact;
* from there on, the two-stage reduction (:mod:`.two_stage`: dense → band → tridiagonal, all
  matrix-matrix work) for the eigenvalues (by bisection for float32), and the top r
  eigenvectors of the band matrix by Chebyshev-filtered subspace iteration
  (:mod:`.band_subspace`), which stops once the factor error is within
  :data:`SUBSPACE_TOLERANCE` (0.1 %) of the optimal error, a bound it checks against the
  exact spectrum. About twice as fast for the large kernels of the seeds.

Nor does it copy Y out of the kernel: G and U_rᵀ Y are taken block by block from the kernel
stored kernel axes first (:mod:`.kernel_blocks`), which a TensorFlow kernel already is.

Memory: the kernel (or that one copy of it) and G, in float32 for large kernels.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh_tridiagonal, eigvalsh_tridiagonal, get_lapack_funcs

from amct_core.decompose import band_subspace, mrrr, two_stage
from amct_core.decompose.applicability import DecomposeMode, _pair, select_mode
from amct_core.decompose.kernel_blocks import KernelBlocks
from amct_core.decompose.rank import select_rank
from amct_core.errors import DecompositionError
from amct_core.logger import get_logger

_LOGGER = get_logger()

# (axes of W that make the rows, axes that make the columns, whether U_r is the first conv,
#  kernel axis (2 = H, 3 = W) of the first conv). W axes: 0 = Cout, 1 = Cin, 2 = KH, 3 = KW.
_LAYOUT = {
    DecomposeMode.SCFK: ((1, 2), (0, 3), True, 2),
    DecomposeMode.SCSK: ((1, 3), (0, 2), True, 3),
    DecomposeMode.FCFK: ((0, 2), (1, 3), False, 3),
    DecomposeMode.FCSK: ((0, 3), (1, 2), False, 2),
}

#: Unfoldings with more elements than this are solved in float32 (memory and speed); smaller
#: ones in float64.
FLOAT64_MAX_ELEMENTS = 1 << 22


#: Layouts :func:`factorize_kernel` can return the factor kernels in: PyTorch's and ONNX's
#: (Cout, Cin, KH, KW), TensorFlow's (KH, KW, Cin, Cout).
LAYOUTS = ("OIHW", "HWIO")


@dataclass(frozen=True)
class SpatialSvdFactors:
    """The two conv kernels that replace one conv, and how they were chosen. ``first`` and
    ``last`` are C-contiguous, in ``layout`` (:data:`LAYOUTS`)."""

    mode: DecomposeMode
    rank: int
    first: np.ndarray
    last: np.ndarray
    singular_values: np.ndarray
    evbmf_rank: int | None
    layout: str = "OIHW"

    @property
    def residual_energy(self) -> float:
        """Σ_{h>r} s_h², the squared Frobenius error of the optimal rank-r approximation."""
        tail = self.singular_values[self.rank:]
        return float(np.sum(tail * tail))


def _check_mode(mode: DecomposeMode) -> None:
    if mode not in _LAYOUT:
        raise DecompositionError(f"mode {mode!r} does not split a conv; use one of "
                                 f"{', '.join(m.name for m in _LAYOUT)}")


def factor_shapes(weight_shape: Sequence[int], mode: DecomposeMode,
                  rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return the (first, last) kernel shapes for a conv of ``weight_shape`` at ``rank``."""
    _check_mode(mode)
    cout, cin, kh, kw = (int(v) for v in weight_shape)
    first_axis = _LAYOUT[mode][3]
    if first_axis == 2:
        return (rank, cin, kh, 1), (cout, rank, 1, kw)
    return (rank, cin, 1, kw), (cout, rank, kh, 1)


#: Channels per tile of each channel axis when the kernel is unfolded (tiles of about 64 × 64
#: channels × the kernel window stay in cache; a plain transposed copy is five times slower).
UNFOLD_TILE = 64


def unfold_weight(weight: np.ndarray, mode: DecomposeMode) -> np.ndarray:
    """Return the L×M unfolding of a (Cout, Cin, KH, KW) kernel for ``mode``, as a C-ordered
    copy."""
    _check_mode(mode)
    rows, cols, _, _ = _LAYOUT[mode]
    permuted = weight.transpose(rows + cols)
    out = np.empty(permuted.shape, dtype=weight.dtype)
    for a in range(0, permuted.shape[0], UNFOLD_TILE):
        for b in range(0, permuted.shape[2], UNFOLD_TILE):
            out[a:a + UNFOLD_TILE, :, b:b + UNFOLD_TILE] = \
                permuted[a:a + UNFOLD_TILE, :, b:b + UNFOLD_TILE]
    return out.reshape(permuted.shape[0] * permuted.shape[1], -1)


#: Largest kernel (bytes, in the compute precision) kept in memory from G = Y Yᵀ to the core
#: U_rᵀ Y; a larger one is dropped while the spectrum is computed and loaded again for the core
#: (one more read, to keep the peak of a (2048, 2048, 5, 5) kernel under 2 GB).
KEEP_KERNEL_MAX_BYTES = 256 << 20


def _fold(blocks: KernelBlocks, u_r: np.ndarray, core: np.ndarray, mode: DecomposeMode,
          layout: str = "OIHW") -> tuple[np.ndarray, np.ndarray]:
    """Fold U_r (L×r) and the core (from :meth:`KernelBlocks.core`), in the row and column
    order of ``blocks``, back into the first and last conv kernels in ``layout``. The folds
    are views until the one copy into the layout asked for, which for a TensorFlow kernel
    (rows and columns kernel index first) in HWIO is none where U_r is the first conv."""
    u_is_first = _LAYOUT[mode][2]
    rank = u_r.shape[1]
    # U_r holds the row axes (a channel axis and a kernel axis); the core the column axes.
    u_part = blocks.fold_rows(u_r)
    core_part = blocks.fold_columns(core)
    first_shape, last_shape = factor_shapes(blocks.shape, mode, rank)
    if u_is_first:  # rows = (Cin, k): first[k, i, ...] = U[(i, h), k]
        first = u_part.reshape(first_shape)
        last = core_part.transpose(1, 0, 2).reshape(last_shape)
    else:  # rows = (Cout, k): last[o, k, ...] = U[(o, h), k]
        last = u_part.transpose(1, 0, 2).reshape(last_shape)
        first = core_part.reshape(first_shape)
    if layout == "HWIO":
        first, last = first.transpose(2, 3, 1, 0), last.transpose(2, 3, 1, 0)
    return np.ascontiguousarray(first), np.ascontiguousarray(last)


#: Below this many rows the top eigenvectors of the tridiagonal matrix come from bisection and
#: inverse iteration in the working precision (fastest there); above it from MRRR in float64,
#: which stays fast on the dense spectra of large kernels where inverse iteration slows down.
BISECTION_MAX_ROWS = 8192


def _mrrr(diag: np.ndarray, offdiag: np.ndarray, rank: int) -> np.ndarray:
    """MRRR in float64, with an n × rank eigenvector array (see :mod:`.mrrr`)."""
    if mrrr.available():
        return mrrr.top_eigenvectors(diag, offdiag, rank)[1]
    rows = diag.shape[0]  # pragma: no cover - SciPy's driver, n × n eigenvector array
    return eigh_tridiagonal(diag.astype(np.float64), offdiag.astype(np.float64), select="i",
                            select_range=(rows - rank, rows - 1), lapack_driver="stemr")[1]


def _bisection(diag: np.ndarray, offdiag: np.ndarray, rank: int) -> np.ndarray:
    rows = diag.shape[0]
    return eigh_tridiagonal(diag, offdiag, select="i", select_range=(rows - rank, rows - 1),
                            lapack_driver="stebz")[1]


def _splits(diag: np.ndarray, offdiag: np.ndarray) -> bool:
    """Whether the tridiagonal matrix splits into blocks, by the test of LAPACK ``?stebz``:
    ``e_j² < |d_j·d_{j+1}|·ulp² + safe_min``."""
    info = np.finfo(diag.dtype)
    products = np.abs(diag[1:].astype(np.float64) * diag[:-1]) * float(info.eps) ** 2
    return bool(np.any(offdiag.astype(np.float64) ** 2
                       < products + float(info.smallest_normal)))


def _inverse_iteration(diag: np.ndarray, offdiag: np.ndarray,
                       eigenvalues: np.ndarray) -> np.ndarray:
    """Inverse iteration (``?stein``): the eigenvectors of the known ``eigenvalues`` (ascending).

    Bisection (``?stebz``) would recompute eigenvalues the solver already has from ``?sterf``
    (half the time of :func:`_bisection` for the kernels of the seeds). ``?stein`` takes one
    block here, so a matrix that splits (where bisection would find the blocks) raises
    ``LinAlgError`` and the caller falls back to bisection.
    """
    rows = diag.shape[0]
    if _splits(diag, offdiag):
        raise np.linalg.LinAlgError("the tridiagonal matrix splits into blocks")
    stein, = get_lapack_funcs(("stein",), (diag,))
    block = np.ones(rows, dtype=np.int32)
    split = np.zeros(rows, dtype=np.int32)
    split[0] = rows
    vectors, info = stein(diag, offdiag, np.ascontiguousarray(eigenvalues, dtype=diag.dtype),
                          block, split)
    if info != 0:
        raise np.linalg.LinAlgError(f"{info} eigenvectors did not converge (?stein)")
    return vectors


def _tridiagonal_top_vectors(diag: np.ndarray, offdiag: np.ndarray,
                             eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvectors of the top eigenvalues ``eigenvalues`` (ascending, already known) of a
    symmetric tridiagonal matrix, ascending: inverse iteration from them, then bisection and
    MRRR (MRRR first above :data:`BISECTION_MAX_ROWS` rows), each method falling back to the
    next if LAPACK reports no convergence."""
    rank = eigenvalues.shape[0]
    if diag.shape[0] <= BISECTION_MAX_ROWS:
        methods = [lambda d, e, r: _inverse_iteration(d, e, eigenvalues), _bisection, _mrrr]
    else:
        methods = [_mrrr, _bisection]
    for method in methods:
        try:
            return method(diag, offdiag, rank)
        except np.linalg.LinAlgError as error:
            failure = error
    raise DecompositionError(f"no convergence of the tridiagonal eigenvectors "
                             f"({failure})") from failure


def _gram_spectrum_and_top_vectors(
        gram: np.ndarray,
        choose_rank: Callable[[np.ndarray], int]) -> tuple[np.ndarray, np.ndarray]:
    """Return (all singular values of Y, descending; its top-r left singular vectors) from
    the Gram matrix G = Y Yᵀ, which is overwritten.

    ``choose_rank`` gets the singular values and returns r. One tridiagonal reduction of G
    serves both the full spectrum and the r vectors.
    """
    num_rows = gram.shape[0]
    if num_rows < 3:
        eigenvalues, vectors = np.linalg.eigh(gram)
        singular = np.sqrt(np.clip(eigenvalues[::-1], 0.0, None))
        rank = choose_rank(singular)
        return singular, vectors[:, ::-1][:, :rank]
    sytrd, sytrd_lwork = get_lapack_funcs(("sytrd", "sytrd_lwork"), (gram,))
    lwork, info = sytrd_lwork(num_rows, lower=1)
    reflectors, diag, offdiag, tau, info = sytrd(gram, lower=1, lwork=int(lwork), overwrite_a=1)
    if info != 0:
        raise DecompositionError(f"tridiagonal reduction failed (LAPACK sytrd info={info})")
    eigenvalues = eigvalsh_tridiagonal(diag, offdiag, lapack_driver="sterf")
    singular = np.sqrt(np.clip(eigenvalues[::-1].astype(np.float64), 0.0, None))
    rank = choose_rank(singular)
    if rank <= 0:
        return singular, np.zeros((num_rows, 0), dtype=gram.dtype)
    small = _tridiagonal_top_vectors(diag, offdiag, eigenvalues[num_rows - rank:])
    small = small[:, ::-1].astype(gram.dtype)
    # sytrd leaves Q as the reflectors of a band of half-width 1: reflector i has its unit
    # entry in row i + 1 and the rest below it in column i.
    return singular, two_stage.apply_band_reflectors(reflectors, tau, 1, small,
                                                     overwrite_vectors=True)


#: From this many rows of G on, the spectrum comes from the two-stage reduction and the top
#: vectors from the band matrix (:mod:`.two_stage`, :mod:`.band_subspace`); below it the
#: one-stage reduction is as fast and its vectors are exact.
TWO_STAGE_MIN_ROWS = 4096
#: Half-width of the band of the two-stage reduction: wider makes the dense-to-band products
#: faster and the bulge chasing slower; 96 was 3-12 % faster overall than 64 and 128 for the
#: seed shapes on two cores.
BAND_WIDTH = 96
#: Largest excess of the factor error over the optimal rank-r error, as a fraction of the
#: optimal error, that the band subspace iteration accepts.
SUBSPACE_TOLERANCE = 1e-3


def _spectrum_beside_blocks(diag: np.ndarray, offdiag: np.ndarray, reflectors: np.ndarray,
                            tau: np.ndarray, choose_rank: Callable[[np.ndarray], int]
                            ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None, list]:
    """(eigenvalues of the tridiagonal matrix, ascending; singular values, descending; the
    rank; the subspace iteration's start block for it, or None for rank 0;
    :func:`two_stage.reflector_blocks`).

    A thread of its own computes the eigenvalues (:func:`two_stage.tridiagonal_eigenvalues`,
    one core, no BLAS), picks the rank from them and draws the start block
    (:func:`band_subspace.start_block`) while this one computes the blocks of the
    back-transform with SciPy's BLAS on one thread, so the two overlap."""
    outcome: dict[str, object] = {}

    def spectrum() -> None:
        try:
            values = two_stage.tridiagonal_eigenvalues(diag, offdiag)
            singular = np.sqrt(np.clip(values[::-1], 0.0, None))
            rank = choose_rank(singular)
            start = (band_subspace.start_block(values.shape[0], rank, reflectors.dtype)
                     if rank > 0 else None)
            outcome["result"] = values, singular, rank, start
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    worker = threading.Thread(target=spectrum, name="amct-eigenvalues", daemon=True)
    worker.start()
    try:
        with two_stage.one_blas_thread():
            blocks = two_stage.reflector_blocks(reflectors, tau, BAND_WIDTH)
    finally:
        worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return (*outcome["result"], blocks)


def _two_stage_spectrum_and_top_vectors(
        gram: np.ndarray,
        choose_rank: Callable[[np.ndarray], int]) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_gram_spectrum_and_top_vectors`, through the two-stage reduction: every
    eigenvalue of G exactly (to the working precision), the top r vectors to within
    :data:`SUBSPACE_TOLERANCE` of the optimal factor error."""
    try:
        band, tau = two_stage.reduce_to_band(gram, BAND_WIDTH)
        diag, offdiag = two_stage.band_tridiagonal(band)
        eigenvalues, singular, rank, start, blocks = _spectrum_beside_blocks(
            diag, offdiag, gram, tau, choose_rank)
    except np.linalg.LinAlgError as error:
        raise DecompositionError(f"two-stage reduction failed ({error})") from error
    if rank <= 0:
        return singular, np.zeros((gram.shape[0], 0), dtype=gram.dtype)
    vectors, excess = band_subspace.top_band_eigenvectors(band, eigenvalues, rank,
                                                          tolerance=SUBSPACE_TOLERANCE,
                                                          start=start)
    if excess > SUBSPACE_TOLERANCE:
        _LOGGER.warning("the rank-%d factors are %.3g%% above the optimal error (target "
                        "%.3g%%)", rank, 100.0 * excess, 100.0 * SUBSPACE_TOLERANCE)
    return singular, two_stage.apply_band_reflectors(gram, tau, BAND_WIDTH, vectors,
                                                     overwrite_vectors=True, blocks=blocks)


def _checked_kernel(weight: np.ndarray) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise DecompositionError(f"a conv kernel must be 4-D (Cout, Cin, KH, KW), got shape "
                                 f"{weight.shape}")
    if not np.issubdtype(weight.dtype, np.floating):
        raise DecompositionError(f"unsupported weight dtype {weight.dtype}; only float16, "
                                 f"float32 and float64 kernels can be decomposed")
    return weight


def _check_finite(blocks: KernelBlocks, gram: np.ndarray) -> None:
    """Refuse a kernel with NaN or Inf values, or whose Gram matrix overflows.

    G[i, i] = Σ_j Y[i, j]² is NaN or Inf whenever row i of Y holds one, so the n diagonal
    entries stand for the whole kernel (a scan of the kernel only runs to word the error).
    """
    if np.all(np.isfinite(np.diagonal(gram))):
        return
    if not blocks.all_finite():
        raise DecompositionError("the kernel contains NaN or Inf values")
    raise DecompositionError(f"the kernel's values are too large for {blocks.dtype} (largest "
                             f"|w| = {blocks.max_abs():.3g}): their squared sums overflow; "
                             f"scale the weights down")


def factorize_kernel(weight: np.ndarray | Callable[[], np.ndarray], mode: DecomposeMode,
                     rank: int | None = None,
                     compute_dtype: np.dtype | type | None = None,
                     layout: str = "OIHW") -> SpatialSvdFactors:
    """Split ``weight`` (Cout, Cin, KH, KW) in ``mode`` at ``rank`` (the rank rule when None).

    ``weight`` is the kernel, or a function returning it: a plugin whose kernels live on disk
    (a TensorFlow checkpoint) passes a loader. The kernel is kept for the core U_rᵀ Y when it
    is at most :data:`KEEP_KERNEL_MAX_BYTES`; a larger one is dropped while the spectrum is
    computed and loaded again, the loader called a second time for it (so a kernel on disk is
    not held meanwhile: peak memory one or two kernel-sized arrays lower). No applicability
    check: callers use :func:`decompose_conv_weight` for that. The factors are returned in the
    compute precision (float64 for small kernels, float32 for large ones unless
    ``compute_dtype`` says otherwise), and in ``layout`` (OIHW, or HWIO for TensorFlow).
    """
    _check_mode(mode)
    if layout not in LAYOUTS:
        raise DecompositionError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    load = weight if callable(weight) else None
    kernel = _checked_kernel(load() if load is not None else weight)
    shape = kernel.shape
    if compute_dtype is None:
        compute_dtype = np.float64 if kernel.size <= FLOAT64_MAX_ELEMENTS else np.float32
    rows, cols, _, _ = _LAYOUT[mode]
    # Peak memory: the kernel (a copy of it where its layout is not (KH, KW, ·, ·)) and G; a
    # large kernel is dropped while the spectrum is computed and loaded again for U_rᵀ Y.
    blocks = KernelBlocks(kernel, rows, cols, compute_dtype)
    keep = blocks.stored.nbytes <= KEEP_KERNEL_MAX_BYTES
    if load is not None:
        del kernel
    gram = blocks.gram()
    _check_finite(blocks, gram)
    if not keep:
        del blocks
    num_rows = gram.shape[0]
    cout, cin, kh, kw = shape
    evbmf: list[int] = []

    def choose_rank(singular: np.ndarray) -> int:
        if rank is not None:
            if not 1 <= int(rank) <= num_rows:
                raise DecompositionError(f"rank must be in [1, {num_rows}] for a kernel of "
                                         f"shape {shape}, got {rank}")
            return int(rank)
        chosen, raw = select_rank(singular, cout, cin, (kh, kw))
        evbmf.append(raw)
        return chosen

    if num_rows >= TWO_STAGE_MIN_ROWS and two_stage.available(gram.dtype):
        singular, u_r = _two_stage_spectrum_and_top_vectors(gram, choose_rank)
    else:
        singular, u_r = _gram_spectrum_and_top_vectors(gram, choose_rank)
    del gram
    if not keep:
        if load is not None:
            kernel = np.asarray(load())
            if kernel.shape != shape:
                raise DecompositionError(f"the kernel loader returned shape {kernel.shape} on "
                                         f"its second call, {shape} on its first")
        blocks = KernelBlocks(kernel, rows, cols, compute_dtype)
        del kernel
    core = blocks.core(u_r)
    first, last = _fold(blocks, u_r, core, mode, layout)
    del blocks
    return SpatialSvdFactors(mode=mode, rank=u_r.shape[1], first=first, last=last,
                             singular_values=singular,
                             evbmf_rank=evbmf[0] if evbmf else None, layout=layout)


def decompose_conv_weight(weight: np.ndarray, stride: int | Sequence[int] = 1,
                          dilation: int | Sequence[int] = 1, groups: int = 1,
                          rank: int | None = None) -> SpatialSvdFactors | None:
    """Decompose a conv kernel if the applicability rule allows it, else return ``None``.

    ``weight`` is (Cout, Cin/groups, KH, KW). The rank comes from the EVBMF rank rule unless
    ``rank`` is given.
    """
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise DecompositionError(f"a conv kernel must be 4-D (Cout, Cin, KH, KW), got shape "
                                 f"{weight.shape}")
    cout, cin_per_group, kh, kw = weight.shape
    mode = select_mode(cout, cin_per_group * groups, (kh, kw), stride, dilation, groups)
    if mode == DecomposeMode.UNCHANGE:
        return None
    return factorize_kernel(weight, mode, rank)


def split_conv_attributes(mode: DecomposeMode, stride: int | Sequence[int],
                          padding: int | Sequence[int] | str,
                          dilation: int | Sequence[int]) -> tuple[dict, dict]:
    """Return the (first, last) conv attributes: stride, padding and dilation per axis.

    Each new conv keeps the original value on its own kernel axis and gets stride 1,
    padding 0 and dilation 1 on the other (reference §2.1). String paddings ('same',
    'valid') apply to both convs as they are, which composes to the same output.
    """
    _check_mode(mode)
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    if isinstance(padding, str):
        pad_h_conv: tuple[int, int] | str = padding
        pad_w_conv: tuple[int, int] | str = padding
    else:
        ph, pw = _pair(padding, "padding")
        pad_h_conv, pad_w_conv = (ph, 0), (0, pw)
    along_h = {"stride": (sh, 1), "padding": pad_h_conv, "dilation": (dh, 1)}
    along_w = {"stride": (1, sw), "padding": pad_w_conv, "dilation": (1, dw)}
    if _LAYOUT[mode][3] == 2:
        return along_h, along_w
    return along_w, along_h
