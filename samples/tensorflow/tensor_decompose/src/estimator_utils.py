"""Helpers of the two Estimator scripts: input functions, the training ``EstimatorSpec``, the
checkpoint naming, validation through ``Estimator.predict`` and the frozen ``.pb`` export.

``tf.estimator`` exists up to TensorFlow 2.15 (with the tensorflow-estimator package) and was
removed in 2.16; nothing here touches it at import time, and
:func:`train_utils.require_estimator` stops the scripts with a clear message when it is missing.

Checkpoints: the Estimator's ``model_dir`` is the folder of ``--ckpt_path`` and the checkpoint
files are named after its last component, so ``--ckpt_path=model/estimator/baseline/model``
gives ``model/estimator/baseline/model-0.*`` (saved when training starts) and ``model-200.*``
(saved at the last step), plus ``checkpoint``, ``graph.pbtxt`` and an
``events.out.tfevents.*`` file written by the Estimator.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
from model import IMAGE_SIZE, conv_net_example, input_placeholder
from train_utils import (
    Mnist,
    accuracy_of,
    amct_errors,
    classification_loss,
    fail,
    freeze_graph,
    log,
    optimizer,
    split_ckpt_path,
    step_line,
    test_batches,
    train_batches,
)

ModelFn = Callable[[tf.Tensor, tf.Tensor, str, dict[str, Any]], Any]


def check_fresh_model_dir(ckpt_path: str) -> None:
    """Refuse a model_dir that already holds a checkpoint: the Estimator would resume from it
    (and skip warm-starting) instead of training from step 0."""
    model_dir, _ = split_ckpt_path(ckpt_path)
    latest = tf.train.latest_checkpoint(model_dir)
    if latest is not None:
        raise fail(f"'{model_dir}' already holds the checkpoint '{latest}'. tf.estimator would "
                   f"resume training from it instead of starting from step 0: delete the "
                   f"folder or choose another --ckpt_path.")


def make_estimator(estimator_lib: Any, model_fn: ModelFn, args: argparse.Namespace,
                   warm_start_from: str | None = None) -> Any:
    """An Estimator whose checkpoints are ``<ckpt_path>-<step>.*``."""
    model_dir, basename = split_ckpt_path(args.ckpt_path)
    config = estimator_lib.RunConfig(
        model_dir=model_dir, tf_random_seed=args.seed, save_checkpoints_steps=args.steps,
        save_checkpoints_secs=None, log_step_count_steps=None)
    params = {"lr": args.lr, "steps": args.steps, "log_steps": args.log_steps,
              "model_dir": model_dir, "checkpoint_basename": basename}
    if warm_start_from is not None:
        params["save_path"] = warm_start_from
    return estimator_lib.Estimator(model_fn=model_fn, config=config, params=params,
                                   warm_start_from=warm_start_from)


def train_input_fn(data: Mnist, args: argparse.Namespace) -> Callable[[], tf.data.Dataset]:
    """Endless shuffled training batches, fed from numpy (the images are not embedded in the
    graph, so ``graph.pbtxt`` and the ``.meta`` files stay small)."""
    def input_fn() -> tf.data.Dataset:
        return tf.data.Dataset.from_generator(
            lambda: train_batches(data.train_images, data.train_labels, args.batch_size,
                                  args.seed),
            output_signature=(
                tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 1], tf.float32),
                tf.TensorSpec([None], tf.int64)))
    return input_fn


def predict_input_fn(data: Mnist, batch_size: int) -> Callable[[], tf.data.Dataset]:
    """The test images, in order."""
    def input_fn() -> tf.data.Dataset:
        return tf.data.Dataset.from_generator(
            lambda: test_batches(data.test_images, batch_size),
            output_signature=tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 1], tf.float32))
    return input_fn


def _step_logger(loss: tf.Tensor, steps: int, log_steps: int) -> Any:
    """A hook printing ``Step N/steps, loss: ...`` every ``log_steps`` training steps."""
    class StepLogger(tf.compat.v1.train.SessionRunHook):
        def begin(self) -> None:
            self.step = 0

        def before_run(self, run_context: Any) -> Any:
            return tf.compat.v1.train.SessionRunArgs(loss)

        def after_run(self, run_context: Any, run_values: Any) -> None:
            self.step += 1
            if self.step % log_steps == 0 or self.step == steps:
                log(step_line(self.step, steps, float(run_values.results)))

    return StepLogger()


def estimator_spec(estimator_lib: Any, logits: tf.Tensor, labels: tf.Tensor | None, mode: str,
                   params: dict[str, Any]) -> Any:
    """The ``EstimatorSpec`` of both scripts: class predictions, or the training step with a
    checkpoint hook named after ``--ckpt_path`` and a progress hook."""
    classes = tf.argmax(logits, axis=1, name="classes")
    if mode == estimator_lib.ModeKeys.PREDICT:
        return estimator_lib.EstimatorSpec(mode, predictions={"classes": classes})
    loss = classification_loss(logits, labels)
    if mode == estimator_lib.ModeKeys.EVAL:
        accuracy = tf.compat.v1.metrics.accuracy(labels, classes)
        return estimator_lib.EstimatorSpec(mode, loss=loss,
                                           eval_metric_ops={"accuracy": accuracy})
    global_step = tf.compat.v1.train.get_or_create_global_step()
    train_op = optimizer(params["lr"]).minimize(loss, global_step=global_step)
    saver_hook = tf.compat.v1.train.CheckpointSaverHook(
        params["model_dir"], save_steps=params["steps"],
        checkpoint_basename=params["checkpoint_basename"])
    return estimator_lib.EstimatorSpec(
        mode, loss=loss, train_op=train_op, training_chief_hooks=[saver_hook],
        training_hooks=[_step_logger(loss, params["steps"], params["log_steps"])])


def train_and_validate(estimator: Any, data: Mnist, args: argparse.Namespace) -> float:
    """Train for ``args.steps`` steps, then return the accuracy of ``Estimator.predict``."""
    try:
        estimator.train(train_input_fn(data, args), steps=args.steps)
        predicted = [batch["classes"] for batch in estimator.predict(
            predict_input_fn(data, args.eval_batch_size), yield_single_examples=False)]
    except amct_errors() as error:
        raise fail(f"decompose_graph failed: {error}") from error
    return accuracy_of(np.concatenate(predicted), data)


def export_frozen_graph(ckpt_path: str, decompose: Callable[[], object] | None = None) -> str:
    """Freeze the latest checkpoint of the model_dir into ``<checkpoint>.pb``
    (e.g. ``model-200.pb``) and return its path.

    ``decompose`` (``lambda: decompose_graph(save_path)``) rebuilds the decomposed structure
    before the weights are restored, as in the fine-tuning ``model_fn``.
    """
    model_dir, _ = split_ckpt_path(ckpt_path)
    latest = tf.train.latest_checkpoint(model_dir)
    if latest is None:
        raise fail(f"no checkpoint found in '{model_dir}' after training")
    graph = tf.Graph()
    with graph.as_default():
        images = input_placeholder()
        conv_net_example(images)
        if decompose is not None:
            decompose()
        saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session(graph=graph) as session:
        saver.restore(session, latest)
        pb_path = f"{latest}.pb"
        freeze_graph(session, pb_path)
    return pb_path
