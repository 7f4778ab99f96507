"""The QDQ writer: layout, agreement with the fake-quant model, ONNX Runtime int8 fusion.

Models are built with onnx.helper with seeded Gaussian (He-scaled) weights; records hold
min-max activation factors measured on seeded Gaussian inputs (the core formulas) and ARQ
weight factors. The fake-quant model (checked against numpy in test_onnx_writers.py) is the
reference: the QDQ model quantizes the same tensors with the same factors, plus the extra
``tensor:`` entries, so it must agree within one quantization step of those tensors.
"""
import collections
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx_quant_models import ModelBuilder, make_record, resnet_like, run, value

from amct_core.quant.bias import deq_scale
from amct_core.quant.record import tensor_key
from amct_onnx.graph import OnnxGraph, get_attribute
from amct_onnx.writers.common import collect_factors
from amct_onnx.writers.fake_quant import build_fake_quant_model
from amct_onnx.writers.qdq import build_qdq_model, qdq_calibration_tensors

RNG = np.random.default_rng(11)


def gaussian(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def build(model, record, **options):
    layers, tensors = collect_factors(model, record)
    return (build_fake_quant_model(model, layers),
            build_qdq_model(model, layers, tensors, **options))


def optimized_ops(model, tmp_path):
    path = str(tmp_path / "optimized.onnx")
    run(model, {i.name: np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim],
                                 np.float32) for i in model.graph.input},
        optimized_path=path)
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


def conv_relu(opset=13):
    b = ModelBuilder(21)
    y = b.conv("x", 8, 16, "conv")
    b.node("Relu", [y], name="relu", outputs=["out"])
    return b.build([value("x", [2, 8, 10, 10])], [value("out", [2, 16, 10, 10])], opset)


def constant(model, name):
    return OnnxGraph(model).constant_value(name)


# --------------------------------------------------------------------------------------------
# One layer


def test_single_conv_layout(tmp_path):
    model = conv_relu()
    x = gaussian(2, 8, 10, 10)
    tensors = qdq_calibration_tensors(model)
    assert tensors == ["conv_out1"]
    record = make_record(model, {"x": x}, tensors=tensors)
    _, qdq = build(model, record)
    onnx.checker.check_model(qdq)
    graph = OnnxGraph(qdq)
    conv = graph.node_by_name("conv")
    data_dq = graph.producer(conv.input[0])
    data_q = graph.producer(data_dq.input[0])
    assert (data_q.op_type, data_dq.op_type, data_q.input[0]) == (
        "QuantizeLinear", "DequantizeLinear", "x")
    assert constant(qdq, data_q.input[1]) == np.float32(record["conv"].scale_d)
    zero = constant(qdq, data_q.input[2])
    assert zero.dtype == np.uint8 and int(zero) == record["conv"].offset_d + 128
    weight_dq = graph.producer(conv.input[1])
    assert get_attribute(weight_dq, "axis") == 0
    assert graph.initializer(weight_dq.input[0]).data_type == TensorProto.INT8
    np.testing.assert_array_equal(constant(qdq, weight_dq.input[1]), record["conv"].scale_w)
    bias_dq = graph.producer(conv.input[2])
    assert graph.initializer(bias_dq.input[0]).data_type == TensorProto.INT32
    np.testing.assert_array_equal(constant(qdq, bias_dq.input[1]),
                                  deq_scale(record["conv"].scale_w, record["conv"].scale_d))
    out_q = graph.consumers_of("conv_out1")
    assert [n.op_type for n in out_q] == ["QuantizeLinear"]
    assert graph.producer("out").op_type == "Relu"  # the graph output stays float
    assert optimized_ops(qdq, tmp_path)["QLinearConv"] == 1


