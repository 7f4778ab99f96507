"""HFMG activation calibration (reference §3.4, ``hfmg_impl.py``).

1. The first batch is counted into ``num_of_bins`` equal bins over its ``[min, max]``. Each
   later batch widens the range to ``[min(min, min_b), max(max, max_b)]``; the batch is counted
   on the widened range and the old histogram re-binned onto it: an old bin lying in one new
   bin adds its count there, one straddling two new bins is split in proportion to the overlap
   (``int(count·fraction)`` to the lower, the rest to the upper bin). Ranges equal within
   FLT_EPSILON add bin by bin.
2. Candidate bin ranges ``[left, right]``: starting from ``[0, nbins−1]``, each step collects
   at least ``ceil(total/1e5)`` counts from the left and then from the right (never crossing)
   and moves in the side that had to give up more bins to do so (the right side on a tie),
   until ``right − left ≤ ceil(nbins/4)``. Every range reached is a candidate.
3. Each candidate's error is the L2 error of mapping the histogram onto ``2^b`` destination
   bins spanning ``[left, right+1)`` (PyTorch ``HistogramObserver``): with bin width ``w``,
   destination width ``d = w·(right − left + 1)/2^b`` and density ``ρ_i = count_i/w``, source bin
   ``i`` spans ``[β, ε) = [(i − left)·w, (i − left + 1)·w)``, and with ``j(v) = clip(floor(v/d),
   0, 2^b − 1)`` and centres ``c_j = (j + ½)·d``, its error is ``ρ_i/3·[((d/2)³ − (β − c_{j(β)})³)
   + (j(ε) − j(β) − 1)·2·(d/2)³ + ((ε − c_{j(ε)})³ + (d/2)³)]`` — the integral of
   ``ρ·(v − centre)³`` pieces, i.e. ``∫ρ·Δ²``. A candidate with ``d < FLT_EPSILON`` scores 0,
   as in the reference. The first minimum wins.
4. The clip range ``[min + left·w, min + (right + 1)·w]`` gives ``(scale, offset)`` by the
   min-max rule (:func:`~amct_core.quant.scale_offset.scale_offset_from_range`).
"""
from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import numpy as np

from amct_core.errors import AmctValueError, QuantizationError
from amct_core.quant.ifmr import as_calibration_data
from amct_core.quant.scale_offset import FLT_EPSILON, check_num_bits, scale_offset_from_range

#: ``num_of_bins`` values the reference accepts (``hfmg_quantize`` in the .cfg proto).
SUPPORTED_NUM_OF_BINS = (1024, 2048, 4096, 8192)
_STEP_DIVISOR = 1e5
_MIN_BIN_RATIO = 4
_BLOCK = 1 << 16


def check_num_of_bins(num_of_bins: int) -> int:
    """``num_of_bins`` as an int, or :class:`AmctValueError` if not 1024/2048/4096/8192."""
    if (isinstance(num_of_bins, bool) or not isinstance(num_of_bins, (int, np.integer))
            or int(num_of_bins) not in SUPPORTED_NUM_OF_BINS):
        raise AmctValueError(
            f"num_of_bins must be one of {list(SUPPORTED_NUM_OF_BINS)}, got {num_of_bins!r}.")
    return int(num_of_bins)


def histogram(x: np.ndarray, low: float, high: float, num_of_bins: int) -> np.ndarray:
    """int64 counts of ``x`` in ``num_of_bins`` equal bins over ``[low, high]``.

    Bin ``floor((x − low)/(high − low)·nbins)`` in float64, the top value in the last bin; with
    ``high == low`` every value is counted in bin 0 (the bin width is 0 then and the bins'
    placement never matters).
    """
    counts = np.zeros(num_of_bins, dtype=np.int64)
    if high <= low:
        counts[0] = x.size
        return counts
    factor = num_of_bins / (high - low)
    size = min(x.size, _BLOCK)
    pos = np.empty(size, dtype=np.float64)
    index = np.empty(size, dtype=np.intp)
    for start in range(0, x.size, _BLOCK):
        block = x[start:start + _BLOCK]
        n = block.size
        np.subtract(block, low, out=pos[:n], dtype=np.float64)
        pos[:n] *= factor
        np.maximum(pos[:n], 0.0, out=pos[:n])
        np.copyto(index[:n], pos[:n], casting="unsafe")     # truncation = floor here
        np.minimum(index[:n], num_of_bins - 1, out=index[:n])
        counts += np.bincount(index[:n], minlength=num_of_bins)
    return counts


