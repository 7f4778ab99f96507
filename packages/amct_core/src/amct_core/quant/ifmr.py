"""IFMR activation calibration (reference §3.4, ``ifmr_impl.py``).

1. The calibration batches are accumulated (flattened, float32).
2. Initial bounds from percentiles, as the reference's top-k: with ``N`` elements,
   ``max_init`` is the k-th largest value for ``k = N − int(max_percentile·N)`` and ``min_init``
   the k-th smallest for ``k = N − int(min_percentile·N)`` (``k = 1`` when
   ``1 − percentile < FLT_EPSILON``, and never below 1). Then ``max_init ← max(max_init, 0)``,
   ``min_init ← min(min_init, 0)``.
3. Candidates ``c_j = base · r_j`` in float32, ``r_j = start + j·step`` for the ratios in
   ``[start, end)`` (end exclusive: 0.7..1.3 by 0.01 gives 60). Symmetric:
   ``base = max(|max_init|, |min_init|)``, clip range ``[−c_j, c_j]`` and
   ``s_j = c_j / (2^(b−1) − 1)`` (``/ 2^(b−1)`` when ``|min_init| > |max_init|``), the rule of
   :func:`~amct_core.quant.scale_offset.symmetric_scale`. Asymmetric: ``base = max_init``,
   clip range ``[min_init, c_j]`` and ``(s_j, o_j)`` from
   :func:`~amct_core.quant.scale_offset.scale_offset_from_range`.
4. The chosen candidate minimises ``SSE_j = Σ_i (round(clip(x_i, lo_j, hi_j)/s_j)·s_j − x_i)²``
   (round half to even; the reference's ``mse_loss`` times N; like the reference, the search
   clips the data, not the integers). The first minimum wins (SSEs within 1e-12 relative of
   the minimum count as equal).
5. ``offset = −round(min/s) − 2^(b−1)`` asymmetric, 0 symmetric.

The search is exact and fast. With ``k_lo = round(lo/s)`` and ``k_hi = round(hi/s)``,
``round(clip(x, lo, hi)/s) = clip(round(x/s), k_lo, k_hi)``, so each candidate splits the
real line at the ``k_hi − k_lo`` edges ``(k + ½)·s`` into segments of constant ``k``, and
``SSE = Σx² + Σ_k (n_k·(k·s)² − 2·k·s·S_k)`` needs only the count ``n_k`` and sum ``S_k`` of
the data in each segment. One bucketing pass over the data (a fine monotone grid; only the
elements in the grid cells that hold an edge are compared with the edges individually) gives
the counts and sums between all candidates' edges at once. The percentile values come from a
pass that keeps only the values beyond thresholds proposed by a strided sample (exact: a
threshold is accepted only when enough values lie beyond it). Edges are exact in float64 (a
float32 scale times a half-integer), and an element lying exactly on an edge goes to the even
``k``, as round-half-to-even does, so each element lands in the segment that exact
arithmetic gives it (the reference's float32 ``x/s`` can differ within an ulp of an edge).
The sums are float64; because ``n·c² − 2·c·S`` cancels against ``Σx²``, candidates whose SSE
is within ``1e-12·Σx²`` of the best are recomputed element by element before choosing. Where
the edges are too many for the data (16 bits, or small inputs) the SSE is computed element by
element in float64, in blocks.

The ratios are ``float32(start + j·step)`` evaluated in float64; ``torch.arange`` in float32
can differ from them by an ulp for some ``j`` (and its length for 0.7..1.3 by 0.01 is 61).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from amct_core.errors import AmctValueError, QuantizationError
from amct_core.quant.scale_offset import (
    FLT_EPSILON,
    check_num_bits,
    scale_offset_from_range,
    symmetric_scale,
)

#: Elements per block of every pass over the data (the temporaries stay in cache).
_SMALL_BLOCK = 1 << 16


def as_calibration_data(data: np.ndarray, name: str = "data") -> np.ndarray:
    """``data`` flattened to float32; raises if it is empty, not numeric, or has NaN/Inf."""
    return _calibration_data(data, name)[0]


def _calibration_data(data: np.ndarray, name: str) -> tuple[np.ndarray, float, float]:
    """:func:`as_calibration_data` and the data's minimum and maximum."""
    array = np.asarray(data)
    if array.dtype.kind not in "fiu" or array.dtype == np.bool_:
        raise AmctValueError(f"{name} must be a real numeric array, got dtype {array.dtype}.")
    if array.size == 0:
        raise AmctValueError(f"{name} is empty; calibration needs at least one value.")
    flat = array.astype(np.float32, copy=False).reshape(-1)
    low, high = flat.min(), flat.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise QuantizationError(
            f"{name} contains NaN or Inf (or values beyond float32); the activations cannot be "
            "calibrated. Check the model and the calibration inputs.")
    return flat, float(low), float(high)


