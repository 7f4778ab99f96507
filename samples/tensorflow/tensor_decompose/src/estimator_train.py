"""Train the sample network with tf.estimator (step 2.2.1 of the README).

Run from samples/tensorflow/tensor_decompose::

    python ./src/estimator_train.py --data_path=data --ckpt_path=model/estimator/baseline/model

Trains ``conv_net_example`` (Adam, learning rate 0.01, 200 iterations of 256 images)
with an Estimator whose ``model_dir`` is the folder of ``--ckpt_path``, prints
``Validation Accuracy: 0.xxxx`` (from ``Estimator.predict`` on the test images) and leaves in
that folder: ``checkpoint``, ``events.out.tfevents.*``, ``graph.pbtxt``, ``model-0.*`` (saved
when training starts), ``model-200.data-00000-of-00001``, ``model-200.index``,
``model-200.meta`` (the checkpoint that ``src/decompose_ckpt.py`` decomposes) and the frozen
graph ``model-200.pb`` (output ``dense/BiasAdd``).

``tf.estimator`` was removed in TensorFlow 2.16: with a newer TensorFlow the script stops with a
message pointing to the Session scripts.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import tensorflow as tf
from estimator_utils import (
    check_fresh_model_dir,
    estimator_spec,
    export_frozen_graph,
    make_estimator,
    train_and_validate,
)
from model import conv_net_example
from train_utils import (
    accuracy_line,
    add_training_arguments,
    check_ckpt_path,
    load_data,
    log,
    require_estimator,
    setup_tensorflow,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(
        description="Train the MNIST sample network with tf.estimator (TensorFlow <= 2.15) and "
                    "save checkpoints (the input of src/decompose_ckpt.py) and a frozen .pb.")
    add_training_arguments(parser, finetune=False, steps=200, lr=0.01,
                           ckpt_example="model/estimator/baseline/model")
    args = parser.parse_args(argv)
    require_estimator()  # before the file checks: without tf.estimator nothing else matters
    check_ckpt_path(parser, args.ckpt_path)
    return args


def model_fn(features: tf.Tensor, labels: tf.Tensor, mode: str,
             params: dict[str, Any]) -> Any:
    """The network and its training step."""
    logits = conv_net_example(features)
    return estimator_spec(tf.estimator, logits, labels, mode, params)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_tensorflow(args.seed)
    check_fresh_model_dir(args.ckpt_path)
    data = load_data(args.data_path)

    estimator = make_estimator(tf.estimator, model_fn, args)
    accuracy = train_and_validate(estimator, data, args)
    export_frozen_graph(args.ckpt_path)
    log(accuracy_line(accuracy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
