"""The QDQ ONNX model: standard QuantizeLinear/DequantizeLinear that ONNX Runtime fuses into
int8 kernels (QLinearConv, QLinearMatMul, QLinearAdd ...). Not an AMCT format (reference §4
describes the fake-quant and deploy models); the factors are the record's (§3.3, §3.4).

Layout, for a quantized layer (8-bit activations, weights of at most 8 bits)::

    x -> QuantizeLinear(scale_d, zp) -> DequantizeLinear(scale_d, zp) ----------.
    W_int8 -> DequantizeLinear(scale_w, offset_w[, axis]) ----------------------+-> layer -> y
    b_int32 -> DequantizeLinear(scale_w*scale_d, 0[, axis 0]) ------------------'

with ``zp = offset_d`` (int8 activations) or ``offset_d + 128`` (uint8; the same integers
shifted, so the model computes the same values). Per-channel weights need opset 13 (``axis``):
an older model is converted with ``onnx.version_converter``; when that fails, per-channel
layers get their weights and bias dequantized offline (float initializers) and a warning.

ONNX Runtime fuses a layer only when its output is quantized as well, so the writer also puts
Q/DQ pairs on the activations around the quantized layers and the ops between them, like
``onnxruntime.quantization.quantize_static``. The *region* is the quantized layers plus the
ops of :data:`EXTRA_OPS` whose data inputs all come from the region (their int8 kernels then
read quantized data) or, for pass-through ops, whose output only the region reads. Tensors
linked by a pass-through op of the region (:data:`PASS_THROUGH_OPS`; its input feeds nothing
else and only the region reads its output) form one *class* and share factors: the input
factors of a quantized layer reading one of them, else the record entry ``tensor:<name>`` of
one of them. :func:`qdq_calibration_tensors` names the tensor per class the calibration should
measure: the last one, e.g. the output of a Relu rather than its input. A class without
factors stays float, so a record without ``tensor:`` entries gives a correct (slower) model.
Quantizing a pass-through op's input with its output's factors is exact (Relu, MaxPool and
reshapes commute with the monotone quantization); a Relu whose factors put the zero point at
the bottom of the range is an identity after the Q/DQ and is removed. A class read by layers
with different factors is split, and each such layer quantizes the raw tensor itself (as do
layers with DMQ factors, which quantize ``x/s``). Graph outputs stay float. Readers outside
the region read the DQ output of tensors produced inside it (as ``quantize_static`` does, so
the producer can be fused; within half a step of the raw value), the raw tensor otherwise.

Layers with other bit widths (INT16 / INT4 activations) keep the fake-quant form (module
``fake_quant``) in this model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from amct_core.errors import AmctValueError
from amct_core.logger import get_logger

from ..graph import DEFAULT_DOMAINS, NodeInserter, OnnxGraph, default_opset, node_inputs
from ..graph import tensor_elem_types as _tensor_elem_types
from ..layers import QuantLayerInfo, scan_quant_layers
from .common import ActivationFactors, LayerFactors
from .fake_quant import (
    add_constant,
    add_quant_chain,
    balanced_input,
    rewrite_layer,
    set_bias,
    set_weight,
)

LOGGER = get_logger("amct_onnx")

#: Ops whose first input and first output are linked: quantizing the input with the output's
#: factors equals quantizing the output (they commute with a monotone rounding).
PASS_THROUGH_OPS = frozenset({"Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze",
                              "Unsqueeze", "Identity"})
#: Ops with int8 kernels in ONNX Runtime whose output has factors of its own.
OWN_FACTOR_OPS = frozenset({"Add", "Concat", "GlobalAveragePool", "AveragePool"})
#: The ops (besides quantized layers) whose activations the QDQ model quantizes.
EXTRA_OPS = PASS_THROUGH_OPS | OWN_FACTOR_OPS

#: Activation integer type of the QDQ model: "int8" (zero point = offset_d) or "uint8"
#: (offset_d + 128). Both compute the same values.
ACTIVATION_TYPES = ("int8", "uint8")
DEFAULT_ACTIVATION_TYPE = "uint8"

#: The opset that allows per-channel DequantizeLinear (the ``axis`` attribute).
PER_CHANNEL_OPSET = 13


def qdq_calibration_tensors(model: onnx.ModelProto,
                            quantized_layer_names: list[str] | None = None,
                            types: dict[str, int] | None = None) -> list[str]:
    """The tensors whose activation factors the QDQ writer wants besides the layers' own (the
    record keys ``tensor:<name>``), in graph order: one per class of linked activations around
    the quantized layers that no quantized layer reads (module docstring). ``quantized_layer_names``
    defaults to every quantizable layer of the model. ``types``: the model's
    ``tensor_elem_types`` when the caller has them."""
    infos = _layer_infos(model, quantized_layer_names)
    plan = _plan(model, infos, types=types)
    with_layer = {plan.find(info.input_name) for info in infos}
    wanted = [plan.representative(root) for root in plan.roots() if root not in with_layer]
    return sorted(wanted, key=plan.position)


def build_qdq_model(model: onnx.ModelProto, layers: list[LayerFactors],
                    tensor_factors: dict[str, ActivationFactors] | None = None,
                    activation_type: str = DEFAULT_ACTIVATION_TYPE) -> onnx.ModelProto:
    """A copy of ``model`` with ``layers`` in QDQ form (module docstring). ``tensor_factors``:
    the record's ``tensor:`` entries by tensor name."""
    if activation_type not in ACTIVATION_TYPES:
        raise AmctValueError(f"activation_type {activation_type!r} is not one of "
                             f"{', '.join(ACTIVATION_TYPES)}")
    tensor_factors = dict(tensor_factors or {})
    qdq_layers = [layer for layer in layers if _native(layer)]
    emulated = [layer for layer in layers if not _native(layer)]
    for layer in emulated:
        LOGGER.warning("QDQ model: layer %s uses INT%d activations / INT%d weights, which "
                       "QuantizeLinear cannot express here; it keeps the fake-quant form.",
                       layer.name, layer.data.num_bits, layer.num_bits_w)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    per_channel = True
    if any(layer.channel_wise for layer in qdq_layers) and \
            default_opset(result) < PER_CHANNEL_OPSET:
        converted, reason = _convert_opset(result, qdq_layers)
        if converted is None:
            per_channel = False
            LOGGER.warning("QDQ model: opset %d has no per-channel DequantizeLinear and the "
                           "conversion to opset %d failed (%s); the per-channel layers get "
                           "float weights (dequantized offline) and run unfused.",
                           default_opset(result), PER_CHANNEL_OPSET, reason)
        else:
            LOGGER.info("QDQ model: converted from opset %d to opset %d for per-channel "
                        "weights.", default_opset(result), PER_CHANNEL_OPSET)
            result = converted

    infos = [layer.info for layer in qdq_layers]
    # layers with DMQ factors quantize x/s, not x: they share no factors with the tensor
    sharing = [layer for layer in qdq_layers if layer.balance is None]
    keys = {layer.name: layer.data.key for layer in sharing}
    plan = _plan(result, infos, keys)
    factors = _class_factors(plan, sharing, tensor_factors)
    aliases = _remove_identity_relus(result, plan, factors, sharing, qdq_layers)
    if aliases:
        # a removed Relu's output factors (measured after the Relu) win over its input's
        remapped = {name: value for name, value in tensor_factors.items() if name not in aliases}
        remapped.update((aliases[name], value) for name, value in tensor_factors.items()
                        if name in aliases)
        tensor_factors = remapped
        plan = _plan(result, infos, keys)
        factors = _class_factors(plan, sharing, tensor_factors)

    graph = OnnxGraph(result)
    inserter = NodeInserter(graph)
    writer = _QdqWriter(graph, inserter, plan, activation_type, per_channel)
    by_name = {layer.name: layer for layer in sharing}
    emulated_names = {layer.name for layer in layers if layer.name not in by_name}
    for root in plan.roots():
        if root in factors:
            for tensor in plan.members(root):
                writer.quantize_tensor(tensor, factors[root], by_name, emulated_names)
    nodes = inserter.by_name()
    for layer in qdq_layers:
        writer.quantize_layer(nodes[layer.name], layer)
    for layer in emulated:
        node = nodes[layer.name]
        source = balanced_input(graph, inserter, node, layer)
        node.input[0] = add_quant_chain(graph, inserter, node, source, layer.data,
                                        f"{layer.name}.quant")
        rewrite_layer(graph, inserter, node, layer)
    inserter.commit()
    return result


