"""The ONNX view of a torch model: export, and which ONNX node each torch layer became.

The graph-based flow (reference §3.1) exports the model to ONNX to see its structure. The
export keeps BatchNormalization nodes (``TrainingMode.PRESERVE`` on a model in eval mode,
no constant folding), so every weight keeps its parameter name and a node maps back to its
module through that name: ``layer1.0.conv1.weight`` is the weight of ``layer1.0.conv1``.
Weightless layers (AvgPool2d) are matched by call order and scope name.
"""
from __future__ import annotations

import io
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
import torch
from torch import nn

from amct_core.errors import AmctValueError
from amct_core.quant.layers import QuantLayer
from amct_onnx.graph import OnnxGraph
from amct_pytorch.ptq.layers import ONNX_OPS, layer_type_of, unsupported_reason

#: Opset of the exported ONNX models.
OPSET = 17

_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_PASS_THROUGH = ("Identity", "Transpose")


def as_input_tuple(input_data: object) -> tuple:
    """The reference's ``input_data``: one tensor or a tuple/list of model inputs."""
    if isinstance(input_data, torch.Tensor):
        return (input_data,)
    if isinstance(input_data, (tuple, list)) and input_data:
        return tuple(input_data)
    raise AmctValueError(f"input_data must be a tensor or a non-empty tuple of tensors (the "
                         f"model inputs used to export it to ONNX), got "
                         f"{type(input_data).__name__}")


def export_onnx(model: nn.Module, input_data: object, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None,
                dynamic_axes: dict | None = None) -> onnx.ModelProto:
    """Export ``model`` (in eval mode) keeping parameter names and BatchNormalization nodes."""
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, as_input_tuple(input_data), buffer, dynamo=False,
                              opset_version=OPSET, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.PRESERVE,
                              input_names=list(input_names) if input_names else None,
                              output_names=list(output_names) if output_names else None,
                              dynamic_axes=dynamic_axes)
    except Exception as error:
        raise AmctValueError(f"Model cannot be quantized for it cannot be export to onnx! "
                             f"({type(error).__name__}: {error})") from error
    finally:
        model.train(was_training)
    return onnx.load_from_string(buffer.getvalue())


def _pool_call_order(model: nn.Module, input_data: object) -> list[str]:
    """Names of the AvgPool2d modules in the order one forward pass calls them."""
    calls: list[str] = []
    handles = [module.register_forward_hook(lambda _m, _i, _o, name=name: calls.append(name))
               for name, module in model.named_modules()
               if name and isinstance(module, nn.AvgPool2d)]
    if not handles:
        return calls
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*as_input_tuple(input_data))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls


@dataclass
class TracedGraph:
    """An exported model and the mapping between its nodes and the model's layers."""

    model: onnx.ModelProto
    #: layer name -> index of its node in ``model.graph.node``
    layer_nodes: dict[str, int] = field(default_factory=dict)
    #: the layers that can be quantized, in graph order
    layers: list[QuantLayer] = field(default_factory=list)
    #: layer name -> why it is not quantized (shared, unsupported configuration ...)
    skipped: dict[str, str] = field(default_factory=dict)
    #: (conv layer, batch-norm module) pairs where the conv output feeds only that BN
    bn_pairs: list[tuple[str, str]] = field(default_factory=list)


def _source_name(tensor: str, view: OnnxGraph, known: set[str]) -> str:
    """Follow Identity/Transpose nodes back to a tensor named in ``known`` (the exporter
    also merges equal-valued initializers through Identity nodes, so a known name is kept
    as soon as it is reached)."""
    seen = 0
    while tensor not in known and seen < 8:
        producer = view.producer(tensor)
        if producer is None or producer.op_type not in _PASS_THROUGH:
            break
        tensor = producer.input[0]
        seen += 1
    return tensor


def _module_of_parameter(tensor: str, parameters: set[str]) -> str | None:
    if tensor in parameters and tensor.endswith(".weight"):
        return tensor[: -len(".weight")]
    return None


def trace(model: nn.Module, input_data: object, input_names: Sequence[str] | None = None,
          output_names: Sequence[str] | None = None,
          dynamic_axes: dict | None = None) -> TracedGraph:
    """Export ``model`` and find the ONNX node of every supported layer."""
    modules = dict(model.named_modules())
    pool_calls = _pool_call_order(model, input_data)
    exported = export_onnx(model, input_data, input_names, output_names, dynamic_axes)
    graph = exported.graph
    view = OnnxGraph(exported)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    nodes_of: dict[str, list[int]] = defaultdict(list)
    pending_pools = list(pool_calls)
    for index, node in enumerate(graph.node):
        if node.op_type in _WEIGHT_OPS and len(node.input) > 1:
            weight = _source_name(node.input[1], view, parameters)
            owner = _module_of_parameter(weight, parameters)
            if owner is not None and owner in modules:
                nodes_of[owner].append(index)
        elif node.op_type == "AveragePool" and pending_pools:
            candidate = pending_pools[0]
            if f"/{candidate.rsplit('.', 1)[-1]}/" in f"{node.name}/":
                nodes_of[candidate].append(index)
                pending_pools.pop(0)

    traced = TracedGraph(model=exported)
    for name, module in modules.items():
        found = layer_type_of(module) if name else None
        if found is None:
            continue
        layer_type = found[0]
        indices = nodes_of.get(name, [])
        reason = unsupported_reason(module)
        if not indices:
            reason = reason or "not found in the exported graph (not called in forward)"
        elif len(indices) > 1 or pool_calls.count(name) > 1:
            reason = "shared layer (called more than once)"
        elif graph.node[indices[0]].op_type not in ONNX_OPS[layer_type]:
            reason = f"exported as {graph.node[indices[0]].op_type}"
        if reason is not None:
            traced.skipped[name] = reason
            continue
        traced.layer_nodes[name] = indices[0]
    order = sorted(traced.layer_nodes, key=traced.layer_nodes.get)
    for name in order:
        found = layer_type_of(modules[name])
        traced.layers.append(QuantLayer(name=name, layer_type=found[0], kind=found[1]))

    bn_uses: dict[str, int] = defaultdict(int)
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            bn_uses[_source_name(node.input[3], view, buffers)] += 1
    for name in order:
        node = graph.node[traced.layer_nodes[name]]
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        users = view.consumers_of(node.output[0])
        if len(users) != 1 or users[0].op_type != "BatchNormalization":
            continue
        if any(node.output[0] == out.name for out in graph.output):
            continue
        mean = _source_name(users[0].input[3], view, buffers)
        bn_name = mean[: -len(".running_mean")] if mean.endswith(".running_mean") else None
        if (bn_name in modules and bn_uses[mean] == 1
                and isinstance(modules[bn_name], nn.modules.batchnorm._BatchNorm)):
            traced.bn_pairs.append((name, bn_name))
    return traced
