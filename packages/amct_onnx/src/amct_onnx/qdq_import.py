"""Reading a QDQ ONNX model for ``convert_qat_model`` (reference §4, ``convert_qat_model``).

A QDQ model carries its quantization as standard ``QuantizeLinear`` (Q) / ``DequantizeLinear``
(DQ) nodes, e.g. a QAT model exported by torch or a model from
``onnxruntime.quantization.quantize_static``. :func:`import_qdq_model` turns it into a float
model plus the record (§3.3) the writers of ``save_model`` need:

* an **activation pair** ``DQ(Q(x))`` (per tensor; Q and DQ share scale and zero point) gives
  the factors ``scale_d = scale`` and ``offset_d = zero_point`` (INT8) or
  ``zero_point - 128`` (UINT8: the same values on the record's int8 grid, since
  ``clip(round(x/s) + z, 0, 255) - z == clip(round(x/s) + z - 128, -128, 127) - (z - 128)``);
  the readers of the DQ output read ``x`` in the float model;
* a **constant DQ** ``DQ(W_int)`` or ``DQ(Q(W_float))`` becomes the float initializer
  ``(W_int - zero_point) * scale`` (float32, as ONNX Runtime computes it), with
  ``W_int = saturate(round(W_float / scale) + zero_point)`` (round half to even);
* a **layer** is a Conv, ConvTranspose, Gemm or MatMul whose data input is an activation
  pair and whose weight is a constant DQ: its record holds ``scale_d``/``offset_d`` and
  ``scale_w``/``offset_w`` (per channel on the output-channel axis for Conv / ConvTranspose,
  per tensor for Gemm / MatMul), and the writers requantize the float weight to exactly the
  source integers (kept in :attr:`ImportedModel.weight_ints`); an INT32 bias DQ keeps its
  integers too (:attr:`ImportedModel.bias_ints`);
* every other reader of an activation pair (Add, MaxPool, Concat, a float layer, a graph
  output ...) reads the pair through a :class:`~.writers.common.TensorQuant`
  (AscendQuant + AscendAntiQuant), and a Q that is a graph output gives its integers
  (AscendQuant alone). Their factors are also in the record as ``tensor:<name>`` entries.

What cannot be converted raises an error naming the node, its op type and the tensor:
per-channel activations, a Q/DQ pair with different factors, types other than INT8 / UINT8
(INT32 for a bias DQ), integer ops (QLinear*, ConvInteger, MatMulInteger ...), a DQ of a
non-constant tensor that no Q produces, a Q that feeds anything but DQ nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from amct_core.errors import AmctValueError, UnsupportedLayerError
from amct_core.logger import get_logger
from amct_core.quant.record import TENSOR_KEY_PREFIX, LayerRecord, tensor_key

from .graph import DEFAULT_DOMAINS, OnnxGraph, get_attribute, node_inputs, tensor_elem_types
from .layers import assign_node_names, scan_quant_layers
from .writers.common import ActivationFactors, TensorQuant

LOGGER = get_logger("amct_onnx")

#: Domains whose QuantizeLinear / DequantizeLinear follow the ONNX definition.
QDQ_DOMAINS = (*DEFAULT_DOMAINS, "com.microsoft")
#: The layer op types that take the factors of their input pair and weight (reference §4).
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Integer-arithmetic ops a QDQ model must not hold (already lowered; not convertible).
INTEGER_OPS = frozenset({
    "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QGemm", "QAttention", "QEmbedLayerNorm",
    "QOrderedMatMul", "QuantizeWithOrder", "DequantizeWithOrder", "QuantizeBFP",
    "DequantizeBFP", "MatMulNBits", "AscendQuant", "AscendDequant", "AscendAntiQuant",
    "AscendWeightQuant"})
_ACTIVATION_TYPES = {TensorProto.INT8: 0, TensorProto.UINT8: 128}
_INT8_RANGE = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255),
               TensorProto.INT32: (-(2 ** 31), 2 ** 31 - 1)}


@dataclass
class QuantParams:
    """The factors of one Q or DQ node: ``scale`` (float32) and ``zero_point`` (int64), one
    value (``axis`` None) or one per slice of ``axis``; ``elem_type``: the integer type."""

    node: onnx.NodeProto
    scale: np.ndarray
    zero_point: np.ndarray
    elem_type: int
    axis: int | None

    @property
    def type_name(self) -> str:
        return TensorProto.DataType.Name(self.elem_type)

    def same_factors(self, other: QuantParams) -> bool:
        return (self.elem_type == other.elem_type and self.axis == other.axis
                and np.array_equal(self.scale, other.scale)
                and np.array_equal(self.zero_point, other.zero_point))

    def describe(self) -> str:
        scale = self.scale.tolist() if self.scale.size > 1 else float(self.scale[0])
        zero = self.zero_point.tolist() if self.zero_point.size > 1 else int(self.zero_point[0])
        return f"scale {scale}, zero point {zero} ({self.type_name})"


@dataclass
class ConstantDq:
    """A DQ of a constant: the integers, their factors and the dequantized float value."""

    node: onnx.NodeProto
    ints: np.ndarray
    params: QuantParams
    value: np.ndarray


@dataclass
class ActivationPair:
    """A Q on a float activation and its DQ partners."""

    quantize: onnx.NodeProto
    tensor: str
    params: QuantParams
    dequantize: list[onnx.NodeProto] = field(default_factory=list)

    @property
    def factors(self) -> ActivationFactors:
        shift = _ACTIVATION_TYPES[self.params.elem_type]
        return ActivationFactors(np.float32(self.params.scale[0]),
                                 int(self.params.zero_point[0]) - shift, 8)


@dataclass
class ImportedModel:
    """The outcome of :func:`import_qdq_model`.

    ``model``: the float model (no Q/DQ nodes; layers read the raw activations).
    ``records``: the record, layer keys then ``tensor:`` keys. ``tensor_quants``: the
    activations quantized outside layers. ``weight_ints``: per layer, the source weight
    integers on the int8 grid; ``bias_ints``: per layer, the INT32 bias integers and the
    scale of their DQ.
    """

    model: onnx.ModelProto
    records: dict[str, LayerRecord]
    tensor_quants: list[TensorQuant]
    weight_ints: dict[str, np.ndarray]
    bias_ints: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def layer_records(self) -> dict[str, LayerRecord]:
        return {key: value for key, value in self.records.items()
                if not key.startswith(TENSOR_KEY_PREFIX)}


def import_qdq_model(source: onnx.ModelProto, model_file: str = "<model>") -> ImportedModel:
    """The float model, record and tensor quantizations of QDQ model ``source`` (module
    docstring). ``source`` is not changed; unnamed nodes of the result are named
    (:func:`~.layers.assign_node_names`). Errors name ``model_file``, the node and the
    tensor."""
    model = onnx.ModelProto()
    model.CopyFrom(source)
    renamed = assign_node_names(model)
    if renamed:
        LOGGER.info("Named %d unnamed node(s) of %s (e.g. %s).", len(renamed), model_file,
                    renamed[0])
    return _Importer(model, model_file).run()


class _Importer:
    def __init__(self, model: onnx.ModelProto, model_file: str) -> None:
        self.model = model
        self.model_file = model_file
        self.graph = OnnxGraph(model)
        self.types = tensor_elem_types(model)
        self.pairs: dict[str, ActivationPair] = {}        # Q node name -> pair
        self.pair_of_dq: dict[str, ActivationPair] = {}   # DQ output -> pair
        self.constants: dict[str, ConstantDq] = {}        # DQ output -> constant
        self.int_outputs: dict[str, ActivationPair] = {}  # Q output (graph output) -> pair

    # -- errors -----------------------------------------------------------------------------
    def _where(self, node: onnx.NodeProto) -> str:
        return f"{node.op_type} node {node.name!r} of model {self.model_file!r}"

    def _unsupported(self, node: onnx.NodeProto, text: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(f"{self._where(node)} {text}")

    # -- main -------------------------------------------------------------------------------
    def run(self) -> ImportedModel:
        self._reject_integer_ops()
        nodes = list(self.model.graph.node)
        quantize = [n for n in nodes if n.op_type == "QuantizeLinear" and n.domain in QDQ_DOMAINS]
        dequantize = [n for n in nodes
                      if n.op_type == "DequantizeLinear" and n.domain in QDQ_DOMAINS]
        handled: set[int] = set()
        for node in quantize:
            handled.update(id(dq) for dq in self._read_quantize(node))
        for node in dequantize:
            if id(node) not in handled:
                self._read_constant_dequantize(node)
        candidates = self._layer_candidates()
        self._build_float_model(quantize + dequantize)
        return self._finish(candidates)

    def _reject_integer_ops(self) -> None:
        for node in self.model.graph.node:
            if node.op_type in INTEGER_OPS or node.op_type.startswith("QLinear"):
                raise self._unsupported(
                    node, f"(inputs {list(node.input)}) is an integer op; convert_qat_model "
                    "reads QDQ models (QuantizeLinear / DequantizeLinear around float ops). "
                    "Export or quantize the model in QDQ format (onnxruntime: "
                    "quant_format=QuantFormat.QDQ).")

    # -- factors ----------------------------------------------------------------------------
    def _resolve(self, name: str) -> str:
        """Follow Identity nodes back to their source (torch shares constants that way)."""
        seen = set()
        while name not in seen:
            seen.add(name)
            producer = self.graph.producer(name)
            if producer is None or producer.op_type != "Identity" or \
                    producer.domain not in DEFAULT_DOMAINS:
                break
            name = producer.input[0]
        return name

    def _constant(self, name: str) -> np.ndarray | None:
        return self.graph.constant_value(self._resolve(name))

    def _is_constant(self, name: str) -> bool:
        return self.graph.is_constant(self._resolve(name))

    def _const_elem_type(self, name: str) -> int | None:
        name = self._resolve(name)
        tensor = self.graph.initializer(name)
        if tensor is not None:
            return tensor.data_type
        producer = self.graph.producer(name)
        if producer is not None and producer.op_type == "Constant":
            for attribute in producer.attribute:
                if attribute.name == "value":
                    return attribute.t.data_type
        return None

    def _params(self, node: onnx.NodeProto) -> QuantParams:
        tensor = node.input[0]
        if len(node.input) < 2 or not node.input[1]:
            raise self._unsupported(node, f"on tensor {tensor!r} has no scale input")
        scale = self._constant(node.input[1])
        if scale is None:
            raise self._unsupported(node, f"on tensor {tensor!r}: its scale {node.input[1]!r} "
                                    "is not a constant; only constant factors are converted")
        if scale.dtype != np.float32:
            raise self._unsupported(node, f"on tensor {tensor!r} has a {scale.dtype} scale; "
                                    "only float32 models are converted")
        if int(get_attribute(node, "block_size", 0) or 0):
            raise self._unsupported(node, f"on tensor {tensor!r} is blocked (block_size); "
                                    "only per-tensor and per-channel factors are converted")
        zero_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zero_name is not None:
            zero = self._constant(zero_name)
            elem_type = self._const_elem_type(zero_name)
            if zero is None or elem_type is None:
                raise self._unsupported(node, f"on tensor {tensor!r}: its zero point "
                                        f"{zero_name!r} is not a constant")
        else:
            zero = np.zeros(scale.shape, np.int64)
            if node.op_type == "QuantizeLinear":
                elem_type = int(get_attribute(node, "output_dtype", 0) or TensorProto.UINT8)
            else:
                producer = self.graph.producer(tensor)
                if producer is not None and producer.op_type == "QuantizeLinear" and \
                        producer.domain in QDQ_DOMAINS:
                    elem_type = self._params(producer).elem_type
                else:
                    elem_type = self._const_elem_type(tensor) or self.types.get(tensor, 0)
        allowed = (_INT8_RANGE if node.op_type == "DequantizeLinear"
                   else _ACTIVATION_TYPES)
        if elem_type not in allowed:
            name = TensorProto.DataType.Name(elem_type) if elem_type else "an unknown type"
            raise self._unsupported(
                node, f"on tensor {tensor!r} uses {name}; convert_qat_model converts INT8 "
                "and UINT8 quantization (and INT32 bias). Quantize to 8 bits.")
        scale = scale.astype(np.float32).reshape(-1)
        zero = np.asarray(zero).astype(np.int64).reshape(-1)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise self._unsupported(node, f"on tensor {tensor!r} has scale {scale.tolist()}; "
                                    "scales must be positive finite numbers")
        if zero.size not in (1, scale.size):
            raise self._unsupported(node, f"on tensor {tensor!r} has {scale.size} scales but "
                                    f"{zero.size} zero points")
        axis = None
        if scale.size > 1:
            axis = int(get_attribute(node, "axis", 1))
            zero = np.broadcast_to(zero, scale.shape).copy()
        return QuantParams(node, scale, zero, elem_type, axis)

    # -- QuantizeLinear ---------------------------------------------------------------------
    def _read_quantize(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """Check a Q node and its DQ partners; returns the partners."""
        params = self._params(node)
        tensor, output = node.input[0], node.output[0]
        partners = []
        for consumer in self.graph.consumers_of(output):
            if (consumer.op_type != "DequantizeLinear" or consumer.domain not in QDQ_DOMAINS
                    or consumer.input[0] != output or output in consumer.input[1:]):
                raise self._unsupported(
                    node, f"on tensor {tensor!r}: its output {output!r} feeds "
                    f"{consumer.op_type} node {consumer.name!r}; a QuantizeLinear output may "
                    "only feed DequantizeLinear nodes (or be a graph output)")
            partner = self._params(consumer)
            if not partner.same_factors(params):
                raise AmctValueError(
                    f"{self._where(node)} ({params.describe()}) and DequantizeLinear node "
                    f"{consumer.name!r} ({partner.describe()}) on tensor {tensor!r} do not "
                    "share their factors; a Q/DQ pair must use the same scale and zero point.")
            partners.append(consumer)
        is_output = self.graph.is_graph_output(output)
        if self._is_constant(tensor):
            if is_output:
                raise self._unsupported(node, f"quantizes the constant {tensor!r} into the "
                                        f"graph output {output!r}; nothing can compute it")
            value = self._constant(tensor)
            if value is None or value.dtype != np.float32:
                raise self._unsupported(node, f"quantizes the constant {tensor!r}, which is "
                                        "not a float32 tensor")
            ints = _quantize(value, params)
            for partner in partners:
                self.constants[partner.output[0]] = ConstantDq(
                    partner, ints, params, _dequantize(ints, params))
            return partners
        if params.axis is not None:
            raise self._unsupported(
                node, f"quantizes the activation {tensor!r} per channel (axis {params.axis}, "
                f"{params.scale.size} scales); only weights may be quantized per channel "
                "(reference §4). Quantize activations per tensor.")
        elem_type = self.types.get(tensor, TensorProto.FLOAT)
        if elem_type != TensorProto.FLOAT:
            raise self._unsupported(
                node, f"quantizes the activation {tensor!r} of type "
                f"{TensorProto.DataType.Name(elem_type)}; only FLOAT activations are converted")
        pair = ActivationPair(node, tensor, params, partners)
        self.pairs[node.name] = pair
        for partner in partners:
            self.pair_of_dq[partner.output[0]] = pair
        if is_output:
            self.int_outputs[output] = pair
        return partners

    # -- DequantizeLinear of a constant -----------------------------------------------------
    def _read_constant_dequantize(self, node: onnx.NodeProto) -> None:
        tensor = node.input[0]
        ints = self._constant(tensor)
        if ints is None:
            producer = self.graph.producer(tensor)
            source = (f"the output of {producer.op_type} node {producer.name!r}"
                      if producer is not None else "a graph input")
            raise self._unsupported(
                node, f"dequantizes {tensor!r}, {source}: a DequantizeLinear must read a "
                "constant or the output of a QuantizeLinear")
        params = self._params(node)
        ints = np.asarray(ints).astype(np.int64)
        self.constants[node.output[0]] = ConstantDq(node, ints, params,
                                                    _dequantize(ints, params))

    # -- layers -----------------------------------------------------------------------------
    def _layer_candidates(self) -> dict[str, tuple[ActivationPair, ConstantDq]]:
        """Layer nodes whose data input is an activation pair and weight a constant DQ."""
        found: dict[str, tuple[ActivationPair, ConstantDq]] = {}
        for node in self.model.graph.node:
            if node.op_type not in LAYER_OPS or node.domain not in DEFAULT_DOMAINS:
                continue
            if len(node.input) < 2:
                continue
            pair = self.pair_of_dq.get(node.input[0])
            weight = self.constants.get(node.input[1])
            if weight is None:
                continue
            if pair is None:
                LOGGER.warning(
                    "%s %s has a quantized weight %s but a float data input; its weight is "
                    "dequantized and the layer stays float.", node.op_type, node.name,
                    node.input[1])
                continue
            self._check_weight(node, weight)
            found[node.name] = (pair, weight)
        return found

    def _check_weight(self, node: onnx.NodeProto, weight: ConstantDq) -> None:
        params = weight.params
        name = (f"{node.input[1]!r} (DequantizeLinear {weight.node.name!r} of "
                f"{weight.node.input[0]!r})")
        if params.elem_type not in _ACTIVATION_TYPES:
            raise self._unsupported(node, f"has a {params.type_name} weight {name}; weights "
                                    "must be INT8 or UINT8")
        if params.axis is None:
            return
        rank = weight.ints.ndim
        axis = params.axis + rank if params.axis < 0 else params.axis
        if node.op_type in ("Gemm", "MatMul"):
            if np.unique(params.scale).size == 1 and np.unique(params.zero_point).size == 1:
                params.scale, params.zero_point = params.scale[:1], params.zero_point[:1]
                params.axis = None
                return
            raise self._unsupported(
                node, f"has a weight {name} quantized per channel (axis {params.axis}); Gemm "
                "and MatMul are converted with per-tensor weights only (reference §4). "
                "Quantize their weights per tensor (onnxruntime: per_channel=False, or "
                "TensorQuantOverrides without 'axis' for these weights).")
        expected = 0 if node.op_type == "Conv" else 1
        if axis != expected:
            raise self._unsupported(
                node, f"has a weight {name} quantized per channel on axis {params.axis}; "
                f"{node.op_type} weights are converted per tensor or per output channel (axis "
                f"{expected}).")
        params.axis = axis

    # -- the float model --------------------------------------------------------------------
    def _build_float_model(self, qdq_nodes: list[onnx.NodeProto]) -> None:
        """Remove the Q/DQ nodes: readers of an activation pair read its float tensor (and
        are remembered in ``self.readers``), constant DQ outputs become float initializers."""
        graph = self.graph
        removed = {id(node) for node in qdq_nodes}
        outputs = set(graph.graph_outputs)
        q_inputs = {node.input[0] for node in qdq_nodes if node.op_type == "QuantizeLinear"}
        #: Q node name -> tensors that must hold the restored value (graph outputs, inputs
        #: of a further Q)
        self.named_restored: dict[str, list[str]] = {}
        #: Q node name -> (node name, input index) reading the pair
        self.readers: dict[str, list[tuple[str, int]]] = {}
        for dq_output, pair in self.pair_of_dq.items():
            if dq_output in outputs or dq_output in q_inputs:
                self.named_restored.setdefault(pair.quantize.name, []).append(dq_output)
            for consumer in graph.consumers_of(dq_output):
                if dq_output not in consumer.input:
                    raise self._unsupported(
                        consumer, f"reads the dequantized tensor {dq_output!r} inside a "
                        "subgraph; such models are not converted")
        kept = [node for node in self.model.graph.node if id(node) not in removed]
        for node in kept:
            for index, name in enumerate(node.input):
                pair = self.pair_of_dq.get(name)
                if pair is not None:
                    node.input[index] = pair.tensor
                    self.readers.setdefault(pair.quantize.name, []).append((node.name, index))
        for dq_output, constant in self.constants.items():  # the DQ nodes go: names are free
            self.model.graph.initializer.append(
                numpy_helper.from_array(constant.value, dq_output))
        int_names = {node.output[0] for node in qdq_nodes if node.op_type == "QuantizeLinear"}
        stale = [v for v in self.model.graph.value_info
                 if v.name in int_names or v.name in self.constants]
        for value in stale:
            self.model.graph.value_info.remove(value)
        graph.set_nodes([_copy(node) for node in kept], sort=False)
        _remove_unused_constants(graph)
        graph.remove_unused_initializers()

    def _finish(self, candidates: dict[str, tuple[ActivationPair, ConstantDq]]
                ) -> ImportedModel:
        scan = scan_quant_layers(self.model)
        by_name = scan.by_name()
        skipped = {s.name: s.reason for s in scan.skipped}
        records: dict[str, LayerRecord] = {}
        weight_ints: dict[str, np.ndarray] = {}
        bias_ints: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        layer_inputs: set[tuple[str, int]] = set()
        for name, (pair, weight) in candidates.items():
            info = by_name.get(name)
            if info is None:
                LOGGER.warning("Layer %s cannot be quantized (%s); it stays float, with its "
                               "input quantized and restored and its weight dequantized.",
                               name, skipped.get(name, "unknown reason"))
                continue
            factors = pair.factors
            shift = _ACTIVATION_TYPES[weight.params.elem_type]
            records[name] = LayerRecord(
                scale_d=float(factors.scale), offset_d=factors.offset,
                scale_w=weight.params.scale.astype(np.float32),
                offset_w=(weight.params.zero_point - shift).astype(np.int64))
            weight_ints[name] = (weight.ints - shift).astype(np.int64)
            if info.bias_name is not None and info.bias_name in self.constants:
                bias = self.constants[info.bias_name]
                if bias.params.elem_type == TensorProto.INT32 and not np.any(
                        bias.params.zero_point):
                    bias_ints[name] = (bias.ints.reshape(-1), bias.params.scale)
            layer_inputs.add((name, 0))
            LOGGER.info("Convert %s %s: input %s (scale_d %g, offset_d %d), weight %s %s.",
                        info.op_type, name, pair.tensor, float(factors.scale), factors.offset,
                        info.weight_name,
                        f"per channel ({weight.params.scale.size} scales)"
                        if weight.params.axis is not None else "per tensor")
        quants = self._tensor_quants(layer_inputs, records)
        return ImportedModel(self.model, records, quants, weight_ints, bias_ints)

    def _tensor_quants(self, layer_inputs: set[tuple[str, int]],
                       records: dict[str, LayerRecord]) -> list[TensorQuant]:
        op_types = {node.name: node.op_type for node in self.model.graph.node}
        quants: list[TensorQuant] = []
        for name, pair in self.pairs.items():
            readers = tuple(reader for reader in dict.fromkeys(self.readers.get(name, ()))
                            if reader not in layer_inputs)
            restored = tuple(self.named_restored.get(name, ()))
            output = pair.quantize.output[0]
            int_output = output if output in self.int_outputs else None
            if not readers and not restored and int_output is None:
                continue
            quant = TensorQuant(pair.tensor, pair.factors, readers, restored, int_output,
                                _ACTIVATION_TYPES[pair.params.elem_type])
            if int_output is not None and quant.int_zero_shift:
                LOGGER.warning("Graph output %s is UINT8; in the deploy model it is the INT8 "
                               "output of an AscendQuant (the same values minus 128). The "
                               "fake-quant model keeps UINT8.", int_output)
            quants.append(quant)
            records.setdefault(tensor_key(pair.tensor), LayerRecord(
                scale_d=float(quant.factors.scale), offset_d=quant.factors.offset))
            read_by = [f"{op_types[node]} {node}" for node, _ in readers]
            read_by += [f"graph output {tensor}" for tensor in restored]
            LOGGER.info("Convert the Q/DQ pair %s on %s (scale %g, offset %d) to AscendQuant%s%s"
                        "%s.", name, pair.tensor, float(quant.factors.scale),
                        quant.factors.offset, " + AscendAntiQuant" if quant.restores else "",
                        f" for {', '.join(read_by)}" if read_by else "",
                        f"; integer graph output {int_output}" if int_output else "")
        return quants


def _quantize(value: np.ndarray, params: QuantParams) -> np.ndarray:
    """``saturate(round(value / scale) + zero_point)`` in float32 with round half to even, as
    ONNX Runtime's QuantizeLinear computes it; int64 result."""
    scale, zero = _broadcast(params, value.ndim)
    ints = np.rint(value.astype(np.float32) / scale).astype(np.int64) + zero
    low, high = _INT8_RANGE[params.elem_type]
    return np.clip(ints, low, high)