def _native(layer: LayerFactors) -> bool:
    """8-bit activations and at most 8-bit weights: expressible with int8 Q/DQ."""
    return layer.data.num_bits == 8 and layer.num_bits_w <= 8


def _layer_infos(model: onnx.ModelProto, names: list[str] | None) -> list[QuantLayerInfo]:
    infos = scan_quant_layers(model).layers
    if names is None:
        return infos
    wanted = set(names)
    return [info for info in infos if info.name in wanted]


# --------------------------------------------------------------------------------------------
# The plan: region, classes of linked tensors, candidate tensors


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def add(self, item: str) -> None:
        self.parent.setdefault(item, item)

    def find(self, item: str) -> str:
        self.add(item)
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, first: str, second: str) -> None:
        self.parent[self.find(second)] = self.find(first)


@dataclass
class _Plan:
    nodes: list[onnx.NodeProto]
    region: set[int]
    candidates: list[str]
    positions: dict[str, int]
    #: layer name -> the tensor it reads now (a removed Relu changes it)
    layer_inputs: dict[str, str] = field(default_factory=dict)
    #: pass-through node index -> (input, output) it links into one class
    links: dict[int, tuple[str, str]] = field(default_factory=dict)
    classes: _UnionFind = field(default_factory=_UnionFind)

    @property
    def linked(self) -> set[int]:
        return set(self.links)

    def find(self, tensor: str) -> str:
        return self.classes.find(tensor)

    def position(self, tensor: str) -> tuple[int, str]:
        return (self.positions.get(tensor, -1), tensor)

    def roots(self) -> list[str]:
        """Class roots of the candidate tensors, in graph order of their first member."""
        return list(dict.fromkeys(self.find(t) for t in self.candidates))

    def members(self, root: str) -> list[str]:
        return [t for t in self.candidates if self.find(t) == root]

    def representative(self, root: str) -> str:
        """The last member in graph order (e.g. a Relu's output rather than its input)."""
        return max(self.members(root), key=self.position)


