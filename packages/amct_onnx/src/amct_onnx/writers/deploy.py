"""The deploy ONNX model for the Ascend ATC tool (reference §4, "Deploy model").

Custom nodes are in the default (empty) ONNX domain. For each quantized layer::

    x -> AscendQuant "<layer>.quant" (scale = 1/scale_d, offset = offset_d: FLOAT;
                                      dst_type = "INT8" | "INT4" | "INT16": STRING)
      -> layer (INT8 weight: the quantized integers; INT32 bias: round(bias/(scale_w*scale_d)))
      -> AscendDequant "<layer>.dequant" (input 1: UINT64 initializer "<layer>.dequant.param",
                                          attribute dtype = 0, float32 output)

Each element of ``<layer>.dequant.param`` packs ``deq_scale = scale_w * scale_d`` (float32 bit
pattern, bits 0-31) and ``offset_w`` (uint8, bits 40-47), one per output channel, or one when
per tensor (``pack_dequant_param``). Layers reading one tensor with identical factors share one
AscendQuant, named after the first. A MaxPool that reads a tensor which otherwise feeds only
quantized layers (one set of factors) gets ``AscendQuant "<maxpool>.quant"`` +
``AscendAntiQuant "<maxpool>.anti_quant"`` (scale = scale_d, offset = offset_d, dst_type), as
AMCT's multi-output quant optimization does. DMQ factors s (reference §3.4) give a standard
``Mul(x, 1/s)`` before the AscendQuant and ``W * s`` weights. AveragePool layers have no
weight: their dequant param packs ``deq_scale = scale_d``. The model does not run in ONNX Runtime.

``convert_qat_model`` passes its activations quantized outside layers explicitly
(:class:`~.common.TensorQuant`, reference §4): each gets ``AscendQuant "<tensor>.quant"`` and,
for the readers of the restored value, ``AscendAntiQuant "<tensor>.anti_quant"``; a graph
output that holds the integers is the AscendQuant's INT8 output (a UINT8 source output becomes
INT8: the same values minus 128). The MaxPool rule above then does not apply.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from amct_core.quant.dequant_param import pack_dequant_param

from ..graph import NodeInserter, OnnxGraph, copy_model
from .common import (
    ActivationFactors,
    LayerFactors,
    TensorQuant,
    antiquant_targets,
    data_input_groups,
    replaced_weights,
)
from .fake_quant import (
    add_constant,
    balanced_input,
    connect_restored,
    rename_output,
    set_bias,
    set_weight,
    tensor_quant_anchor,
)

#: AscendDequant ``dtype`` attribute: 0 = float32, 1 = float16 (reference §4).
DEQUANT_DTYPE_FLOAT32 = 0


def build_deploy_model(model: onnx.ModelProto, layers: list[LayerFactors],
                       tensor_quants: Sequence[TensorQuant] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with ``layers`` in the deploy layout (module docstring).
    ``tensor_quants``: the activations quantized outside layers; None applies the MaxPool
    rule instead."""
    result = copy_model(model, replaced_weights(layers))
    graph = OnnxGraph(result)
    inserter = NodeInserter(graph)
    nodes = inserter.by_name()
    for group in data_input_groups(layers).values():
        first = group[0]
        source = balanced_input(graph, inserter, nodes[first.name], first)
        quantized = _add_quant(graph, inserter, nodes[first.name], source, first.data,
                               first.name)
        for layer in group:
            nodes[layer.name].input[0] = quantized
    for layer in layers:
        _rewrite_layer(graph, inserter, nodes[layer.name], layer)
    if tensor_quants is not None:
        for quant in tensor_quants:
            _add_tensor_quant(graph, inserter, nodes, quant)
        inserter.commit()
        return result
    for maxpool_name, layer in antiquant_targets(graph, layers):
        maxpool = nodes[maxpool_name]
        quantized = _add_quant(graph, inserter, maxpool, layer.info.input_name, layer.data,
                               maxpool_name)
        restored = graph.unique_name(f"{maxpool_name}.anti_quant.output")
        inserter.before(maxpool, _custom_node(
            "AscendAntiQuant", [quantized], [restored], graph.unique_name(
                f"{maxpool_name}.anti_quant"),
            scale=float(layer.data.scale), offset=float(layer.data.offset),
            dst_type=dst_type(layer.data)))
        for index, name in enumerate(maxpool.input):
            if name == layer.info.input_name:
                maxpool.input[index] = restored
    inserter.commit()
    return result