def _check_percentile(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise AmctValueError(f"{name} must be a number in (0, 1], got {value!r}.")
    if not 0.0 < float(value) <= 1.0:
        raise AmctValueError(f"{name} must be in (0, 1], got {value!r}.")
    return float(value)


def candidate_ratios(search_range: Sequence[float] = (0.7, 1.3),
                     search_step: float = 0.01) -> np.ndarray:
    """The float32 ratios ``start + j·step`` in ``[start, end)`` (reference §3.4, step 3).

    The count is ``ceil((end − start)/step)`` computed in float64, as ``torch.arange`` and
    ``numpy.arange`` (and so the reference) compute it: the defaults' quotient is
    60.000000000000014, so there are 61 candidates, 0.70 to 1.30.
    """
    try:
        start, end = (float(v) for v in search_range)
    except (TypeError, ValueError) as err:
        raise AmctValueError(
            f"search_range must be two numbers (start, end), got {search_range!r}.") from err
    if isinstance(search_step, bool):
        raise AmctValueError(f"search_step must be a number > 0, got {search_step!r}.")
    try:
        step = float(search_step)
    except (TypeError, ValueError) as err:
        raise AmctValueError(f"search_step must be a number > 0, got {search_step!r}.") from err
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 < start < end):
        raise AmctValueError(
            f"search_range must satisfy 0 < start < end, got {search_range!r}.")
    if not (math.isfinite(step) and step > 0.0):
        raise AmctValueError(f"search_step must be a number > 0, got {search_step!r}.")
    count = math.ceil((end - start) / step)
    if count > 100_000:
        raise AmctValueError(
            f"search_range {search_range!r} with search_step {search_step!r} gives {count} "
            "candidates; use a larger step.")
    return (start + step * np.arange(count, dtype=np.float64)).astype(np.float32)


def percentile_rank(size: int, percentile: float) -> int:
    """The reference's top-k index ``N − int(p·N)``: 1 when ``1 − p < FLT_EPSILON`` or when the
    formula gives 0."""
    if 1.0 - percentile < FLT_EPSILON:
        return 1
    return max(size - int(percentile * size), 1)


class _Scratch(threading.local):
    """Per-thread scratch arrays kept between calls.

    Calibration calls IFMR once per layer; fresh multi-megabyte temporaries would be
    page-faulted in on every call, which costs as much as the search itself. The arrays are
    reused (grown when too small); nothing returned to a caller is a view of them.
    """

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: type, fill: complex | None = None) -> np.ndarray:
        array = self.arrays.get(name)
        if array is None or array.size < size or array.dtype != dtype:
            array = np.empty(max(size, 1), dtype=dtype)
            self.arrays[name] = array
        view = array[:size]
        if fill is not None:
            view.fill(fill)
        return view