def _plan(model: onnx.ModelProto, infos: list[QuantLayerInfo],
          layer_keys: dict[str, tuple] | None = None,
          types: dict[str, int] | None = None) -> _Plan:
    """Region, candidate tensors and classes. With ``layer_keys`` (layer name -> activation
    factors key, for the layers that may share factors with their input tensor), a class read
    by layers with different factors is split into single tensors, so that each of those
    layers can quantize the raw float tensor itself. ``types``: the model's
    ``tensor_elem_types`` (computed here when not given)."""
    forbidden: set[int] = set()
    private = set() if layer_keys is None else {i.name for i in infos} - set(layer_keys)
    if types is None:
        types = _tensor_elem_types(model)
    while True:
        plan = _build_plan(model, infos, forbidden, private, types)
        if layer_keys is None:
            return plan
        keys: dict[str, set] = {}
        for name, tensor in plan.layer_inputs.items():
            if tensor in plan.positions and name in layer_keys:
                keys.setdefault(plan.find(tensor), set()).add(layer_keys[name])
        split = {index for index, (_, target) in plan.links.items()
                 if len(keys.get(plan.find(target), ())) > 1}
        if not split:
            return plan
        forbidden |= split


def _build_plan(model: onnx.ModelProto, infos: list[QuantLayerInfo], forbidden: set[int],
                private: set[str], types: dict[str, int]) -> _Plan:
    """``forbidden``: pass-through nodes not to link; ``private``: layers that quantize their
    input with factors of their own (DMQ), which must read a raw float tensor; ``types``: the
    model's ``tensor_elem_types``."""
    graph = OnnxGraph(model)
    nodes = list(model.graph.node)
    producer: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for output in node.output:
            if output:
                producer[output] = index
        for name in dict.fromkeys(node_inputs(node)):
            consumers.setdefault(name, []).append(index)
    layer_names = {info.name for info in infos}
    layer_index = {i for i, node in enumerate(nodes) if node.name in layer_names}
    outputs = set(graph.graph_outputs)

    def is_activation(name: str) -> bool:
        return bool(name) and not graph.is_constant(name) and \
            types.get(name, TensorProto.FLOAT) == TensorProto.FLOAT

    def data_inputs(index: int) -> list[str]:
        node = nodes[index]
        data = list(node.input) if node.op_type in ("Add", "Concat") else list(node.input[:1])
        return [t for t in data if is_activation(t)]

    def activations(index: int) -> list[str]:
        node = nodes[index]
        if index in layer_index:
            return [node.input[0], node.output[0]]
        return data_inputs(index) + [t for t in node.output[:1] if is_activation(t)]

    def is_extra(index: int) -> bool:
        node = nodes[index]
        if node.op_type not in EXTRA_OPS or node.domain not in DEFAULT_DOMAINS:
            return False
        return not (node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1])

    # An extra op joins when all its data inputs come from the region (its int8 kernel then
    # reads quantized data), or, for a pass-through op, when only the region reads its output.
    region = set(layer_index)
    changed = True
    while changed:
        changed = False
        for index in range(len(nodes)):
            if index in region or not is_extra(index):
                continue
            inputs = data_inputs(index)
            forward = bool(inputs) and all(producer.get(t, -1) in region for t in inputs)
            readers = consumers.get(nodes[index].output[0], [])
            backward = (nodes[index].op_type in PASS_THROUGH_OPS and bool(readers)
                        and all(reader in region for reader in readers))
            if forward or backward:
                region.add(index)
                changed = True

    found: dict[str, None] = {}
    for index in sorted(region):
        for tensor in activations(index):
            if tensor not in outputs:
                found.setdefault(tensor)
    candidates = list(found)
    positions = {t: producer.get(t, -1) for t in candidates}
    candidates.sort(key=lambda t: (positions[t], t))
    plan = _Plan(nodes, region, candidates, positions)
    plan.layer_inputs = {nodes[i].name: nodes[i].input[0] for i in sorted(layer_index)}
    members = set(candidates)
    for tensor in candidates:
        plan.classes.add(tensor)
    for index in sorted(region - layer_index - forbidden):
        node = nodes[index]
        if node.op_type not in PASS_THROUGH_OPS:
            continue
        source, target = node.input[0], node.output[0]
        readers = consumers.get(target, ())
        if (source in members and target in members and consumers.get(source) == [index]
                and all(r in region and nodes[r].name not in private for r in readers)):
            plan.classes.union(target, source)
            plan.links[index] = (source, target)
    return plan


