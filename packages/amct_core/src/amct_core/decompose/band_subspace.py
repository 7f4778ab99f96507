"""Top eigenvectors of a symmetric band matrix whose eigenvalues are known, by
Chebyshev-filtered subspace iteration with Rayleigh–Ritz (Zhou and Saad 2007).

The spatial SVD needs the r leading eigenvectors of the Gram matrix only to the accuracy that
its factor error needs: the error of a rank-r basis U is tr(G) − tr(UᵀGU), the optimum is
E* = Σ_{h>r} λ_h, and the toolkit's goal is to stay within 1 % of E*. After the two-stage
reduction (:mod:`.two_stage`) the Gram matrix is a band matrix B = Q1ᵀ G Q1 with half-width
kd, so a product B·X costs O(n·kd·k) instead of O(n²·k), and every eigenvalue λ of B is known.

One round, on a block of k = r + p vectors (p ≈ 20 % of r):

    Y = p_m(B) X,        p_m(t) = T_m((t − c)/e) / T_m((λ_r − c)/e),
    c ± e = [λ_min, λ_{k+1}],     (T_m the Chebyshev polynomial of degree m)

which damps every eigenvector outside the block by at least T_m((λ_r − c)/e) relative to the
r-th; then Y = QR, H = Qᵀ B Q, H = Z Θ Zᵀ, and the Ritz vectors Q Z. Their Ritz values θ_i ≤ λ_i,
and because tr(UᵀBU) = Σ_{i≤r} θ_i, the excess error of the rank-r basis is exactly
Σ_{i≤r} (λ_i − θ_i), computed at no cost from the known spectrum. Rounds repeat on the Ritz
vectors until that excess is at most ``tolerance`` · E*.

The degree is the largest (at most :data:`MAX_DEGREE`) for which the filter spreads the active
eigenvalues over at most :data:`MAX_SPREAD` (T_m at the largest over T_m at λ_r): the filtered
block is orthonormalised in the working precision, and a direction amplified 10⁴ times less
than another keeps 3 correct digits in float32. Leading Ritz vectors whose summed excess is
negligible are locked and deflated (projected out after every product), so the next rounds
filter only the rest, with a degree set by the largest eigenvalue still active.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.linalg import LinAlgError, cholesky, eigh, qr
from scipy.linalg.blas import get_blas_funcs
from scipy.linalg.lapack import dtrtri

from amct_core.decompose import blas

try:
    from amct_core.decompose import _band_product
except ImportError:  # built without a C compiler: products of dense slabs through OpenBLAS
    _band_product = None

#: Highest Chebyshev degree per round.
MAX_DEGREE = 16
#: Largest spread T_m(λ_top)/T_m(λ_r) of the filter over the active eigenvalues, per working
#: precision: in float32 a direction amplified 10⁴ times less than another keeps 3 digits; in
#: float64 the bound comes from the Cholesky QR, whose Gram matrix squares the condition number
#: of the filtered block (about 10² times the spread).
MAX_SPREAD = {np.dtype(np.float32): 1e4, np.dtype(np.float64): 1e5}
#: Largest T_m at the top active eigenvalue: the filtered block's condition number is about
#: that (the damped directions keep |T_m| ≤ 1), and its Cholesky QR in float64 needs κ² ≪ 1/ε.
MAX_GROWTH = 1e6
#: Leading Ritz vectors are locked while their summed excess Σ(λ_i − θ_i) stays below this
#: fraction of the allowed excess.
LOCK_FRACTION = 0.1
#: Oversampling: the block holds r + max(MIN_OVERSAMPLING, OVERSAMPLING·r) vectors.
OVERSAMPLING = 0.2
MIN_OVERSAMPLING = 16
#: Rounds before giving up on the tolerance (each round damps the rest further).
MAX_ROUNDS = 24
#: The smallest excess asked for, in units of ε·tr(B) (see :func:`top_band_eigenvectors`).
ROUNDING_FLOOR = 100.0
#: Rows of the band matrix per dense slab in the product (B − cI)·X: a slab holds its rows'
#: whole band, SLAB_ROWS + 2·kd columns, so narrower slabs multiply fewer zeros, down to where
#: the products get too small (a 6144 × 1479 block at kd = 96 on two cores: 33 ms with 48 or
#: 64 rows, 34-35 ms with 96, 37-38 ms with 128, 37-44 ms with 32).
SLAB_ROWS = 64
#: Most threads of the C extension's band product: it runs on every CPU this process may use,
#: up to this many.
PRODUCT_THREADS = 16


def band_product_kernel(dtype: np.dtype | type) -> bool:
    """Whether the products B·X of a ``dtype`` band run in the C extension ``_band_product``
    (built, float32, an AVX-512 CPU): only the band's entries, on every usable CPU (at most
    :data:`PRODUCT_THREADS`), about twice as fast as the dense slabs through OpenBLAS."""
    return (_band_product is not None and np.dtype(dtype) == np.float32
            and bool(_band_product.available()))


#: The block's width is rounded up to a multiple of this: rows of a whole number of 64-byte
#: lines in float32 (the band product's kernel runs 25 % faster on a 6144 × 1488 block than on
#: 6144 × 1478), and likewise the width left after locking.
BLOCK_ALIGNMENT = 16


def block_size(n: int, rank: int) -> int:
    """The number of vectors iterated for ``rank`` eigenvectors of an n × n matrix: rank plus
    the oversampling, rounded up to a multiple of :data:`BLOCK_ALIGNMENT` (at most n)."""
    width = rank + max(MIN_OVERSAMPLING, math.ceil(OVERSAMPLING * rank))
    return min(n, -(-width // BLOCK_ALIGNMENT) * BLOCK_ALIGNMENT)


def start_block(n: int, rank: int, dtype: np.dtype | type, seed: int = 0) -> np.ndarray:
    """The seeded random start of :func:`top_band_eigenvectors`: n × :func:`block_size`
    entries uniform on [-1, 1) (as good a start as Gaussian entries, at a third of the cost)."""
    block = np.random.default_rng(seed).random((n, block_size(n, rank)), dtype=dtype)
    block *= 2.0
    block -= 1.0
    return block


def _dense_slabs(rows: np.ndarray, kd: int) -> list[tuple[int, int, int, int, np.ndarray]]:
    """(r0, r1, c0, c1, slab) per :data:`SLAB_ROWS` rows of the band matrix whose row r
    around its diagonal is ``rows[r]`` (rows[r, kd + t] = B[r, r + t]): the slab is
    B[r0:r1, c0:c1], every column its rows' band touches, dense."""
    n, dtype = rows.shape[0], rows.dtype
    slabs = []
    for r0 in range(0, n, SLAB_ROWS):
        r1 = min(n, r0 + SLAB_ROWS)
        c0, c1 = max(0, r0 - kd), min(n, r1 + kd)
        # Row i of the slab holds rows[r0 + i] from column r0 + i − kd on: a skewed view
        # (one element further along each row) of a slab as wide as an inner one.
        padded = np.zeros((r1 - r0, r1 - r0 + 2 * kd), dtype=dtype)
        skewed = np.lib.stride_tricks.as_strided(
            padded, shape=(r1 - r0, 2 * kd + 1),
            strides=(padded.strides[0] + padded.strides[1], padded.strides[1]),
            writeable=True)
        skewed[...] = rows[r0:r1]
        first = c0 - (r0 - kd)  # columns before it are left of the matrix (zeros)
        slab = padded[:, first:first + c1 - c0]
        slabs.append((r0, r1, c0, c1, np.ascontiguousarray(slab)))
    return slabs


