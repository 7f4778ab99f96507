"""Fold BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it (reference §3.1,
step 1 of ``quantize_model``: "BN fusion"; config keys ``do_fusion`` and
``skip_fusion_layers``, §3.2).

With ``f = gamma / sqrt(var + eps)`` per channel c, a BatchNormalization in inference mode
computes ``y = (x - mean)·f + beta``. When x is the output of a layer that is linear in its
weight, the layer's weight is scaled per output channel and its bias replaced:

- Conv, weight ``(Cout, Cin/g, k...)``: ``W'[c] = W[c]·f[c]``; ``b' = (b - mean)·f + beta``.
- ConvTranspose, weight ``(Cin, Cout/g, k...)``: output channel ``c = group·Cout/g + j``, so
  ``W'[i, j] = W[i, j]·f[group(i)·Cout/g + j]``; bias as for Conv.
- Gemm ``Y = alpha·A'·B' + beta_g·C`` (B' = B or Bᵀ, shape K×N): the N columns of B' are
  scaled by ``alpha·f`` and ``C' = (beta_g·C - mean)·f + beta``, with ``alpha`` and ``beta_g``
  set to 1 (so the folded Gemm is quantizable, §3.5).

A pair is folded only when the result computes the same function: the layer's output feeds
the BatchNormalization and nothing else (no other node, no graph output, no subgraph), the
weight, bias and the four BatchNormalization parameters are float initializers, the
BatchNormalization is in inference mode (``training_mode`` 0, ``spatial`` 1) with only its
first output used, and the layer's name is not in ``skip_fusion_layers``. Everything else is
left as it is. The folded layer takes over the BatchNormalization's output name, so the rest of
the graph is untouched; a weight initializer shared with another node is copied, not changed.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from amct_core.logger import get_logger
from amct_onnx.graph import attribute_graphs

LOGGER = get_logger("amct_onnx")

#: Operators a following BatchNormalization can be folded into.
FOLDABLE_TYPES = ("Conv", "ConvTranspose", "Gemm")


@dataclass
class FusionResult:
    """The model after folding and the (layer name, BatchNormalization name) pairs folded."""

    model: onnx.ModelProto
    fused: list[tuple[str, str]] = field(default_factory=list)


def fold_batchnorm(model: onnx.ModelProto, skip_fusion_layers: Iterable[str] = (),
                   in_place: bool = False) -> FusionResult:
    """Return a copy of ``model`` with every foldable layer + BatchNormalization pair folded
    (module docstring; reference §3.1 BN fusion, §3.2 ``skip_fusion_layers``).

    The input model is not changed, unless ``in_place`` (for a caller that has no further use
    for it): then it is folded itself, without a copy. Layers are matched by node name.
    """
    if in_place:
        folded = model
    else:
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
    graph = folded.graph
    skip = set(skip_fusion_layers)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    uses = _use_counts(graph)
    graph_outputs = {value.name for value in graph.output}
    producers = {output: node for node in graph.node for output in node.output if output}
    names_in_use = _all_names(graph)
    fused: list[tuple[str, str]] = []
    removed: list[onnx.NodeProto] = []

    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        layer = producers.get(bn.input[0])
        if layer is None or layer.op_type not in FOLDABLE_TYPES or layer.domain not in ("",
                                                                                      "ai.onnx"):
            continue
        reason = _why_not_foldable(layer, bn, initializers, uses, graph_outputs, skip)
        if reason:
            LOGGER.debug("BatchNormalization %s is not folded into %s: %s", bn.name,
                         layer.name, reason)
            continue
        _fold_pair(graph, layer, bn, initializers, uses, names_in_use,
                   inputs_list_initializers=folded.ir_version < 4)
        producers[bn.output[0]] = layer  # a second BatchNormalization may follow
        fused.append((layer.name, bn.name))
        removed.append(bn)

    if removed:
        removed_ids = {id(node) for node in removed}
        kept = [node for node in graph.node if id(node) not in removed_ids]
        del graph.node[:]
        graph.node.extend(kept)
        _drop_unused_initializers(graph)
    for layer_name, bn_name in fused:
        LOGGER.info("Fused BatchNormalization %s into %s.", bn_name, layer_name)
    return FusionResult(folded, fused)


def batchnorm_factors(scale: np.ndarray, bias: np.ndarray, mean: np.ndarray,
                      var: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(f, shift)`` with ``BN(x) = x·f + shift``: ``f = scale/sqrt(var + eps)``,
    ``shift = bias - mean·f`` (float64)."""
    factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(epsilon))
    return factor, bias.astype(np.float64) - mean.astype(np.float64) * factor