def _dequantize(ints: np.ndarray, params: QuantParams) -> np.ndarray:
    """``(ints - zero_point) * scale`` in float32 (ONNX DequantizeLinear)."""
    scale, zero = _broadcast(params, ints.ndim)
    return ((ints.astype(np.int64) - zero).astype(np.float32) * scale).astype(np.float32)


def _broadcast(params: QuantParams, rank: int) -> tuple[np.ndarray, np.ndarray]:
    if params.axis is None:
        return params.scale.reshape(()), params.zero_point.reshape(())
    axis = params.axis + rank if params.axis < 0 else params.axis
    shape = [1] * rank
    shape[axis] = params.scale.size
    return params.scale.reshape(shape), params.zero_point.reshape(shape)


def _remove_unused_constants(graph: OnnxGraph) -> None:
    """Drop Constant nodes and Identity nodes of constants whose output nothing reads (the
    factors of the removed Q/DQ nodes)."""
    while True:
        used = set(graph.graph_outputs)
        for node in graph.graph.node:
            used.update(node_inputs(node))
        kept = [node for node in graph.graph.node
                if not (node.op_type in ("Constant", "Identity") and node.output[0] not in used
                        and (node.op_type == "Constant" or graph.is_constant(node.input[0])))]
        if len(kept) == len(graph.graph.node):
            return
        graph.set_nodes([_copy(node) for node in kept], sort=False)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


