"""What the three writers share: the per-layer integer tensors computed from the record.

For each quantized layer (reference §3.3 record, §3.4 formulas, §4 layouts):

* ``scale_d``, ``offset_d``: activation factors; the input is quantized as
  ``clip(round(x * (1/scale_d)) + offset_d, -2^(b-1), 2^(b-1)-1)``;
* ``weight_int``: ``quantize_weight(weight, scale_w, offset_w, b_w, axis)`` (integers);
* ``bias_int``: ``round(bias / (scale_w * scale_d))`` as int32, one value per output channel;
* ``deq_scale``: ``scale_w * scale_d`` (float32), one value per output channel or a single
  value, the factor that brings the integer result back to float;
* AveragePool has no weight: ``scale_w = 1``, ``offset_w = 0``.

:class:`TensorQuant` describes an activation quantized on its own, outside any layer
(``convert_qat_model``, reference §4: the Q/DQ pairs of Add inputs and the like become
AscendQuant + AscendAntiQuant; a QuantizeLinear that is a graph output becomes AscendQuant).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from amct_core.errors import RecordFileError, UnsupportedLayerError
from amct_core.quant.arq import quantize_weight
from amct_core.quant.bias import deq_scale as _deq_scale
from amct_core.quant.bias import quantize_bias
from amct_core.quant.record import TENSOR_KEY_PREFIX, LayerRecord, require_factors

from ..graph import OnnxGraph, default_opset, get_attribute
from ..layers import LayerScan, QuantLayerInfo, scan_quant_layers

#: The lowest default-domain opset the writers accept (Clip with min/max inputs, Round).
MIN_OPSET = 11


@dataclass(frozen=True)
class ActivationFactors:
    """Per-tensor activation factors: ``scale`` (float32), integer ``offset``, bit width."""

    scale: np.float32
    offset: int
    num_bits: int = 8

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1

    @property
    def key(self) -> tuple[float, int, int]:
        return (float(self.scale), int(self.offset), int(self.num_bits))


@dataclass(eq=False)
class LayerFactors:
    """One quantized layer: its node description, record and the integer tensors."""

    info: QuantLayerInfo
    record: LayerRecord
    data: ActivationFactors
    num_bits_w: int
    scale_w: np.ndarray
    offset_w: np.ndarray
    weight_int: np.ndarray | None
    bias_int: np.ndarray | None
    deq_scale: np.ndarray
    #: DMQ ``tensor_balance_factor`` s (one per input channel) or None: the layer computes
    #: with ``x / s`` and ``W * s`` (reference §3.4 DMQ, applied at save time)
    balance: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def input_key(self) -> tuple:
        """What decides whether two layers can share their input quantization."""
        balance = b"" if self.balance is None else self.balance.tobytes()
        return (self.info.input_name, *self.data.key, balance)

    def balance_shape(self) -> list[int]:
        """The shape of ``1/s`` that broadcasts over the layer's input: ``(1, C, 1, 1)`` for
        convolutions, ``(C,)`` for MatMul / Gemm, ``(C, 1)`` for Gemm with ``transA``."""
        size = self.balance.size
        if self.info.kind != "linear":
            return [1, size] + [1] * self.info.spatial_rank
        if self.info.op_type == "Gemm" and get_attribute(self.info.node, "transA", 0):
            return [size, 1]
        return [size]

    @property
    def channel_wise(self) -> bool:
        return self.scale_w.size > 1

    def offset_w_per_output(self) -> np.ndarray:
        """``offset_w`` spread over the output channels (like ``deq_scale``)."""
        offsets = self.info.per_output_channel(self.offset_w)
        if offsets.size == 1 and self.deq_scale.size > 1:
            offsets = np.full(self.deq_scale.size, offsets[0])
        return offsets.astype(np.int64)

    def deq_shape(self) -> list[int]:
        """The shape of ``deq_scale`` that broadcasts over the layer's output: ``(1, C, 1, 1)``
        (2-D conv) or ``(1, C, 1, 1, 1)`` (3-D conv) when per channel, ``(C,)`` for Gemm /
        MatMul, and a scalar when one value."""
        if self.deq_scale.size == 1:
            return []
        if self.info.kind == "linear":
            return [self.deq_scale.size]
        return [1, self.deq_scale.size] + [1] * self.info.spatial_rank


@dataclass(frozen=True)
class TensorQuant:
    """An activation tensor quantized outside a layer (reference §4, ``convert_qat_model``).

    ``tensor``: the float tensor quantized with ``factors`` (per tensor). ``readers``:
    (node name, input index) pairs that read the restored value ``(q - offset) * scale``
    (AscendQuant + AscendAntiQuant in the deploy model). ``restored_outputs``: graph outputs
    that hold the restored value. ``int_output``: a graph output that holds the integers
    themselves (a QuantizeLinear without DequantizeLinear partner: AscendQuant alone);
    ``int_zero_shift`` is added to the int8-grid integers in the fake-quant model to give the
    source's values (128 for a UINT8 output, else 0).
    """

    tensor: str
    factors: ActivationFactors
    readers: tuple[tuple[str, int], ...] = ()
    restored_outputs: tuple[str, ...] = ()
    int_output: str | None = None
    int_zero_shift: int = 0

    @property
    def restores(self) -> bool:
        """Whether anything reads the restored (anti-quantized) value."""
        return bool(self.readers or self.restored_outputs)


def check_opset(model: onnx.ModelProto, model_file: str) -> int:
    """The default-domain opset of ``model``; UnsupportedLayerError (an AmctValueError)
    naming ``model_file`` when it is below 11."""
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise UnsupportedLayerError(
            f"model {model_file!r} uses ONNX opset {opset}; the quantized models need opset "
            f">= {MIN_OPSET} (Round, Clip with min/max inputs). Export the model with "
            f"opset_version >= {MIN_OPSET} or convert it with onnx.version_converter.")
    return opset


def activation_factors(record: LayerRecord, where: str, record_file: str) -> ActivationFactors:
    """The activation factors of a record entry, checked (scale > 0, offset in range)."""
    if record.scale_d is None or record.offset_d is None:
        raise RecordFileError(
            f"record file {record_file!r}: {where} has no scale_d/offset_d. Calibration ran "
            "fewer than batch_num batches, or the record is stale: run the calibration "
            "again before save_model.")
    scale = np.float32(record.scale_d)
    bits = int(record.num_bits_d)
    if not np.isfinite(scale) or scale <= 0:
        raise RecordFileError(f"record file {record_file!r}: {where} has scale_d "
                              f"{record.scale_d}; it must be a positive finite number")
    factors = ActivationFactors(scale, int(record.offset_d), bits)
    if not factors.qmin <= factors.offset <= factors.qmax:
        raise RecordFileError(f"record file {record_file!r}: {where} has offset_d "
                              f"{record.offset_d}, outside the INT{bits} range "
                              f"[{factors.qmin}, {factors.qmax}]")
    return factors


def layer_factors(graph: OnnxGraph, info: QuantLayerInfo, record: LayerRecord,
                  record_file: str) -> LayerFactors:
    """Check the record of one layer against the node and compute its integer tensors."""
    where = f"layer {info.name!r}"
    data = activation_factors(record, where, record_file)
    if not info.layer.has_weight:
        one = np.ones(1, np.float32)
        return LayerFactors(info, record, data, 8, one, np.zeros(1, np.int64), None, None,
                            _deq_scale(one, float(data.scale)))
    scale_w = np.asarray(record.scale_w, np.float32).reshape(-1)
    offset_w = np.asarray(record.offset_w, np.int64).reshape(-1)
    if scale_w.size == 0:
        raise RecordFileError(
            f"record file {record_file!r}: {where} has no scale_w. Calibration ran fewer than "
            "batch_num batches, or the record is stale: run the calibration again before "
            "save_model.")
    weight = graph.initializer_array(info.weight_name)
    balance = _balance(info, record, weight, record_file)
    if balance is not None:
        axis = _input_channel_axis(info)
        shape = [1] * weight.ndim
        shape[axis] = balance.size
        weight = (weight * balance.reshape(shape)).astype(np.float32)
    channels = weight.shape[info.channel_axis]
    if scale_w.size not in (1, channels):
        raise RecordFileError(
            f"record file {record_file!r}: {where} has {scale_w.size} scale_w values but its "
            f"weight {info.weight_name!r} has {channels} channels on axis "
            f"{info.channel_axis}; the record does not belong to this model")
    if not np.all(np.isfinite(scale_w)) or np.any(scale_w <= 0):
        raise RecordFileError(f"record file {record_file!r}: {where} has a scale_w that is "
                              "not a positive finite number")
    if offset_w.size == 0:
        offset_w = np.zeros(scale_w.size, np.int64)
    if offset_w.size not in (1, scale_w.size):
        raise RecordFileError(f"record file {record_file!r}: {where} has {offset_w.size} "
                              f"offset_w values for {scale_w.size} scale_w values")
    bits_w = int(record.num_bits_w)
    weight_int = np.asarray(quantize_weight(weight, scale_w, offset_w, bits_w,
                                            axis=info.channel_axis))
    weight_int = np.rint(weight_int).astype(np.int64).reshape(weight.shape)
    scale_out = info.per_output_channel(scale_w)
    deq_scale = _deq_scale(scale_out, float(data.scale))
    bias_int = None
    if info.bias_name is not None:
        bias = graph.initializer_array(info.bias_name).astype(np.float32).reshape(-1)
        if bias.size == 1:
            bias = np.full(info.out_channels, bias[0], np.float32)
        scale_for_bias = scale_out if scale_out.size > 1 else np.full(bias.size, scale_out[0])
        bias_int = np.asarray(quantize_bias(bias, scale_for_bias.astype(np.float32),
                                            float(data.scale), layer=info.name))
        bias_int = bias_int.astype(np.int32).reshape(-1)
    return LayerFactors(info, record, data, bits_w, scale_w, offset_w, weight_int, bias_int,
                        deq_scale, balance)


def _input_channel_axis(info: QuantLayerInfo) -> int:
    """The weight axis of the input channels: 1 for Conv, 0 for ConvTranspose and MatMul,
    Gemm: 1 with transB, else 0."""
    if info.op_type == "Conv":
        return 1
    if info.op_type == "Gemm":
        return 1 - info.channel_axis
    return 0


def _balance(info: QuantLayerInfo, record: LayerRecord, weight: np.ndarray,
             record_file: str) -> np.ndarray | None:
    """The DMQ factors of a layer, checked, or None when the record has none."""
    balance = np.asarray(record.tensor_balance_factor, np.float32).reshape(-1)
    if balance.size == 0:
        return None
    if info.group != 1:
        raise UnsupportedLayerError(
            f"record file {record_file!r}: layer {info.name!r} has tensor_balance_factor, but "
            f"DMQ applies only to ungrouped convolutions (group {info.group}). Disable "
            "dmq_balancer for this layer and calibrate again.")
    channels = weight.shape[_input_channel_axis(info)]
    if balance.size != channels:
        raise RecordFileError(
            f"record file {record_file!r}: layer {info.name!r} has {balance.size} "
            f"tensor_balance_factor values but {channels} input channels; the record does not "
            "belong to this model")
    return balance


def split_records(records: dict[str, LayerRecord]
                  ) -> tuple[dict[str, LayerRecord], dict[str, LayerRecord]]:
    """(layer records, tensor records): keys starting with ``tensor:`` hold the activation
    factors of one ONNX tensor (the QDQ writer's extra factors)."""
    layers = {k: v for k, v in records.items() if not k.startswith(TENSOR_KEY_PREFIX)}
    tensors = {k[len(TENSOR_KEY_PREFIX):]: v for k, v in records.items()
               if k.startswith(TENSOR_KEY_PREFIX)}
    return layers, tensors


def collect_factors(model: onnx.ModelProto, records: dict[str, LayerRecord],
                    record_file: str = "<record>", model_file: str = "<model>",
                    scan: LayerScan | None = None
                    ) -> tuple[list[LayerFactors], dict[str, ActivationFactors]]:
    """Match the record to the model: every layer key must name a quantizable node, every
    ``tensor:`` key a tensor of the graph. Returns the layers to quantize (graph order) and
    the tensor factors. Errors name the record file, the model file and the layer."""
    graph = OnnxGraph(model)
    scan = scan or scan_quant_layers(model)
    by_name = scan.by_name()
    skipped = {s.name: s for s in scan.skipped}
    layer_records, tensor_records = split_records(records)
    for name in layer_records:
        if name in by_name:
            continue
        if name in skipped:
            raise UnsupportedLayerError(
                f"record file {record_file!r} has layer {name!r}, but that "
                f"{skipped[name].op_type} node of model {model_file!r} cannot be quantized: "
                f"{skipped[name].reason}. Remove the layer from the record (set quant_enable "
                "false in the config and calibrate again).")
        node = graph.node_by_name(name)
        what = (f"is a {node.op_type} node, which is not a quantizable layer type"
                if node is not None else "is not a node of the model")
        raise RecordFileError(
            f"record file {record_file!r} has layer {name!r}, which {what} in model "
            f"{model_file!r}. Use the record written for this modified ONNX model.")
    recorded = [info for info in scan.layers if info.name in layer_records]
    require_factors(layer_records, [info.layer for info in recorded], record_file)
    layers = [layer_factors(graph, info, layer_records[info.name], record_file)
              for info in recorded]
    known = set(graph.producers) | set(graph.graph_inputs)
    tensors: dict[str, ActivationFactors] = {}
    for name, record in tensor_records.items():
        if name not in known:
            raise RecordFileError(
                f"record file {record_file!r} has key {TENSOR_KEY_PREFIX + name!r}, but model "
                f"{model_file!r} has no tensor {name!r}. Use the record written for this "
                "modified ONNX model.")
        tensors[name] = activation_factors(record, f"tensor {name!r}", record_file)
    return layers, tensors


def replaced_weights(layers: list[LayerFactors]) -> set[str]:
    """The weight initializers a writer replaces: those of the layers with integer weights
    (``graph.copy_model`` need not copy their values)."""
    return {layer.info.weight_name for layer in layers if layer.weight_int is not None}


def data_input_groups(layers: list[LayerFactors]) -> dict[tuple, list[LayerFactors]]:
    """Layers grouped by (input tensor, activation factors): each group shares one quant
    node (reference §4, quant fusion), named after its first layer."""
    groups: dict[tuple, list[LayerFactors]] = {}
    for layer in layers:
        groups.setdefault(layer.input_key, []).append(layer)
    return groups


def antiquant_targets(graph: OnnxGraph, layers: list[LayerFactors]
                      ) -> list[tuple[str, LayerFactors]]:
    """(MaxPool node name, layer giving the factors) for each MaxPool that gets an
    AscendQuant + AscendAntiQuant pair (reference §4): its input tensor also feeds quantized
    layers, all with the same activation factors, and every other reader of the tensor is a
    (named) MaxPool."""
    by_tensor: dict[str, list[list[LayerFactors]]] = {}
    for key, group in data_input_groups(layers).items():
        by_tensor.setdefault(key[0], []).append(group)
    names = {layer.name for layer in layers}
    targets: list[tuple[str, LayerFactors]] = []
    for tensor, groups in by_tensor.items():
        if len(groups) != 1 or graph.is_graph_output(tensor) or groups[0][0].balance is not None:
            continue
        others = [node for node in graph.consumers_of(tensor) if node.name not in names]
        if others and all(node.op_type == "MaxPool" and node.name for node in others):
            targets.extend((node.name, groups[0][0]) for node in others)
    return targets
