"""Train the sample network with a tf.compat.v1 Session (step 2.1.1 of the README).

Run from samples/tensorflow/tensor_decompose::

    python ./src/session_train.py --data_path=data --ckpt_path=model/session/baseline/model

Trains ``conv_net_example`` (Adam, learning rate 0.01, 200 iterations of 256 images),
prints ``Validation Accuracy: 0.xxxx`` on the test images and writes, in the folder of
``--ckpt_path``: ``model-200.data-00000-of-00001``, ``model-200.index``, ``model-200.meta``
(the checkpoint that ``src/decompose_ckpt.py`` decomposes), ``checkpoint`` and the frozen
graph ``model.pb`` (output ``dense/BiasAdd``).
"""
from __future__ import annotations

import argparse
import os
import sys

import tensorflow as tf
from model import conv_net_example, input_placeholder
from train_utils import (
    accuracy_line,
    add_training_arguments,
    check_ckpt_path,
    classification_loss,
    evaluate_session,
    freeze_graph,
    load_data,
    log,
    make_parent_dir,
    optimizer,
    setup_tensorflow,
    train_session,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(
        description="Train the MNIST sample network with a tf.compat.v1 Session and save a "
                    "checkpoint (the input of src/decompose_ckpt.py) and a frozen model.pb.")
    add_training_arguments(parser, finetune=False, steps=200, lr=0.01,
                           ckpt_example="model/session/baseline/model")
    args = parser.parse_args(argv)
    check_ckpt_path(parser, args.ckpt_path)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_tensorflow(args.seed)
    data = load_data(args.data_path)

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(args.seed)
        images = input_placeholder()
        labels = tf.compat.v1.placeholder(tf.int64, [None], name="label")
        logits = conv_net_example(images)
        loss = classification_loss(logits, labels)
        train_op = optimizer(args.lr).minimize(loss)
        init = tf.compat.v1.global_variables_initializer()
        saver = tf.compat.v1.train.Saver()

    with tf.compat.v1.Session(graph=graph) as session:
        session.run(init)
        train_session(session, train_op, loss, images, labels, data, args)
        accuracy = evaluate_session(session, logits, images, data, args.eval_batch_size)
        make_parent_dir(args.ckpt_path)
        saved = saver.save(session, args.ckpt_path, global_step=args.steps)
        log(f"Checkpoint is saved to: {saved}")
        freeze_graph(session, os.path.join(os.path.dirname(args.ckpt_path), "model.pb"))
    log(accuracy_line(accuracy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
