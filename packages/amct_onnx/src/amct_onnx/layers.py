"""Which ONNX nodes can be quantized, and how (reference §3.5).

Quantizable nodes (default ONNX domain):

* ``Conv``: 2-D (4-D weight, any ``group``) or 3-D (5-D weight) with ``dilations[0] == 1``;
* ``ConvTranspose``: 2-D (4-D weight);
* ``Gemm``: constant 2-D ``B`` (``transB`` 0 or 1), ``alpha == beta == 1``, optional constant
  ``C`` of one value per output (shape ``(N,)``, ``(1, N)`` or a single value);
* ``MatMul``: second input a constant 2-D initializer (``K x N``);
* ``AveragePool``: 2-D.

Weights must be float32 initializers used by that node alone: a shared (reused) weight is not
quantized (reference §3.5), and :func:`scan_quant_layers` reports it so the caller can log it.
The layer name is the node name, so nodes must be named uniquely; :func:`assign_node_names`
names unnamed nodes deterministically.

The weight channel axis is the output-channel axis of the weight: 0 for ``Conv`` and ``Gemm``
with ``transB = 1``; 1 for ``ConvTranspose`` and for ``MatMul`` / ``Gemm`` with ``transB = 0``
(``K x N`` weight).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from amct_core.errors import AmctValueError
from amct_core.logger import get_logger
from amct_core.quant.layers import QuantLayer

from .graph import DEFAULT_DOMAINS, OnnxGraph, get_attribute

LOGGER = get_logger("amct_onnx")

#: ONNX op type -> layer kind of :class:`amct_core.quant.layers.QuantLayer`.
OP_KINDS = {"Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "linear",
            "MatMul": "linear", "AveragePool": "avgpool"}

#: The ONNX op types that can be quantized (the layer types of configs and records).
QUANTIZABLE_OP_TYPES = tuple(OP_KINDS)


@dataclass(frozen=True, eq=False)
class QuantLayerInfo:
    """How one quantizable node is quantized.

    ``input_name``/``output_name``: the activation tensor the node reads / writes.
    ``weight_name``/``bias_name``: initializer names (None when absent). ``channel_axis``: the
    output-channel axis of the weight (None for AveragePool). ``spatial_rank``: 2 or 3 for
    convolutions and pooling, 0 for Gemm / MatMul. ``out_channels``: the number of output
    channels (None for AveragePool). ``group``: the ``group`` attribute of convolutions.
    """

    layer: QuantLayer
    node: onnx.NodeProto = field(repr=False)
    input_name: str
    output_name: str
    weight_name: str | None
    bias_name: str | None
    channel_axis: int | None
    spatial_rank: int
    out_channels: int | None
    group: int = 1

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def op_type(self) -> str:
        return self.layer.layer_type

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def output_channel_axis(self) -> int:
        """The channel axis of the node's output: 1 for convolutions and pooling (NC...), the
        last axis for Gemm / MatMul."""
        return -1 if self.kind == "linear" else 1

    def per_output_channel(self, values: np.ndarray) -> np.ndarray:
        """Spread per-weight-channel ``values`` (one per slice of the weight's channel axis,
        or a single value) over the output channels: a single value stays a 1-element array;
        for a grouped ConvTranspose the ``Cout/group`` values repeat for each group."""
        values = np.asarray(values).reshape(-1)
        if values.size == 1 or self.out_channels is None:
            return values
        if values.size == self.out_channels:
            return values
        if (self.kind == "conv_transpose" and self.group > 1
                and values.size * self.group == self.out_channels):
            return np.tile(values, self.group)
        raise AmctValueError(
            f"layer {self.name!r}: {values.size} weight factors do not match its "
            f"{self.out_channels} output channels; the record does not belong to this model")


@dataclass(frozen=True)
class SkippedLayer:
    """A node of a quantizable op type that cannot be quantized, and why."""

    name: str
    op_type: str
    reason: str


@dataclass
class LayerScan:
    """The outcome of :func:`scan_quant_layers`."""

    layers: list[QuantLayerInfo]
    skipped: list[SkippedLayer]

    def by_name(self) -> dict[str, QuantLayerInfo]:
        return {info.name: info for info in self.layers}


def find_quant_layers(model: onnx.ModelProto) -> list[QuantLayerInfo]:
    """The quantizable nodes of ``model`` in graph order (reference §3.5). Nodes that cannot
    be quantized are left out; :func:`scan_quant_layers` says why."""
    return scan_quant_layers(model).layers


def scan_quant_layers(model: onnx.ModelProto) -> LayerScan:
    """Every node of a quantizable op type, sorted into quantizable layers and skipped ones
    (with the reason: shared weight, unsupported attribute, unnamed node ...)."""
    graph = OnnxGraph(model)
    names = Counter(node.name for node in model.graph.node if node.name)
    layers: list[QuantLayerInfo] = []
    skipped: list[SkippedLayer] = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in OP_KINDS or node.domain not in DEFAULT_DOMAINS:
            continue
        label = node.name or f"{node.op_type} node #{index}"
        if not node.name:
            reason = "the node has no name; call assign_node_names() first"
        elif names[node.name] > 1:
            reason = (f"{names[node.name]} nodes are called {node.name!r}; layer names must be "
                      "unique (call assign_node_names())")
        else:
            reason = None
        try:
            info = None if reason else _describe(graph, node)
        except _UnsupportedError as error:
            reason = str(error)
        if reason:
            skipped.append(SkippedLayer(label, node.op_type, reason))
        else:
            layers.append(info)
    return LayerScan(layers, skipped)


def assign_node_names(model: onnx.ModelProto) -> list[str]:
    """Name every unnamed node of the main graph ``<op_type>_<k>`` and rename a node whose
    name an earlier node already has ``<name>_<k>`` (k counts per base name from 0 for unnamed
    nodes, from 1 for repeated names, skipping names of nodes and graph inputs in use).
    Deterministic: graph order decides. Edits ``model`` in place; returns the new names."""
    graph = model.graph
    taken = {node.name for node in graph.node if node.name}
    taken.update(value.name for value in graph.input)
    seen: set[str] = set()
    counters: dict[str, int] = {}
    given: list[str] = []
    for node in graph.node:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or node.op_type
        index = counters.get(base, 1 if node.name else 0)
        while f"{base}_{index}" in taken:
            index += 1
        counters[base] = index + 1
        new_name = f"{base}_{index}"
        if node.name:
            LOGGER.warning("Node name %s is used twice; the later node is called %s.",
                           node.name, new_name)
        node.name = new_name
        taken.add(new_name)
        seen.add(new_name)
        given.append(new_name)
    return given


class _UnsupportedError(Exception):
    """Internal: why a node cannot be quantized."""


def _weight(graph: OnnxGraph, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
    if len(node.input) <= index or not node.input[index]:
        raise _UnsupportedError(f"it has no {what} input")
    name = node.input[index]
    tensor = graph.initializer(name)
    if tensor is None or graph.is_graph_input(name):
        raise _UnsupportedError(f"its {what} {name!r} is not a constant initializer")
    if tensor.data_type != onnx.TensorProto.FLOAT:
        raise _UnsupportedError(f"its {what} {name!r} is "
                           f"{onnx.TensorProto.DataType.Name(tensor.data_type)}; only FLOAT "
                           "weights are quantized")
    users = graph.consumers_of(name)
    if len(users) > 1 or graph.is_graph_output(name):
        others = ", ".join(repr(n.name or n.op_type) for n in users)
        raise _UnsupportedError(f"its {what} {name!r} is shared (used by {others}); shared "
                           "weights are not quantized")
    return graph.initializer_array(name)


def _bias(graph: OnnxGraph, node: onnx.NodeProto, index: int, channels: int) -> str | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    name = node.input[index]
    tensor = graph.initializer(name)
    if tensor is None or graph.is_graph_input(name):
        raise _UnsupportedError(f"its bias {name!r} is not a constant initializer")
    if tensor.data_type != onnx.TensorProto.FLOAT:
        raise _UnsupportedError(f"its bias {name!r} is not FLOAT")
    dims = tuple(tensor.dims)
    size = int(np.prod(dims)) if dims else 1
    if size not in (1, channels) or (size == channels and len(dims) > 1
                                     and dims[-1] != channels):
        raise _UnsupportedError(f"its bias {name!r} of shape {list(dims)} is not one value per "
                           f"output channel ({channels})")
    return name


def _activation_input(graph: OnnxGraph, node: onnx.NodeProto) -> str:
    if not node.input or not node.input[0]:
        raise _UnsupportedError("it has no data input")
    if graph.is_constant(node.input[0]):
        raise _UnsupportedError(f"its data input {node.input[0]!r} is a constant")
    if not node.output or not node.output[0]:
        raise _UnsupportedError("it has no output")
    return node.input[0]


def _describe(graph: OnnxGraph, node: onnx.NodeProto) -> QuantLayerInfo:
    op_type = node.op_type
    layer = QuantLayer(node.name, op_type, OP_KINDS[op_type])
    data = _activation_input(graph, node)
    output = node.output[0]
    if op_type == "AveragePool":
        kernel = get_attribute(node, "kernel_shape", [])
        if len(kernel) != 2:
            raise _UnsupportedError(f"only 2-D AveragePool is quantized (kernel_shape {kernel})")
        return QuantLayerInfo(layer, node, data, output, None, None, None, 2, None)
    if op_type in ("Conv", "ConvTranspose"):
        weight = _weight(graph, node, 1, "weight")
        group = int(get_attribute(node, "group", 1))
        if op_type == "Conv":
            if weight.ndim == 5:
                dilations = get_attribute(node, "dilations", [1, 1, 1])
                if dilations[0] != 1:
                    raise _UnsupportedError(f"3-D Conv is quantized only with dilation_d = 1 "
                                       f"(dilations {list(dilations)})")
            elif weight.ndim != 4:
                raise _UnsupportedError(f"only 2-D and 3-D Conv are quantized (weight of rank "
                                   f"{weight.ndim})")
            channels, axis = weight.shape[0], 0
        else:
            if weight.ndim != 4:
                raise _UnsupportedError(f"only 2-D ConvTranspose is quantized (weight of rank "
                                   f"{weight.ndim})")
            channels, axis = weight.shape[1] * group, 1
        bias = _bias(graph, node, 2, channels)
        return QuantLayerInfo(layer, node, data, output, node.input[1], bias, axis,
                              weight.ndim - 2, int(channels), group)
    weight = _weight(graph, node, 1, "weight")
    if weight.ndim != 2:
        raise _UnsupportedError(f"its weight {node.input[1]!r} has rank {weight.ndim}; only 2-D "
                           "weights are quantized")
    if op_type == "MatMul":
        return QuantLayerInfo(layer, node, data, output, node.input[1], None, 1, 0,
                              int(weight.shape[1]))
    alpha = float(get_attribute(node, "alpha", 1.0))
    beta = float(get_attribute(node, "beta", 1.0))
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if alpha != 1.0 or (has_bias and beta != 1.0):
        raise _UnsupportedError(f"Gemm is quantized only with alpha = beta = 1 (alpha {alpha}, "
                           f"beta {beta})")
    trans_b = int(get_attribute(node, "transB", 0))
    axis = 0 if trans_b else 1
    channels = int(weight.shape[axis])
    bias = _bias(graph, node, 2, channels)
    return QuantLayerInfo(layer, node, data, output, node.input[1], bias, axis, 0, channels)
