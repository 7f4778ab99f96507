"""The network of the TensorFlow tensor-decomposition sample, ``conv_net_example``.

conv2d (1 -> 128 channels, 3x3, ReLU) -> conv2d_1 (128 -> 128, 3x3, ReLU) -> flatten -> dense
(10 logits). ``auto_decomposition`` leaves ``conv2d/Conv2D`` alone (a single input channel is
too thin to be worth decomposing) and splits ``conv2d_1/Conv2D`` into a 3x1 and a 1x3 conv.

The layers are written with ``tf.compat.v1.variable_scope``, ``tf.compat.v1.get_variable`` and
``tf.nn`` rather than ``tf.compat.v1.layers`` (which needs Keras 2 and is gone with Keras 3,
TensorFlow >= 2.16), with the same op and variable names as ``tf.compat.v1.layers``::

    conv2d/kernel    conv2d/bias    conv2d/Conv2D    conv2d/BiasAdd    conv2d/Relu
    conv2d_1/kernel  conv2d_1/bias  conv2d_1/Conv2D  conv2d_1/BiasAdd  conv2d_1/Relu
    flatten/Reshape
    dense/kernel     dense/bias     dense/MatMul     dense/BiasAdd

so a checkpoint or frozen graph of this sample reads like one of the original
``tf.layers`` model. The graph is built in ``tf.compat.v1`` graph mode.
"""
from __future__ import annotations

import tensorflow as tf

NUM_CLASSES = 10
IMAGE_SIZE = 28
INPUT_NAME = "input"
OUTPUT_NAME = "dense/BiasAdd"


def _scope(default_name: str):
    """A new variable scope named like a ``tf.compat.v1.layers`` layer: ``conv2d``,
    ``conv2d_1``, ...; its name scope has the same name."""
    return tf.compat.v1.variable_scope(None, default_name=default_name)


def conv2d(inputs: tf.Tensor, filters: int, kernel_size: int,
           activation=tf.nn.relu) -> tf.Tensor:
    """``tf.compat.v1.layers.conv2d(inputs, filters, kernel_size, activation=...)``: VALID
    padding, stride 1, NHWC, Glorot-uniform kernel, zero bias."""
    with _scope("conv2d"):
        in_channels = int(inputs.shape[-1])
        kernel = tf.compat.v1.get_variable(
            "kernel", [kernel_size, kernel_size, in_channels, filters], dtype=tf.float32,
            initializer=tf.compat.v1.glorot_uniform_initializer())
        bias = tf.compat.v1.get_variable("bias", [filters], dtype=tf.float32,
                                         initializer=tf.compat.v1.zeros_initializer())
        outputs = tf.nn.conv2d(inputs, kernel, strides=[1, 1, 1, 1], padding="VALID",
                               data_format="NHWC", name="Conv2D")
        outputs = tf.nn.bias_add(outputs, bias, data_format="NHWC", name="BiasAdd")
        if activation is not None:
            outputs = activation(outputs, name="Relu")
    return outputs


def flatten(inputs: tf.Tensor) -> tf.Tensor:
    """``tf.compat.v1.layers.flatten``: (N, H, W, C) -> (N, H*W*C)."""
    size = 1
    for dim in inputs.shape[1:]:
        size *= int(dim)
    with tf.compat.v1.name_scope(None, default_name="flatten"):
        shape = tf.constant([-1, size], dtype=tf.int32, name="Const")
        return tf.reshape(inputs, shape, name="Reshape")


def dense(inputs: tf.Tensor, units: int) -> tf.Tensor:
    """``tf.compat.v1.layers.dense(inputs, units)`` without activation."""
    with _scope("dense"):
        kernel = tf.compat.v1.get_variable(
            "kernel", [int(inputs.shape[-1]), units], dtype=tf.float32,
            initializer=tf.compat.v1.glorot_uniform_initializer())
        bias = tf.compat.v1.get_variable("bias", [units], dtype=tf.float32,
                                         initializer=tf.compat.v1.zeros_initializer())
        outputs = tf.matmul(inputs, kernel, name="MatMul")
        return tf.nn.bias_add(outputs, bias, name="BiasAdd")


def conv_net_example(images: tf.Tensor, num_classes: int = NUM_CLASSES) -> tf.Tensor:
    """Logits (N, num_classes) of float images (N, 28, 28, 1) scaled to [0, 1]."""
    net = conv2d(images, 128, 3)
    net = conv2d(net, 128, 3)
    net = flatten(net)
    return dense(net, num_classes)


def input_placeholder(batch_size: int | None = None) -> tf.Tensor:
    """The float32 input of the network, ``input`` (N, 28, 28, 1), for Session graphs."""
    return tf.compat.v1.placeholder(tf.float32, [batch_size, IMAGE_SIZE, IMAGE_SIZE, 1],
                                    name=INPUT_NAME)