def test_single_conv_agrees_with_fake_quant():
    model = conv_relu()
    x = gaussian(2, 8, 10, 10)
    record = make_record(model, {"x": x}, tensors=["conv_out1"])
    fake, qdq = build(model, record)
    expected = run(fake, {"x": x})[0]
    step = record[tensor_key("conv_out1")].scale_d
    got = run(qdq, {"x": x})[0]
    assert np.abs(got - expected).max() <= 0.5 * step + 1e-5
    # without the output's factors the QDQ model quantizes what the fake-quant model does
    del record[tensor_key("conv_out1")]
    _, plain = build(model, record)
    np.testing.assert_allclose(run(plain, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in plain.graph.node].count("QuantizeLinear") == 1


@pytest.mark.parametrize("activation_type", ["uint8", "int8"])
def test_int8_and_uint8_activations_compute_the_same(activation_type):
    model = conv_relu()
    x = gaussian(2, 8, 10, 10)
    record = make_record(model, {"x": x}, tensors=["conv_out1"])
    fake, qdq = build(model, record, activation_type=activation_type)
    zero = constant(qdq, "x_zero_point")
    assert zero.dtype == np.dtype(activation_type)
    step = record[tensor_key("conv_out1")].scale_d
    assert np.abs(run(qdq, {"x": x})[0] - run(fake, {"x": x})[0]).max() <= 0.5 * step + 1e-5


def test_per_tensor_linear_layers_and_matmul():
    b = ModelBuilder(22)
    y = b.node("MatMul", ["x", b.constant("m.w", gaussian(6, 8))], name="matmul")
    y = b.node("Relu", [y], name="relu")
    b.node("Gemm", [y, b.constant("g.w", gaussian(5, 8)), b.constant("g.b", gaussian(5))],
           name="gemm", transB=1, outputs=["out"])
    model = b.build([value("x", [4, 6])], [value("out", [4, 5])])
    x = gaussian(4, 6)
    record = make_record(model, {"x": x})
    fake, qdq = build(model, record)
    graph = OnnxGraph(qdq)
    weight_dq = graph.producer(graph.node_by_name("gemm").input[1])
    assert get_attribute(weight_dq, "axis") is None
    assert constant(qdq, weight_dq.input[1]).shape == ()
    np.testing.assert_allclose(run(qdq, {"x": x})[0], run(fake, {"x": x})[0], rtol=1e-5,
                               atol=1e-5)


# --------------------------------------------------------------------------------------------
# A ResNet-like network


@pytest.fixture(scope="module")
def resnet():
    model = resnet_like(size=16, channels=(8, 16), blocks_per_stage=2, seed=3)
    x = np.random.default_rng(5).standard_normal((4, 3, 16, 16)).astype(np.float32)
    return model, x


def test_calibration_tensors_of_a_resnet(resnet):
    model, _ = resnet
    tensors = qdq_calibration_tensors(model)
    graph = OnnxGraph(model)
    producers = [graph.producer(t).name for t in tensors]
    # the second conv of each block and each projection feed an Add; the last block's
    # output (after its Relu) feeds the GlobalAveragePool
    assert producers == ["s0b0.conv2", "s0b1.conv2", "s1b0.conv2", "s1b0.down",
                         "s1b1.conv2", "s1b1.relu2"]
    # only the stem quantized: its Relu and MaxPool join it, the Adds (fed by float convs) not
    assert qdq_calibration_tensors(model, ["stem"]) == ["stem_relu_out2", "stem_pool_out3"]


def test_resnet_is_fused_into_int8_kernels(resnet, tmp_path):
    model, x = resnet
    record = make_record(model, {"input": x}, tensors=qdq_calibration_tensors(model))
    _, qdq = build(model, record)
    ops = optimized_ops(qdq, tmp_path)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    adds = sum(n.op_type == "Add" for n in model.graph.node)
    assert ops["QLinearConv"] == convs and ops["Conv"] == 0
    assert ops["QLinearAdd"] == adds and ops["QLinearGlobalAveragePool"] == 1
    assert "Relu" not in [n.op_type for n in qdq.graph.node]  # zero point at 0: removed


def test_resnet_agrees_with_fake_quant(resnet):
    model, x = resnet
    record = make_record(model, {"input": x}, tensors=qdq_calibration_tensors(model))
    fake, qdq = build(model, record)
    expected = run(fake, {"input": x})[0]
    reference_qdq = run(qdq, {"input": x},
                        level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0]
    fused = run(qdq, {"input": x})[0]
    spread = expected.max() - expected.min()
    # the extra activation quantization moves the logits by a few percent of their range
    assert np.abs(reference_qdq - expected).max() <= 0.05 * spread
    assert np.abs(fused - reference_qdq).max() <= 0.02 * spread
    assert (fused.argmax(1) == expected.argmax(1)).mean() >= 0.75


def test_resnet_without_tensor_factors_is_correct_but_unfused(resnet, tmp_path):
    model, x = resnet
    record = make_record(model, {"input": x})
    fake, qdq = build(model, record)
    expected = run(fake, {"input": x}, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0]
    got = run(qdq, {"input": x}, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0]
    spread = expected.max() - expected.min()
    assert np.abs(got - expected).max() <= 0.02 * spread
    ops = optimized_ops(qdq, tmp_path)
    assert ops["QLinearAdd"] == 0


# --------------------------------------------------------------------------------------------
# Opsets, mixed factors, other bit widths


def test_opset_11_is_converted_to_13_for_per_channel_weights(caplog):
    model = conv_relu(opset=11)
    x = gaussian(2, 8, 10, 10)
    record = make_record(model, {"x": x})
    fake, qdq = build(model, record)
    assert [o.version for o in qdq.opset_import if o.domain == ""] == [13]
    assert get_attribute(OnnxGraph(qdq).producer("conv.weight_dequantized"), "axis") == 0
    np.testing.assert_allclose(run(qdq, {"x": x})[0], run(fake, {"x": x})[0], rtol=1e-5,
                               atol=1e-5)


def test_opset_11_falls_back_to_float_weights_when_conversion_fails(monkeypatch, caplog):
    model = conv_relu(opset=11)
    x = gaussian(2, 8, 10, 10)
    record = make_record(model, {"x": x})

    def fail(*_args, **_kwargs):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)
    logger = logging.getLogger("amct.amct_onnx")
    logger.addHandler(caplog.handler)
    try:
        fake, qdq = build(model, record)
    finally:
        logger.removeHandler(caplog.handler)
    assert "conversion to opset 13 failed (RuntimeError: no adapter)" in caplog.text
    assert [o.version for o in qdq.opset_import if o.domain == ""] == [11]
    graph = OnnxGraph(qdq)
    assert graph.initializer("conv.weight").data_type == TensorProto.FLOAT
    assert "DequantizeLinear" in [graph.producer(graph.node_by_name("conv").input[0]).op_type]
    np.testing.assert_allclose(run(qdq, {"x": x})[0], run(fake, {"x": x})[0], rtol=1e-5,
                               atol=1e-5)