# --------------------------------------------------------------------------------------------
# Checks


def _why_not_foldable(layer: onnx.NodeProto, bn: onnx.NodeProto,
                      initializers: dict[str, onnx.TensorProto], uses: dict[str, int],
                      graph_outputs: set[str], skip: set[str]) -> str | None:
    """Why the pair cannot be folded, or None when it can."""
    if layer.name in skip:
        return "the layer is in skip_fusion_layers"
    if uses.get(layer.output[0], 0) != 1 or layer.output[0] in graph_outputs:
        return "the layer's output has other consumers"
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in bn.attribute}
    if attrs.get("training_mode", 0) != 0 or attrs.get("spatial", 1) != 1:
        return "the BatchNormalization is not in inference mode"
    if any(name and uses.get(name, 0) for name in bn.output[1:]) or any(
            name in graph_outputs for name in bn.output[1:] if name):
        return "the BatchNormalization's statistics outputs are used"
    if len(bn.input) < 5 or not all(name in initializers for name in bn.input[1:5]):
        return "the BatchNormalization parameters are not initializers"
    params = [initializers[name] for name in bn.input[1:5]]
    channels = {int(np.prod(tensor.dims)) for tensor in params}
    if len(channels) != 1 or not all(_is_float(tensor) for tensor in params):
        return "the BatchNormalization parameters are not float vectors of one length"
    if len(layer.input) < 2 or layer.input[1] not in initializers:
        return "the weight is not an initializer"
    weight = initializers[layer.input[1]]
    if not _is_float(weight):
        return "the weight is not a float tensor"
    if len(layer.input) > 2 and layer.input[2]:
        bias = initializers.get(layer.input[2])
        if bias is None or not _is_float(bias):
            return "the bias is not a float initializer"
    channel_count = channels.pop()
    out_channels = _output_channels(layer, weight)
    if out_channels is None or out_channels != channel_count:
        return (f"the layer has {out_channels} output channels, the BatchNormalization "
                f"{channel_count}")
    if layer.op_type == "Gemm" and len(layer.input) > 2 and layer.input[2]:
        bias_shape = tuple(initializers[layer.input[2]].dims)
        try:
            np.broadcast_shapes(bias_shape, (channel_count,))
        except ValueError:
            return f"the Gemm's C {bias_shape} does not broadcast to the channels"
    return None


def _output_channels(layer: onnx.NodeProto, weight: onnx.TensorProto) -> int | None:
    dims = list(weight.dims)
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in layer.attribute}
    if layer.op_type == "Conv":
        return dims[0] if len(dims) >= 3 else None
    if layer.op_type == "ConvTranspose":
        return dims[1] * int(attrs.get("group", 1)) if len(dims) >= 3 else None
    if len(dims) != 2:  # Gemm
        return None
    return dims[0] if attrs.get("transB", 0) else dims[1]


def _is_float(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                onnx.TensorProto.FLOAT16)


# --------------------------------------------------------------------------------------------
# Folding


