"""Shared pieces of the quantization-aware training (QAT) samples.

The residual network, its FP32 training and MNIST loading are those of the PyTorch PTQ sample
(``samples/pytorch/ptq/src``, put on ``sys.path`` here). This module adds what the three QAT
scripts share:

* :func:`single_op_config`: the single-op QAT config dict of the manual (单算子模式的量化感知训练,
  调用示例): ``retrain_data_config{dst_type, batch_num, fixed_min, clip_min, clip_max}`` and
  ``retrain_weight_config{dst_type, weights_retrain_algo, channel_wise}``;
* :func:`train_steps`: a training loop whose batch and learning rate depend only on the step
  number (and the seed, the rank and the number of processes), so a run stopped after step
  ``k`` and resumed from a checkpoint of step ``k`` continues exactly as an uninterrupted run:
  step ``t`` of an epoch of ``E = N // (B·W)`` steps (``N`` training digits, ``B`` digits per
  process, ``W`` processes) takes digits ``[(i·W + r)·B, (i·W + r + 1)·B)`` (``i = t mod E``,
  rank ``r``) of a permutation seeded by ``(seed, t // E)``, and the learning rate follows the
  cosine schedule ``lr_t = lr · (1 + cos(π·t/T)) / 2`` over the ``T`` steps of the run;
* the weights of the FP32 network (:func:`weights_file`, :func:`fp32_model`): ``--pretrained-path``
  if given; the PTQ sample's ``model/resnet.pth`` if it was trained there; else
  ``model/resnet.pth`` of this folder, trained first (and saved) when absent;
* ONNX export (``dynamo=False``, opset 13, dynamic batch) and the accuracy lines.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

PTQ_SAMPLE = Path(__file__).resolve().parents[2] / "ptq"
if str(PTQ_SAMPLE / "src") not in sys.path:
    sys.path.insert(0, str(PTQ_SAMPLE / "src"))

import torch  # noqa: E402
from data_utils import MnistData, load_data, log, normalize, test_split  # noqa: E402
from model import build_model  # noqa: E402
from ort_utils import accuracy, make_session, percent  # noqa: E402
from ort_utils import predict as ort_predict  # noqa: E402
from torch import nn  # noqa: E402
from train import positive_float, positive_int  # noqa: E402
from train_utils import default_weights_path, load_weights, save_weights  # noqa: E402
from train_utils import predict as torch_predict  # noqa: E402
from train_utils import train as train_fp32  # noqa: E402

__all__ = [
    "DYNAMIC_AXES", "INPUT_NAME", "MODEL_NAME", "OUTPUT_NAME", "MnistData", "accuracy_line",
    "add_data_arguments", "add_fp32_arguments", "cosine_lr", "export_onnx", "fp32_model",
    "load_data", "log", "normalize", "onnx_accuracy", "positive_float", "positive_int",
    "set_module", "single_op_config", "step_batch", "test_split", "torch_accuracy",
    "train_fp32_weights", "train_steps", "training_tensors", "weights_file",
]

INPUT_NAME = "input"
OUTPUT_NAME = "output"
#: The exported ONNX models take any batch size.
DYNAMIC_AXES = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
#: The network of the fine-tune and graph-based samples (``MnistResNet`` of the PTQ sample).
MODEL_NAME = "resnet"


def single_op_config(batch_num: int, channel_wise: bool, dst_type: str = "INT8") -> dict:
    """The single-op QAT config of the manual's examples: ULQ activations whose clips IFMR
    initialises over the first ``batch_num`` training batches (``clip_min``/``clip_max``
    None), and ARQ-retrain weights, per output channel when ``channel_wise``."""
    return {
        "retrain_data_config": {
            "dst_type": dst_type,
            "batch_num": batch_num,
            "fixed_min": False,
            "clip_min": None,
            "clip_max": None,
        },
        "retrain_weight_config": {
            "dst_type": dst_type,
            "weights_retrain_algo": "arq_retrain",
            "channel_wise": channel_wise,
        },
    }


def set_module(model: nn.Module, submodule_key: str, module: nn.Module) -> None:
    """Replace the submodule ``submodule_key`` (``layer1.0.conv1``) of ``model`` by ``module``
    (the ``_set_module`` of the manual's fine-tune example)."""
    tokens = submodule_key.split(".")
    parent = model
    for token in tokens[:-1]:
        parent = getattr(parent, token)
    setattr(parent, tokens[-1], module)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-path and --eval-size."""
    parser.add_argument("--data-path", default="data",
                        help="MNIST folder (default: data); the embedded 5,000-digit subset is "
                             "used when no MNIST is there")
    parser.add_argument("--eval-size", type=positive_int, default=None,
                        help="measure the accuracies on the first this many test digits "
                             "(default: all)")


def add_fp32_arguments(parser: argparse.ArgumentParser) -> None:
    """--pretrained-path and the FP32 training arguments (used only when no weights exist)."""
    parser.add_argument("--pretrained-path", default=None,
                        help="weights of the FP32 network (a state dict saved by "
                             "../ptq/src/train.py); default: ../ptq/model/resnet.pth if it "
                             "exists, else model/resnet.pth, trained first when absent")
    parser.add_argument("--train-steps", type=positive_int, default=300,
                        help="FP32 training steps when the weights are trained first "
                             "(default: 300)")
    parser.add_argument("--train-batch-size", type=positive_int, default=64,
                        help="FP32 training batch size (default: 64)")
    parser.add_argument("--train-lr", type=positive_float, default=0.05,
                        help="FP32 initial learning rate (default: 0.05)")


def weights_file(pretrained_path: str | None) -> tuple[str, bool]:
    """(path of the FP32 weights, whether they must be trained first); module docstring."""
    if pretrained_path is not None:
        if not os.path.isfile(pretrained_path):
            raise SystemExit(f"--pretrained-path {pretrained_path!r} does not exist; train the "
                             f"network with: python ../ptq/src/train.py --model {MODEL_NAME} "
                             f"--save-path {pretrained_path}")
        return pretrained_path, False
    shared = PTQ_SAMPLE / default_weights_path(MODEL_NAME)
    if shared.is_file():
        return str(shared), False
    own = default_weights_path(MODEL_NAME)
    return own, not os.path.isfile(own)


def train_fp32_weights(args: argparse.Namespace, data: MnistData, path: str, tag: str) -> None:
    """Train the FP32 network (the PTQ sample's training) and save its weights to ``path``."""
    log(f"[{tag}] No trained weights found: training '{MODEL_NAME}' first "
        f"({args.train_steps} steps; 'python ../ptq/src/train.py --model {MODEL_NAME}' does "
        f"the same)")
    model = train_fp32(build_model(MODEL_NAME), data, args.train_steps, args.train_batch_size,
                       args.train_lr, seed=1, log_steps=max(1, args.log_steps))
    save_weights(model, path)
    log(f"[{tag}] Weights saved to {path}")


def fp32_model(args: argparse.Namespace, data: MnistData, tag: str) -> nn.Module:
    """The FP32 ``MnistResNet`` with trained weights (module docstring), in eval mode."""
    path, needs_training = weights_file(args.pretrained_path)
    if needs_training:
        train_fp32_weights(args, data, path, tag)
    model = load_weights(MODEL_NAME, path)
    log(f"[{tag}] FP32 model '{MODEL_NAME}' with the weights of {os.path.relpath(path)}")
    return model


def training_tensors(data: MnistData) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized training digits ``(N, 1, 28, 28)`` and their int64 labels."""
    return (torch.from_numpy(normalize(data.train_images)),
            torch.from_numpy(data.train_labels.astype(np.int64)))


def step_batch(num_images: int, batch_size: int, step: int, seed: int, rank: int = 0,
               world_size: int = 1) -> tuple[np.ndarray, int]:
    """(indices of the digits of ``step`` on ``rank``, epoch); module docstring."""
    per_step = batch_size * world_size
    steps_per_epoch = num_images // per_step
    if steps_per_epoch < 1:
        raise SystemExit(f"{world_size} process(es) x batch size {batch_size} = {per_step} "
                         f"digits per step, more than the {num_images} training digits; "
                         f"lower --batch-size")
    epoch, index = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_images)
    start = (index * world_size + rank) * batch_size
    return order[start:start + batch_size], epoch


def cosine_lr(lr: float, step: int, total: int) -> float:
    """``lr · (1 + cos(π·step/total)) / 2``: the learning rate of step ``step`` (0-based)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                labels: torch.Tensor, *, start: int, stop: int, total: int, batch_size: int,
                lr: float, seed: int, log_steps: int, rank: int = 0, world_size: int = 1,
                mean_loss: Callable[[torch.Tensor], float] | None = None,
                verbose: bool = True) -> None:
    """Train ``model`` (train mode) for steps ``start .. stop - 1`` of a ``total``-step run.

    Each step takes the batch of :func:`step_batch` and the learning rate of :func:`cosine_lr`.
    Every ``log_steps`` steps (and on the last one) it prints ``[Train] Step: s/total, Epoch:
    e, Loss: l``; ``mean_loss`` turns the local loss into the printed one (the mean over the
    processes under DistributedDataParallel; by default the local value).
    """
    model.train()
    for step in range(start, stop):
        index, epoch = step_batch(len(labels), batch_size, step, seed, rank, world_size)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, step, total)
        chosen = torch.from_numpy(index)
        loss = nn.functional.cross_entropy(model(images[chosen]), labels[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if done % log_steps == 0 or done == stop:
            value = mean_loss(loss.detach()) if mean_loss is not None else loss.item()
            if verbose:
                log(f"[Train] Step: {done}/{total}, Epoch: {epoch}, Loss: {value:.6f}")


def torch_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """(correct predictions, images) of ``model`` in eval mode, in PyTorch."""
    return accuracy(torch_predict(model, images), labels)


def onnx_accuracy(path: str, images: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """(correct predictions, images) of the ONNX model at ``path`` in ONNX Runtime."""
    return accuracy(ort_predict(make_session(path), images), labels)


def accuracy_line(stage: str, runtime: str, result: tuple[int, int]) -> str:
    """``[Accuracy] <stage> (<runtime>): 97.50% (975/1000)``, the line the scripts print."""
    return f"[Accuracy] {stage} ({runtime}): {percent(*result)}"


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """``torch.onnx.export`` of ``model`` (eval mode) with the TorchScript exporter
    (``dynamo=False``), opset 13 and a dynamic batch: QAT layers become QuantizeLinear /
    DequantizeLinear pairs (a QDQ model)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        # torch >= 2.9 warns that dynamo=False is the legacy exporter; it is the one meant.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # The QAT layers read their clips as numbers while being traced (the factors of
        # QuantizeLinear are constants of the exported model), which the tracer warns about.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=13,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=DYNAMIC_AXES)