_SCRATCH = _Scratch()


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``Σ a·b`` in float64 without BLAS (a threaded BLAS costs more than it saves on the
    blocks used here, and far more on a busy machine)."""
    return float(np.einsum("i,i->", a, b))


def _blocks(x: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, x.size, _SMALL_BLOCK):
        yield x[start:start + _SMALL_BLOCK]


def order_statistics(x: np.ndarray, ranks: Sequence[int]) -> list[float]:
    """The ``rank``-th smallest values (1-based) of the float32 vector ``x``, exactly."""
    part = np.partition(x, [r - 1 for r in ranks])
    return [float(part[r - 1]) for r in ranks]


def tail_order_statistics(x: np.ndarray, low_rank: int, high_rank: int) -> tuple[float, float]:
    """The ``low_rank``-th smallest and the ``high_rank``-th largest value of ``x``, exactly.

    A strided sample proposes a threshold ``t`` per tail; one pass keeps the values beyond it
    and counts those equal to it. If at least ``k`` values are ``≥ t`` (``≤ t`` for the low
    tail), the k-th largest is among the kept values or is ``t`` itself. A tail that came up
    short is retried with a wider threshold, at worst by a full partition.
    """
    size = x.size
    if size <= 1 << 16 or low_rank + high_rank > size // 8:
        low, high = order_statistics(x, [low_rank, size - high_rank + 1])
        return low, high
    stride = size // (1 << 14)
    sample = x[::stride].copy()
    widen = 2.0
    while True:
        keep = [min(sample.size, math.ceil(widen * rank / stride) + 8)
                for rank in (low_rank, high_rank)]
        sample.partition([keep[0] - 1, sample.size - keep[1]])
        low_cut, high_cut = sample[keep[0] - 1], sample[sample.size - keep[1]]
        lows, highs, low_ties, high_ties = [], [], 0, 0
        for block in _blocks(x):
            lows.append(block[block < low_cut])
            highs.append(block[block > high_cut])
            low_ties += int(np.count_nonzero(block == low_cut))
            high_ties += int(np.count_nonzero(block == high_cut))
        low_tail, high_tail = np.concatenate(lows), np.concatenate(highs)
        short = (low_tail.size + low_ties < low_rank, high_tail.size + high_ties < high_rank)
        if not any(short):
            break
        if any(lack and k == sample.size for lack, k in zip(short, keep, strict=True)):
            low, high = order_statistics(x, [low_rank, size - high_rank + 1])
            return low, high             # the sample cannot widen further
        widen *= 4.0
    low = (np.partition(low_tail, low_rank - 1)[low_rank - 1] if low_tail.size >= low_rank
           else low_cut)
    high = (np.partition(high_tail, high_tail.size - high_rank)[high_tail.size - high_rank]
            if high_tail.size >= high_rank else high_cut)
    return float(low), float(high)


def sum_of_squares(x: np.ndarray) -> float:
    """``Σ x²`` in float64."""
    total = 0.0
    for block in _blocks(x):
        values = block.astype(np.float64)
        total += _dot(values, values)
    return total


def _clip_bounds(lo: np.ndarray, hi: np.ndarray,
                 scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 ``(s, k_lo, k_hi)`` with ``k = round(bound/s)`` (exact for float32 inputs)."""
    s64 = scales.astype(np.float64)
    k_lo = np.round(lo.astype(np.float64) / s64)
    k_hi = np.round(hi.astype(np.float64) / s64)
    return s64, k_lo, k_hi


def _sse_direct(x: np.ndarray, s64: np.ndarray, k_lo: np.ndarray,
                k_hi: np.ndarray) -> np.ndarray:
    """``Σ_i (clip(round(x_i/s), k_lo, k_hi)·s − x_i)²`` per candidate, element by element."""
    sse = np.zeros(s64.size, dtype=np.float64)
    block_size = 1 << 18
    for start in range(0, x.size, block_size):
        block = x[start:start + block_size].astype(np.float64)
        work = np.empty_like(block)
        for j in range(s64.size):
            np.divide(block, s64[j], out=work)
            np.rint(work, out=work)
            np.maximum(work, k_lo[j], out=work)
            np.minimum(work, k_hi[j], out=work)
            work *= s64[j]
            work -= block
            sse[j] += _dot(work, work)
    return sse


def _grid_size(size: int, n_edges: int) -> int:
    """Grid cells for ``size`` values and ``n_edges`` edges: about ``sqrt(size·n_edges)``
    (balancing the per-cell work against the values compared with edges one by one), a power
    of two in [2^12, 2^17] (larger tables fall out of cache)."""
    target = math.sqrt(max(size, 1) * max(n_edges, 1))
    return int(min(1 << 17, max(1 << 12, 1 << int(target).bit_length())))