def merge_histograms(old_counts: np.ndarray, old_low: float, old_high: float,
                     new_counts: np.ndarray, low: float, high: float) -> np.ndarray:
    """Re-bin ``old_counts`` (over ``[old_low, old_high]``) onto the bins of ``new_counts``
    (over ``[low, high]`` ⊇ the old range) and add them (module docstring, step 1)."""
    bins = new_counts.size
    if (math.isclose(old_low, low, abs_tol=FLT_EPSILON)
            and math.isclose(old_high, high, abs_tol=FLT_EPSILON)):
        return new_counts + old_counts
    width = (high - low) / bins
    old_width = (old_high - old_low) / bins
    index = np.arange(bins, dtype=np.float64)
    lower = old_low + index * old_width
    upper = old_low + (index + 1.0) * old_width
    idx_low = np.clip(np.floor((lower - low) / width), 0, bins - 1).astype(np.intp)
    idx_high = np.clip(np.floor((upper - low) / width), 0, bins - 1).astype(np.intp)
    old = old_counts.astype(np.float64)
    split = idx_low != idx_high
    fraction = np.zeros(bins, dtype=np.float64)
    fraction[split] = ((low + (idx_low[split] + 1.0) * width - lower[split])
                       / (upper[split] - lower[split]))
    to_low = np.where(split, np.floor(old * fraction), old)
    to_high = old - to_low
    merged = (new_counts.astype(np.float64)
              + np.bincount(idx_low, weights=to_low, minlength=bins)
              + np.bincount(idx_high, weights=to_high, minlength=bins))
    return np.round(merged).astype(np.int64)


def hfmg_search_ranges(counts: np.ndarray) -> list[tuple[int, int]]:
    """The candidate ``(left, right)`` bin ranges (module docstring, step 2)."""
    bins = len(counts)
    cumulative = [0, *np.cumsum(counts, dtype=np.int64).tolist()]   # C[i] = Σ counts[:i]
    step = max(math.ceil(cumulative[-1] / _STEP_DIVISOR), 1)
    min_bins = math.ceil(bins / _MIN_BIN_RATIO)
    left, right = 0, bins - 1
    ranges = []
    while right - left > min_bins:
        # left: first t in (left, right) with Σ counts[left:t] ≥ step, else right
        temp_left = bisect_left(cumulative, cumulative[left] + step, left + 1, right)
        # right: last u ≤ right with Σ counts[u:right+1] ≥ step; temp_right = u − 1 ≥ temp_left
        if temp_left < right:
            found = bisect_right(cumulative, cumulative[right + 1] - step, temp_left + 1,
                                 right + 1)
            temp_right = max(temp_left, found - 2)
        else:
            temp_right = right
        if right - temp_right >= temp_left - left:
            right = temp_right
        else:
            left = temp_left
        ranges.append((left, right))
    return ranges


def _cube(values: np.ndarray) -> np.ndarray:
    """``v³`` by multiplication (``np.power`` is ~20× slower for negative bases)."""
    return values * values * values