def _class_factors(plan: _Plan, layers: list[LayerFactors],
                   tensor_factors: dict[str, ActivationFactors]) -> dict[str, ActivationFactors]:
    """Factors per class root: a quantized layer's input factors (the first layer in graph
    order), else the record's factors of the representative, else of any member."""
    factors: dict[str, ActivationFactors] = {}
    candidates = set(plan.candidates)
    for layer in layers:
        tensor = plan.layer_inputs.get(layer.name)
        if tensor in candidates:
            factors.setdefault(plan.find(tensor), layer.data)
    for root in plan.roots():
        if root in factors:
            continue
        members = sorted(plan.members(root), key=plan.position, reverse=True)
        found = [tensor_factors[t] for t in members if t in tensor_factors]
        if found:
            factors[root] = found[0]
    return factors


def _remove_identity_relus(model: onnx.ModelProto, plan: _Plan,
                           factors: dict[str, ActivationFactors],
                           sharing: list[LayerFactors],
                           layers: list[LayerFactors]) -> dict[str, str]:
    """Remove each linked Relu whose class zero point is the lowest integer: after its input's
    Q/DQ every value is >= 0 and the Relu is an identity. Only when every reader of its output
    will read the DQ output (ops of the region; quantized layers with the class factors, not
    reading x/s for DMQ), as the readers then read its input's DQ output. Returns {removed
    output: input}."""
    aliases: dict[str, str] = {}
    removed: set[int] = set()
    readers: dict[str, list[int]] = {}
    implicit = set()
    for index, node in enumerate(plan.nodes):
        implicit.update(set(node_inputs(node)) - set(node.input))
        for name in set(node.input):
            readers.setdefault(name, []).append(index)
    layer_data = {layer.name: layer.data for layer in sharing}
    layer_names = {layer.name for layer in layers}
    for index in sorted(plan.linked):
        node = plan.nodes[index]
        if node.op_type != "Relu" or node.output[0] in implicit:
            continue
        chosen = factors.get(plan.find(node.input[0]))
        if chosen is None or chosen.offset != chosen.qmin:
            continue
        safe = True
        for reader in readers.get(node.output[0], ()):
            other = plan.nodes[reader]
            if reader not in plan.region:
                safe = False
            elif other.name in layer_names and (other.name not in layer_data
                                                or other.input[0] != node.output[0]
                                                or layer_data[other.name].key != chosen.key):
                safe = False
        if safe:
            aliases[node.output[0]] = node.input[0]
            removed.add(index)
    if not aliases:
        return aliases

    def resolve(name: str) -> str:
        while name in aliases:
            name = aliases[name]
        return name

    kept = [node for index, node in enumerate(plan.nodes) if index not in removed]
    for node in kept:
        for position, name in enumerate(node.input):
            if name in aliases:
                node.input[position] = resolve(name)
    copies = []
    for node in kept:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del model.graph.node[:]
    model.graph.node.extend(copies)
    return {name: resolve(name) for name in aliases}


