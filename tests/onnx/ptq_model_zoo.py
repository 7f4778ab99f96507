"""Small ONNX models for the PTQ tests, built with onnx.helper (no torch).

Weights come from ``numpy.random.default_rng(seed)`` with a fixed seed, or (``digits_mlp``)
from an sklearn MLPClassifier trained on the sklearn digits data set (shipped with sklearn, no
download).
"""
from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_FOR_OPSET = {11: 6, 13: 7, 15: 8, 17: 8}


def make_model(nodes, inputs, outputs, initializers, opset: int = 13,
               ir_version: int | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(value), name)
                               for name, value in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="amct-tests")
    model.ir_version = ir_version or IR_FOR_OPSET.get(opset, 8)
    if any(not output.type.tensor_type.HasField("shape") for output in model.graph.output):
        inferred = onnx.shape_inference.infer_shapes(model).graph
        known = {info.name: info for info in [*inferred.value_info, *inferred.output]}
        for output in model.graph.output:
            if not output.type.tensor_type.HasField("shape") and output.name in known:
                output.CopyFrom(known[output.name])
    onnx.checker.check_model(model)
    return model


def float_input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def bn_params(rng: np.random.Generator, prefix: str, channels: int) -> dict[str, np.ndarray]:
    return {f"{prefix}.scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
            f"{prefix}.bias": rng.normal(0, 0.2, channels).astype(np.float32),
            f"{prefix}.mean": rng.normal(0, 0.3, channels).astype(np.float32),
            f"{prefix}.var": rng.uniform(0.2, 2.0, channels).astype(np.float32)}


def bn_node(prefix: str, x: str, y: str, epsilon: float = 1e-5, name: str | None = None):
    return helper.make_node("BatchNormalization",
                            [x, f"{prefix}.scale", f"{prefix}.bias", f"{prefix}.mean",
                             f"{prefix}.var"], [y], name=name if name is not None else prefix,
                            epsilon=epsilon)


def conv_weight(rng, shape) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return (rng.normal(0, 1, shape) / np.sqrt(fan_in)).astype(np.float32)


def resnet_like(opset: int = 13, seed: int = 0, channels: int = 16, size: int = 32,
                classes: int = 10, named: bool = True, batch: int | str = "N"):
    """A small ResNet: stem Conv-BN-Relu, two residual blocks (Conv-BN-Relu-Conv-BN, Add, Relu;
    the second with a depthwise conv), AveragePool, GlobalAveragePool, Flatten, Gemm.

    Returns the model. ``named=False`` leaves every node unnamed.
    """
    rng = np.random.default_rng(seed)
    c = channels
    init: dict[str, np.ndarray] = {}
    nodes = []

    def conv(name, x, y, cin, cout, k=3, group=1, bias=False, stride=1):
        init[f"{name}.weight"] = conv_weight(rng, (cout, cin // group, k, k))
        inputs = [x, f"{name}.weight"]
        if bias:
            init[f"{name}.b"] = rng.normal(0, 0.1, cout).astype(np.float32)
            inputs.append(f"{name}.b")
        nodes.append(helper.make_node("Conv", inputs, [y], name=name, kernel_shape=[k, k],
                                      pads=[k // 2] * 4, strides=[stride, stride],
                                      group=group))

    def bn(name, x, y, ch):
        init.update(bn_params(rng, name, ch))
        nodes.append(bn_node(name, x, y))

    def relu(name, x, y):
        nodes.append(helper.make_node("Relu", [x], [y], name=name))

    conv("stem", "input", "stem.c", 3, c)
    bn("stem_bn", "stem.c", "stem.b", c)
    relu("stem_relu", "stem.b", "stem.r")
    # block 1
    conv("b1_conv1", "stem.r", "b1.c1", c, c)
    bn("b1_bn1", "b1.c1", "b1.b1", c)
    relu("b1_relu1", "b1.b1", "b1.r1")
    conv("b1_conv2", "b1.r1", "b1.c2", c, c, bias=True)
    bn("b1_bn2", "b1.c2", "b1.b2", c)
    nodes.append(helper.make_node("Add", ["b1.b2", "stem.r"], ["b1.add"], name="b1_add"))
    relu("b1_relu2", "b1.add", "b1.out")
    # block 2 with a depthwise conv
    conv("b2_dw", "b1.out", "b2.c1", c, c, group=c)
    bn("b2_bn1", "b2.c1", "b2.b1", c)
    relu("b2_relu1", "b2.b1", "b2.r1")
    conv("b2_pw", "b2.r1", "b2.c2", c, c, k=1)
    bn("b2_bn2", "b2.c2", "b2.b2", c)
    nodes.append(helper.make_node("Add", ["b2.b2", "b1.out"], ["b2.add"], name="b2_add"))
    relu("b2_relu2", "b2.add", "b2.out")
    nodes.append(helper.make_node("AveragePool", ["b2.out"], ["pool"], name="pool",
                                  kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("GlobalAveragePool", ["pool"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    init["fc.weight"] = conv_weight(rng, (classes, c))
    init["fc.bias"] = rng.normal(0, 0.1, classes).astype(np.float32)
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"],
                                  name="fc", transB=1))
    if not named:
        for node in nodes:
            node.name = ""
    return make_model(nodes, [float_input("input", [batch, 3, size, size])],
                      [float_input("logits", [batch, classes])], init, opset)


def digits_mlp(opset: int = 13, hidden: int = 32, seed: int = 0):
    """An sklearn MLPClassifier trained on the digits data set (8×8 images, 10 classes), as a
    Gemm-Relu-Gemm ONNX model. Returns ``(model, x_train, x_test, y_test)`` with float32 x
    scaled to [0, 1]."""
    x_train, x_test, y_test, coefs, intercepts = _trained_digits_mlp(hidden, seed)
    mlp = SimpleNamespace(coefs_=coefs, intercepts_=intercepts)
    init = {"fc1.weight": mlp.coefs_[0].astype(np.float32),
            "fc1.bias": mlp.intercepts_[0].astype(np.float32),
            "fc2.weight": mlp.coefs_[1].T.astype(np.float32).copy(),
            "fc2.bias": mlp.intercepts_[1].astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("Gemm", ["hr", "fc2.weight", "fc2.bias"], ["logits"],
                              name="fc2", transB=1)]
    model = make_model(nodes, [float_input("x", ["N", 64])], [float_input("logits", ["N", 10])],
                       init, opset)
    return model, x_train, x_test, y_test


@functools.lru_cache(maxsize=4)
def _trained_digits_mlp(hidden: int, seed: int):
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    x_train, y_train, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]
    mlp = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(x_train, y_train)
    return x_train, x_test, y_test, mlp.coefs_, mlp.intercepts_


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
