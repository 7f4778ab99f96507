"""The fake-quant ONNX model (reference §4, "Fake-quant model"), runnable in ONNX Runtime.

For each quantized layer::

    x -> Mul(1/scale_d) -> Round -> Add(offset_d) -> Clip(-2^(b-1), 2^(b-1)-1) -> Sub(offset_d)
      -> layer(weight = int - offset_w as float, bias = round(bias/(scale_w*scale_d)) as float)
      -> Mul(deq_scale = scale_w*scale_d)

``deq_scale`` broadcasts on the output channel axis (``(1, C, 1, 1)`` for a per-channel 2-D
conv, ``(1, C, 1, 1, 1)`` for 3-D, ``(N,)`` for Gemm / MatMul, a scalar per tensor). The
integer arithmetic is exact in float32 as long as the accumulations stay below 2^24, so the
model reproduces the deploy model's integer computation. A layer with DMQ factors s in the record
(``tensor_balance_factor``) reads ``Mul(x, 1/s)`` (``<layer>.dmq_balance``) and its weight is
``W * s`` before quantization (reference §3.4 DMQ). Layers that read the same tensor with
identical activation factors share one quant chain, named after the first of them
(``<layer>.quant.*``). Where a tensor feeds quantized layers and otherwise only MaxPool nodes,
each MaxPool reads a quant chain of its own followed by ``Mul(scale_d)`` (the fake-quant form
of the AscendQuant/AscendAntiQuant pair of the deploy model, ``<maxpool>.quant.*`` and
``<maxpool>.anti_quant``). The output tensor names of all layers are kept.

``convert_qat_model`` passes its activations quantized outside layers explicitly
(:class:`~.common.TensorQuant`, reference §4): each gets the quant chain
``<tensor>.quant.*`` and, for the readers of the restored value, ``Mul(scale_d)``
(``<tensor>.anti_quant``); a graph output that holds the integers reads
``Add(offset_d + shift)`` (``<tensor>.quant.output``) and a ``Cast`` to its INT8 / UINT8 type,
so the model gives the values the source QuantizeLinear gave. The MaxPool rule above then
does not apply (the source model says which tensors are quantized).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from ..graph import NodeInserter, OnnxGraph, copy_model
from .common import (
    ActivationFactors,
    LayerFactors,
    TensorQuant,
    antiquant_targets,
    data_input_groups,
    replaced_weights,
)


def build_fake_quant_model(model: onnx.ModelProto, layers: list[LayerFactors],
                           tensor_quants: Sequence[TensorQuant] | None = None
                           ) -> onnx.ModelProto:
    """A copy of ``model`` with ``layers`` fake-quantized (see the module docstring).
    ``tensor_quants``: the activations quantized outside layers; None applies the MaxPool
    rule instead."""
    result = copy_model(model, replaced_weights(layers))
    graph = OnnxGraph(result)
    inserter = NodeInserter(graph)
    nodes = inserter.by_name()
    for group in data_input_groups(layers).values():
        first = group[0]
        anchor = nodes[first.name]
        source = balanced_input(graph, inserter, anchor, first)
        quantized = add_quant_chain(graph, inserter, anchor, source, first.data,
                                    f"{first.name}.quant")
        for layer in group:
            nodes[layer.name].input[0] = quantized
    for layer in layers:
        rewrite_layer(graph, inserter, nodes[layer.name], layer)
    if tensor_quants is not None:
        for quant in tensor_quants:
            _add_tensor_quant(graph, inserter, nodes, quant)
        inserter.commit()
        return result
    for maxpool_name, layer in antiquant_targets(graph, layers):
        maxpool = nodes[maxpool_name]
        quantized = add_quant_chain(graph, inserter, maxpool, layer.info.input_name,
                                    layer.data, f"{maxpool_name}.quant")
        restored = graph.unique_name(f"{maxpool_name}.anti_quant.output")
        scale = add_constant(graph, f"{maxpool_name}.anti_quant.scale",
                             np.asarray(layer.data.scale, np.float32))
        inserter.before(maxpool, helper.make_node(
            "Mul", [quantized, scale], [restored],
            name=graph.unique_name(f"{maxpool_name}.anti_quant")))
        _replace_input(maxpool, layer.info.input_name, restored)
    inserter.commit()
    return result


def tensor_quant_anchor(inserter: NodeInserter, nodes: dict[str, onnx.NodeProto],
                        quant: TensorQuant) -> onnx.NodeProto | None:
    """The node to insert a tensor's quant nodes before: its first reader (None: the end)."""
    readers = [nodes[name] for name, _ in quant.readers]
    order = {id(node): index for index, node in enumerate(inserter.nodes)}
    return min(readers, key=lambda node: order[id(node)]) if readers else None


