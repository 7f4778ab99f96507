"""BatchNormalization folding (amct_onnx.fusion, reference §3.1 step 1, §3.2 skip_fusion_layers).

Models are built with onnx.helper, weights from numpy's default_rng with fixed seeds. Every fold
is checked twice: the folded model's outputs equal the original's in onnxruntime (1e-5), and the
folded weight equals W·gamma/sqrt(var+eps) computed here with numpy.
"""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from ptq_model_zoo import (
    bn_node,
    bn_params,
    conv_weight,
    float_input,
    make_model,
    resnet_like,
    run,
)

from amct_onnx.fusion import fold_batchnorm
from amct_onnx.layers import find_quant_layers

OPSETS = [11, 13, 15]


def _initializer(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _op_types(model):
    return [node.op_type for node in model.graph.node]


def _assert_same_outputs(original, folded, feeds, atol=1e-5):
    for want, got in zip(run(original, feeds), run(folded, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def _conv_bn(opset, *, bias=True, group=1, cin=4, cout=6, dims=2, extra_consumer=False):
    rng = np.random.default_rng(1)
    kernel = [3] * dims
    init = {"w": conv_weight(rng, (cout, cin // group, *kernel))}
    inputs = ["x", "w"]
    if bias:
        init["b"] = rng.normal(0, 0.1, cout).astype(np.float32)
        inputs.append("b")
    init.update(bn_params(rng, "bn", cout))
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", kernel_shape=kernel,
                              pads=[1] * (2 * dims), group=group),
             bn_node("bn", "c", "y", epsilon=1e-3)]
    outputs = [float_input("y", None)]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        outputs.append(float_input("r", None))
    model = make_model(nodes, [float_input("x", [2, cin, *([7] * dims)])], outputs, init, opset)
    feeds = {"x": rng.normal(0, 1, (2, cin, *([7] * dims))).astype(np.float32)}
    return model, feeds, init


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_is_folded_with_identical_outputs(opset, bias):
    model, feeds, init = _conv_bn(opset, bias=bias)
    result = fold_batchnorm(model)
    assert result.fused == [("conv", "bn")]
    assert _op_types(result.model) == ["Conv"]
    assert result.model.graph.node[0].output[0] == "y"
    onnx.checker.check_model(result.model)
    _assert_same_outputs(model, result.model, feeds)
    factor = init["bn.scale"].astype(np.float64) / np.sqrt(init["bn.var"] + 1e-3)
    weight = _initializer(result.model, result.model.graph.node[0].input[1])
    np.testing.assert_allclose(weight, init["w"] * factor[:, None, None, None], rtol=1e-6)
    bias_in = init["b"] if bias else 0.0
    expected_bias = (bias_in - init["bn.mean"]) * factor + init["bn.bias"]
    np.testing.assert_allclose(_initializer(result.model, result.model.graph.node[0].input[2]),
                               expected_bias, rtol=1e-5, atol=1e-7)
    # the BN parameters are gone, the input model is untouched
    assert {t.name for t in result.model.graph.initializer} == {"w", "b"} if bias else {
        "w", "conv.bias"}
    assert _op_types(model) == ["Conv", "BatchNormalization"]


@pytest.mark.parametrize("group", [2, 6])
def test_grouped_and_depthwise_conv(group):
    model, feeds, _ = _conv_bn(13, group=group, cin=6, cout=6)
    result = fold_batchnorm(model)
    assert result.fused == [("conv", "bn")]
    _assert_same_outputs(model, result.model, feeds)


def test_conv3d():
    model, feeds, _ = _conv_bn(13, dims=3)
    result = fold_batchnorm(model)
    assert result.fused == [("conv", "bn")]
    _assert_same_outputs(model, result.model, feeds)


def test_not_folded_when_conv_output_has_another_consumer():
    model, _, _ = _conv_bn(13, extra_consumer=True)
    result = fold_batchnorm(model)
    assert result.fused == []
    assert _op_types(result.model) == _op_types(model)


def test_skip_fusion_layers_is_respected():
    model, _, _ = _conv_bn(13)
    result = fold_batchnorm(model, skip_fusion_layers=["conv"])
    assert result.fused == []
    assert _op_types(result.model) == ["Conv", "BatchNormalization"]


def test_bn_with_computed_parameters_is_not_folded():
    model, _, _ = _conv_bn(13)
    graph = model.graph
    graph.node.insert(0, helper.make_node("Identity", ["bn.mean"], ["mean2"], name="id"))
    graph.node[2].input[3] = "mean2"
    result = fold_batchnorm(model)
    assert result.fused == []


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(opset, group):
    rng = np.random.default_rng(2)
    cin, cout = 4, 6
    init = {"w": conv_weight(rng, (cin, cout // group, 3, 3)),
            "b": rng.normal(0, 0.1, cout).astype(np.float32)}
    init.update(bn_params(rng, "bn", cout))
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv",
                              kernel_shape=[3, 3], strides=[2, 2], group=group),
             bn_node("bn", "c", "y")]
    model = make_model(nodes, [float_input("x", [2, cin, 5, 5])], [float_input("y", None)],
                       init, opset)
    result = fold_batchnorm(model)
    assert result.fused == [("deconv", "bn")]
    feeds = {"x": rng.normal(0, 1, (2, cin, 5, 5)).astype(np.float32)}
    _assert_same_outputs(model, result.model, feeds)
    if group == 1:
        factor = init["bn.scale"] / np.sqrt(init["bn.var"].astype(np.float64) + 1e-5)
        np.testing.assert_allclose(_initializer(result.model, "w"),
                                   init["w"] * factor[None, :, None, None], rtol=1e-6)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize(("trans_b", "c_shape"), [(0, (5,)), (1, (1, 5)), (1, None), (0, ())])
def test_gemm(opset, trans_b, c_shape):
    rng = np.random.default_rng(3)
    k, n = 7, 5
    weight = conv_weight(rng, (n, k) if trans_b else (k, n))
    init = {"w": weight}
    inputs = ["x", "w"]
    if c_shape is not None:
        init["c"] = rng.normal(0, 0.3, c_shape).astype(np.float32)
        inputs.append("c")
    init.update(bn_params(rng, "bn", n))
    nodes = [helper.make_node("Gemm", inputs, ["g"], name="fc", transB=trans_b, alpha=0.7,
                              beta=1.3),
             bn_node("bn", "g", "y")]
    model = make_model(nodes, [float_input("x", [4, k])], [float_input("y", None)], init,
                       opset)
    result = fold_batchnorm(model)
    assert result.fused == [("fc", "bn")]
    _assert_same_outputs(model, result.model,
                         {"x": rng.normal(0, 1, (4, k)).astype(np.float32)})
    gemm = result.model.graph.node[0]
    assert {a.name: a.f for a in gemm.attribute if a.name in ("alpha", "beta")} == {
        "alpha": 1.0, "beta": 1.0}
    assert [info.name for info in find_quant_layers(result.model)] == ["fc"]


def test_shared_weight_is_copied_not_changed():
    rng = np.random.default_rng(4)
    init = {"w": conv_weight(rng, (4, 4, 3, 3))}
    init.update(bn_params(rng, "bn1", 4))
    init.update(bn_params(rng, "bn2", 4))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1] * 4),
             bn_node("bn1", "c1", "y1"),
             helper.make_node("Conv", ["y1", "w"], ["c2"], name="conv2", pads=[1] * 4),
             bn_node("bn2", "c2", "y2")]
    model = make_model(nodes, [float_input("x", [1, 4, 6, 6])], [float_input("y2", None)],
                       init)
    result = fold_batchnorm(model)
    assert result.fused == [("conv1", "bn1"), ("conv2", "bn2")]
    weights = [node.input[1] for node in result.model.graph.node]
    assert len(set(weights)) == 2
    _assert_same_outputs(model, result.model,
                         {"x": rng.normal(0, 1, (1, 4, 6, 6)).astype(np.float32)})


def test_two_batchnorms_in_a_row_are_both_folded():
    rng = np.random.default_rng(5)
    init = {"w": conv_weight(rng, (4, 3, 3, 3))}
    init.update(bn_params(rng, "bn1", 4))
    init.update(bn_params(rng, "bn2", 4))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             bn_node("bn1", "c", "b1"), bn_node("bn2", "b1", "y")]
    model = make_model(nodes, [float_input("x", [1, 3, 6, 6])], [float_input("y", None)], init)
    result = fold_batchnorm(model)
    assert result.fused == [("conv", "bn1"), ("conv", "bn2")]
    _assert_same_outputs(model, result.model,
                         {"x": rng.normal(0, 1, (1, 3, 6, 6)).astype(np.float32)})


def test_ir3_model_listing_initializers_as_inputs_stays_valid():
    model, feeds, _ = _conv_bn(8, bias=False)
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    onnx.checker.check_model(model)
    result = fold_batchnorm(model)
    assert result.fused == [("conv", "bn")]
    onnx.checker.check_model(result.model)
    assert {v.name for v in result.model.graph.input} == {"x", "w", "conv.bias"}
    _assert_same_outputs(model, result.model, feeds)


@pytest.mark.parametrize("opset", [11, 13])
def test_resnet_like_all_batchnorms_folded(opset):
    model = resnet_like(opset=opset, seed=7)
    result = fold_batchnorm(model)
    assert "BatchNormalization" not in _op_types(result.model)
    assert len(result.fused) == 5
    feeds = {"input": np.random.default_rng(8).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)}
    _assert_same_outputs(model, result.model, feeds)
