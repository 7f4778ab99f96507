"""Fine-tune the decomposed model with tf.estimator (step 2.2.3 of the README).

Run from samples/tensorflow/tensor_decompose::

    python ./src/estimator_finetune.py --data_path=data \\
        --save_path=model/estimator/decompose/model \\
        --ckpt_path=model/estimator/decompose_finetune/model

The training code of ``estimator_train.py`` changes in two places:

1. ``model_fn`` calls ``decompose_graph(params['save_path'])`` after building the network and
   before the optimizer (in every mode, so prediction uses the decomposed structure too);
2. the Estimator is created with ``warm_start_from=save_path``, which initialises the
   trainable variables (the decomposed convolutions included) from the decomposed checkpoint.

It fine-tunes with a learning rate of 0.001 for 100 iterations, prints
``Validation Accuracy: 0.xxxx`` and leaves in the folder of ``--ckpt_path``: ``checkpoint``,
``events.out.tfevents.*``, ``graph.pbtxt``, ``model-0.*``, ``model-100.*`` and the frozen
``model-100.pb`` (output ``dense/BiasAdd``).

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
    amct_errors,
    check_ckpt_path,
    check_decomposed_model,
    fail,
    import_tensor_decompose,
    load_data,
    log,
    require_estimator,
    setup_tensorflow,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(
        description="Fine-tune the model decomposed by src/decompose_ckpt.py with tf.estimator "
                    "(TensorFlow <= 2.15): decompose_graph in model_fn, warm start from the "
                    "decomposed checkpoint.")
    add_training_arguments(parser, finetune=True, steps=100, lr=0.001,
                           ckpt_example="model/estimator/decompose_finetune/model")
    args = parser.parse_args(argv)
    require_estimator()  # before the file checks: without tf.estimator nothing else matters
    check_decomposed_model(parser, args.save_path)
    check_ckpt_path(parser, args.ckpt_path)
    return args


def model_fn(features: tf.Tensor, labels: tf.Tensor, mode: str,
             params: dict[str, Any]) -> Any:
    """The network, decomposed as ``<save_path>.pkl`` says, and its training step."""
    _, decompose_graph = import_tensor_decompose()
    logits = conv_net_example(features)
    # After the network, before the optimizer: rewrite the graph as the .pkl says.
    decompose_graph(params["save_path"])
    return estimator_spec(tf.estimator, logits, labels, mode, params)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_tensorflow(args.seed)
    _, decompose_graph = import_tensor_decompose()
    check_fresh_model_dir(args.ckpt_path)
    data = load_data(args.data_path)

    estimator = make_estimator(tf.estimator, model_fn, args, warm_start_from=args.save_path)
    accuracy = train_and_validate(estimator, data, args)
    try:
        export_frozen_graph(args.ckpt_path, lambda: decompose_graph(args.save_path))
    except amct_errors() as error:
        raise fail(f"decompose_graph failed: {error}") from error
    log(accuracy_line(accuracy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