def connect_restored(graph: OnnxGraph, inserter: NodeInserter,
                     nodes: dict[str, onnx.NodeProto], quant: TensorQuant,
                     restored: str) -> None:
    """Let the readers of ``quant`` read ``restored``; further restored graph outputs get an
    Identity of it (the first one is ``restored`` itself)."""
    for name, index in quant.readers:
        nodes[name].input[index] = restored
    for output in quant.restored_outputs[1:]:
        inserter.before(None, helper.make_node(
            "Identity", [restored], [output], name=graph.unique_name(f"{output}.identity")))


def _add_tensor_quant(graph: OnnxGraph, inserter: NodeInserter,
                      nodes: dict[str, onnx.NodeProto], quant: TensorQuant) -> None:
    anchor = tensor_quant_anchor(inserter, nodes, quant)
    prefix = f"{quant.tensor}.quant"
    quantized = add_quant_chain(graph, inserter, anchor, quant.tensor, quant.factors, prefix)
    if quant.restores:
        restored = (quant.restored_outputs[0] if quant.restored_outputs
                    else graph.unique_name(f"{quant.tensor}.anti_quant.output"))
        scale = add_constant(graph, f"{quant.tensor}.anti_quant.scale",
                             np.asarray(quant.factors.scale, np.float32))
        inserter.before(anchor, helper.make_node(
            "Mul", [quantized, scale], [restored],
            name=graph.unique_name(f"{quant.tensor}.anti_quant")))
        connect_restored(graph, inserter, nodes, quant, restored)
    if quant.int_output is not None:
        shift = add_constant(graph, f"{prefix}.output.offset", np.asarray(
            quant.factors.offset + quant.int_zero_shift, np.float32))
        shifted = graph.unique_name(f"{prefix}.output.add.output")
        to_type = onnx.TensorProto.UINT8 if quant.int_zero_shift else onnx.TensorProto.INT8
        inserter.before(None, helper.make_node(
            "Add", [quantized, shift], [shifted], name=graph.unique_name(f"{prefix}.output.add")),
            helper.make_node("Cast", [shifted], [quant.int_output], to=to_type,
                             name=graph.unique_name(f"{prefix}.output.cast")))


def add_constant(graph: OnnxGraph, base: str, value: np.ndarray) -> str:
    """Add ``value`` as an initializer named ``base`` (made unique); returns the name."""
    return graph.add_initializer(graph.unique_name(base), value)


def balanced_input(graph: OnnxGraph, inserter: NodeInserter, anchor: onnx.NodeProto,
                   layer: LayerFactors) -> str:
    """The tensor the layer quantizes: its input, or ``Mul(x, 1/s)`` (``<layer>.dmq_balance``)
    when the record has DMQ factors s (reference §3.4 DMQ: X/s and W*s at save time)."""
    if layer.balance is None:
        return layer.info.input_name
    inverse = (1.0 / layer.balance.astype(np.float64)).astype(np.float32)
    factor = add_constant(graph, f"{layer.name}.dmq_balance.scale",
                          inverse.reshape(layer.balance_shape()))
    output = graph.unique_name(f"{layer.name}.dmq_balance.output")
    inserter.before(anchor, helper.make_node("Mul", [layer.info.input_name, factor], [output],
                                             name=graph.unique_name(f"{layer.name}.dmq_balance")))
    return output