class _Grid:
    """A fine monotone grid: the cell of ``v`` is ``floor((v − origin)·step_inv)`` in
    float32, clipped to ``[0, cells]``.

    Every operation is monotone, so ``cell(a) < cell(b)`` implies ``a < b`` for any float32
    ``a``, ``b``: all values of a lower cell are below all values of a higher one, and a value
    can equal or straddle an edge only in the edge's own cell. ``clip`` may be off when every
    value lies in ``[low, high]`` (then no cell leaves ``[0, cells]``).
    """

    def __init__(self, low: float, high: float, cells: int, clip: bool = True) -> None:
        self.cells = cells
        self.clip = clip
        self.origin = np.float32(low)
        span = float(np.float32(high)) - float(self.origin)
        step_inv = np.float32(cells / span) if span > 0.0 else np.float32(1.0)
        self.step_inv = step_inv if np.isfinite(step_inv) and step_inv > 0 else np.float32(1.0)

    def cells_of(self, values: np.ndarray, scaled: np.ndarray | None = None,
                 index: np.ndarray | None = None) -> np.ndarray:
        """The cells (intp) of float32 ``values``, optionally into the given buffers."""
        values = np.asarray(values, dtype=np.float32)
        scaled = np.empty(values.shape, dtype=np.float32) if scaled is None else scaled
        index = np.empty(values.shape, dtype=np.intp) if index is None else index
        np.subtract(values, self.origin, out=scaled, dtype=np.float32)
        scaled *= self.step_inv
        if self.clip:
            np.maximum(scaled, np.float32(0.0), out=scaled)
            np.minimum(scaled, np.float32(self.cells), out=scaled)
        np.copyto(index, scaled, casting="unsafe")
        return index


def _choose_grid(x_low: float, x_high: float, edges: np.ndarray, size: int) -> _Grid:
    """A grid over the data and the edges; over the edges alone when outliers would crowd
    the edges into few cells."""
    cells = _grid_size(size, edges.size)
    grid = _Grid(min(x_low, float(edges[0])), max(x_high, float(edges[-1])), cells, clip=False)
    edge_cells = np.clip(grid.cells_of(edges), 0, cells)
    if np.bincount(edge_cells, minlength=cells + 1).max() > 16:
        grid = _Grid(float(edges[0]), float(edges[-1]), cells, clip=True)
    return grid


def _segment_totals(x: np.ndarray, grid: _Grid,
                    edges: np.ndarray) -> tuple[np.ndarray, float]:
    """Float64 sum + 1j·count of the data for every id, and ``Σx²``, in one pass: id ``2r``
    holds the values strictly between edges ``r−1`` and ``r``, id ``2r+1`` those equal to
    edge ``r``.

    Every value is added to its cell (sum and count in one complex accumulator, one scattered
    add); cells without an edge then go whole to their id (``2·(edges in lower cells)``),
    summed by ``reduceat`` over the runs of such cells. The values of cells holding an edge are
    compared with those edges one by one. The data are walked in small blocks, so no temporary
    grows with them (large temporaries cost page faults on every call).
    """
    n_edges = edges.size
    cells = grid.cells
    edge_cells = np.clip(grid.cells_of(edges), 0, cells)     # sorted, as the edges are
    scratch = _SCRATCH
    per_cell = scratch.get("per_cell", cells + 1, np.int32, 0)
    np.add.at(per_cell, edge_cells, 1)
    before = scratch.get("before", cells + 2, np.int32, 0)  # edges in the cells below
    np.cumsum(per_cell, out=before[1:])
    has_edge = np.greater(per_cell, 0, out=scratch.get("has_edge", cells + 1, np.bool_))
    most = int(per_cell.max())
    cell_totals = scratch.get("cell_totals", cells + 1, np.complex128, 0)  # sum + 1j·count
    id_totals = scratch.get("id_totals", 2 * n_edges + 1, np.complex128, 0)
    size = min(x.size, _SMALL_BLOCK)
    scaled = scratch.get("scaled", size, np.float32)
    index = scratch.get("index", size, np.intp)
    pairs = scratch.get("pairs", size, np.complex128)        # value + 1j
    pairs.imag = 1.0
    sum_sq = 0.0
    for block in _blocks(x):
        n = block.size
        cell = grid.cells_of(block, scaled[:n], index[:n])
        values = pairs.real[:n]
        np.copyto(values, block)
        np.add.at(cell_totals, cell, pairs[:n])
        sum_sq += _dot(values, values)
        chosen = np.flatnonzero(has_edge[cell])
        near = values[chosen]
        near_cells = cell[chosen]
        if most <= 8:
            rank = before[near_cells].astype(np.intp)
            first = rank.copy()
            in_cell = per_cell[near_cells]
            for t in range(most):
                rank += (in_cell > t) & (edges[np.minimum(first + t, n_edges - 1)] < near)
        else:
            rank = np.searchsorted(edges, near, side="left")
        ids = 2 * rank + (edges[np.minimum(rank, n_edges - 1)] == near)
        np.add.at(id_totals, ids, near + 1j)
    # Runs of edge-free cells: [0, first occupied), then after each occupied cell up to the
    # next one. ``bounds`` alternates occupied cell / start of the run after it.
    occupied = edge_cells[np.concatenate(([True], edge_cells[1:] != edge_cells[:-1]))]
    bounds = np.empty(2 * occupied.size + 1, dtype=np.intp)
    bounds[0] = 0
    bounds[1::2] = occupied
    bounds[2::2] = occupied + 1
    is_run = np.ones(bounds.size, dtype=bool)
    is_run[1::2] = False
    valid = np.concatenate((bounds[1:] > bounds[:-1], [bounds[-1] <= cells]))
    bounds, is_run = bounds[valid], is_run[valid]         # drop empty runs
    runs = np.add.reduceat(cell_totals, bounds)
    np.add.at(id_totals, 2 * before[bounds[is_run]].astype(np.intp), runs[is_run])
    return id_totals.copy(), sum_sq


