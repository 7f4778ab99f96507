"""Accuracy-based automatic calibration of a trained MNIST network with AMCT_PyTorch.

The steps are those of the AMCT manual (训练后量化, 基于精度的自动量化):

1. an evaluator, a subclass of ``AutoCalibrationEvaluatorBase``: ``calibration`` runs
   ``batch_num`` batches of training digits through a calibration model, ``evaluate`` measures
   the test accuracy (percent) of a model, ``metric_eval`` accepts a loss below
   ``--expected-acc-loss`` points;
2. ``amct.create_quant_config``: the JSON config, every layer quantized;
3. ``amct.accuracy_based_auto_calibration``: evaluates the FP32 model, quantizes with the
   config and, when the check fails, ranks the layers by the cosine similarity of their
   quantized output to their float output and searches (binary search) how few of the least
   similar layers must stay in FP32 for the check to pass; it writes that config, its record
   and the fake-quant, deploy and QDQ models.

To show the search at work, the network is first made fragile in one layer (``--outlier``;
``--no-fragile`` keeps it as trained): a few input channels of one convolution are made
``--outlier`` times larger and its matching weights that much smaller, which leaves the float
network unchanged but ruins the 8-bit quantization of that layer's input.

Then the accuracy of the FP32 model (PyTorch and ONNX Runtime), of the initial config (every
layer quantized) and of the final fake-quant model (ONNX Runtime) is printed, with the layers
rolled back.

    python src/auto_calibration_sample.py                 # resnet
    python src/auto_calibration_sample.py --model cnn
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import sample_utils  # noqa: F401  (puts the PTQ sample's src folder on sys.path)
import torch
from data_utils import calibration_batches, load_data, log, test_split
from model import MODELS
from sample_utils import (
    DYNAMIC_AXES,
    INPUT_NAME,
    OUTPUT_NAME,
    export_fp32_onnx,
    make_fragile,
    onnx_accuracy,
    positive_float,
    trained_model,
)
from torch import nn
from train import add_training_arguments, positive_int
from train_utils import predict as torch_predict

import amct_pytorch as amct
from amct_pytorch.common.auto_calibration import AutoCalibrationEvaluatorBase

#: Where accuracy_based_auto_calibration writes its search history (relative to the cwd).
HISTORY_FILE = os.path.join("amct_log", "accuracy_based_auto_calibration_record.json")
RANKING_FILE = "accuracy_based_auto_calibration_ranking_information.json"


class ModelEvaluator(AutoCalibrationEvaluatorBase):
    """The evaluator of the manual's example: calibration on the calibration batches, test
    accuracy in percent, and a check that the loss is below ``expected_acc_loss`` points.

    As in the PyTorch reference, ``calibration`` and ``evaluate`` receive the torch model
    (the seed's ``model_file, weights_file`` is the Caffe signature).
    """

    def __init__(self, batches: list[np.ndarray], images: np.ndarray, labels: np.ndarray,
                 expected_acc_loss: float) -> None:
        self.batches = batches
        self.images = images
        self.labels = labels
        # the expected accuracy loss, in percentage points
        self.diff = expected_acc_loss
        self.evaluations = 0

    def calibration(self, model: nn.Module) -> None:
        # exactly batch_num batches, the batch_num of the quantization config
        with torch.no_grad():
            for batch in self.batches:
                model(torch.from_numpy(batch))

    def evaluate(self, model: nn.Module) -> float:
        # the test accuracy of the model, in percent
        self.evaluations += 1
        logits = torch_predict(model, self.images)
        correct = int((logits.argmax(axis=1) == self.labels).sum())
        return 100.0 * correct / len(self.labels)

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        # passes when the accuracy loss is below the expected loss
        loss = original_metric - new_metric
        if loss < self.diff:
            return True, loss
        return False, loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet",
                        help="network to quantize")
    parser.add_argument("--data-path", default="data",
                        help="MNIST folder; the embedded 5,000-digit subset is used when no "
                             "MNIST is there")
    parser.add_argument("--pretrained-path", default=None,
                        help="trained weights (a state dict); by default those of the PTQ "
                             "sample (../ptq/model/<model>.pth) when they exist, else "
                             "model/<model>.pth, trained first if absent")
    parser.add_argument("--batch-num", type=positive_int, default=2,
                        help="number of calibration batches (batch_num of the config)")
    parser.add_argument("--calib-batch-size", type=positive_int, default=16,
                        help="training images per calibration batch")
    parser.add_argument("--skip-layers", nargs="+", default=[], metavar="LAYER",
                        help="layers left in FP32 from the start (module names)")
    parser.add_argument("--expected-acc-loss", type=float, default=0.5,
                        help="accuracy loss (percentage points) the evaluator accepts: the "
                             "check passes when FP32 accuracy - quantized accuracy is below it "
                             "(a negative value asks for a gain)")
    parser.add_argument("--strategy", default="BinarySearch", choices=["BinarySearch"],
                        help="search strategy of accuracy_based_auto_calibration")
    parser.add_argument("--sensitivity", default="CosineSimilarity",
                        choices=["CosineSimilarity"],
                        help="layer sensitivity measure of accuracy_based_auto_calibration")
    parser.add_argument("--eval-size", type=positive_int, default=1000,
                        help="the evaluator measures the accuracy on the first this many test "
                             "images")
    parser.add_argument("--no-fragile", action="store_true",
                        help="quantize the network as trained (no outlier channels)")
    parser.add_argument("--outlier", type=positive_float, default=1e4,
                        help="factor of the outlier channels of the fragile layer's input")
    parser.add_argument("--outlier-channels", type=positive_int, default=2,
                        help="number of outlier channels")
    parser.add_argument("--output-dir", default=os.path.join("model", "auto_calibration"),
                        help="folder of the config, record, ranking and ONNX models")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="ONNX Runtime intra-op threads")
    group = parser.add_argument_group(
        "training", "used only when no trained weights are found")
    add_training_arguments(group, prefix="train-")
    args = parser.parse_args(argv)
    if args.pretrained_path is not None and not os.path.isfile(args.pretrained_path):
        parser.error(f"--pretrained-path: file not found: {args.pretrained_path} (train the "
                     f"weights with: python ../ptq/src/train.py --model {args.model} "
                     f"--save-path {args.pretrained_path})")
    return args


def print_table(rows: list[tuple[str, str, str]]) -> None:
    """Print rows of (model, runs in, test accuracy) as a plain-text table."""
    header = ("Model", "Runs in", "Test accuracy")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "|".join(f" {cell:<{width}} " for cell, width in zip(cells, widths,
                                                                     strict=True)).rstrip()

    log(line(header))
    log("+".join("-" * (width + 2) for width in widths))
    for row in rows:
        log(line(row))


def percent(value: float, total: int) -> str:
    """``98.10% (981/1000)`` from an accuracy in percent."""
    return f"{value:.2f}% ({round(value * total / 100)}/{total})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_data(args.data_path)
    model = trained_model(args, data, "AutoCalib")
    batches = calibration_batches(data, args.batch_num, args.calib_batch_size)
    if not args.no_fragile:
        model, fragile_layer, outliers = make_fragile(model, args.model, args.outlier,
                                                      args.outlier_channels, batches[0])
        log(f"[AutoCalib] Made {fragile_layer} fragile: {args.outlier_channels} of its input "
            f"channels x{args.outlier:g} (channels {', '.join(map(str, outliers))}, the most "
            f"active on the first calibration batch), its matching weights "
            f"/{args.outlier:g} (same float network; --no-fragile to keep it as trained)")
    images, labels = test_split(data, args.eval_size)
    input_data = torch.from_numpy(batches[0])

    os.makedirs(args.output_dir, exist_ok=True)
    prefix = os.path.join(args.output_dir, args.model)
    config_json_file = f"{prefix}_quant_config.json"
    record_file = f"{prefix}_record.txt"
    result_path = prefix

    # 4.1 the quantization config: every layer quantized (except --skip-layers)
    log(f"[AutoCalib] 1/2 create_quant_config -> {config_json_file}")
    amct.create_quant_config(config_json_file, model, input_data, args.skip_layers,
                             args.batch_num)
    # 4.2 the evaluator
    evaluator = ModelEvaluator(batches, images, labels, args.expected_acc_loss)
    # 4.3 the search
    log(f"[AutoCalib] 2/2 accuracy_based_auto_calibration (strategy {args.strategy}, "
        f"sensitivity {args.sensitivity}; the check: loss < {args.expected_acc_loss:g} "
        f"points on {len(labels)} test images)")
    amct.accuracy_based_auto_calibration(
        model=model,
        model_evaluator=evaluator,
        config_file=config_json_file,
        record_file=record_file,
        save_dir=result_path,
        input_data=input_data,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes=DYNAMIC_AXES,
        strategy=args.strategy,
        sensitivity=args.sensitivity)

    with open(HISTORY_FILE, encoding="utf-8") as stream:
        history = json.load(stream)
    fp32_onnx_file = f"{prefix}_fp32.onnx"
    export_fp32_onnx(model, input_data, fp32_onnx_file)
    total = len(labels)
    fp32_correct, _ = onnx_accuracy(fp32_onnx_file, images, labels, args.threads)
    rows = [("FP32", "PyTorch", percent(history["original_metric"], total)),
            ("FP32", "ONNX Runtime", percent(100.0 * fp32_correct / total, total)),
            ("Initial config (all layers quantized)", "PyTorch",
             percent(history["initial"]["metric"], total))]
    fake_quant_file = f"{result_path}_fake_quant_model.onnx"
    passed = history["result"] is not None
    if passed:
        correct, _ = onnx_accuracy(fake_quant_file, images, labels, args.threads)
        rows.append(("Fake-quant model (final config)", "ONNX Runtime",
                     percent(100.0 * correct / total, total)))

    log("")
    log(f"[Result] Model '{args.model}'; test accuracy on {total} images; calibration on "
        f"{args.batch_num} x {args.calib_batch_size} training images; the check: loss < "
        f"{args.expected_acc_loss:g} points")
    print_table(rows)
    ranking_file = os.path.join(os.path.dirname(prefix), RANKING_FILE)
    if "ranking" in history:
        worst = list(history["ranking"].items())[:5]
        log(f"[Result] Least similar layers (cosine similarity, {ranking_file}): "
            + ", ".join(f"{name} {value:.6f}" for name, value in worst))
    log(f"[Result] Evaluations: {evaluator.evaluations} (1 FP32 + 1 initial config + "
        f"{len(history['trials'])} search trial(s)); history in {HISTORY_FILE}")
    if not passed:
        log(f"[Result] FAILED: no configuration passed the check; no quantized model was "
            f"written and {config_json_file} is unchanged")
        return 1
    with open(config_json_file, encoding="utf-8") as stream:
        config = json.load(stream)
    layers = [name for name, entry in config.items()
              if isinstance(entry, dict) and "quant_enable" in entry]
    rolled_back = history["result"]
    log(f"[Result] Layers rolled back to FP32: {len(rolled_back)} of {len(layers)}: "
        f"{', '.join(rolled_back) if rolled_back else 'none'}")
    log(f"[Result] Final config {config_json_file}, record {record_file}, models "
        f"{result_path}_{{fake_quant,deploy,qdq}}_model.onnx")
    return 0


if __name__ == "__main__":
    from amct_core.errors import AmctError

    try:
        raise SystemExit(main())
    except AmctError as error:  # a bad argument or model for AMCT: its message says why
        raise SystemExit(f"[AutoCalib] ERROR: {error}") from None
