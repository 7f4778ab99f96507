"""Export the trained MNIST residual network to ONNX and save calibration batches as .npy.

The network, its training and the MNIST loading are those of the PyTorch quantization sample
(``samples/pytorch/ptq/src``). The weights are, in this order: ``--pretrained-path`` if given;
the PyTorch sample's ``model/resnet.pth`` if it was trained there; else they are trained here
and saved to ``model/resnet.pth``.

Outputs (for ``amct_onnx calibration``):

* ``model/resnet.onnx``: opset 13, input ``input`` of shape ``(batch, 1, 28, 28)``
  (normalized digits, dynamic batch), output ``output`` (10 logits);
* ``data/calibration/batch_000.npy`` ...: ``--batch-num`` batches of ``--calib-batch-size``
  normalized training digits (float32), one file per batch.

    python src/export_model.py
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

PYTORCH_SAMPLE = Path(__file__).resolve().parents[3] / "pytorch" / "ptq"
if str(PYTORCH_SAMPLE / "src") not in sys.path:
    sys.path.insert(0, str(PYTORCH_SAMPLE / "src"))

import torch  # noqa: E402
from data_utils import calibration_batches, load_data, log, test_split  # noqa: E402
from model import MODELS, build_model  # noqa: E402
from train import add_training_arguments, positive_int  # noqa: E402
from train_utils import (  # noqa: E402
    default_weights_path,
    load_weights,
    predict,
    save_weights,
    train,
)

INPUT_NAME = "input"
OUTPUT_NAME = "output"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet",
                        help="network to export")
    parser.add_argument("--data-path", default="data",
                        help="MNIST folder; the embedded 5,000-digit subset is used when no "
                             "MNIST is there")
    parser.add_argument("--pretrained-path", default=None,
                        help="trained weights (a state dict); by default those of the PyTorch "
                             "sample (samples/pytorch/ptq/model/<model>.pth) when they exist, "
                             "else model/<model>.pth, trained first if absent")
    parser.add_argument("--onnx-path", default=None,
                        help="the exported model (default: model/<model>.onnx)")
    parser.add_argument("--calib-dir", default=os.path.join("data", "calibration"),
                        help="folder of the calibration batches (.npy, one per batch)")
    parser.add_argument("--batch-num", type=positive_int, default=2,
                        help="number of calibration batches to save")
    parser.add_argument("--calib-batch-size", type=positive_int, default=16,
                        help="training images per calibration batch")
    group = parser.add_argument_group(
        "training", "used only when no trained weights are found")
    add_training_arguments(group, prefix="train-")
    args = parser.parse_args(argv)
    if args.onnx_path is None:
        args.onnx_path = os.path.join("model", f"{args.model}.onnx")
    if args.pretrained_path is not None and not os.path.isfile(args.pretrained_path):
        parser.error(f"--pretrained-path: file not found: {args.pretrained_path}")
    return args


def weights_file(args: argparse.Namespace) -> tuple[str, bool]:
    """(path of the weights to load, whether they must be trained first)."""
    if args.pretrained_path is not None:
        return args.pretrained_path, False
    shared = PYTORCH_SAMPLE / default_weights_path(args.model)
    if shared.is_file():
        return str(shared), False
    own = default_weights_path(args.model)
    return own, not os.path.isfile(own)


def export(model: torch.nn.Module, example: np.ndarray, path: str) -> None:
    """torch.onnx.export with the TorchScript exporter, opset 13 and a dynamic batch axis."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch >= 2.9 warns that dynamo=False is the legacy exporter; it is the one meant.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (torch.from_numpy(example),), path, dynamo=False,
                          opset_version=13, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def save_batches(batches: list[np.ndarray], folder: str) -> list[str]:
    """Save each batch as ``batch_NNN.npy`` in ``folder``; older batch files are removed, so
    that the folder holds exactly these batches (amct_onnx reads them in file-name order)."""
    os.makedirs(folder, exist_ok=True)
    for stale in Path(folder).glob("batch_*.npy"):
        stale.unlink()
    paths = []
    for index, batch in enumerate(batches):
        path = os.path.join(folder, f"batch_{index:03d}.npy")
        np.save(path, batch)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_data(args.data_path)
    path, needs_training = weights_file(args)
    if needs_training:
        log(f"[Export] No trained weights found: training '{args.model}' first "
            f"({args.train_steps} steps)")
        trained = train(build_model(args.model), data, args.train_steps, args.train_batch_size,
                        args.train_lr, args.train_seed, args.log_steps)
        save_weights(trained, path)
        log(f"[Export] Weights saved to {path}")
    model = load_weights(args.model, path)
    log(f"[Export] '{args.model}' with the weights of {os.path.relpath(path)}")

    batches = calibration_batches(data, args.batch_num, args.calib_batch_size)
    export(model, batches[0], args.onnx_path)
    log(f"[Export] ONNX model: {args.onnx_path} (input '{INPUT_NAME}': normalized digits "
        f"(batch, 1, 28, 28), float32)")
    files = save_batches(batches, args.calib_dir)
    log(f"[Export] Calibration data: {len(files)} batch(es) of {args.calib_batch_size} "
        f"training images in {args.calib_dir}")
    images, labels = test_split(data)
    correct = int((predict(model, images).argmax(axis=1) == labels).sum())
    log(f"[Export] FP32 test accuracy (PyTorch): {100.0 * correct / len(labels):.2f}% "
        f"({correct}/{len(labels)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
