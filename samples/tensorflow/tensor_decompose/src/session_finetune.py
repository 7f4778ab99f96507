"""Fine-tune the decomposed model with a tf.compat.v1 Session (step 2.1.3 of the README).

Run from samples/tensorflow/tensor_decompose::

    python ./src/session_finetune.py --data_path=data --save_path=model/session/decompose/model \\
        --ckpt_path=model/session/decompose_finetune/model

The training code of ``session_train.py`` changes in three places:

1. ``decompose_graph(save_path)`` is called after the network is built and before the
   optimizer, so the optimizer trains the two decomposed convolutions;
2. ``tf.compat.v1.global_variables()`` (at that point: the network with its decomposed
   convolutions) are restored from ``save_path``, the decomposed checkpoint;
3. the remaining variables (the optimizer's) are initialised.

It then fine-tunes with a learning rate of 0.001 for 100 iterations, prints
``Validation Accuracy: 0.xxxx`` and writes ``model-100.data-00000-of-00001``,
``model-100.index``, ``model-100.meta``, ``checkpoint`` and the frozen ``model.pb`` (output
``dense/BiasAdd``) in the folder of ``--ckpt_path``.
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
    amct_errors,
    check_ckpt_path,
    check_decomposed_model,
    classification_loss,
    evaluate_session,
    fail,
    freeze_graph,
    import_tensor_decompose,
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
        description="Fine-tune the model decomposed by src/decompose_ckpt.py with a "
                    "tf.compat.v1 Session (decompose_graph + restore of the decomposed "
                    "checkpoint).")
    add_training_arguments(parser, finetune=True, steps=100, lr=0.001,
                           ckpt_example="model/session/decompose_finetune/model")
    args = parser.parse_args(argv)
    check_decomposed_model(parser, args.save_path)
    check_ckpt_path(parser, args.ckpt_path)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_tensorflow(args.seed)
    _, decompose_graph = import_tensor_decompose()
    data = load_data(args.data_path)

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(args.seed)
        images = input_placeholder()
        labels = tf.compat.v1.placeholder(tf.int64, [None], name="label")
        logits = conv_net_example(images)
        # After the network, before the optimizer: rewrite the graph as the .pkl says.
        try:
            decompose_graph(args.save_path)
        except amct_errors() as error:
            raise fail(f"decompose_graph failed: {error}") from error
        restorer = tf.compat.v1.train.Saver(tf.compat.v1.global_variables())
        restored = {variable.op.name for variable in tf.compat.v1.global_variables()}

        loss = classification_loss(logits, labels)
        train_op = optimizer(args.lr).minimize(loss)
        init_others = tf.compat.v1.variables_initializer(
            [variable for variable in tf.compat.v1.global_variables()
             if variable.op.name not in restored])
        saver = tf.compat.v1.train.Saver()

    with tf.compat.v1.Session(graph=graph) as session:
        try:
            restorer.restore(session, args.save_path)
        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as error:
            raise fail(f"cannot restore the decomposed checkpoint '{args.save_path}': "
                       f"{error.message.splitlines()[0]}") from error
        log(f"Restored the decomposed model from: {args.save_path}")
        session.run(init_others)
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
