"""The unfolding of a conv kernel as a grid of channel blocks (reference §2.1).

The spatial SVD works on the L×M unfolding Y of a kernel W (Cout, Cin, KH, KW): a row per
(row channel c, row kernel index a), a column per (column channel d, column kernel index b),
Y[(c, a), (d, b)] = W at those four indices. Ordered kernel-index first, rows (a, c) and
columns (b, d), Y is a grid of K_r × K_c channel blocks

    Y = [A_ab],   A_ab = W[:, :, h, w] (or its transpose) with (h, w) = (a, b) or (b, a),

and every block is a plain 2-D slice of the kernel stored with its kernel axes first
(KH, KW, ·, ·). A TensorFlow kernel (HWIO) is stored that way already and is used as it lies;
any other layout (PyTorch's OIHW) is copied once into (KH, KW, Cout, Cin). No unfolded copy of
the kernel is made: the two products the solver needs are taken block by block,

    G = Y Yᵀ:      G_aa' = Σ_b A_ab A_a'bᵀ     (only a ≥ a': the lower triangle)
    core = Uᵀ Y:   core_b = Σ_a U_aᵀ A_ab      (U_a: the rows of block a of U)

each one matrix product of the channel sizes (2048² blocks for the largest kernels of the
seeds, as fast as one product of the whole unfolding). Reordering rows and columns changes
neither the spectrum of G nor the factorisation: the row order only carries over to U's rows,
which :meth:`KernelBlocks.fold_rows` and :meth:`KernelBlocks.fold_columns` undo.
"""
from __future__ import annotations

import numpy as np

from amct_core.decompose import blas

#: Output channels per tile when a kernel is copied into (KH, KW, Cout, Cin).
COPY_TILE = 128

#: W axes: 0 = Cout, 1 = Cin, 2 = KH, 3 = KW.
_CHANNEL_AXES = (0, 1)
_KERNEL_AXES = (2, 3)


