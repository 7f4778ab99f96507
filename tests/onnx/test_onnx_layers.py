"""Which ONNX nodes amct_onnx.layers finds quantizable (reference §3.5), and why not."""
import numpy as np
import pytest
from onnx import helper
from onnx_quant_models import ModelBuilder, he, value

from amct_core.errors import AmctValueError
from amct_onnx.layers import assign_node_names, find_quant_layers, scan_quant_layers


def by_name(model):
    return {info.name: info for info in find_quant_layers(model)}


def skipped(model):
    return {s.name: s.reason for s in scan_quant_layers(model).skipped}


def test_conv_2d_grouped_and_3d():
    b = ModelBuilder()
    y = b.conv("x", 8, 16, "conv")
    y = b.conv(y, 16, 16, "depthwise", group=16, bias=False)
    b.conv("v", 4, 6, "conv3d", spatial=3)
    b.conv("v", 4, 6, "conv3d_dilated", spatial=3, dilations=[2, 1, 1])
    b.conv("v", 4, 6, "conv3d_hw_dilated", spatial=3, dilations=[1, 2, 2])
    b.node("Conv", ["s", b.constant("c1.w", he(b.rng, [4, 2, 3], 6))], name="conv1d",
           kernel_shape=[3])
    model = b.build([value("x", [1, 8, 8, 8]), value("v", [1, 4, 4, 6, 6]),
                     value("s", [1, 2, 9])], [value(y, None)])
    found = by_name(model)
    assert set(found) == {"conv", "depthwise", "conv3d", "conv3d_hw_dilated"}
    conv = found["conv"]
    assert (conv.kind, conv.op_type, conv.channel_axis, conv.spatial_rank) == (
        "conv", "Conv", 0, 2)
    assert (conv.weight_name, conv.bias_name, conv.out_channels) == (
        "conv.weight", "conv.bias", 16)
    assert found["depthwise"].group == 16 and found["depthwise"].bias_name is None
    assert found["conv3d"].spatial_rank == 3
    reasons = skipped(model)
    assert "dilation_d = 1" in reasons["conv3d_dilated"]
    assert "2-D and 3-D" in reasons["conv1d"]


def test_conv_transpose_2d_only():
    b = ModelBuilder()
    b.node("ConvTranspose", ["x", b.constant("ct.w", he(b.rng, [8, 4, 3, 3], 72)),
                             b.constant("ct.b", np.zeros(8, np.float32))],
           name="deconv", kernel_shape=[3, 3], group=2)
    b.node("ConvTranspose", ["v", b.constant("ct3.w", he(b.rng, [4, 4, 3, 3, 3], 108))],
           name="deconv3d", kernel_shape=[3, 3, 3])
    model = b.build([value("x", [1, 8, 5, 5]), value("v", [1, 4, 3, 3, 3])], [])
    info = by_name(model)["deconv"]
    assert (info.kind, info.channel_axis, info.out_channels, info.group) == (
        "conv_transpose", 1, 8, 2)
    np.testing.assert_array_equal(info.per_output_channel(np.arange(4)),
                                  [0, 1, 2, 3, 0, 1, 2, 3])
    assert "2-D ConvTranspose" in skipped(model)["deconv3d"]


def test_gemm_variants():
    b = ModelBuilder()
    b.node("Gemm", ["x", b.constant("g1.w", he(b.rng, [5, 4], 4)),
                    b.constant("g1.b", np.zeros(5, np.float32))], name="fc_t", transB=1)
    b.node("Gemm", ["x", b.constant("g2.w", he(b.rng, [4, 5], 4)),
                    b.constant("g2.b", np.zeros((1, 5), np.float32))], name="fc")
    b.node("Gemm", ["x", b.constant("g3.w", he(b.rng, [4, 5], 4))], name="fc_alpha",
           alpha=0.5)
    b.node("Gemm", ["x", "y"], name="fc_dynamic")
    b.node("Gemm", ["x", b.constant("g4.w", he(b.rng, [4, 5], 4)),
                    b.constant("g4.b", np.zeros((3, 5), np.float32))], name="fc_bias_mn")
    model = b.build([value("x", [3, 4]), value("y", [4, 5])], [])
    found = by_name(model)
    assert found["fc_t"].channel_axis == 0 and found["fc"].channel_axis == 1
    assert found["fc_t"].kind == "linear" and found["fc"].out_channels == 5
    assert found["fc"].bias_name == "g2.b"
    reasons = skipped(model)
    assert "alpha = beta = 1" in reasons["fc_alpha"]
    assert "not a constant initializer" in reasons["fc_dynamic"]
    assert "one value per output channel" in reasons["fc_bias_mn"]