class _BandOperator:
    """(B − shift·I)·X for a symmetric band matrix B in LAPACK lower band storage: by the
    C extension's kernel where :func:`band_product_kernel`, from the band's entries per group
    of four rows; else by dense slabs of rows (each slab holds its rows' whole band, with the
    shift on its diagonal, so each product is a few large matrix products and nothing else)."""

    def __init__(self, band: np.ndarray, dtype: np.dtype, shift: float = 0.0):
        kd, n = band.shape[0] - 1, band.shape[1]
        self.shift = float(shift)
        # Row r of B − shift·I around its diagonal: rows[r, kd + t] = B[r, r + t], |t| ≤ kd
        # (zero outside the matrix), from the band's diagonals: B[r, r − o] = band[o, r − o]
        # and its mirror B[r, r + o] = band[o, r].
        rows = np.zeros((n, 2 * kd + 1), dtype=dtype)
        for offset in range(kd + 1):
            rows[offset:, kd - offset] = band[offset, :n - offset]
            rows[:n - offset, kd + offset] = band[offset, :n - offset]
        rows[:, kd] -= self.shift
        self.kd, self.n = kd, n
        self.groups = None
        self._rows = rows
        self.slabs: list[tuple[int, int, int, int, np.ndarray]] = []
        if band_product_kernel(dtype):
            # groups[g, c, q] = (B − shift·I)[4g + q, 4g − kd + c] = rows[4g + q, c − q].
            count = (n + 3) // 4
            padded = np.zeros((4 * count, 2 * kd + 1), dtype=dtype)
            padded[:n] = rows
            self.groups = np.zeros((count, 2 * kd + 4, 4), dtype=dtype)
            for q in range(4):
                self.groups[:, q:q + 2 * kd + 1, q] = padded[q::4]
        else:
            self.slabs = _dense_slabs(rows, kd)

    def step(self, current: np.ndarray, alpha: float, out: np.ndarray,
             beta: float = 0.0) -> np.ndarray:
        """out ← alpha·(B − shift·I)·current + beta·out, in place: one call of the C
        extension's kernel, or one ``?gemm`` per slab.

        ``out`` may hold the block two steps back of a three-term recurrence (each slab's
        rows of ``out`` are read only for the same rows of the result), but not ``current``.
        """
        if self.groups is not None and current.flags.c_contiguous and out.flags.c_contiguous \
                and current.dtype == out.dtype == self.groups.dtype \
                and current.shape == out.shape and current.shape[0] == self.n:
            _band_product.step(self.n, current.shape[1], self.kd, self.groups.ctypes.data,
                               current.ctypes.data, out.ctypes.data, alpha, beta,
                               max(1, min(PRODUCT_THREADS, blas.usable_cpus())))
            return out
        if not self.slabs:  # blocks the kernel cannot take (not C-ordered): by slabs
            self.slabs = _dense_slabs(self._rows, self.kd)
        for r0, r1, c0, c1, slab in self.slabs:
            blas.matmul_into(slab, current[c0:c1], out[r0:r1], alpha=alpha, beta=beta)
        return out

    def product(self, current: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out ← B·current = (B − shift·I)·current + shift·current."""
        np.multiply(current, self.shift, out=out)
        return self.step(current, 1.0, out, beta=1.0 if self.shift else 0.0)


def _chebyshev(m: int, x: float) -> float:
    if abs(x) <= 1.0:
        return math.cos(m * math.acos(x))
    return math.cosh(m * math.acosh(abs(x))) * (1.0 if x > 0 or m % 2 == 0 else -1.0)


def _degree(x_top: float, x_rank: float, spread_limit: float) -> int:
    """Largest degree whose spread T_m(x_top)/T_m(x_rank) stays within ``spread_limit`` and
    whose growth T_m(x_top) within :data:`MAX_GROWTH`."""
    x_rank = max(x_rank, 1.0 + 1e-6)
    degree = 1
    while degree < MAX_DEGREE:
        nxt = degree + 1
        try:
            growth = _chebyshev(nxt, x_top)
            spread = growth / _chebyshev(nxt, x_rank)
        except OverflowError:
            break
        if spread > spread_limit or growth > MAX_GROWTH:
            break
        degree = nxt
    return degree


def _deflate(block: np.ndarray, locked: np.ndarray) -> None:
    """block ← (I − L Lᵀ) block, in place."""
    if locked.shape[1]:
        blas.matmul(locked, blas.matmul(locked.T, block), out=block, alpha=-1.0, beta=1.0)


def _filter(operator: _BandOperator, block: np.ndarray, degree: int, half_width: float,
            anchor: float, buffer: np.ndarray, locked: np.ndarray) -> np.ndarray:
    """p_m(P B P)·block, p_m the Chebyshev polynomial on [c ± half_width] (c the operator's
    shift) scaled to 1 at ``anchor`` (three-term recurrence with the scaling of Zhou and Saad,
    Algorithm 3.1), P the projector onto the complement of the ``locked`` vectors (``block`` is
    orthogonal to them).

    Each step writes the new block over the one two steps back, so the recurrence needs
    ``block`` (overwritten) and one ``buffer``; the result is one of the two.
    """
    center = operator.shift
    sigma_first = half_width / (anchor - center)
    sigma = sigma_first
    previous, current = block, operator.step(block, sigma / half_width, buffer)
    _deflate(current, locked)
    for _ in range(1, degree):
        sigma_next = 1.0 / (2.0 / sigma_first - sigma)
        # X_{j+1} = (2σ'/e)(B − cI) X_j − σσ' X_{j−1}, over X_{j−1}.
        operator.step(current, 2.0 * sigma_next / half_width, previous,
                      beta=-sigma * sigma_next)
        _deflate(previous, locked)
        previous, current = current, previous
        sigma = sigma_next
    return current


#: Rows of the block converted to float64 at a time by :func:`_orthonormalise`.
ORTHO_ROWS = 1024


def _orthonormalise(block: np.ndarray) -> np.ndarray:
    """Replace the columns of ``block`` (n × k, C order) by an orthonormal basis of their span,
    in place, and return it.

    Cholesky QR in float64: R = chol(XᵀX), Q = X R⁻¹, whose loss of orthogonality is about
    ε₆₄·κ(X)², about 10⁻⁴ for the κ ≈ :data:`MAX_GROWTH` the filter allows, then rounded to
    the working precision. Two matrix products instead of a Householder QR, which is half
    matrix-vector work; R⁻¹ is formed once (``?trtri``, k³/3 flops) and applied by ``?trmm``,
    25 % faster than ``?trsm`` on these blocks (its rounding, ε₆₄·κ(R), is far below the
    float32 the result is rounded to). Both run on :data:`ORTHO_ROWS` rows at a time
    converted to float64 (XᵀX = Σ X_iᵀ X_i, and each row of Q is that row of X times R⁻¹), so
    no float64 copy of the whole block is made. Falls back to Householder QR if the Cholesky
    factorisation fails.
    """
    n, k = block.shape
    chunk = np.empty((min(ORTHO_ROWS, n), k), dtype=np.float64)
    gram = np.zeros((k, k), dtype=np.float64, order="F")
    for start in range(0, n, ORTHO_ROWS):
        rows = chunk[:min(ORTHO_ROWS, n - start)]
        rows[...] = block[start:start + rows.shape[0]]
        blas.gram_into(rows, gram, beta=1.0, lower=False)
    try:
        factor = cholesky(gram, lower=False, check_finite=False)
        inverse, info = dtrtri(factor, lower=0, unitdiag=0, overwrite_c=1)
        if info != 0:  # a zero on R's diagonal (cholesky fails first in practice)
            raise LinAlgError(f"dtrtri: R[{info - 1}, {info - 1}] is zero")
    except LinAlgError:
        block[...] = qr(np.asfortranarray(block), mode="economic", overwrite_a=True,
                        check_finite=False)[0]
        return block
    trmm = get_blas_funcs("trmm", (chunk,))
    for start in range(0, n, ORTHO_ROWS):
        rows = chunk[:min(ORTHO_ROWS, n - start)]
        rows[...] = block[start:start + rows.shape[0]]
        # The C-ordered rows are their transpose in Fortran order: Qᵀ = R⁻ᵀ Xᵀ in place.
        solved = trmm(1.0, inverse, rows.T, side=0, lower=0, trans_a=1, overwrite_b=1)
        block[start:start + rows.shape[0]] = solved.T
    return block


def top_band_eigenvectors(band: np.ndarray, eigenvalues: np.ndarray, rank: int,
                          tolerance: float = 1e-3, seed: int = 0,
                          start: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The ``rank`` leading eigenvectors (n × rank, orthonormal, leading first) of the
    symmetric band matrix ``band`` (LAPACK lower band storage) whose eigenvalues (any order)
    are ``eigenvalues``.

    Returns (vectors, excess): excess = Σ_{i≤r}(λ_i − θ_i) / Σ_{h>r} λ_h, the error of the
    basis beyond the optimal rank-r error, as a fraction of it (at most ``tolerance`` unless
    :data:`MAX_ROUNDS` rounds were not enough). Where the optimal error is at the rounding
    level (a matrix of rank below r), the target is that level, :data:`ROUNDING_FLOOR`·ε·tr(B),
    and the excess is measured against it divided by ``tolerance``. The random start is
    seeded, so the result is reproducible; ``start``, if given, is that block
    (:func:`start_block` of ``seed``, drawn ahead by the caller) and is overwritten.
    """
    dtype = band.dtype
    n = band.shape[1]
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    if lam.shape[0] != n:
        raise ValueError(f"expected {n} eigenvalues, got {lam.shape[0]}")
    if not 1 <= rank <= n:
        raise ValueError(f"rank must be in [1, {n}], got {rank}")
    k = block_size(n, rank)
    optimal = float(np.sum(np.clip(lam[rank:], 0.0, None)))
    total = float(np.sum(np.clip(lam, 0.0, None)))
    if not total > 0.0:  # the zero matrix: any orthonormal basis is optimal
        return np.eye(n, rank, dtype=dtype), 0.0
    # Sums of Ritz values carry rounding errors of about ε·tr(B): for a (nearly) rank-deficient
    # matrix, whose optimal error is at that level, ask for no better than that.
    floor = ROUNDING_FLOOR * float(np.finfo(dtype).eps) * total
    allowed = max(tolerance * optimal, floor)
    scale = max(optimal, floor / tolerance) if tolerance > 0 else max(optimal, floor)
    leading = float(np.sum(lam[:rank]))

    low = float(lam[-1])
    cut = float(lam[k]) if k < n else low
    span = max(float(lam[0]) - low, float(np.finfo(dtype).tiny))
    # The damped interval [low, cut]; when it is a point (equal unwanted eigenvalues), a
    # sliver of the gap up to λ_r, or of the whole spectrum when there is no gap either.
    gap = float(lam[rank - 1]) - low
    half_width = (cut - low) / 2.0
    if not half_width > 0.0:
        half_width = 1e-3 * gap if gap > 0.0 else 1e-6 * span
    center = low + half_width
    anchor = max(float(lam[rank - 1]), center + 1e-3 * half_width)

    dynamic_range = MAX_SPREAD[np.dtype(dtype)]

    def scaled(value: float) -> float:
        return (value - center) / half_width

    operator = _BandOperator(band, dtype, shift=center)
    if start is None:
        block = start_block(n, rank, dtype, seed)
    elif start.shape != (n, k) or start.dtype != dtype or not start.flags.c_contiguous:
        raise ValueError(f"start must be a C-ordered {dtype} array of shape {(n, k)}")
    else:
        block = start
    locked = np.zeros((n, 0), dtype=dtype)
    locked_ritz = np.zeros(0)
    for round_index in range(MAX_ROUNDS):
        count = locked.shape[1]
        # The spread bound covers the largest eigenvalue still active (locked ones are
        # deflated).
        degree = _degree(scaled(float(lam[count])), scaled(anchor), dynamic_range)
        buffer = np.empty(block.shape, dtype=dtype)
        filtered = _filter(operator, block, degree, half_width, anchor, buffer, locked)
        _deflate(filtered, locked)  # again: the first pass leaves its own rounding errors
        basis = _orthonormalise(filtered)
        # The product goes into the buffer the filter no longer needs.
        spare = buffer if basis is block else block
        _deflate(basis, locked)
        product = operator.product(basis, spare)
        # H = Qᵀ B Q is symmetric: only its lower triangle is computed, and read.
        projected = blas.lower_product(basis, product)
        # Divide and conquer on the whole k × k problem is faster than a subset solver here.
        ritz, rotation = eigh(projected, lower=True, driver="evd", overwrite_a=True,
                              check_finite=False)
        # Reversed views have negative strides, which BLAS cannot take: copy, in Fortran order
        # so that the leading columns are a contiguous block.
        ritz, rotation = ritz[::-1].astype(np.float64), np.asfortranarray(rotation[:, ::-1])
        wanted = rank - count
        excess_abs = leading - float(np.sum(locked_ritz)) - float(np.sum(ritz[:max(wanted, 0)]))
        excess = excess_abs / scale
        if excess_abs <= allowed or round_index == MAX_ROUNDS - 1 or wanted <= 0:
            break
        vectors = blas.matmul(basis, rotation)
        # Lock the leading Ritz vectors whose summed excess is negligible.
        deficits = np.cumsum(np.clip(lam[count:count + ritz.shape[0]] - ritz, 0.0, None))
        newly = int(np.searchsorted(deficits, LOCK_FRACTION * allowed, side="right"))
        newly = min(newly, wanted - 1, ritz.shape[0] - MIN_OVERSAMPLING)
        # Keep the width of the block left a multiple of BLOCK_ALIGNMENT (lock fewer).
        newly -= (ritz.shape[0] - newly) % BLOCK_ALIGNMENT
        if newly > 0:
            locked = np.concatenate([locked, vectors[:, :newly]], axis=1)
            locked_ritz = np.concatenate([locked_ritz, ritz[:newly]])
        block = np.ascontiguousarray(vectors[:, max(newly, 0):])
    # The product B·Q is no longer needed: the Ritz vectors go into its buffer (no new n × r
    # array while the basis is still held).
    width = max(rank - locked.shape[1], 0)
    active = blas.matmul(basis, rotation[:, :width],
                         out=spare.reshape(-1)[:n * width].reshape(n, width))
    if not locked.shape[1]:  # nothing locked: the r Ritz vectors of one basis as they are
        vectors = active
    else:
        vectors = np.ascontiguousarray(np.concatenate([locked, active], axis=1)[:, :rank])
        # Locked and active vectors come from different rounds: measure the excess of the
        # basis returned on it, tr(UᵀBU) for the r vectors.
        captured = float(np.einsum("ij,ij->", vectors,
                                   operator.product(vectors, np.empty_like(vectors)),
                                   dtype=np.float64))
        excess = (leading - captured) / scale
    # The Ritz values are tr(UᵀBU) exactly for one orthonormal basis. tr(UᵀBU) ≤ Σ_{i≤r} λ_i
    # for any orthonormal U (Ky Fan), so a negative excess is rounding in the sums: 0.
    return vectors, max(excess, 0.0)