def test_readers_with_different_factors_and_float_readers():
    b = ModelBuilder(23)
    y = b.conv("x", 4, 4, "first")
    y = b.node("Relu", [y], name="relu", outputs=["r"])
    b.conv(y, 4, 4, "left")
    b.conv(y, 4, 4, "right")
    b.node("Sigmoid", [y], name="sigmoid", outputs=["s"])
    model = b.build([value("x", [1, 4, 6, 6])],
                    [value("left_out3", None), value("right_out4", None), value("s", None)])
    x = gaussian(1, 4, 6, 6)
    record = make_record(model, {"x": x})
    record["right"].scale_d *= 1.5
    fake, qdq = build(model, record)
    graph = OnnxGraph(qdq)
    left_dq = graph.producer(graph.node_by_name("left").input[0])
    right_dq = graph.producer(graph.node_by_name("right").input[0])
    assert left_dq.name != right_dq.name
    assert graph.producer(right_dq.input[0]).input[0] == "r"  # quantized from the float tensor
    assert graph.node_by_name("relu") is not None  # a float reader needs the real Relu
    left, right, sigmoid = run(qdq, {"x": x})
    fake_left, fake_right, fake_sigmoid = run(fake, {"x": x})
    np.testing.assert_allclose(left, fake_left, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(right, fake_right, rtol=1e-5, atol=1e-5)
    # the float reader of a tensor made in the region reads its DQ output (as
    # quantize_static does): within half a step of the factors (Sigmoid' <= 1/4)
    assert graph.node_by_name("sigmoid").input[0] == left_dq.output[0]
    assert np.abs(sigmoid - fake_sigmoid).max() <= 0.125 * record["left"].scale_d + 1e-6


def test_symmetric_factors_keep_the_relu():
    b = ModelBuilder(24)
    y = b.conv("x", 4, 4, "a")
    y = b.node("Relu", [y], name="relu")
    b.conv(y, 4, 4, "b")
    model = b.build([value("x", [1, 4, 6, 6])], [value("b_out3", None)])
    x = gaussian(1, 4, 6, 6)
    record = make_record(model, {"x": x}, asymmetric=False)
    fake, qdq = build(model, record)
    assert [n.op_type for n in qdq.graph.node].count("Relu") == 1
    np.testing.assert_allclose(run(qdq, {"x": x})[0], run(fake, {"x": x})[0], rtol=1e-5,
                               atol=1e-5)


def test_int16_activation_layers_keep_the_fake_quant_form():
    b = ModelBuilder(25)
    y = b.conv("x", 4, 4, "wide")
    b.conv(y, 4, 4, "narrow")
    model = b.build([value("x", [1, 4, 6, 6])], [value("narrow_out2", None)])
    x = gaussian(1, 4, 6, 6)
    record = make_record(model, {"x": x}, act_bits={"wide": 16})
    fake, qdq = build(model, record)
    ops = [n.op_type for n in qdq.graph.node]
    assert ops.count("Round") == 1 and ops.count("QuantizeLinear") == 1
    np.testing.assert_allclose(run(qdq, {"x": x})[0], run(fake, {"x": x})[0], rtol=1e-5,
                               atol=1e-5)


def test_dmq_layers_quantize_the_balanced_input():
    b = ModelBuilder(26)
    y = b.conv("x", 4, 6, "a")
    y = b.node("Relu", [y], name="relu")
    b.conv(y, 6, 6, "b")
    model = b.build([value("x", [1, 4, 6, 6])], [value("b_out3", None)])
    x = gaussian(1, 4, 6, 6)
    assert qdq_calibration_tensors(model) == []  # b's input factors serve the Relu output
    record = make_record(model, {"x": x}, tensors=["relu_out2"])
    record["b"].tensor_balance_factor = np.linspace(0.5, 2.0, 6).astype(np.float32)
    fake, qdq = build(model, record)
    graph = OnnxGraph(qdq)
    quant = graph.producer(graph.producer(graph.node_by_name("b").input[0]).input[0])
    assert graph.producer(quant.input[0]).name == "b.dmq_balance"
    assert graph.node_by_name("relu") is not None  # b reads x/s from the raw Relu output
    np.testing.assert_allclose(run(qdq, {"x": x})[0], run(fake, {"x": x})[0], rtol=1e-5,
                               atol=1e-5)


def test_concat_pooling_transpose_and_reshape(tmp_path):
    b = ModelBuilder(27)
    y = b.conv("x", 4, 8, "c0")
    y = b.node("Relu", [y], name="r0")
    left = b.conv(y, 8, 8, "ca")
    right = b.conv(y, 8, 8, "cb", kernel=1)
    y = b.node("Concat", [left, right], name="cat", axis=1, outputs=["cat_out"])
    y = b.node("MaxPool", [y], name="mp", kernel_shape=[2, 2], strides=[2, 2])
    y = b.node("ConvTranspose", [y, b.constant("ct.w", gaussian(16, 4, 2, 2) * 0.3),
                                 b.constant("ct.b", gaussian(4))], name="ct",
               kernel_shape=[2, 2], strides=[2, 2])
    y = b.node("AveragePool", [y], name="ap", kernel_shape=[2, 2], strides=[2, 2])
    y = b.node("Reshape", [y, b.constant("shape", np.int64([2, -1]))], name="rs")
    b.node("Gemm", [y, b.constant("g.w", gaussian(64, 5) * 0.2)], name="g", outputs=["out"])
    model = b.build([value("x", [2, 4, 8, 8])], [value("out", [2, 5])])
    x = gaussian(2, 4, 8, 8)
    tensors = qdq_calibration_tensors(model)
    assert tensors == ["ca_out3", "cb_out4"]  # the Concat's output takes ct's input factors
    record = make_record(model, {"x": x}, tensors=tensors, channel_wise=True)
    fake, qdq = build(model, record)
    gemm_weight = OnnxGraph(qdq).producer(OnnxGraph(qdq).node_by_name("g").input[1])
    assert get_attribute(gemm_weight, "axis") == 1  # K x N weight, N channels
    ops = optimized_ops(qdq, tmp_path)
    assert ops["QLinearConcat"] == 1 and ops["QLinearConv"] == 3
    assert ops["QLinearAveragePool"] == 1 and ops["QGemm"] == 1
    expected = run(fake, {"x": x})[0]
    got = run(qdq, {"x": x})[0]
    assert np.abs(got - expected).max() <= 0.05 * (expected.max() - expected.min())
    del record[tensor_key("ca_out3")], record[tensor_key("cb_out4")]
    _, plain = build(model, record)
    np.testing.assert_allclose(run(plain, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
