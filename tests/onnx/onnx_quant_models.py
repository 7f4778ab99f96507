"""Small ONNX models built with onnx.helper, their records, and numpy references for the
ONNX writer tests (no torch). Weights come from a fixed-seed numpy generator (normal values
scaled like He initialisation), so every run sees the same real-valued weights."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from amct_core.quant.arq import arq_weight, quantize_weight
from amct_core.quant.bias import deq_scale, quantize_bias
from amct_core.quant.record import LayerRecord, tensor_key
from amct_core.quant.scale_offset import quantize, scale_offset_from_range

FLOAT = TensorProto.FLOAT


def he(rng: np.random.Generator, shape, fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


class ModelBuilder:
    """Collects nodes and initializers; ``build`` makes a ModelProto of the given opset."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op_type: str, inputs, name: str | None = None, outputs=None, **attrs) -> str:
        self.count += 1
        name = name if name is not None else f"{op_type.lower()}{self.count}"
        outputs = outputs or [f"{name or op_type}_out{self.count}"]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name,
                                           **attrs))
        return outputs[0]

    def conv(self, x: str, cin: int, cout: int, name: str, kernel=3, stride=1, group=1,
             bias=True, spatial=2, dilations=None) -> str:
        kernel_shape = [kernel] * spatial
        weight = he(self.rng, [cout, cin // group, *kernel_shape],
                    cin // group * kernel ** spatial)
        inputs = [x, self.constant(f"{name}.weight", weight)]
        if bias:
            inputs.append(self.constant(f"{name}.bias",
                                        (self.rng.standard_normal(cout) * 0.1).astype(np.float32)))
        attrs = {"kernel_shape": kernel_shape, "strides": [stride] * spatial,
                 "pads": [kernel // 2] * (2 * spatial), "group": group}
        if dilations:
            attrs["dilations"] = dilations
            attrs["pads"] = [d * (kernel // 2) for d in dilations] * 2
        return self.node("Conv", inputs, name=name, **attrs)

    def build(self, inputs, outputs, opset: int = 13) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "test", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 7 if opset < 15 else 8
        _fill_output_shapes(model)
        return model


def _fill_output_shapes(model: onnx.ModelProto) -> None:
    """Give graph outputs declared without a shape the shape ONNX inference finds."""
    if all(o.type.tensor_type.HasField("shape") for o in model.graph.output):
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # custom ops: leave the outputs as they are
        return
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for output in model.graph.output:
        found = known.get(output.name)
        if not output.type.tensor_type.HasField("shape") and found is not None and \
                found.type.tensor_type.HasField("shape"):
            output.type.CopyFrom(found.type)


def value(name: str, shape, elem_type=FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def resnet_like(batch=None, channels=(16, 32, 64), blocks_per_stage=2, size=32,
                opset: int = 13, seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """Stem conv + Relu + MaxPool, basic residual blocks (conv-relu-conv + identity or a 1x1
    strided projection, Add, Relu), GlobalAveragePool, Flatten, Gemm."""
    builder = ModelBuilder(seed)
    x = builder.node("Conv", ["input", builder.constant(
        "stem.weight", he(builder.rng, [channels[0], 3, 3, 3], 27)),
        builder.constant("stem.bias", np.zeros(channels[0], np.float32))],
        name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = builder.node("Relu", [x], name="stem_relu")
    x = builder.node("MaxPool", [x], name="stem_pool", kernel_shape=[2, 2], strides=[2, 2])
    cin = channels[0]
    for stage, cout in enumerate(channels):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            prefix = f"s{stage}b{block}"
            y = builder.conv(x, cin, cout, f"{prefix}.conv1", stride=stride)
            y = builder.node("Relu", [y], name=f"{prefix}.relu1")
            y = builder.conv(y, cout, cout, f"{prefix}.conv2")
            shortcut = x
            if stride != 1 or cin != cout:
                shortcut = builder.conv(x, cin, cout, f"{prefix}.down", kernel=1, stride=stride)
            y = builder.node("Add", [y, shortcut], name=f"{prefix}.add")
            x = builder.node("Relu", [y], name=f"{prefix}.relu2")
            cin = cout
    x = builder.node("GlobalAveragePool", [x], name="gap")
    x = builder.node("Flatten", [x], name="flatten", axis=1)
    fc_weight = he(builder.rng, [classes, cin], cin)
    builder.node("Gemm", [x, builder.constant("fc.weight", fc_weight),
                          builder.constant("fc.bias", np.zeros(classes, np.float32))],
                 name="fc", outputs=["logits"], transB=1)
    return builder.build([value("input", [batch, 3, size, size])],
                         [value("logits", [batch, classes])], opset)


# --------------------------------------------------------------------------------------------
# Running models and making records


def session(model: onnx.ModelProto, threads: int = 1,
            optimized_path: str | None = None,
            level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict, outputs=None, **kwargs) -> list[np.ndarray]:
    return session(model, **kwargs).run(outputs, feeds)


def intermediate_values(model: onnx.ModelProto, feeds: dict, tensors) -> dict[str, np.ndarray]:
    """The values of ``tensors`` when ``model`` runs on ``feeds`` (exposed as outputs)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {v.name for v in augmented.graph.output}
    wanted = [t for t in tensors if t not in feeds]
    for tensor in wanted:
        if tensor not in present:
            augmented.graph.output.append(helper.make_tensor_value_info(tensor, FLOAT, None))
    values = {}
    if wanted:
        values = dict(zip(wanted, run(augmented, feeds, wanted,
                                      level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                          strict=True))
    values.update((t, feeds[t]) for t in tensors if t in feeds)
    return values


def activation_record(data: np.ndarray, asymmetric: bool = True, num_bits: int = 8
                      ) -> LayerRecord:
    """Min-max activation factors of ``data`` (the core formula)."""
    scale, offset = scale_offset_from_range(float(np.min(data)), float(np.max(data)),
                                            num_bits, symmetric=not asymmetric)
    kind = f"INT{num_bits}"
    return LayerRecord(scale_d=float(np.asarray(scale).reshape(-1)[0]),
                       offset_d=int(np.asarray(offset).reshape(-1)[0]),
                       act_type=kind, dst_type=kind)


def make_record(model: onnx.ModelProto, feeds: dict, layer_names=None, tensors=(),
                asymmetric: bool = True, channel_wise: bool | None = None,
                act_bits: dict | None = None, wts_bits: dict | None = None
                ) -> dict[str, LayerRecord]:
    """A record for ``model``: min-max activation factors measured on ``feeds`` for each
    layer (all quantizable layers when ``layer_names`` is None) and ``tensor:`` entries for
    ``tensors``; ARQ weight factors (channel-wise for conv kinds unless told)."""
    from amct_onnx.layers import find_quant_layers

    infos = [i for i in find_quant_layers(model)
             if layer_names is None or i.name in layer_names]
    values = intermediate_values(model, feeds, [i.input_name for i in infos] + list(tensors))
    graph_inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    records: dict[str, LayerRecord] = {}
    for info in infos:
        bits = (act_bits or {}).get(info.name, 8)
        record = activation_record(values[info.input_name], asymmetric, bits)
        if info.layer.has_weight:
            wbits = (wts_bits or {}).get(info.name, 8)
            wise = (info.kind != "linear") if channel_wise is None else channel_wise
            scale, offset = arq_weight(graph_inits[info.weight_name], wbits, wise,
                                       axis=info.channel_axis)
            record.scale_w = np.asarray(scale, np.float32).reshape(-1)
            record.offset_w = np.asarray(offset, np.int64).reshape(-1)
            record.wts_type = f"INT{wbits}"
        records[info.name] = record
    for tensor in tensors:
        records[tensor_key(tensor)] = activation_record(values[tensor], asymmetric)
    return records


# --------------------------------------------------------------------------------------------
# Numpy references (integer arithmetic)


def conv_nd(x: np.ndarray, w: np.ndarray, strides, pads, dilations, group: int) -> np.ndarray:
    """N-d cross-correlation with groups (ONNX Conv semantics) in int64/float64."""
    spatial = w.ndim - 2
    begin, end = pads[:spatial], pads[spatial:]
    x = np.pad(x, [(0, 0), (0, 0), *zip(begin, end, strict=True)])
    n, cin = x.shape[:2]
    cout = w.shape[0]
    kernel = w.shape[2:]
    out_shape = [(x.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                 for i in range(spatial)]
    cin_g, cout_g = cin // group, cout // group
    out = np.zeros([n, cout, *out_shape], dtype=np.result_type(x, w))
    for index in np.ndindex(*kernel):
        window = tuple(slice(index[i] * dilations[i],
                             index[i] * dilations[i] + strides[i] * (out_shape[i] - 1) + 1,
                             strides[i]) for i in range(spatial))
        for g in range(group):
            patch = x[(slice(None), slice(g * cin_g, (g + 1) * cin_g), *window)]
            kern = w[(slice(g * cout_g, (g + 1) * cout_g), slice(None), *index)]
            out[:, g * cout_g:(g + 1) * cout_g] += np.einsum("nc...,oc->no...", patch, kern)
    return out


def conv_transpose_2d(x: np.ndarray, w: np.ndarray, strides, pads, group: int,
                      output_padding=(0, 0)) -> np.ndarray:
    """ONNX ConvTranspose (2-D, dilation 1) by scattering each input pixel."""
    n, _, h, wd = x.shape
    cin_g, cout_g, kh, kw = w.shape[0] // group, w.shape[1], w.shape[2], w.shape[3]
    full_h = (h - 1) * strides[0] + kh + output_padding[0]
    full_w = (wd - 1) * strides[1] + kw + output_padding[1]
    out = np.zeros([n, cout_g * group, full_h, full_w], dtype=np.result_type(x, w))
    for g in range(group):
        xs = x[:, g * cin_g:(g + 1) * cin_g]
        ws = w[g * cin_g:(g + 1) * cin_g]
        for i in range(kh):
            for j in range(kw):
                contribution = np.einsum("nchw,co->nohw", xs, ws[:, :, i, j])
                out[:, g * cout_g:(g + 1) * cout_g,
                    i:i + strides[0] * (h - 1) + 1:strides[0],
                    j:j + strides[1] * (wd - 1) + 1:strides[1]] += contribution
    return out[:, :, pads[0]:full_h - pads[2], pads[1]:full_w - pads[3]]


def integer_input(x: np.ndarray, record: LayerRecord) -> np.ndarray:
    """``quantize(x) - offset_d`` as int64 (the integers the quantized layer reads)."""
    q = quantize(x, record.scale_d, record.offset_d, record.num_bits_d)
    return (q.astype(np.int64) - int(record.offset_d))


def integer_weight(weight: np.ndarray, record: LayerRecord, axis: int) -> np.ndarray:
    q = quantize_weight(weight, record.scale_w, record.offset_w, record.num_bits_w, axis=axis)
    offsets = np.asarray(record.offset_w, np.int64)
    if offsets.size > 1:
        shape = [1] * weight.ndim
        shape[axis] = offsets.size
        offsets = offsets.reshape(shape)
    return q.astype(np.int64) - offsets


def save(model: onnx.ModelProto, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(model, path)
    return path


__all__ = ["FLOAT", "ModelBuilder", "activation_record", "conv_nd", "conv_transpose_2d",
           "deq_scale", "he", "integer_input", "integer_weight", "intermediate_values",
           "make_record", "quantize_bias", "resnet_like", "run", "save", "session", "value"]
