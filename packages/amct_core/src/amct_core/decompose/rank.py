"""The rank rule of the spatial SVD (reference §2.3).

    sizeL = min(KH, KW)·min(Cin, Cout)
    r_evbmf = EVBMF rank of the L×M unfolding (all its singular values)
    divisor = 4 if min(Cin, Cout) ≥ 256 else 6
    r = clip(r_evbmf, sizeL // (divisor + 1), sizeL // divisor)
    r = make_divisible(r, 16)            # max(16, ((r + 8) // 16)·16), +16 if below 0.9·r
    r = min(r, sizeL)

so r is about sizeL/6 (sizeL/4 for wide convs): 64 for a 128→128 3×3 conv.
"""
from __future__ import annotations

import numpy as np

from amct_core.decompose.evbmf import evbmf_rank


def make_divisible(value: int, divisor: int = 16, min_value: int = 16) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``), never
    going more than 10 % below it."""
    new_value = max(min_value, ((int(value) + divisor // 2) // divisor) * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def rank_bounds(out_channels: int, in_channels: int,
                kernel_size: tuple[int, int]) -> tuple[int, int]:
    """Return the (lowest, highest) rank the clamp allows before ``make_divisible``."""
    min_c = min(out_channels, in_channels)
    size_l = min(kernel_size) * min_c
    divisor = 4 if min_c >= 256 else 6
    return size_l // (divisor + 1), size_l // divisor


def select_rank(singular_values: np.ndarray, out_channels: int, in_channels: int,
                kernel_size: tuple[int, int]) -> tuple[int, int]:
    """Return ``(rank, evbmf_rank)`` for a conv from all singular values of its unfolding."""
    min_c = min(out_channels, in_channels)
    size_l = min(kernel_size) * min_c
    size_m = max(kernel_size) * max(out_channels, in_channels)
    raw = evbmf_rank(singular_values, size_l, size_m)
    low, high = rank_bounds(out_channels, in_channels, kernel_size)
    rank = make_divisible(int(np.clip(raw, low, high)))
    return min(rank, size_l), raw
