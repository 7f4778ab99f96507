"""Shared pieces of the auto-calibration and DMQ samples: the trained network, the fragile
layer and the ONNX Runtime accuracy.

The network, its training and MNIST loading are those of the PyTorch PTQ sample
(``samples/pytorch/ptq/src``, put on ``sys.path`` here). The weights are, in this order:
``--pretrained-path`` if given; the PTQ sample's ``model/<model>.pth`` if it was trained there;
else ``model/<model>.pth`` of this folder, trained first (and saved) when absent.

Making a layer fragile (:func:`make_fragile`): ``channels`` output channels of the layer before
a ReLU (a BatchNorm or a convolution: its weight and bias) are scaled by ``factor`` and the
matching input channels of the next convolution divided by it. ReLU and max-pooling are
positively homogeneous, ``relu(f·z) = f·relu(z)`` for ``f > 0``, so the float network computes
the same function, but that convolution's input now has a few channels ``factor`` times larger
than the others: quantizing it per tensor to 8 bits rounds the other channels to zero. The
channels scaled are those with the largest mean activation at that input on a batch of images:
a channel the trained ReLU mostly silences would give outliers too rare to matter, and which
channels those are depends on the training (and so on the machine it ran on).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from pathlib import Path

import numpy as np

PTQ_SAMPLE = Path(__file__).resolve().parents[2] / "ptq"
if str(PTQ_SAMPLE / "src") not in sys.path:
    sys.path.insert(0, str(PTQ_SAMPLE / "src"))

import torch  # noqa: E402
from data_utils import MnistData, log  # noqa: E402
from model import build_model  # noqa: E402
from ort_utils import accuracy, make_session  # noqa: E402
from ort_utils import predict as ort_predict  # noqa: E402
from torch import nn  # noqa: E402
from train_utils import default_weights_path, load_weights, save_weights, train  # noqa: E402

INPUT_NAME = "input"
OUTPUT_NAME = "output"
#: The exported ONNX models take any batch size.
DYNAMIC_AXES = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
#: Per network: (the module scaled, the convolution whose input gets the outlier channels).
FRAGILE = {"resnet": ("layer2.1.bn1", "layer2.1.conv2"), "cnn": ("conv1", "conv2")}


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def weights_file(model_name: str, pretrained_path: str | None) -> tuple[str, bool]:
    """(path of the weights to load, whether they must be trained first)."""
    if pretrained_path is not None:
        return pretrained_path, False
    shared = PTQ_SAMPLE / default_weights_path(model_name)
    if shared.is_file():
        return str(shared), False
    own = default_weights_path(model_name)
    return own, not os.path.isfile(own)


def trained_model(args: argparse.Namespace, data: MnistData, tag: str) -> nn.Module:
    """The FP32 network with trained weights (module docstring), trained first if needed."""
    path, needs_training = weights_file(args.model, args.pretrained_path)
    if needs_training:
        log(f"[{tag}] No trained weights found: training '{args.model}' first "
            f"({args.train_steps} steps; 'python ../ptq/src/train.py --model {args.model}' "
            f"does the same)")
        model = train(build_model(args.model), data, args.train_steps, args.train_batch_size,
                      args.train_lr, args.train_seed, args.log_steps)
        save_weights(model, path)
        log(f"[{tag}] Weights saved to {path}")
    model = load_weights(args.model, path)
    log(f"[{tag}] FP32 model '{args.model}' with the weights of {os.path.relpath(path)}")
    return model


def make_fragile(model: nn.Module, model_name: str, factor: float, channels: int,
                 images: np.ndarray) -> tuple[nn.Module, str, list[int]]:
    """A copy of ``model`` computing the same function with ``channels`` outlier input
    channels, ``factor`` times larger, at one convolution (module docstring): the channels of
    the largest mean activation there on ``images``. Returns the copy, that convolution's name
    and the channels scaled (ascending)."""
    scaled_name, conv_name = FRAGILE[model_name]
    fragile = copy.deepcopy(model).eval()
    scaled, conv = fragile.get_submodule(scaled_name), fragile.get_submodule(conv_name)
    if not 0 < channels <= conv.in_channels:
        raise SystemExit(f"--outlier-channels must be in [1, {conv.in_channels}] (the input "
                         f"channels of {conv_name}), got {channels}")
    seen: list[torch.Tensor] = []
    hook = conv.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0]))
    try:
        with torch.no_grad():
            fragile(torch.from_numpy(images))
    finally:
        hook.remove()
    activity = seen[0].transpose(0, 1).reshape(conv.in_channels, -1).mean(dim=1)
    # stable order: ties (e.g. channels that are never active) go to the lower index
    order = sorted(range(conv.in_channels), key=lambda c: (-float(activity[c]), c))
    chosen = sorted(order[:channels])
    with torch.no_grad():
        scaled.weight[chosen] *= factor
        scaled.bias[chosen] *= factor
        conv.weight[:, chosen] /= factor
    return fragile, conv_name, chosen


def export_fp32_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """The FP32 model in ONNX (opset 13, dynamic batch), the ONNX Runtime baseline."""
    with warnings.catch_warnings():
        # torch >= 2.9 warns that dynamo=False is the legacy exporter; it is the one meant.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=13,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=DYNAMIC_AXES)


def onnx_accuracy(path: str, images: np.ndarray, labels: np.ndarray,
                  threads: int = 2) -> tuple[int, int]:
    """(correct predictions, images) of the ONNX model at ``path`` in ONNX Runtime."""
    return accuracy(ort_predict(make_session(path, threads), images), labels)
