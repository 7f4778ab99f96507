"""Post-training quantization of a trained MNIST network with AMCT_PyTorch.

The steps are those of the AMCT manual (训练后量化, 手工量化):

1. ``amct.create_quant_config``: the JSON quantization config of the model;
2. ``amct.quantize_model``: the modified ONNX model, the record file with the weight factors
   and the calibration model;
3. the calibration model runs ``batch_num`` batches of training digits, which writes the
   activation factors to the record (afterwards it computes the quantized result in PyTorch);
4. ``amct.save_model``: the fake-quant, deploy and QDQ ONNX models.

Then the test accuracy of the FP32 model (PyTorch and ONNX Runtime), the calibration model
(PyTorch), the fake-quant model and the QDQ model (ONNX Runtime) is printed, with the ONNX
Runtime latency of one batch of the FP32 and QDQ models.

    python src/ptq_sample.py                  # resnet; trains model/resnet.pth if absent
    python src/ptq_sample.py --model cnn
"""
from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
import torch
from data_utils import calibration_batches, load_data, log, test_split
from model import MODELS, build_model
from ort_utils import accuracy, latencies_ms, make_session, percent, print_table
from ort_utils import predict as ort_predict
from torch import nn
from train import add_training_arguments, positive_int
from train_utils import default_weights_path, load_weights, save_weights, train
from train_utils import predict as torch_predict