def _sse_grid(x: np.ndarray, s64: np.ndarray, k_lo: np.ndarray, k_hi: np.ndarray,
              data_range: tuple[float, float]) -> tuple[np.ndarray, float]:
    """The same SSE as :func:`_sse_direct` from segment counts and sums (module docstring),
    and ``Σx²``."""
    n_cand = s64.size
    n_split = (k_hi - k_lo).astype(np.int64)             # edges of each candidate
    split_start = np.concatenate(([0], np.cumsum(n_split)))
    owner = np.repeat(np.arange(n_cand), n_split)
    k_edge = k_lo[owner] + (np.arange(split_start[-1]) - split_start[owner])
    all_edges = (k_edge + 0.5) * s64[owner]              # exact: float32 × half-integer
    # unique edges and where each candidate's edges are: the candidates' runs are sorted,
    # which a stable (merging) sort exploits
    order = np.argsort(all_edges, kind="stable")
    ordered = all_edges[order]
    new = np.ones(ordered.size, dtype=bool)
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    edges = ordered[new]
    where = np.empty(all_edges.size, dtype=np.intp)
    where[order] = np.cumsum(new) - 1
    if edges.size == 0:
        sum_sq = sum_of_squares(x)
        totals = np.array([sum(float(b.sum(dtype=np.float64)) for b in _blocks(x)) + 1j * x.size,
                           0.0])
    else:
        grid = _choose_grid(data_range[0], data_range[1], edges, x.size)
        totals, sum_sq = _segment_totals(x, grid, edges)
        totals = np.append(totals, 0.0)
    end = totals.size - 1                                # index of the appended zero
    # Segment starts of every candidate: 0, then after each edge (ids < 2u+1 lie below edge
    # u; the point id 2u+1 goes below too when k is even, as x = (k+½)s rounds to even k),
    # then ``end`` so that one reduceat serves all candidates.
    tie_down = np.remainder(k_edge, 2.0) == 0.0
    splits = 2 * where + 1 + tie_down
    n_seg = n_split + 1
    seg_start = np.concatenate(([0], np.cumsum(n_seg + 1)))
    starts = np.full(seg_start[-1], end, dtype=np.int64)
    starts[seg_start[:-1]] = 0
    inner = np.ones(seg_start[-1], dtype=bool)
    inner[seg_start[:-1]] = False
    inner[seg_start[1:] - 1] = False
    starts[inner] = splits
    seg_totals = np.add.reduceat(totals, starts)
    keep = np.ones(seg_start[-1], dtype=bool)
    keep[seg_start[1:] - 1] = False                      # the entries at ``end``
    seg_counts, seg_sums = seg_totals.imag[keep], seg_totals.real[keep]
    seg_owner = np.repeat(np.arange(n_cand), n_seg)
    seg_first = np.concatenate(([0], np.cumsum(n_seg)))
    centres = (k_lo[seg_owner] + (np.arange(seg_first[-1]) - seg_first[seg_owner])) \
        * s64[seg_owner]
    terms = centres * (seg_counts * centres - 2.0 * seg_sums)
    return sum_sq + np.add.reduceat(terms, seg_first[:-1]), sum_sq


def _use_grid(size: int, total_edges: float) -> bool:
    """Bucketing pays off from about 3 values per edge (its fixed cost is a few ms)."""
    return size >= 1 << 14 and 3 * total_edges <= size