def _errors_by_source_bin(counts: np.ndarray, ranges: np.ndarray,
                          dst_bins: int) -> np.ndarray:
    """``Σ_j ∫ n(u)·(u − C_j)² du`` in source-bin units, summed source bin by source bin (the
    PyTorch form; cheap when the destination bins outnumber the occupied source bins)."""
    nonzero = np.flatnonzero(counts)
    weight = counts[nonzero].astype(np.float64)
    position = nonzero.astype(np.float64)
    errors = np.empty(len(ranges), dtype=np.float64)
    chunk = max(1, (1 << 16) // max(nonzero.size, 1))
    for first in range(0, len(ranges), chunk):
        left = ranges[first:first + chunk, 0:1]
        right = ranges[first:first + chunk, 1:2]
        dst_width = (right - left + 1.0) / dst_bins
        half_cubed = _cube(dst_width / 2.0)
        begin = position - left
        end = begin + 1.0
        dst_begin = np.clip(np.floor(begin / dst_width), 0, dst_bins - 1)
        dst_end = np.clip(np.floor(end / dst_width), 0, dst_bins - 1)
        delta_begin = begin - (dst_begin + 0.5) * dst_width
        delta_end = end - (dst_end + 0.5) * dst_width
        norm = (half_cubed - _cube(delta_begin)) + (_cube(delta_end) + half_cubed)
        norm += (dst_end - dst_begin - 1.0) * (2.0 * half_cubed)
        errors[first:first + chunk] = (norm * weight).sum(axis=1) / 3.0
    return errors


def _errors_by_destination_bin(counts: np.ndarray, ranges: np.ndarray,
                               dst_bins: int) -> np.ndarray:
    """The same sum, destination bin by destination bin, from exact int64 prefix sums.

    Destination bin ``j`` covers ``[L + j·r, L + (j+1)·r)`` source units (``r = (R−L+1)/D``;
    the first bin reaches down to 0, the last up to ``nbins``) with centre ``C``. Its whole
    source bins ``k`` add ``n_k·((k−C)² + (k−C) + ⅓)``, summed from ``Σn``, ``Σn·k``,
    ``Σn·k²`` re-centred on ``m = round(C)`` in integers; the cut bins at its ends add
    ``n·((b−C)³ − (a−C)³)/3``.
    """
    bins = counts.size
    q0 = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    k = np.arange(bins, dtype=np.int64)
    q1 = np.concatenate(([0], np.cumsum(counts * k, dtype=np.int64)))
    q2 = np.concatenate(([0], np.cumsum(counts * k * k, dtype=np.int64)))
    density = np.concatenate((counts.astype(np.float64), [0.0]))
    j = np.arange(dst_bins, dtype=np.float64)
    errors = np.empty(len(ranges), dtype=np.float64)
    chunk = max(1, (1 << 15) // dst_bins)
    for first in range(0, len(ranges), chunk):
        left = ranges[first:first + chunk, 0:1]
        width = (ranges[first:first + chunk, 1:2] - left + 1.0) / dst_bins
        low = left + j * width
        high = low + width
        low[:, 0] = 0.0
        high[:, -1] = float(bins)
        centre = left + (j + 0.5) * width
        i_a = np.ceil(low).astype(np.int64)
        i_b = np.floor(high).astype(np.int64)
        same = i_a > i_b                      # the destination bin lies inside one source bin
        i_b = np.maximum(i_a, i_b)
        s0 = q0[i_b] - q0[i_a]
        m = np.round(centre).astype(np.int64)
        t1 = q1[i_b] - q1[i_a]
        s1m = t1 - m * s0
        s2m = (q2[i_b] - q2[i_a]) - 2 * m * t1 + m * m * s0
        delta = centre - m
        s0f, s1f, s2f = s0.astype(np.float64), s1m.astype(np.float64), s2m.astype(np.float64)
        whole = s2f - 2.0 * delta * s1f + delta * delta * s0f + s1f - delta * s0f + s0f / 3.0
        a_rel = low - centre
        b_rel = high - centre
        a_cubed, b_cubed = _cube(a_rel), _cube(b_rel)
        low_bin_density = density[np.floor(low).astype(np.int64)]
        cut_low = low_bin_density * (_cube(i_a - centre) - a_cubed) / 3.0
        cut_high = density[i_b] * (b_cubed - _cube(i_b - centre)) / 3.0
        inside = low_bin_density * (b_cubed - a_cubed) / 3.0
        per_bin = np.where(same, inside, whole + cut_low + cut_high)
        errors[first:first + chunk] = per_bin.sum(axis=1)
    return errors


def hfmg_l2_errors(counts: np.ndarray, bin_width: float, ranges: list[tuple[int, int]],
                   dst_bins: int, method: str = "auto") -> np.ndarray:
    """The L2 error of every candidate range (module docstring, step 3), float64.

    ``method`` picks how the (identical) sum is formed: ``"destination"`` bin by destination
    bin, ``"source"`` bin by source bin, or ``"auto"`` (whichever has fewer terms).
    """
    if not ranges or bin_width <= 0.0:
        return np.zeros(len(ranges), dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    bounds = np.asarray(ranges, dtype=np.float64).reshape(-1, 2)
    if method == "auto":
        # a source term costs about a third of a destination term
        method = "source" if 3 * np.count_nonzero(counts) < dst_bins else "destination"
    if method == "source":
        errors = _errors_by_source_bin(counts, bounds, dst_bins)
    elif method == "destination":
        errors = _errors_by_destination_bin(counts, bounds, dst_bins)
    else:
        raise AmctValueError(
            f"method must be 'auto', 'source' or 'destination', got {method!r}.")
    errors *= bin_width * bin_width   # ρ = n/w and (v − c)² = w²(u − C)², dv = w·du
    dst_width = bin_width * (bounds[:, 1] - bounds[:, 0] + 1.0) / dst_bins
    return np.where(dst_width < FLT_EPSILON, 0.0, errors)


@dataclass(frozen=True)
class HfmgSearch:
    """Everything the HFMG search computed: the chosen factors and clip range, the candidate
    ranges and their L2 errors (reference §3.4)."""

    scale: float
    offset: int
    clip_min: float
    clip_max: float
    best_index: int
    ranges: list[tuple[int, int]]
    errors: np.ndarray


class HfmgCalibrator:
    """HFMG over several batches: :meth:`update` merges each batch into the histogram,
    :meth:`result` searches it (reference §3.4; module docstring)."""

    def __init__(self, num_bits: int = 8, symmetric: bool = True,
                 num_of_bins: int = 4096) -> None:
        self.num_bits = check_num_bits(num_bits)
        self.symmetric = bool(symmetric)
        self.num_of_bins = check_num_of_bins(num_of_bins)
        self.reset()

    def reset(self) -> None:
        """Forget the accumulated histogram."""
        self.counts: np.ndarray | None = None
        self.low = 0.0
        self.high = 0.0
        self.num_batches = 0

    def update(self, batch: np.ndarray) -> None:
        """Merge one batch into the histogram."""
        x = as_calibration_data(batch, f"batch {self.num_batches + 1}")
        batch_low, batch_high = float(x.min()), float(x.max())
        if self.counts is None:
            self.low, self.high = batch_low, batch_high
            self.counts = histogram(x, self.low, self.high, self.num_of_bins)
        else:
            low, high = min(self.low, batch_low), max(self.high, batch_high)
            fresh = histogram(x, low, high, self.num_of_bins)
            self.counts = merge_histograms(self.counts, self.low, self.high, fresh, low, high)
            self.low, self.high = low, high
        self.num_batches += 1

    def search(self) -> HfmgSearch:
        """Search the accumulated histogram."""
        if self.counts is None:
            raise QuantizationError(
                "HFMG has no data: call update() with at least one batch before result().")
        width = (self.high - self.low) / self.num_of_bins
        ranges = hfmg_search_ranges(self.counts)
        errors = hfmg_l2_errors(self.counts, width, ranges, 1 << self.num_bits)
        best = int(np.argmin(errors))
        left, right = ranges[best]
        clip_min = self.low + left * width
        clip_max = self.low + (right + 1) * width
        scale, offset = scale_offset_from_range(clip_min, clip_max, self.num_bits,
                                                self.symmetric)
        return HfmgSearch(scale=float(scale), offset=int(offset), clip_min=clip_min,
                          clip_max=clip_max, best_index=best, ranges=ranges, errors=errors)

    def result(self) -> tuple[float, int]:
        """``(scale, offset)``: the scale as a Python float (a float32 value), the offset an
        int (0 when symmetric)."""
        found = self.search()
        return found.scale, found.offset


def hfmg(data: np.ndarray, num_bits: int = 8, symmetric: bool = True,
         num_of_bins: int = 4096) -> tuple[float, int]:
    """HFMG ``(scale, offset)`` of one batch of ``data`` (reference §3.4)."""
    calibrator = HfmgCalibrator(num_bits, symmetric, num_of_bins)
    calibrator.update(data)
    return calibrator.result()