def add_quant_chain(graph: OnnxGraph, inserter: NodeInserter, anchor: onnx.NodeProto,
                    tensor: str, factors: ActivationFactors, prefix: str) -> str:
    """Insert ``Mul(1/scale) -> Round -> Add(offset) -> Clip(qmin, qmax) -> Sub(offset)`` on
    ``tensor`` before ``anchor``; returns the output tensor (the integers minus offset, as
    float). Reference §4: the fake-quant form of AscendQuant."""
    reciprocal = np.float32(1.0 / float(factors.scale))
    scale = add_constant(graph, f"{prefix}.scale", np.asarray(reciprocal, np.float32))
    offset = add_constant(graph, f"{prefix}.offset", np.asarray(factors.offset, np.float32))
    low = add_constant(graph, f"{prefix}.min", np.asarray(factors.qmin, np.float32))
    high = add_constant(graph, f"{prefix}.max", np.asarray(factors.qmax, np.float32))
    steps = [("mul", "Mul", [scale]), ("round", "Round", []), ("add", "Add", [offset]),
             ("clip", "Clip", [low, high]), ("sub", "Sub", [offset])]
    current = tensor
    for suffix, op_type, extra in steps:
        output = graph.unique_name(f"{prefix}.{suffix}.output")
        inserter.before(anchor, helper.make_node(
            op_type, [current, *extra], [output], name=graph.unique_name(f"{prefix}.{suffix}")))
        current = output
    return current


def integer_weight_as_float(layer: LayerFactors) -> np.ndarray:
    """``int - offset_w`` as float32, the weight of the fake-quant model."""
    weight = layer.weight_int.astype(np.float64)
    offsets = layer.offset_w.astype(np.float64)
    if offsets.size > 1:
        shape = [1] * weight.ndim
        shape[layer.info.channel_axis] = offsets.size
        offsets = offsets.reshape(shape)
    return (weight - offsets).astype(np.float32)


def set_bias(graph: OnnxGraph, node: onnx.NodeProto, layer: LayerFactors,
             value: np.ndarray) -> None:
    """Give ``node`` the bias ``value`` (one per output channel): the bias initializer is
    replaced in place when only this node reads it, else a new one is added."""
    name = layer.info.bias_name
    if len(graph.consumers_of(name)) == 1 and not graph.is_graph_output(name):
        graph.replace_initializer(name, value)
        drop_value_info(graph, name)
    else:
        node.input[2] = add_constant(graph, f"{layer.name}.bias", value)


def set_weight(graph: OnnxGraph, layer: LayerFactors, value: np.ndarray) -> None:
    """Replace the layer's weight initializer (it is never shared, see layers.py)."""
    graph.replace_initializer(layer.info.weight_name, value)
    drop_value_info(graph, layer.info.weight_name)


def drop_value_info(graph: OnnxGraph, name: str) -> None:
    """Remove a stale value_info entry of ``name`` (its type may have changed)."""
    stale = [v for v in graph.graph.value_info if v.name == name]
    for value in stale:
        graph.graph.value_info.remove(value)


def rename_output(graph: OnnxGraph, node: onnx.NodeProto, base: str) -> tuple[str, str]:
    """Let ``node`` write a new tensor ``base`` (made unique) instead of its first output;
    returns (new name, original name) so a follower can write the original name."""
    original = node.output[0]
    renamed = graph.unique_name(base)
    node.output[0] = renamed
    return renamed, original


def rewrite_layer(graph: OnnxGraph, inserter: NodeInserter, node: onnx.NodeProto,
                  layer: LayerFactors) -> None:
    """Weights and bias of the fake-quant model, and ``Mul(deq_scale)`` on the output."""
    if layer.weight_int is not None:
        set_weight(graph, layer, integer_weight_as_float(layer))
    if layer.bias_int is not None:
        set_bias(graph, node, layer, layer.bias_int.astype(np.float32))
    renamed, original = rename_output(graph, node, f"{layer.name}.dequant.input")
    deq = add_constant(graph, f"{layer.name}.dequant.scale",
                       layer.deq_scale.astype(np.float32).reshape(layer.deq_shape()))
    inserter.after(node, helper.make_node("Mul", [renamed, deq], [original],
                                          name=graph.unique_name(f"{layer.name}.dequant")))


def _replace_input(node: onnx.NodeProto, old: str, new: str) -> None:
    for index, name in enumerate(node.input):
        if name == old:
            node.input[index] = new
