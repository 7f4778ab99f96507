"""Which convs are decomposed, and in which mode (reference §2.1–2.2).

The mode names say which channel axis and which kernel axis are the smaller ones:
``FC``/``SC``: the First (output) or Second (input) channel axis is the smaller (Cout < Cin gives
FC); ``FK``/``SK``: the First (height) or Second (width) kernel axis is the smaller (KH ≤ KW
gives FK). ``UNCHANGE`` means the conv is kept as it is.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence


class DecomposeMode(enum.IntEnum):
    """Decomposition modes, numbered as the reference numbers them."""

    UNCHANGE = 0
    FCFK = 1
    FCSK = 2
    SCFK = 3
    SCSK = 4


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values[0], values[1]


def unchanged_reason(out_channels: int, in_channels: int, kernel_size: int | Sequence[int],
                     stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
                     groups: int = 1) -> str | None:
    """Return why a conv is not decomposed, or ``None`` when it is eligible.

    The conv is left unchanged when any of these holds (reference §2.2): dilation > 1 on
    either axis; groups > 1; min(KH, KW) < 3; max(strideH, strideW) > 2;
    min(KH, KW)·min(Cin, Cout) < 16; min(KH, KW) < 7 and min(Cin, Cout) < 64.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    min_k = min(kh, kw)
    min_c = min(in_channels, out_channels)
    if dh > 1 or dw > 1:
        return f"dilation {(dh, dw)} is larger than 1"
    if groups > 1:
        return f"groups {groups} is larger than 1"
    if min_k < 3:
        return f"kernel {(kh, kw)} is smaller than 3 on one axis"
    if max(sh, sw) > 2:
        return f"stride {(sh, sw)} is larger than 2"
    if min_k * min_c < 16:
        return f"min kernel {min_k} x min channels {min_c} is smaller than 16"
    if min_k < 7 and min_c < 64:
        return f"min kernel {min_k} < 7 and min channels {min_c} < 64"
    return None


def select_mode(out_channels: int, in_channels: int, kernel_size: int | Sequence[int],
                stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
                groups: int = 1) -> DecomposeMode:
    """Return the decomposition mode of a conv, ``UNCHANGE`` when it is not eligible."""
    if unchanged_reason(out_channels, in_channels, kernel_size, stride, dilation, groups):
        return DecomposeMode.UNCHANGE
    kh, kw = _pair(kernel_size, "kernel_size")
    first_channel_smaller = out_channels < in_channels
    first_kernel_smaller = kh <= kw
    if first_channel_smaller:
        return DecomposeMode.FCFK if first_kernel_smaller else DecomposeMode.FCSK
    return DecomposeMode.SCFK if first_kernel_smaller else DecomposeMode.SCSK