def test_matmul_needs_a_constant_2d_second_input():
    b = ModelBuilder()
    b.node("MatMul", ["x", b.constant("m.w", he(b.rng, [4, 6], 4))], name="mm")
    b.node("MatMul", ["x3", b.constant("m3.w", he(b.rng, [2, 4, 6], 4))], name="mm3")
    b.node("MatMul", [b.constant("m.a", he(b.rng, [3, 4], 4)), "w"], name="mm_const_a")
    model = b.build([value("x", [2, 7, 4]), value("x3", [2, 3, 4]), value("w", [4, 6])], [])
    found = by_name(model)
    assert list(found) == ["mm"]
    assert (found["mm"].channel_axis, found["mm"].out_channels, found["mm"].spatial_rank) == (
        1, 6, 0)
    reasons = skipped(model)
    assert "rank 3" in reasons["mm3"]
    assert "data input 'm.a' is a constant" in reasons["mm_const_a"]


def test_average_pool_2d():
    b = ModelBuilder()
    b.node("AveragePool", ["x"], name="pool", kernel_shape=[2, 2])
    b.node("AveragePool", ["s"], name="pool1d", kernel_shape=[2])
    model = b.build([value("x", [1, 3, 4, 4]), value("s", [1, 3, 4])], [])
    info = by_name(model)["pool"]
    assert (info.kind, info.weight_name, info.channel_axis, info.layer.has_weight) == (
        "avgpool", None, None, False)
    assert "2-D AveragePool" in skipped(model)["pool1d"]


def test_shared_weights_are_reported_not_quantized():
    b = ModelBuilder()
    weight = b.constant("shared.w", he(b.rng, [4, 4, 3, 3], 36))
    y = b.node("Conv", ["x", weight], name="first", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.node("Conv", [y, weight], name="second", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = b.build([value("x", [1, 4, 6, 6])], [])
    assert find_quant_layers(model) == []
    reasons = skipped(model)
    assert "'shared.w' is shared" in reasons["first"] and "'second'" in reasons["first"]
    assert "shared weights are not quantized" in reasons["second"]


def test_float16_weights_are_not_quantized():
    b = ModelBuilder()
    b.node("MatMul", ["x", b.constant("h.w", np.ones((4, 2), np.float16))], name="half")
    model = b.build([value("x", [1, 4])], [])
    assert "FLOAT16" in skipped(model)["half"]


def test_unnamed_and_repeated_names():
    b = ModelBuilder()
    b.node("Relu", ["x"], name="", outputs=["a"])
    b.node("Conv", ["a", b.constant("w1", he(b.rng, [2, 2, 1, 1], 2))], name="",
           outputs=["b"], kernel_shape=[1, 1])
    b.node("Conv", ["b", b.constant("w2", he(b.rng, [2, 2, 1, 1], 2))], name="conv",
           outputs=["c"], kernel_shape=[1, 1])
    b.node("Conv", ["c", b.constant("w3", he(b.rng, [2, 2, 1, 1], 2))], name="conv",
           outputs=["d"], kernel_shape=[1, 1])
    b.node("Relu", ["d"], name="", outputs=["e"])
    model = b.build([value("x", [1, 2, 3, 3])], [value("e", None)])
    reasons = skipped(model)
    assert "no name" in reasons["Conv node #1"]
    assert "2 nodes are called 'conv'" in reasons["conv"]
    copy = model.__class__()
    copy.CopyFrom(model)
    assert assign_node_names(model) == ["Relu_0", "Conv_0", "conv_1", "Relu_1"]
    assign_node_names(copy)
    assert [n.name for n in copy.graph.node] == [n.name for n in model.graph.node]
    assert set(by_name(model)) == {"Conv_0", "conv", "conv_1"}
    assert assign_node_names(model) == []


def test_nodes_of_other_domains_are_ignored():
    b = ModelBuilder()
    b.nodes.append(helper.make_node("Conv", ["x", "w"], ["y"], name="custom",
                                    domain="com.example"))
    model = b.build([value("x", [1, 1, 2, 2])], [])
    scan = scan_quant_layers(model)
    assert scan.layers == [] and scan.skipped == []


def test_per_output_channel_rejects_a_foreign_record():
    b = ModelBuilder()
    b.conv("x", 4, 6, "conv")
    info = by_name(b.build([value("x", [1, 4, 5, 5])], []))["conv"]
    assert info.per_output_channel(np.float32([2.0])).tolist() == [2.0]
    with pytest.raises(AmctValueError, match="'conv': 4 weight factors"):
        info.per_output_channel(np.ones(4))