class KernelBlocks:
    """A kernel (Cout, Cin, KH, KW) seen as the channel-block grid of its unfolding.

    ``row_axes`` and ``col_axes`` are (channel axis, kernel axis) of the rows and columns of
    the unfolding, as W axes. The kernel is kept as an array ``stored`` of shape
    (KH, KW, X, Y), (X, Y) = (Cin, Cout) or (Cout, Cin), C-contiguous in ``dtype``: ``kernel``
    itself when it is a transposed view of such an array (a TensorFlow kernel), else a copy.
    """

    def __init__(self, kernel: np.ndarray, row_axes: tuple[int, int],
                 col_axes: tuple[int, int], dtype: np.dtype | type):
        if kernel.ndim != 4:
            raise ValueError(f"a conv kernel must be 4-D, got shape {kernel.shape}")
        if row_axes[0] not in _CHANNEL_AXES or row_axes[1] not in _KERNEL_AXES \
                or col_axes[0] not in _CHANNEL_AXES or col_axes[1] not in _KERNEL_AXES \
                or sorted(row_axes + col_axes) != [0, 1, 2, 3]:
            raise ValueError(f"rows {row_axes} and columns {col_axes} must each pair a "
                             f"channel axis with a kernel axis")
        dtype = np.dtype(dtype)
        hwio = kernel.transpose(2, 3, 1, 0)
        if hwio.flags.c_contiguous and kernel.dtype == dtype:
            self.stored, self._stored_io = hwio, True
        else:
            # (KH, KW, Cout, Cin), a tile of output channels at a time: each tile's reads
            # stay in cache (one transposing copy of the whole kernel takes up to twice as long).
            self.stored = np.empty(kernel.shape[2:] + kernel.shape[:2], dtype=dtype)
            for start in range(0, kernel.shape[0], COPY_TILE):
                self.stored[:, :, start:start + COPY_TILE] = \
                    kernel[start:start + COPY_TILE].transpose(2, 3, 0, 1)
            self._stored_io = False
        self.shape = tuple(int(v) for v in kernel.shape)
        self.row_axes, self.col_axes = row_axes, col_axes
        self.row_channels = self.shape[row_axes[0]]
        self.row_kernel = self.shape[row_axes[1]]
        self.col_channels = self.shape[col_axes[0]]
        self.col_kernel = self.shape[col_axes[1]]

    @property
    def dtype(self) -> np.dtype:
        return self.stored.dtype

    @property
    def num_rows(self) -> int:
        """L, the number of rows of the unfolding."""
        return self.row_channels * self.row_kernel

    def block(self, a: int, b: int) -> np.ndarray:
        """A_ab (row channels × column channels): a view of the stored kernel."""
        h, w = (a, b) if self.row_axes[1] == 2 else (b, a)
        plane = self.stored[h, w]
        # plane is (Cin, Cout) when stored HWIO, else (Cout, Cin); rows are Cin when the row
        # channel axis is 1.
        rows_first = (self.row_axes[0] == 1) == self._stored_io
        return plane if rows_first else plane.T

    def gram(self) -> np.ndarray:
        """G = Y Yᵀ (rows in (a, c) order) as a Fortran-ordered array whose lower triangle is
        set, the upper one left zero (a calloc'ed array: for a large G those pages are never
        touched). NaN and Inf in the kernel give NaN or Inf on G's diagonal."""
        size, n = self.row_channels, self.num_rows
        result = np.zeros((n, n), dtype=self.dtype, order="F")
        # Each product lands in its block of G (BLAS with G's leading dimension): no
        # temporaries, and only the lower triangles of the diagonal blocks are touched.
        for a in range(self.row_kernel):
            rows = slice(a * size, (a + 1) * size)
            for b in range(self.col_kernel):
                blas.gram_into(self.block(a, b).T, result[rows, rows], beta=float(b > 0))
            for other in range(a):
                for b in range(self.col_kernel):
                    blas.matmul_into(self.block(a, b), self.block(other, b).T,
                                     result[rows, other * size:(other + 1) * size],
                                     beta=float(b > 0))
        return result

    def core(self, vectors: np.ndarray) -> np.ndarray:
        """Uᵀ Y for U (L × r, rows in (a, c) order), as an r × K_c × C_c array (row i of Uᵀ Y,
        columns in (b, d) order, is ``[i].reshape(-1)``): a view of a C-ordered
        (K_c, r, C_c) array, one matrix product per column kernel index b, not copied into
        r × M order (the factor folded from it may want that order back, a TensorFlow one
        does)."""
        size, width = self.row_channels, self.col_channels
        rank = vectors.shape[1]
        result = np.empty((self.col_kernel, rank, width), dtype=self.dtype)
        for b in range(self.col_kernel):
            for a in range(self.row_kernel):
                blas.matmul_into(vectors[a * size:(a + 1) * size].T, self.block(a, b),
                                 result[b], beta=float(a > 0))
        return result.transpose(1, 0, 2)

    def fold_rows(self, vectors: np.ndarray) -> np.ndarray:
        """U (rows (a, c)) as (r, row channels, row kernel size), the layout of the factor
        that holds it."""
        rank = vectors.shape[1]
        return vectors.T.reshape(rank, self.row_kernel, self.row_channels).transpose(0, 2, 1)

    def fold_columns(self, core: np.ndarray) -> np.ndarray:
        """The core (r × M with columns in (b, d) order, or :meth:`core`'s r × K_c × C_c) as
        (r, column channels, column kernel size)."""
        rank = core.shape[0]
        return core.reshape(rank, self.col_kernel, self.col_channels).transpose(0, 2, 1)

    def max_abs(self) -> float:
        """The largest |w| of the kernel."""
        return float(np.max(np.abs(self.stored)))

    def all_finite(self) -> bool:
        return all_finite(self.stored)


#: Elements tested at a time by :func:`all_finite`.
FINITE_CHUNK = 1 << 20


def all_finite(values: np.ndarray) -> bool:
    """Whether every element of ``values`` is finite, tested :data:`FINITE_CHUNK` elements at
    a time into one small reused mask: ``np.all(np.isfinite(values))`` makes a mask as large as
    the kernel, 38 MB of fresh memory for a (2048, 2048, 3, 3) kernel (0.14 s against 0.01 s
    on a VM whose fresh memory is slow)."""
    flat = np.asarray(values).reshape(-1)  # a copy only for a non-contiguous view
    mask = np.empty(min(flat.size, FINITE_CHUNK), dtype=bool)
    for start in range(0, flat.size, FINITE_CHUNK):
        part = flat[start:start + FINITE_CHUNK]
        chunk = mask[:part.size]
        np.isfinite(part, out=chunk)
        if not chunk.all():
            return False
    return True