def clipped_round_sse(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, scales: np.ndarray,
                      method: str = "auto",
                      data_range: tuple[float, float] | None = None) -> np.ndarray:
    """``SSE_j = Σ_i (round(clip(x_i, lo_j, hi_j)/s_j)·s_j − x_i)²`` for every candidate j.

    ``x`` is a float32 vector; ``lo``, ``hi``, ``scales`` float32 vectors of the candidates
    (``lo ≤ hi``, ``scales > 0``). ``method``: ``"grid"`` (segment sums; the candidates within
    ``1e-12·Σx²`` of the best are then recomputed per element), ``"direct"`` (per element) or
    ``"auto"`` (grid when the data has at least 3 elements per edge). ``data_range``: the
    data's ``(min, max)`` when already known.
    """
    s64, k_lo, k_hi = _clip_bounds(np.asarray(lo), np.asarray(hi), np.asarray(scales))
    if method == "auto":
        method = "grid" if _use_grid(x.size, float(np.sum(k_hi - k_lo))) else "direct"
    if method == "direct":
        return _sse_direct(x, s64, k_lo, k_hi)
    if method == "grid":
        if data_range is None:
            data_range = (float(x.min()), float(x.max()))
        sse, sum_sq = _sse_grid(x, s64, k_lo, k_hi, data_range)
        # The segment sums cancel against Σx² (relative error ~1e-16·Σx²): candidates that
        # close to the best are recomputed element by element, identical ones once.
        close = np.flatnonzero(sse <= sse.min() + 1e-12 * sum_sq)
        if close.size > 1:
            _, first, inverse = np.unique(
                np.stack([s64[close], k_lo[close], k_hi[close]], axis=1), axis=0,
                return_index=True, return_inverse=True)
            picked = close[first]
            exact = _sse_direct(x, s64[picked], k_lo[picked], k_hi[picked])
            sse[close] = exact[inverse.reshape(-1)]
        return sse
    raise AmctValueError(f"method must be 'auto', 'grid' or 'direct', got {method!r}.")


@dataclass(frozen=True)
class IfmrSearch:
    """Everything the IFMR search computed (reference §3.4).

    ``scale``/``offset`` are the chosen factors; ``candidates`` the clip maxima searched,
    ``scales``/``offsets`` their factors and ``mse`` their mean squared errors (float64);
    ``max_init``/``min_init`` the clamped percentile bounds.
    """

    scale: float
    offset: int
    best_index: int
    max_init: float
    min_init: float
    candidates: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray
    mse: np.ndarray


def ifmr_search(data: np.ndarray, num_bits: int = 8, symmetric: bool = True,
                max_percentile: float = 0.999999, min_percentile: float = 0.999999,
                search_range: Sequence[float] = (0.7, 1.3), search_step: float = 0.01,
                method: str = "auto") -> IfmrSearch:
    """Run IFMR on ``data`` and return the whole search (see the module docstring).

    ``method`` chooses how the SSEs are computed (same values): ``"auto"``, ``"grid"`` or
    ``"direct"`` (see :func:`clipped_round_sse`).
    """
    bits = check_num_bits(num_bits)
    max_p = _check_percentile(max_percentile, "max_percentile")
    min_p = _check_percentile(min_percentile, "min_percentile")
    ratios = candidate_ratios(search_range, search_step)
    x, x_low, x_high = _calibration_data(data, "data")
    size = x.size
    largest = max(abs(x_low), abs(x_high))
    if largest * max(float(ratios[-1]), 1.0) * (1.0 + 1e-6) > float(np.finfo(np.float32).max):
        raise QuantizationError(
            f"data holds values up to {largest:.3g}; the IFMR candidates up to "
            f"{float(ratios[-1]):g} times that overflow float32. Check the model and inputs.")
    max_rank = percentile_rank(size, max_p)
    min_rank = percentile_rank(size, min_p)
    min_init, max_init = tail_order_statistics(x, min_rank, max_rank)
    max_init = np.float32(max(max_init, 0.0))
    min_init = np.float32(min(min_init, 0.0))
    if symmetric:
        negative = abs(float(min_init)) > abs(float(max_init))
        base = np.float32(max(abs(float(max_init)), abs(float(min_init))))
        candidates = (ratios * base).astype(np.float32)
        scales = symmetric_scale(candidates, negative, bits)
        offsets = np.zeros(candidates.size, dtype=np.int64)
        lo = -candidates
    else:
        candidates = (ratios * max_init).astype(np.float32)
        scales, offsets = scale_offset_from_range(min_init, candidates, bits, symmetric=False)
        lo = np.full(candidates.size, min_init, dtype=np.float32)
    sse = clipped_round_sse(x, lo, candidates, scales, method, (x_low, x_high))
    best = int(np.flatnonzero(sse <= sse.min() + 1e-12 * abs(sse.min()))[0])
    return IfmrSearch(scale=float(scales[best]), offset=int(offsets[best]), best_index=best,
                      max_init=float(max_init), min_init=float(min_init),
                      candidates=candidates, scales=scales, offsets=offsets, mse=sse / size)