def _add_tensor_quant(graph: OnnxGraph, inserter: NodeInserter,
                      nodes: dict[str, onnx.NodeProto], quant: TensorQuant) -> None:
    anchor = tensor_quant_anchor(inserter, nodes, quant)
    quantized = _add_quant(graph, inserter, anchor, quant.tensor, quant.factors, quant.tensor,
                           output=quant.int_output)
    if quant.int_output is not None:
        for value in graph.graph.output:
            if value.name == quant.int_output:
                value.type.tensor_type.elem_type = onnx.TensorProto.INT8
    if not quant.restores:
        return
    restored = (quant.restored_outputs[0] if quant.restored_outputs
                else graph.unique_name(f"{quant.tensor}.anti_quant.output"))
    inserter.before(anchor, _custom_node(
        "AscendAntiQuant", [quantized], [restored],
        graph.unique_name(f"{quant.tensor}.anti_quant"), scale=float(quant.factors.scale),
        offset=float(quant.factors.offset), dst_type=dst_type(quant.factors)))
    connect_restored(graph, inserter, nodes, quant, restored)


def dst_type(factors: ActivationFactors) -> str:
    """The ``dst_type`` string of AscendQuant / AscendAntiQuant (``INT8``, ``INT4`` ...)."""
    return f"INT{factors.num_bits}"


def _add_quant(graph: OnnxGraph, inserter: NodeInserter, anchor: onnx.NodeProto | None,
               tensor: str, factors: ActivationFactors, layer_name: str,
               output: str | None = None) -> str:
    output = output or graph.unique_name(f"{layer_name}.quant.output")
    inserter.before(anchor, _custom_node(
        "AscendQuant", [tensor], [output], graph.unique_name(f"{layer_name}.quant"),
        scale=float(np.float32(1.0 / float(factors.scale))), offset=float(factors.offset),
        dst_type=dst_type(factors)))
    return output


def _custom_node(op_type: str, inputs: list[str], outputs: list[str], name: str,
                 **attributes) -> onnx.NodeProto:
    """A default-domain node with its attributes in the given order (helper.make_node
    sorts them by name)."""
    node = helper.make_node(op_type, inputs, outputs, name=name)
    node.attribute.extend(helper.make_attribute(key, value)
                          for key, value in attributes.items())
    return node


def _weight_dtype(num_bits: int) -> type:
    return np.int8 if num_bits <= 8 else np.int16


def _rewrite_layer(graph: OnnxGraph, inserter: NodeInserter, node: onnx.NodeProto,
                   layer: LayerFactors) -> None:
    if layer.weight_int is not None:
        set_weight(graph, layer, layer.weight_int.astype(_weight_dtype(layer.num_bits_w)))
    if layer.bias_int is not None:
        set_bias(graph, node, layer, layer.bias_int.astype(np.int32))
    scale_w = layer.info.per_output_channel(layer.scale_w).astype(np.float32)
    offsets = layer.offset_w_per_output()
    if scale_w.size == 1 and offsets.size > 1:
        scale_w = np.full(offsets.size, scale_w[0], np.float32)
    packed = np.asarray(pack_dequant_param(scale_w, float(layer.data.scale), offsets),
                        np.uint64).reshape(-1)
    param = add_constant(graph, f"{layer.name}.dequant.param", packed)
    renamed, original = rename_output(graph, node, f"{layer.name}.dequant.input")
    inserter.after(node, helper.make_node(
        "AscendDequant", [renamed, param], [original],
        name=graph.unique_name(f"{layer.name}.dequant"), dtype=DEQUANT_DTYPE_FLOAT32))