INPUT_NAME = "input"
OUTPUT_NAME = "output"
#: The exported ONNX models take any batch size.
DYNAMIC_AXES = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}


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
                        help="trained weights (a state dict from src/train.py); by default "
                             "model/<model>.pth, trained first if that file does not exist")
    parser.add_argument("--batch-num", type=positive_int, default=2,
                        help="number of calibration batches (batch_num of the config)")
    parser.add_argument("--calib-batch-size", type=positive_int, default=16,
                        help="training images per calibration batch")
    parser.add_argument("--skip-layers", nargs="+", default=[], metavar="LAYER",
                        help="layers left in FP32 (module names, e.g. conv1 fc)")
    parser.add_argument("--output-dir", default=os.path.join("model", "quant"),
                        help="folder of the config, record and ONNX models")
    parser.add_argument("--eval-size", type=positive_int, default=None,
                        help="evaluate on the first this many test images (default: all)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="ONNX Runtime intra-op threads of the latency measurement")
    parser.add_argument("--latency-batch", type=positive_int, default=64,
                        help="test images per batch in the latency measurement")
    parser.add_argument("--latency-runs", type=positive_int, default=20,
                        help="timed runs per model (the median is printed)")
    group = parser.add_argument_group(
        "training", "used only when the default weights file does not exist yet")
    add_training_arguments(group, prefix="train-")
    args = parser.parse_args(argv)
    args.train_if_missing = args.pretrained_path is None
    if args.pretrained_path is None:
        args.pretrained_path = default_weights_path(args.model)
    elif not os.path.isfile(args.pretrained_path):
        parser.error(f"--pretrained-path: file not found: {args.pretrained_path} (train the "
                     f"weights with: python src/train.py --model {args.model} --save-path "
                     f"{args.pretrained_path})")
    return args


def trained_model(args: argparse.Namespace, data) -> nn.Module:
    """The FP32 network with its trained weights; trains and saves them first if needed."""
    if not os.path.isfile(args.pretrained_path):
        log(f"[PTQ] No weights at {args.pretrained_path}: training '{args.model}' first "
            f"({args.train_steps} steps; 'python src/train.py --model {args.model}' does the "
            f"same)")
        model = train(build_model(args.model), data, args.train_steps, args.train_batch_size,
                      args.train_lr, args.train_seed, args.log_steps)
        save_weights(model, args.pretrained_path)
        log(f"[PTQ] Weights saved to {args.pretrained_path}")
    model = load_weights(args.model, args.pretrained_path)
    log(f"[PTQ] FP32 model '{args.model}' with the weights of {args.pretrained_path}")
    return model


def export_fp32_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """The FP32 model in ONNX, as a user would export it, for the ONNX Runtime baseline."""
    with warnings.catch_warnings():
        # torch >= 2.9 warns that dynamo=False is the legacy exporter; it is the one whose
        # output AMCT also uses (opset 13, dynamic batch axis).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=13,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=DYNAMIC_AXES)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import amct_pytorch as amct

    data = load_data(args.data_path)
    model = trained_model(args, data)
    batches = calibration_batches(data, args.batch_num, args.calib_batch_size)
    example = torch.from_numpy(batches[0])

    os.makedirs(args.output_dir, exist_ok=True)
    prefix = os.path.join(args.output_dir, args.model)
    config_file = f"{prefix}_quant_config.json"
    modified_onnx_file = f"{prefix}_modified_model.onnx"
    record_file = f"{prefix}_record.txt"
    fp32_onnx_file = f"{prefix}_fp32.onnx"

    log(f"[PTQ] 1/4 create_quant_config -> {config_file}")
    amct.create_quant_config(config_file=config_file, model=model, input_data=example,
                             skip_layers=args.skip_layers, batch_num=args.batch_num)
    log(f"[PTQ] 2/4 quantize_model -> {modified_onnx_file}, {record_file}")
    calibration_model = amct.quantize_model(
        config_file=config_file, modfied_onnx_file=modified_onnx_file,
        record_file=record_file, model=model, input_data=example,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES)
    log(f"[PTQ] 3/4 Calibration: {args.batch_num} batch(es) of {args.calib_batch_size} "
        f"training images through the calibration model")
    with torch.no_grad():
        for batch in batches:  # exactly batch_num batches
            calibration_model(torch.from_numpy(batch))
    log(f"[PTQ] 4/4 save_model -> {prefix}_{{fake_quant,deploy,qdq}}_model.onnx")
    amct.save_model(modfied_onnx_file=modified_onnx_file, record_file=record_file,
                    save_path=prefix)
    export_fp32_onnx(model, example, fp32_onnx_file)

    images, labels = test_split(data, args.eval_size)
    log(f"[PTQ] Evaluating on {len(labels)} test images; the deploy model "
        f"({prefix}_deploy_model.onnx, Ascend custom ops) does not run in ONNX Runtime")
    fp32_session = make_session(fp32_onnx_file, args.threads)
    qdq_session = make_session(f"{prefix}_qdq_model.onnx", args.threads)
    fake_quant_session = make_session(f"{prefix}_fake_quant_model.onnx", args.threads)
    calibration_logits = torch_predict(calibration_model, images)
    fake_quant_logits = ort_predict(fake_quant_session, images)
    results = {
        "fp32_torch": accuracy(torch_predict(model, images), labels),
        "fp32_ort": accuracy(ort_predict(fp32_session, images), labels),
        "calibration": accuracy(calibration_logits, labels),
        "fake_quant": accuracy(fake_quant_logits, labels),
        "qdq": accuracy(ort_predict(qdq_session, images), labels),
    }
    latency_batch = images[:args.latency_batch]
    fp32_ms, qdq_ms = latencies_ms([fp32_session, qdq_session], latency_batch,
                                   args.latency_runs)

    log("")
    log(f"[Result] Model '{args.model}'; test accuracy on {len(labels)} images; "
        f"calibration on {args.batch_num} x {args.calib_batch_size} training images")
    log(f"[Result] Latency: median of {args.latency_runs} runs on a batch of "
        f"{len(latency_batch)} test images, ONNX Runtime CPU, {args.threads} intra-op "
        f"thread(s)")
    print_table([
        ("FP32", "PyTorch", percent(*results["fp32_torch"]), "-"),
        ("FP32", "ONNX Runtime", percent(*results["fp32_ort"]), f"{fp32_ms:.2f} ms"),
        ("Calibration model", "PyTorch", percent(*results["calibration"]), "-"),
        ("Fake-quant model", "ONNX Runtime", percent(*results["fake_quant"]), "-"),
        ("QDQ model", "ONNX Runtime", percent(*results["qdq"]), f"{qdq_ms:.2f} ms"),
    ])
    same = int((calibration_logits.argmax(1) == fake_quant_logits.argmax(1)).sum())
    log(f"[Result] Calibration model (PyTorch) and fake-quant model (ONNX Runtime) agree on "
        f"{same}/{len(labels)} predictions; largest logit difference "
        f"{float(np.abs(calibration_logits - fake_quant_logits).max()):.2e}")
    log(f"[Result] QDQ / FP32 latency in ONNX Runtime: {qdq_ms / fp32_ms:.2f}")
    return 0


if __name__ == "__main__":
    from amct_core.errors import AmctError

    try:
        raise SystemExit(main())
    except AmctError as error:  # a bad argument or model for AMCT: its message says why
        raise SystemExit(f"[PTQ] ERROR: {error}") from None