def _fold_pair(graph: onnx.GraphProto, layer: onnx.NodeProto, bn: onnx.NodeProto,
               initializers: dict[str, onnx.TensorProto], uses: dict[str, int],
               names_in_use: set[str], inputs_list_initializers: bool) -> None:
    scale, bn_beta, mean, var = (numpy_helper.to_array(initializers[name]).reshape(-1)
                                 for name in bn.input[1:5])
    epsilon = next((helper.get_attribute_value(attr) for attr in bn.attribute
                    if attr.name == "epsilon"), 1e-5)
    factor, shift = batchnorm_factors(scale, bn_beta, mean, var, epsilon)
    weight_tensor = initializers[layer.input[1]]
    weight = numpy_helper.to_array(weight_tensor).astype(np.float64)
    has_bias = len(layer.input) > 2 and bool(layer.input[2])
    bias = (numpy_helper.to_array(initializers[layer.input[2]]).astype(np.float64)
            if has_bias else None)
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in layer.attribute}

    if layer.op_type == "Conv":
        new_weight = weight * factor.reshape((-1,) + (1,) * (weight.ndim - 1))
        new_bias = (bias.reshape(-1) * factor if has_bias else 0.0) + shift
    elif layer.op_type == "ConvTranspose":
        group = int(attrs.get("group", 1))
        cin, cout_g = weight.shape[0], weight.shape[1]
        grouped = weight.reshape((group, cin // group, cout_g, *weight.shape[2:]))
        per_group = factor.reshape((group, 1, cout_g) + (1,) * (weight.ndim - 2))
        new_weight = (grouped * per_group).reshape(weight.shape)
        new_bias = (bias.reshape(-1) * factor if has_bias else 0.0) + shift
    else:  # Gemm
        trans_b = int(attrs.get("transB", 0))
        alpha = float(attrs.get("alpha", 1.0))
        new_weight = alpha * weight * (factor[:, None] if trans_b else factor[None, :])
        beta = float(attrs.get("beta", 1.0))
        new_bias = (beta * bias * factor if has_bias else 0.0) + shift
        _set_float_attribute(layer, "alpha", 1.0)
        _set_float_attribute(layer, "beta", 1.0)

    weight_dtype = numpy_helper.to_array(weight_tensor).dtype
    bias_dtype = (numpy_helper.to_array(initializers[layer.input[2]]).dtype if has_bias
                  else weight_dtype)
    new_weight_name = _replace_initializer(graph, layer, 1, new_weight.astype(weight_dtype),
                                           initializers, uses, names_in_use, "weight",
                                           inputs_list_initializers)
    if has_bias:
        _replace_initializer(graph, layer, 2, new_bias.astype(bias_dtype), initializers, uses,
                             names_in_use, "bias", inputs_list_initializers)
    else:
        name = _unique(f"{layer.name or new_weight_name}.bias", names_in_use)
        _add_initializer(graph, numpy_helper.from_array(new_bias.astype(bias_dtype), name),
                         initializers, inputs_list_initializers)
        while len(layer.input) < 2:
            layer.input.append("")
        if len(layer.input) == 2:
            layer.input.append(name)
        else:
            layer.input[2] = name
        uses[name] = 1

    old_output = layer.output[0]
    layer.output[0] = bn.output[0]
    uses.pop(old_output, None)
    for name in bn.input[1:5]:
        uses[name] = uses.get(name, 1) - 1
    stale = [info for info in graph.value_info if info.name == old_output]
    for info in stale:
        graph.value_info.remove(info)


def _replace_initializer(graph: onnx.GraphProto, layer: onnx.NodeProto, index: int,
                         value: np.ndarray, initializers: dict[str, onnx.TensorProto],
                         uses: dict[str, int], names_in_use: set[str], role: str,
                         inputs_list_initializers: bool) -> str:
    """Give input ``index`` of ``layer`` the value ``value``: in place when the initializer
    feeds only this layer, else as a new initializer (the shared one stays as it was)."""
    old_name = layer.input[index]
    if uses.get(old_name, 0) == 1:
        initializers[old_name].CopyFrom(numpy_helper.from_array(value, old_name))
        return old_name
    name = _unique(f"{layer.name or old_name}.{role}", names_in_use)
    _add_initializer(graph, numpy_helper.from_array(value, name), initializers,
                     inputs_list_initializers)
    layer.input[index] = name
    uses[old_name] = uses.get(old_name, 1) - 1
    uses[name] = 1
    return name


def _add_initializer(graph: onnx.GraphProto, tensor: onnx.TensorProto,
                     initializers: dict[str, onnx.TensorProto],
                     inputs_list_initializers: bool) -> None:
    """Add ``tensor``; models of IR version < 4 also list every initializer as a graph input."""
    graph.initializer.append(tensor)  # appends a copy: keep the graph's own message
    initializers[tensor.name] = graph.initializer[-1]
    if inputs_list_initializers:
        graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                         list(tensor.dims)))


def _set_float_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.f = value
            return
    node.attribute.append(helper.make_attribute(name, value))


# --------------------------------------------------------------------------------------------
# Graph bookkeeping


def _use_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """How many node inputs (in this graph and any subgraph) read each name."""
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                counts[name] = counts.get(name, 0) + 1
        for attr in node.attribute:
            for sub in attribute_graphs(attr):
                for name, count in _use_counts(sub).items():
                    counts[name] = counts.get(name, 0) + count
    return counts


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {tensor.name for tensor in graph.initializer}
    names.update(value.name for value in graph.input)
    names.update(value.name for value in graph.output)
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
    return names


def _unique(base: str, names_in_use: set[str]) -> str:
    name, index = base, 1
    while name in names_in_use:
        name = f"{base}_{index}"
        index += 1
    names_in_use.add(name)
    return name


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = set(_use_counts(graph)) | {value.name for value in graph.output}
    unused = [tensor for tensor in graph.initializer if tensor.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    unused_names = {tensor.name for tensor in unused}
    stale_inputs = [value for value in graph.input if value.name in unused_names]
    for value in stale_inputs:
        graph.input.remove(value)
