"""Fake-quant and deploy ONNX writers (reference §4) against numpy integer references.

Each model is built with onnx.helper; weights are seeded Gaussian values (He-scaled), inputs
seeded Gaussian values, records hold min-max activation factors of those inputs and ARQ weight
factors (the core formulas). The numpy reference quantizes the input with the core formula,
runs the layer in exact integer arithmetic (int64), adds the int32 bias and multiplies by
``scale_w * scale_d``: the fake-quant model run by ONNX Runtime must give the same values.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_quant_models import (
    ModelBuilder,
    conv_nd,
    conv_transpose_2d,
    he,
    integer_input,
    integer_weight,
    intermediate_values,
    make_record,
    run,
    value,
)

from amct_core.errors import QuantizationError, UnsupportedLayerError
from amct_core.quant.bias import deq_scale, quantize_bias
from amct_core.quant.dequant_param import unpack_dequant_param
from amct_core.quant.record import LayerRecord
from amct_onnx.graph import OnnxGraph, get_attribute
from amct_onnx.writers.common import check_opset, collect_factors
from amct_onnx.writers.deploy import build_deploy_model
from amct_onnx.writers.fake_quant import build_fake_quant_model

RNG = np.random.default_rng(7)


def gaussian(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def build_all(model, record):
    layers, _ = collect_factors(model, record)
    return build_fake_quant_model(model, layers), build_deploy_model(model, layers)


def attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def constant(model, name):
    return OnnxGraph(model).constant_value(name)


# --------------------------------------------------------------------------------------------
# numpy reference of one quantized layer


def reference(model, name, x, record):
    """The quantized layer ``name`` of ``model`` on input ``x``, in integer arithmetic."""
    graph = OnnxGraph(model)
    node = graph.node_by_name(name)
    qx = integer_input(x, record)
    if node.op_type == "AveragePool":
        kernel = get_attribute(node, "kernel_shape")
        strides = get_attribute(node, "strides", [1, 1])
        n, c, h, w = qx.shape
        out_h, out_w = (h - kernel[0]) // strides[0] + 1, (w - kernel[1]) // strides[1] + 1
        sums = np.zeros((n, c, out_h, out_w))
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                sums += qx[:, :, i:i + strides[0] * out_h:strides[0],
                           j:j + strides[1] * out_w:strides[1]]
        return sums / (kernel[0] * kernel[1]) * np.float64(np.float32(record.scale_d))
    weight = graph.constant_value(node.input[1])
    bias = graph.constant_value(node.input[2]) if len(node.input) > 2 else None
    group = get_attribute(node, "group", 1)
    if node.op_type == "Conv":
        axis, spatial = 0, weight.ndim - 2
        qw = integer_weight(weight, record, axis)
        acc = conv_nd(qx, qw, get_attribute(node, "strides", [1] * spatial),
                      get_attribute(node, "pads", [0] * 2 * spatial),
                      get_attribute(node, "dilations", [1] * spatial), group)
        channel_shape = [1, -1] + [1] * spatial
    elif node.op_type == "ConvTranspose":
        axis = 1
        qw = integer_weight(weight, record, axis)
        acc = conv_transpose_2d(qx, qw, get_attribute(node, "strides", [1, 1]),
                                get_attribute(node, "pads", [0, 0, 0, 0]), group)
        channel_shape = [1, -1, 1, 1]
    else:
        trans_b = get_attribute(node, "transB", 0) if node.op_type == "Gemm" else 0
        axis = 0 if trans_b else 1
        qw = integer_weight(weight, record, axis)
        acc = qx @ (qw.T if trans_b else qw)
        channel_shape = [-1]
    scale_w = np.asarray(record.scale_w, np.float32)
    channels = acc.shape[1] if channel_shape != [-1] else acc.shape[-1]
    if scale_w.size > 1 and scale_w.size != channels:  # grouped ConvTranspose
        scale_w = np.tile(scale_w, channels // scale_w.size)
    if bias is not None:
        bias_int = quantize_bias(np.broadcast_to(bias.reshape(-1), (channels,)),
                                 scale_w if scale_w.size > 1 else scale_w[0], record.scale_d)
        acc = acc + bias_int.astype(np.int64).reshape(channel_shape)
    deq = deq_scale(scale_w, record.scale_d).astype(np.float64)
    return acc * (deq.reshape(channel_shape) if deq.size > 1 else deq[0])


def check_fake_quant(model, inputs, names, rtol=1e-5, atol=1e-5, **record_options):
    """Each layer in ``names`` of the fake-quant model equals the numpy reference."""
    record = make_record(model, inputs, layer_names=names, **record_options)
    layers, _ = collect_factors(model, record)
    fake = build_fake_quant_model(model, layers)
    onnx.checker.check_model(fake)
    wanted = [OnnxGraph(model).node_by_name(n).output[0] for n in names]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(fake)
    for tensor in wanted:
        if tensor not in {o.name for o in exposed.graph.output}:
            exposed.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT,
                                                                      None))
    layer_inputs = inputs_of(model, fake, inputs, names)
    outputs = run(exposed, inputs, wanted)
    for name, got in zip(names, outputs, strict=True):
        expected = reference(model, name, layer_inputs[name], record[name])
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=name)
    return record, fake


def inputs_of(model, fake, inputs, names):
    """The float inputs of the layers ``names`` inside the fake-quant model (after the
    quantized layers before them)."""
    graph = OnnxGraph(model)
    tensors = {n: graph.node_by_name(n).input[0] for n in names}
    values = intermediate_values(fake, inputs, list(tensors.values()))
    return {n: values[t] for n, t in tensors.items()}


# --------------------------------------------------------------------------------------------
# Fake-quant values


@pytest.mark.parametrize("opset", range(11, 19))
def test_fake_quant_conv_and_gemm_in_every_opset(opset):
    b = ModelBuilder(opset)
    y = b.conv("x", 3, 8, "conv", stride=2)
    y = b.node("Relu", [y], name="relu")
    y = b.node("Flatten", [y], name="flatten")
    b.node("Gemm", [y, b.constant("fc.w", he(b.rng, [5, 8 * 4 * 4], 128)),
                    b.constant("fc.b", gaussian(5))], name="fc", transB=1, outputs=["out"])
    model = b.build([value("x", [2, 3, 8, 8])], [value("out", [2, 5])], opset)
    check_fake_quant(model, {"x": gaussian(2, 3, 8, 8)}, ["conv", "fc"])


def test_fake_quant_grouped_dilated_and_3d_convs():
    b = ModelBuilder(1)
    y = b.conv("x", 8, 8, "depthwise", group=8)
    y = b.conv(y, 8, 12, "grouped", group=4, dilations=[2, 2])
    y = b.conv(y, 12, 6, "pointwise", kernel=1, bias=False)
    b.conv("v", 3, 4, "conv3d", spatial=3, dilations=[1, 2, 2])
    model = b.build([value("x", [2, 8, 9, 9]), value("v", [1, 3, 4, 7, 7])],
                    [value(y, None), value("conv3d_out4", None)])
    check_fake_quant(model, {"x": gaussian(2, 8, 9, 9), "v": gaussian(1, 3, 4, 7, 7)},
                     ["depthwise", "grouped", "pointwise", "conv3d"])


@pytest.mark.parametrize("group", [1, 2])
def test_fake_quant_conv_transpose(group):
    b = ModelBuilder(2)
    b.node("ConvTranspose", ["x", b.constant("ct.w", he(b.rng, [4, 6 // group, 3, 3], 36)),
                             b.constant("ct.b", gaussian(6))], name="deconv",
           kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], group=group,
           outputs=["out"])
    model = b.build([value("x", [2, 4, 5, 5])], [value("out", None)])
    check_fake_quant(model, {"x": gaussian(2, 4, 5, 5)}, ["deconv"])


def test_fake_quant_gemm_without_transpose_matmul_and_per_channel_linear():
    b = ModelBuilder(3)
    y = b.node("Gemm", ["x", b.constant("g.w", he(b.rng, [6, 7], 6)),
                        b.constant("g.b", gaussian(1, 7))], name="gemm")
    b.node("MatMul", ["s", b.constant("m.w", he(b.rng, [6, 3], 6))], name="matmul",
           outputs=["mm"])
    model = b.build([value("x", [4, 6]), value("s", [2, 5, 6])],
                    [value(y, None), value("mm", None)])
    feeds = {"x": gaussian(4, 6), "s": gaussian(2, 5, 6)}
    check_fake_quant(model, feeds, ["gemm", "matmul"])
    check_fake_quant(model, feeds, ["gemm", "matmul"], channel_wise=True)


def test_fake_quant_average_pool_and_symmetric_activations():
    b = ModelBuilder(4)
    b.node("AveragePool", ["x"], name="pool", kernel_shape=[2, 2], strides=[2, 2],
           outputs=["out"])
    model = b.build([value("x", [2, 3, 6, 6])], [value("out", None)])
    record, fake = check_fake_quant(model, {"x": gaussian(2, 3, 6, 6)}, ["pool"],
                                    asymmetric=False)
    assert record["pool"].offset_d == 0
    pool = OnnxGraph(fake).producer("out")
    assert pool.op_type == "Mul" and pool.name == "pool.dequant"
    assert constant(fake, pool.input[1]) == np.float32(record["pool"].scale_d)


def test_fake_quant_int16_activations_and_int4_weights():
    b = ModelBuilder(5)
    b.conv("x", 3, 4, "conv")
    model = b.build([value("x", [1, 3, 6, 6])], [value("conv_out1", None)])
    _, fake = check_fake_quant(model, {"x": gaussian(1, 3, 6, 6)}, ["conv"],
                               act_bits={"conv": 16}, wts_bits={"conv": 4})
    clip = next(n for n in fake.graph.node if n.op_type == "Clip")
    assert constant(fake, clip.input[1]) == -32768 and constant(fake, clip.input[2]) == 32767
    weight = constant(fake, "conv.weight")
    assert weight.min() >= -8 and weight.max() <= 7


# --------------------------------------------------------------------------------------------
# Fake-quant layout


def conv_pair_model(opset=13):
    b = ModelBuilder(6)
    y = b.node("Relu", ["x"], name="relu", outputs=["r"])
    b.conv(y, 4, 4, "left")
    b.conv(y, 4, 6, "right", kernel=1)
    b.node("MaxPool", [y], name="pool", kernel_shape=[2, 2], strides=[2, 2], outputs=["p"])
    return b.build([value("x", [1, 4, 6, 6])],
                   [value("left_out2", None), value("right_out3", None), value("p", None)],
                   opset)


def test_fake_quant_chain_layout_and_constants():
    model = conv_pair_model()
    x = gaussian(1, 4, 6, 6)
    record = make_record(model, {"x": x}, layer_names=["left"])
    fake, _ = build_all(model, record)
    graph = OnnxGraph(fake)
    chain, tensor = [], "r"
    while True:
        readers = [n for n in graph.consumers_of(tensor) if n.op_type != "MaxPool"
                   and n.name != "right"]
        node = readers[0]
        chain.append(node.op_type)
        if node.op_type == "Conv":
            break
        tensor = node.output[0]
    assert chain == ["Mul", "Round", "Add", "Clip", "Sub", "Conv"]
    mul = graph.node_by_name("left.quant.mul")
    assert constant(fake, mul.input[1]) == np.float32(1.0 / np.float32(record["left"].scale_d))
    clip = graph.node_by_name("left.quant.clip")
    assert (constant(fake, clip.input[1]), constant(fake, clip.input[2])) == (-128, 127)
    assert constant(fake, graph.node_by_name("left.quant.add").input[1]) == \
        record["left"].offset_d
    dequant = graph.producer("left_out2")
    assert dequant.name == "left.dequant" and dequant.op_type == "Mul"
    deq = constant(fake, dequant.input[1])
    assert deq.shape == (1, 4, 1, 1)
    np.testing.assert_array_equal(deq.reshape(-1), deq_scale(record["left"].scale_w,
                                                             record["left"].scale_d))
    weight = constant(fake, "left.weight")
    np.testing.assert_array_equal(weight, np.round(weight))
    bias = constant(fake, "left.bias")
    np.testing.assert_array_equal(bias, quantize_bias(
        constant(model, "left.bias"), record["left"].scale_w, record["left"].scale_d))
    # the unquantized layer keeps its float weights and output
    np.testing.assert_array_equal(constant(fake, "right.weight"), constant(model, "right.weight"))
    assert graph.producer("right_out3").op_type == "Conv"


def test_layers_with_identical_factors_share_one_chain_and_maxpool_gets_anti_quant():
    model = conv_pair_model()
    x = gaussian(1, 4, 6, 6)
    record = make_record(model, {"x": x})
    fake, deploy = build_all(model, record)
    fake_ops = [n.op_type for n in fake.graph.node]
    assert fake_ops.count("Round") == 2  # the shared chain and the MaxPool's own
    graph = OnnxGraph(fake)
    assert graph.node_by_name("right.quant.mul") is None
    assert graph.node_by_name("left").input[0] == graph.node_by_name("right").input[0]
    anti = graph.producer(graph.node_by_name("pool").input[0])
    assert anti.name == "pool.anti_quant" and anti.op_type == "Mul"
    assert graph.producer(anti.input[0]).name == "pool.quant.sub"
    # the MaxPool reads the dequantized values: compare with numpy
    p = run(fake, {"x": x}, ["p"])[0]
    r = np.maximum(x, 0)
    restored = integer_input(r, record["left"]) * np.float32(record["left"].scale_d)
    expected = restored.reshape(1, 4, 3, 2, 3, 2).max(axis=(3, 5))
    np.testing.assert_allclose(p, expected, rtol=1e-6, atol=1e-6)
    # deploy: one AscendQuant for both layers, a Quant + AntiQuant pair for the MaxPool
    deploy_graph = OnnxGraph(deploy)
    quants = [n.name for n in deploy.graph.node if n.op_type == "AscendQuant"]
    assert quants == ["left.quant", "pool.quant"]
    anti = deploy_graph.node_by_name("pool.anti_quant")
    assert anti.op_type == "AscendAntiQuant" and anti.domain == ""
    assert attrs(anti) == {"scale": pytest.approx(record["left"].scale_d),
                           "offset": record["left"].offset_d, "dst_type": b"INT8"}
    assert deploy_graph.node_by_name("pool").input[0] == anti.output[0]


def test_layers_with_different_factors_get_separate_chains():
    model = conv_pair_model()
    x = gaussian(1, 4, 6, 6)
    record = make_record(model, {"x": x})
    record["right"].scale_d *= 2
    fake, deploy = build_all(model, record)
    graph = OnnxGraph(fake)
    assert graph.node_by_name("right.quant.mul") is not None
    assert graph.node_by_name("left").input[0] != graph.node_by_name("right").input[0]
    assert graph.node_by_name("pool").input[0] == "r"  # no AntiQuant: two sets of factors
    assert [n.name for n in deploy.graph.node if n.op_type == "AscendQuant"] == [
        "left.quant", "right.quant"]


def test_bias_out_of_int32_range_names_the_layer():
    b = ModelBuilder(8)
    b.conv("x", 2, 2, "conv")
    model = b.build([value("x", [1, 2, 4, 4])], [value("conv_out1", None)])
    record = make_record(model, {"x": gaussian(1, 2, 4, 4)})
    bias = model.graph.initializer[1]
    bias.CopyFrom(numpy_helper.from_array(np.float32([1e12, 0.0]), bias.name))
    with pytest.raises(QuantizationError, match=r"^Do bias quantize failed\..*'conv'"):
        collect_factors(model, record)


def test_opset_below_11_is_rejected():
    b = ModelBuilder(9)
    b.conv("x", 2, 2, "conv")
    model = b.build([value("x", [1, 2, 4, 4])], [value("conv_out1", None)], opset=10)
    with pytest.raises(UnsupportedLayerError, match=r"'m\.onnx' uses ONNX opset 10.*>= 11"):
        check_opset(model, "m.onnx")


# --------------------------------------------------------------------------------------------
# Deploy layout, decoded back to the record


def decode_deploy_layer(deploy, name):
    """The record values a deploy layer holds: (scale_d, offset_d, scale_w, offset_w,
    weight int8, bias int32, dst_type)."""
    graph = OnnxGraph(deploy)
    layer = graph.node_by_name(name)
    quant = graph.producer(layer.input[0])
    dequant = graph.consumers_of(layer.output[0])[0]
    assert (quant.op_type, quant.domain, dequant.op_type, dequant.domain) == (
        "AscendQuant", "", "AscendDequant", "")
    quant_attrs, dequant_attrs = attrs(quant), attrs(dequant)
    assert [a.type for a in quant.attribute] == [helper.AttributeProto.FLOAT,
                                                 helper.AttributeProto.FLOAT,
                                                 helper.AttributeProto.STRING]
    assert dequant_attrs == {"dtype": 0}
    assert dequant.name == f"{name}.dequant" and dequant.input[1] == f"{name}.dequant.param"
    param = graph.initializer(dequant.input[1])
    assert param.data_type == TensorProto.UINT64
    deq, offset_w = unpack_dequant_param(numpy_helper.to_array(param))
    scale_d = 1.0 / quant_attrs["scale"]
    weight = bias = None
    if len(layer.input) > 1:
        weight_tensor = graph.initializer(layer.input[1])
        assert weight_tensor.data_type == TensorProto.INT8
        weight = numpy_helper.to_array(weight_tensor)
    if len(layer.input) > 2:
        bias_tensor = graph.initializer(layer.input[2])
        assert bias_tensor.data_type == TensorProto.INT32
        bias = numpy_helper.to_array(bias_tensor)
    return (quant, scale_d, int(quant_attrs["offset"]), deq / np.float32(scale_d), offset_w,
            weight, bias, quant_attrs["dst_type"].decode())


def test_deploy_model_decodes_back_to_the_record():
    b = ModelBuilder(10)
    y = b.conv("x", 3, 8, "conv")
    y = b.node("Relu", [y], name="relu")
    y = b.node("AveragePool", [y], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    y = b.node("Flatten", [y], name="flatten")
    b.node("Gemm", [y, b.constant("fc.w", he(b.rng, [32, 5], 32)),
                    b.constant("fc.b", gaussian(5))], name="fc", outputs=["out"])
    model = b.build([value("x", [2, 3, 4, 4])], [value("out", None)])
    record = make_record(model, {"x": gaussian(2, 3, 4, 4)})
    _, deploy = build_all(model, record)
    for name in ("conv", "pool", "fc"):
        quant, scale_d, offset_d, scale_w, offset_w, weight, bias, dst = \
            decode_deploy_layer(deploy, name)
        expected = record[name]
        assert quant.name == f"{name}.quant" and dst == "INT8"
        assert scale_d == pytest.approx(expected.scale_d, rel=1e-6)
        assert offset_d == expected.offset_d
        want_w = expected.scale_w if name != "pool" else np.ones(1, np.float32)
        np.testing.assert_allclose(scale_w, want_w, rtol=1e-6)
        np.testing.assert_array_equal(offset_w, np.zeros_like(offset_w))
        if name == "pool":
            assert weight is None
            continue
        axis = 0 if name == "conv" else 1
        np.testing.assert_array_equal(weight, integer_weight(constant(model, f"{name}.w"
                                                                      if name == "fc" else
                                                                      "conv.weight"),
                                                             expected, axis))
        original_bias = constant(model, "fc.b" if name == "fc" else "conv.bias")
        np.testing.assert_array_equal(bias, quantize_bias(original_bias, expected.scale_w,
                                                          expected.scale_d))
    assert OnnxGraph(deploy).producer("out").op_type == "AscendDequant"
    assert {o.domain for o in deploy.opset_import} == {""}


def test_deploy_keeps_unquantized_layers_and_int4_dst_type():
    b = ModelBuilder(11)
    y = b.conv("x", 2, 3, "a")
    b.conv(y, 3, 3, "b")
    model = b.build([value("x", [1, 2, 5, 5])], [value("b_out2", None)])
    record = make_record(model, {"x": gaussian(1, 2, 5, 5)}, layer_names=["b"],
                         act_bits={"b": 4}, wts_bits={"b": 4})
    _, deploy = build_all(model, record)
    graph = OnnxGraph(deploy)
    assert graph.initializer("a.weight").data_type == TensorProto.FLOAT
    quant = graph.node_by_name("b.quant")
    assert attrs(quant)["dst_type"] == b"INT4"
    weight = numpy_helper.to_array(graph.initializer("b.weight"))
    assert weight.dtype == np.int8 and weight.min() >= -8 and weight.max() <= 7


def test_an_existing_record_layer_without_weight_factors_is_reported():
    b = ModelBuilder(12)
    b.conv("x", 2, 2, "conv")
    model = b.build([value("x", [1, 2, 4, 4])], [value("conv_out1", None)])
    with pytest.raises(Exception, match=r"'conv' \(no scale_w\)"):
        collect_factors(model, {"conv": LayerRecord(scale_d=0.1, offset_d=0)}, "rec.txt")


# --------------------------------------------------------------------------------------------
# DMQ factors (reference §3.4: X/s and W*s at save time)


def dmq_model():
    b = ModelBuilder(13)
    b.conv("x", 4, 6, "conv")
    b.node("MatMul", ["t", b.constant("mm.w", he(b.rng, [5, 3], 5))], name="mm",
           outputs=["mm_out"])
    return b.build([value("x", [2, 4, 6, 6]), value("t", [2, 7, 5])],
                   [value("conv_out1", None), value("mm_out", None)])


def dmq_record(model, feeds, balance):
    """Factors measured on x/s and W*s, as a DMQ calibration would give them."""
    balanced = onnx.ModelProto()
    balanced.CopyFrom(model)
    graph = OnnxGraph(balanced)
    graph.replace_initializer("conv.weight", constant(model, "conv.weight")
                              * balance["conv"].reshape(1, -1, 1, 1))
    graph.replace_initializer("mm.w", constant(model, "mm.w") * balance["mm"].reshape(-1, 1))
    scaled = {"x": feeds["x"] / balance["conv"].reshape(1, -1, 1, 1),
              "t": feeds["t"] / balance["mm"]}
    record = make_record(balanced, scaled)
    for name, factors in balance.items():
        record[name].tensor_balance_factor = factors
    return balanced, scaled, record


def test_dmq_factors_scale_inputs_and_weights():
    model = dmq_model()
    feeds = {"x": gaussian(2, 4, 6, 6), "t": gaussian(2, 7, 5)}
    balance = {"conv": np.float32([0.5, 2.0, 1.0, 4.0]),
               "mm": np.float32([1.5, 0.25, 1.0, 3.0, 0.75])}
    balanced, scaled, record = dmq_record(model, feeds, balance)
    fake, deploy = build_all(model, record)
    conv_out, mm_out = run(fake, feeds)
    np.testing.assert_allclose(conv_out, reference(balanced, "conv", scaled["x"],
                                                   record["conv"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mm_out, reference(balanced, "mm", scaled["t"], record["mm"]),
                               rtol=1e-5, atol=1e-5)
    graph = OnnxGraph(deploy)
    mul = graph.producer(graph.node_by_name("conv.quant").input[0])
    assert mul.name == "conv.dmq_balance" and mul.op_type == "Mul"
    np.testing.assert_allclose(constant(deploy, mul.input[1]).reshape(-1),
                               1 / balance["conv"], rtol=1e-7)
    assert constant(deploy, mul.input[1]).shape == (1, 4, 1, 1)
    np.testing.assert_array_equal(
        constant(deploy, "conv.weight"),
        integer_weight(constant(balanced, "conv.weight"), record["conv"], 0))
    assert constant(deploy, graph.producer(graph.node_by_name("mm.quant").input[0])
                    .input[1]).shape == (5,)


def test_dmq_factors_are_checked():
    model = dmq_model()
    feeds = {"x": gaussian(2, 4, 6, 6), "t": gaussian(2, 7, 5)}
    record = make_record(model, feeds)
    record["conv"].tensor_balance_factor = np.ones(3, np.float32)
    with pytest.raises(Exception, match="'conv' has 3 tensor_balance_factor values but 4"):
        collect_factors(model, record, "rec.txt")
    b = ModelBuilder(14)
    b.conv("x", 4, 4, "dw", group=4)
    grouped = b.build([value("x", [1, 4, 5, 5])], [value("dw_out1", None)])
    record = make_record(grouped, {"x": gaussian(1, 4, 5, 5)})
    record["dw"].tensor_balance_factor = np.ones(1, np.float32)
    with pytest.raises(UnsupportedLayerError, match="'dw'.*ungrouped"):
        collect_factors(grouped, record, "rec.txt")