def ifmr(data: np.ndarray, num_bits: int = 8, symmetric: bool = True,
         max_percentile: float = 0.999999, min_percentile: float = 0.999999,
         search_range: Sequence[float] = (0.7, 1.3),
         search_step: float = 0.01) -> tuple[float, int]:
    """IFMR ``(scale, offset)`` of ``data`` (reference §3.4); see the module docstring.

    Returns the scale as a Python float (a float32 value) and the offset as an int (0 when
    ``symmetric``). Raises :class:`AmctValueError` for bad parameters or empty data and
    :class:`QuantizationError` for NaN/Inf data or an unsupported ``num_bits``.
    """
    result = ifmr_search(data, num_bits, symmetric, max_percentile, min_percentile,
                         search_range, search_step)
    return result.scale, result.offset


class IfmrCalibrator:
    """IFMR over several batches: :meth:`update` accumulates, :meth:`result` searches.

    The parameters are those of :func:`ifmr` and are checked when the calibrator is made.
    """

    def __init__(self, num_bits: int = 8, symmetric: bool = True,
                 max_percentile: float = 0.999999, min_percentile: float = 0.999999,
                 search_range: Sequence[float] = (0.7, 1.3), search_step: float = 0.01) -> None:
        self.num_bits = check_num_bits(num_bits)
        self.symmetric = bool(symmetric)
        self.max_percentile = _check_percentile(max_percentile, "max_percentile")
        self.min_percentile = _check_percentile(min_percentile, "min_percentile")
        candidate_ratios(search_range, search_step)
        self.search_range = (float(search_range[0]), float(search_range[1]))
        self.search_step = float(search_step)
        self._batches: list[np.ndarray] = []

    @property
    def num_batches(self) -> int:
        """How many batches :meth:`update` has accumulated."""
        return len(self._batches)

    @property
    def num_elements(self) -> int:
        """How many values have been accumulated."""
        return sum(batch.size for batch in self._batches)

    def update(self, batch: np.ndarray) -> None:
        """Accumulate one batch (copied, flattened to float32)."""
        flat = as_calibration_data(batch, f"batch {len(self._batches) + 1}")
        self._batches.append(np.array(flat, dtype=np.float32, copy=True))

    def reset(self) -> None:
        """Forget the accumulated batches."""
        self._batches = []

    def same_state(self, other: object) -> bool:
        """True when ``other`` is an ``IfmrCalibrator`` with the same parameters that holds
        the same batches, bit for bit: its :meth:`result` is then this one's (for layers that
        read one tensor, whose search needs to run once)."""
        if not isinstance(other, IfmrCalibrator) or self._settings() != other._settings():
            return False
        if len(self._batches) != len(other._batches):
            return False
        pairs = list(zip(self._batches, other._batches, strict=True))
        if any(a.shape != b.shape for a, b in pairs):
            return False
        # a short prefix first: the batches of different tensors differ there already
        return (all(np.array_equal(a[:64].view(np.uint32), b[:64].view(np.uint32))
                    for a, b in pairs)
                and all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in pairs))

    def _settings(self) -> tuple:
        return (self.num_bits, self.symmetric, self.max_percentile, self.min_percentile,
                self.search_range, self.search_step)

    def search(self) -> IfmrSearch:
        """Run the search on all accumulated batches."""
        if not self._batches:
            raise QuantizationError(
                "IFMR has no data: call update() with at least one batch before result().")
        data = self._batches[0] if len(self._batches) == 1 else np.concatenate(self._batches)
        return ifmr_search(data, self.num_bits, self.symmetric, self.max_percentile,
                           self.min_percentile, self.search_range, self.search_step)

    def result(self) -> tuple[float, int]:
        """``(scale, offset)`` from all accumulated batches, as :func:`ifmr` returns them."""
        found = self.search()
        return found.scale, found.offset
