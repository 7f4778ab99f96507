"""One adapter per framework for the cross-backend decomposition tests.

Each backend takes the same conv, given framework-free as a (Cout, Cin, KH, KW) kernel, a bias,
a stride and a padding mode, decomposes it through its plugin's public API, and returns the two
factor kernels in (Cout, Cin, KH, KW) layout plus the outputs of the original and decomposed
layer on an NCHW input. A backend whose framework is not installed is skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass
class Decomposed:
    first: np.ndarray  # (r, Cin, kh, kw') in the core's layout
    last: np.ndarray   # (Cout, r, kh', kw)
    original_output: np.ndarray  # NCHW
    decomposed_output: np.ndarray  # NCHW


def _torch_backend(weight, bias, stride, padding, inputs, workdir: Path) -> Decomposed | None:
    torch = pytest.importorskip("torch")
    tensor_decompose = pytest.importorskip("amct_pytorch.tensor_decompose")
    cout, cin, kh, kw = weight.shape
    conv = torch.nn.Conv2d(cin, cout, (kh, kw), stride=stride,
                           padding="same" if padding == "SAME" else 0).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        conv.bias.copy_(torch.from_numpy(bias))
    model = torch.nn.Sequential(conv)
    x = torch.from_numpy(inputs)
    with torch.no_grad():
        original = model(x).numpy()
    model, changes = tensor_decompose.auto_decomposition(model, str(workdir / "info.json"))
    if not changes:
        return None
    first, last = model[0][0], model[0][1]
    with torch.no_grad():
        decomposed = model(x).numpy()
    return Decomposed(first.weight.detach().numpy(), last.weight.detach().numpy(), original,
                      decomposed)


def _tensorflow_backend(weight, bias, stride, padding, inputs, workdir: Path
                        ) -> Decomposed | None:
    tf = pytest.importorskip("tensorflow")
    tensor_decompose = pytest.importorskip("amct_tensorflow.tensor_decompose")
    tf1 = tf.compat.v1
    cout, cin, kh, kw = weight.shape
    nhwc = np.ascontiguousarray(inputs.transpose(0, 2, 3, 1))

    def build():
        x = tf1.placeholder(tf.float64, [None, *nhwc.shape[1:]], name="x")
        with tf1.variable_scope("conv2d"):
            kernel = tf1.get_variable("kernel", [kh, kw, cin, cout], tf.float64)
            b = tf1.get_variable("bias", [cout], tf.float64)
        y = tf.nn.bias_add(tf.nn.conv2d(x, kernel, [1, stride, stride, 1], padding,
                                        name="conv2d/Conv2D"), b)
        return x, tf.identity(y, name="out")

    graph = tf.Graph()
    with graph.as_default():
        x, out = build()
        variables = {v.op.name: v for v in tf1.global_variables()}
        saver = tf1.train.Saver()
        with tf1.Session() as session:
            variables["conv2d/kernel"].load(weight.transpose(2, 3, 1, 0), session)
            variables["conv2d/bias"].load(bias, session)
            original = session.run(out, {x: nhwc})
            os.makedirs(workdir / "base", exist_ok=True)
            prefix = saver.save(session, str(workdir / "base" / "model"))
    save = str(workdir / "dec" / "model")
    if not tensor_decompose.auto_decomposition(prefix + ".meta", prefix, save):
        return None
    reader = tf.train.load_checkpoint(save)
    first = reader.get_tensor("conv2d/Conv2D/decom_first/kernel").transpose(3, 2, 0, 1)
    last = reader.get_tensor("conv2d/Conv2D/decom_last/kernel").transpose(3, 2, 0, 1)
    graph = tf.Graph()
    with graph.as_default():
        x, out = build()
        tensor_decompose.decompose_graph(save)
        restorer = tf1.train.Saver(tf1.global_variables())
        with tf1.Session() as session:
            restorer.restore(session, save)
            decomposed = session.run(out, {x: nhwc})
    return Decomposed(first, last, original.transpose(0, 3, 1, 2),
                      decomposed.transpose(0, 3, 1, 2))


BACKENDS = {"pytorch": _torch_backend, "tensorflow": _tensorflow_backend}