def _convert_opset(model: onnx.ModelProto, layers: list[LayerFactors]
                   ) -> tuple[onnx.ModelProto | None, str]:
    """``model`` converted to opset 13 (None and the reason when that fails or changes a
    quantized layer's node, weight or tensors)."""
    try:
        converted = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
        onnx.checker.check_model(converted)
    except Exception as error:  # the converter raises several types
        return None, f"{type(error).__name__}: {error}"
    nodes = {node.name: node for node in converted.graph.node}
    initializers = {tensor.name for tensor in converted.graph.initializer}
    for layer in layers:
        node = nodes.get(layer.name)
        info = layer.info
        if (node is None or node.op_type != info.op_type or node.input[0] != info.input_name
                or node.output[0] != info.output_name
                or (info.weight_name and info.weight_name not in initializers)):
            return None, f"the converter changed layer {layer.name!r}"
    return converted, ""


# --------------------------------------------------------------------------------------------
# Writing


class _QdqWriter:
    def __init__(self, graph: OnnxGraph, inserter: NodeInserter, plan: _Plan,
                 activation_type: str, per_channel: bool) -> None:
        self.graph = graph
        self.inserter = inserter
        self.per_channel = per_channel
        self.uint8 = activation_type == "uint8"
        nodes = inserter.nodes
        if len(nodes) != len(plan.nodes):
            raise AmctValueError("internal error: the QDQ plan is out of date")
        self.region_ids = {id(nodes[index]) for index in plan.region}
        #: DQ outputs of the activation Q/DQ pairs written so far
        self.restored: set[str] = set()
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in nodes:
            for output in node.output:
                if output:
                    self.producers[output] = node
            for name in dict.fromkeys(node_inputs(node)):
                self.consumers.setdefault(name, []).append(node)

    # -- activations ------------------------------------------------------------------------
    def _in_region(self, node: onnx.NodeProto) -> bool:
        return id(node) in self.region_ids

    def _activation_constants(self, base: str, factors: ActivationFactors) -> tuple[str, str]:
        scale = add_constant(self.graph, f"{base}_scale", np.asarray(factors.scale, np.float32))
        if self.uint8:
            zero = np.asarray(factors.offset + 128, np.uint8)
        else:
            zero = np.asarray(factors.offset, np.int8)
        return scale, add_constant(self.graph, f"{base}_zero_point", zero)

    def _qdq_pair(self, tensor: str, factors: ActivationFactors, base: str
                  ) -> tuple[str, list[onnx.NodeProto]]:
        scale, zero = self._activation_constants(base, factors)
        quantized = self.graph.unique_name(f"{base}_quantized")
        restored = self.graph.unique_name(f"{base}_dequantized")
        nodes = [
            helper.make_node("QuantizeLinear", [tensor, scale, zero], [quantized],
                             name=self.graph.unique_name(f"{base}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [quantized, scale, zero], [restored],
                             name=self.graph.unique_name(f"{base}_DequantizeLinear")),
        ]
        return restored, nodes

    def quantize_tensor(self, tensor: str, factors: ActivationFactors,
                        layers: dict[str, LayerFactors], emulated: set[str]) -> None:
        """Q/DQ on ``tensor``; its readers move to the DQ output (see module docstring)."""
        producer = self.producers.get(tensor)
        from_region = producer is not None and self._in_region(producer)
        readers = []
        for consumer in self.consumers.get(tensor, ()):
            layer = layers.get(consumer.name)
            if consumer.name in emulated:
                continue
            if layer is not None and tensor == consumer.input[0]:
                if layer.data.key != factors.key:
                    continue  # the layer gets a Q/DQ pair with its own factors
            elif not (self._in_region(consumer) or from_region):
                continue
            readers.append(consumer)
        if not readers:
            return
        restored, nodes = self._qdq_pair(tensor, factors, tensor)
        self.restored.add(restored)
        if producer is not None:
            self.inserter.after(producer, *nodes)
        else:
            self.inserter.after(None, *nodes)
        for consumer in readers:
            for position, name in enumerate(consumer.input):
                if name == tensor:
                    consumer.input[position] = restored

    # -- layers -----------------------------------------------------------------------------
    def quantize_layer(self, node: onnx.NodeProto, layer: LayerFactors) -> None:
        if node.input[0] not in self.restored:  # no shared Q/DQ with the same factors
            source = balanced_input(self.graph, self.inserter, node, layer)
            restored, nodes = self._qdq_pair(source, layer.data, f"{layer.name}.input")
            self.inserter.before(node, *nodes)
            node.input[0] = restored
        if layer.weight_int is None:
            return
        if layer.channel_wise and not self.per_channel:
            self._float_weights(node, layer)
            return
        graph = self.graph
        info = layer.info
        weight_type = np.int8
        set_weight(graph, layer, layer.weight_int.astype(weight_type))
        axis = {"axis": info.channel_axis} if layer.channel_wise else {}
        shape = [] if not layer.channel_wise else [layer.scale_w.size]
        scale = add_constant(graph, f"{info.weight_name}_scale",
                             layer.scale_w.astype(np.float32).reshape(shape))
        offsets = np.broadcast_to(layer.offset_w, layer.scale_w.shape).reshape(shape)
        zero = add_constant(graph, f"{info.weight_name}_zero_point", offsets.astype(weight_type))
        restored = graph.unique_name(f"{info.weight_name}_dequantized")
        self.inserter.before(node, helper.make_node(
            "DequantizeLinear", [info.weight_name, scale, zero], [restored],
            name=graph.unique_name(f"{layer.name}.weight_DequantizeLinear"), **axis))
        node.input[1] = restored
        if layer.bias_int is None:
            return
        set_bias(graph, node, layer, layer.bias_int.astype(np.int32))
        bias_name = node.input[2]
        per_channel_bias = layer.deq_scale.size > 1
        bias_shape = [layer.deq_scale.size] if per_channel_bias else []
        bias_scale = add_constant(graph, f"{bias_name}_scale",
                                  layer.deq_scale.astype(np.float32).reshape(bias_shape))
        bias_zero = add_constant(graph, f"{bias_name}_zero_point",
                                 np.zeros(bias_shape, np.int32))
        bias_restored = graph.unique_name(f"{bias_name}_dequantized")
        self.inserter.before(node, helper.make_node(
            "DequantizeLinear", [bias_name, bias_scale, bias_zero], [bias_restored],
            name=graph.unique_name(f"{layer.name}.bias_DequantizeLinear"),
            **({"axis": 0} if per_channel_bias else {})))
        node.input[2] = bias_restored

    def _float_weights(self, node: onnx.NodeProto, layer: LayerFactors) -> None:
        """Opset < 13 without conversion: the dequantized weights and bias as float."""
        info = layer.info
        weight = layer.weight_int.astype(np.float64)
        shape = [1] * weight.ndim
        shape[info.channel_axis] = layer.scale_w.size
        offsets = np.broadcast_to(layer.offset_w, layer.scale_w.shape).reshape(shape)
        scales = layer.scale_w.astype(np.float64).reshape(shape)
        set_weight(self.graph, layer, ((weight - offsets) * scales).astype(np.float32))
        if layer.bias_int is not None:
            bias = layer.bias_int.astype(np.float64) * layer.deq_scale.astype(np.float64)
            set_bias(self.graph, node, layer, bias.astype(np.float32))
