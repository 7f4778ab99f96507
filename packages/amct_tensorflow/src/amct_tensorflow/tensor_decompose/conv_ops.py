"""Conv2D ops of a ``tf.Graph`` as the core's decomposition sees them.

TensorFlow keeps a conv kernel as (KH, KW, Cin, Cout) ("HWIO") and the per-axis attributes
(strides, dilations, explicit paddings) in data-format order; the core works on
(Cout, Cin, KH, KW) kernels and (H, W) pairs. This module only translates between the two and
finds which variable holds each conv's kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from amct_core.decompose import DecomposeMode, SpatialSvdFactors, select_mode
from amct_core.decompose.applicability import unchanged_reason
from amct_core.decompose.change_file import ConvChange, SplitConv

DECOMPOSABLE_DTYPES = (tf.float16, tf.float32, tf.float64)
_VARIABLE_OPS = {"VariableV2", "Variable", "VarHandleOp"}
_PASS_THROUGH_OPS = {"Identity", "ReadVariableOp"}


@dataclass
class ConvSite:
    """One Conv2D op with its kernel variable and attributes."""

    op: tf.Operation
    kernel: str | None  # name of the variable op holding the kernel, None if not a variable
    kernel_shape: tuple[int, ...] | None
    data_format: str
    strides: tuple[int, ...]
    padding: str
    explicit_paddings: tuple[int, ...]
    dilations: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def dtype(self) -> tf.DType:
        return self.op.get_attr("T")

    def hw(self, values: tuple[int, ...]) -> tuple[int, int]:
        """(H, W) entries of a data-format-ordered 4-list."""
        return (values[1], values[2]) if self.data_format == "NHWC" else (values[2], values[3])

    def input_channels(self) -> int | None:
        shape = self.op.inputs[0].shape
        if shape.rank != 4:
            return None
        return shape[3] if self.data_format == "NHWC" else shape[1]

    def unchanged_reason(self) -> str | None:
        """Why this conv is not decomposed, ``None`` when it is eligible (reference §2.2)."""
        if self.kernel is None:
            return "its kernel is not a variable"
        if self.kernel_shape is None or len(self.kernel_shape) != 4:
            return f"its kernel shape {self.kernel_shape} is not 4-D"
        if self.op._control_flow_context is not None:
            return "it is inside a control-flow construct (while loop or cond)"
        kh, kw, cin, cout = self.kernel_shape
        in_channels = self.input_channels()
        if in_channels is None:
            return "the channel count of its input is unknown"
        if in_channels % cin:
            return f"its input has {in_channels} channels but the kernel expects {cin}"
        return unchanged_reason(cout, in_channels, (kh, kw), self.hw(self.strides),
                                self.hw(self.dilations), in_channels // cin)

    def mode(self) -> DecomposeMode:
        kh, kw, cin, cout = self.kernel_shape
        return select_mode(cout, cin, (kh, kw), self.hw(self.strides), self.hw(self.dilations))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def kernel_variable_name(conv: tf.Operation) -> str | None:
    """Name of the variable op whose value is the conv's filter, following Identity/reads."""
    tensor = conv.inputs[1]
    for _ in range(8):
        op = tensor.op
        if op.type in _VARIABLE_OPS:
            return op.name
        if op.type not in _PASS_THROUGH_OPS or not op.inputs:
            return None
        tensor = op.inputs[0]
    return None


def conv_sites(graph: tf.Graph) -> list[ConvSite]:
    """Every Conv2D op of ``graph``, in graph order."""
    sites = []
    for op in graph.get_operations():
        if op.type != "Conv2D":
            continue
        kernel = kernel_variable_name(op)
        shape = op.inputs[1].shape
        sites.append(ConvSite(
            op=op, kernel=kernel,
            kernel_shape=tuple(int(d) for d in shape) if shape.is_fully_defined() else None,
            data_format=_text(op.get_attr("data_format")),
            strides=tuple(op.get_attr("strides")), padding=_text(op.get_attr("padding")),
            explicit_paddings=tuple(op.get_attr("explicit_paddings")),
            dilations=tuple(op.get_attr("dilations"))))
    return sites


def hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    """(KH, KW, Cin, Cout) -> (Cout, Cin, KH, KW), the core's layout."""
    return np.transpose(kernel, (3, 2, 0, 1))


def oihw_to_hwio(kernel: np.ndarray) -> np.ndarray:
    """(Cout, Cin, KH, KW) -> (KH, KW, Cin, Cout), TensorFlow's layout."""
    return np.transpose(kernel, (2, 3, 1, 0))


def _axis_attrs(site: ConvSite, along_h: bool) -> tuple[tuple[int, ...], tuple[int, ...],
                                                          tuple[int, ...]]:
    """Strides, dilations and explicit paddings of the split conv that spans H (or W).

    The split conv keeps the original value on its own kernel axis and gets stride 1,
    dilation 1 and no padding on the other (reference §2.1). SAME and VALID paddings stay as
    they are: SAME pads each axis from that axis's own size, kernel and stride, so the two
    convs together pad exactly as the original did.
    """
    h_index, w_index = (1, 2) if site.data_format == "NHWC" else (2, 3)
    other = w_index if along_h else h_index
    strides, dilations = list(site.strides), list(site.dilations)
    strides[other], dilations[other] = 1, 1
    pads: list[int] = []
    if site.padding == "EXPLICIT":
        pads = list(site.explicit_paddings)
        pads[2 * other], pads[2 * other + 1] = 0, 0
    return tuple(strides), tuple(dilations), tuple(pads)


def split_scope(conv_name: str, part: str) -> str:
    """Name scope of a split conv: ``<conv>/decom_first`` or ``<conv>/decom_last``."""
    return f"{conv_name}/{part}"


def make_change(site: ConvSite, factors: SpatialSvdFactors, variable_owner: str
                ) -> tuple[ConvChange, np.ndarray, np.ndarray]:
    """The change record of ``site`` and its two HWIO factor kernels.

    ``variable_owner`` is the conv whose name scope holds the factor variables: the conv
    itself, or the first conv of a group that shares one kernel variable. ``factors`` may be
    in either layout of the core (HWIO as :func:`factorize_kernel` gives it for TensorFlow).
    """
    if factors.layout == "HWIO":
        first, last = factors.first, factors.last
    else:
        first, last = oihw_to_hwio(factors.first), oihw_to_hwio(factors.last)
    first_along_h = first.shape[1] == 1  # (kh, 1, Cin, r): the first conv spans H
    parts = []
    for part, kernel, along_h in (("decom_first", first, first_along_h),
                                  ("decom_last", last, not first_along_h)):
        strides, dilations, pads = _axis_attrs(site, along_h)
        scope = split_scope(site.name, part)
        parts.append(SplitConv(op=f"{scope}/{part}",
                               variable=f"{split_scope(variable_owner, part)}/kernel",
                               shape=tuple(int(d) for d in kernel.shape), strides=strides,
                               explicit_paddings=pads, dilations=dilations))
    change = ConvChange(conv=site.name, kernel=site.kernel, kernel_shape=site.kernel_shape,
                        dtype=site.dtype.name, data_format=site.data_format,
                        strides=site.strides, padding=site.padding,
                        explicit_paddings=site.explicit_paddings, dilations=site.dilations,
                        mode=int(factors.mode), rank=int(factors.rank),
                        first=parts[0], last=parts[1])
    return change, first, last
