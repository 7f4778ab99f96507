"""DMQ balancing before post-training quantization of a trained MNIST network (AMCT_PyTorch).

The steps are those of the AMCT manual (量化数据均衡预处理):

1. a ``.cfg`` (simple config) with ``dmq_balancer { migration_strength }`` goes to
   ``amct.create_quant_config(config_defination=...)``;
2. ``amct.quantize_preprocess``: a model that measures ``max|X_j|`` per input channel of every
   quantized layer;
3. **exactly one** forward pass of it on the calibration images: the balance factors
   ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (α = migration_strength) go to the record;
4. ``amct.quantize_model``: the calibration model, which quantizes ``X / s`` and ``W · s``;
5. ``batch_num`` forward passes of it: the activation factors go to the record;
6. ``amct.save_model``: the fake-quant, deploy and QDQ models.

For comparison the same network is quantized without DMQ (``create_quant_config`` with the
same ``batch_num``, ``quantize_model``, calibration, ``save_model``), and the accuracy of the
FP32 model and of both fake-quant models is printed (ONNX Runtime).

As in the auto-calibration sample the network is first made fragile in one layer
(``--outlier``; ``--no-fragile`` keeps it as trained): a few input channels of one
convolution are made ``--outlier`` times larger and its matching weights that much smaller.
The float network is unchanged, but per-tensor 8-bit quantization of that input fails; DMQ
moves the outliers into the weights, which are quantized per channel.

    python src/dmq_sample.py                 # resnet
    python src/dmq_sample.py --model cnn
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

import amct_pytorch as amct

CFG_TEMPLATE = """\
# simple config of the DMQ sample (训练后量化简易配置文件, DMQBalancer)
batch_num : {batch_num}
common_config : {{
    dmq_balancer : {{
        migration_strength : {migration_strength}
    }}
}}
"""


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
    parser.add_argument("--batch-num", type=positive_int, default=1,
                        help="number of calibration batches (batch_num of the .cfg)")
    parser.add_argument("--calib-batch-size", type=positive_int, default=32,
                        help="training images per calibration batch")
    parser.add_argument("--migration-strength", type=float, default=0.5,
                        help="dmq_balancer.migration_strength of the .cfg, in [0.2, 0.8]")
    parser.add_argument("--config-defination", default=None,
                        help="your own .cfg with dmq_balancer (then --batch-num and "
                             "--migration-strength are taken from it); by default the sample "
                             "writes <output-dir>/dmq_quant.cfg")
    parser.add_argument("--eval-size", type=positive_int, default=1000,
                        help="evaluate on the first this many test images")
    parser.add_argument("--no-fragile", action="store_true",
                        help="quantize the network as trained (no outlier channels)")
    parser.add_argument("--outlier", type=positive_float, default=1e4,
                        help="factor of the outlier channels of the fragile layer's input")
    parser.add_argument("--outlier-channels", type=positive_int, default=2,
                        help="number of outlier channels")
    parser.add_argument("--output-dir", default=os.path.join("model", "dmq"),
                        help="folder of the configs, records and ONNX models")
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
    if args.config_defination is not None and not os.path.isfile(args.config_defination):
        parser.error(f"--config-defination: file not found: {args.config_defination}")
    return args


def calibrate(model: nn.Module, batches: list[np.ndarray]) -> None:
    """One forward pass per batch, without gradients."""
    with torch.no_grad():
        for batch in batches:
            model(torch.from_numpy(batch))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_data(args.data_path)
    model = trained_model(args, data, "DMQ")
    first = calibration_batches(data, 1, args.calib_batch_size)[0]
    if not args.no_fragile:
        model, fragile_layer, outliers = make_fragile(model, args.model, args.outlier,
                                                      args.outlier_channels, first)
        log(f"[DMQ] Made {fragile_layer} fragile: {args.outlier_channels} of its input "
            f"channels x{args.outlier:g} (channels {', '.join(map(str, outliers))}, the most "
            f"active on the first calibration batch), its matching weights "
            f"/{args.outlier:g} (same float network; --no-fragile to keep it as trained)")
    os.makedirs(args.output_dir, exist_ok=True)
    prefix = os.path.join(args.output_dir, args.model)
    config_defination = args.config_defination
    if config_defination is None:
        config_defination = os.path.join(args.output_dir, "dmq_quant.cfg")
        with open(config_defination, "w", encoding="utf-8") as stream:
            stream.write(CFG_TEMPLATE.format(batch_num=args.batch_num,
                                             migration_strength=args.migration_strength))
    images, labels = test_split(data, args.eval_size)

    # ---- with DMQ: the call sequence of the manual
    config_file = f"{prefix}_dmq_quant_config.json"
    record_file = f"{prefix}_dmq_record.txt"
    modified_onnx_file = f"{prefix}_dmq_modified_model.onnx"
    if os.path.exists(record_file):
        os.remove(record_file)  # the balance factors of an earlier run must not be reused
    input_data = torch.from_numpy(first)
    log(f"[DMQ] 1/6 create_quant_config(config_defination={config_defination}) -> "
        f"{config_file}")
    amct.create_quant_config(config_file=config_file, model=model, input_data=input_data,
                             skip_layers=[], batch_num=args.batch_num,
                             config_defination=config_defination)
    with open(config_file, encoding="utf-8") as stream:
        batch_num = json.load(stream)["batch_num"]
    batches = calibration_batches(data, batch_num, args.calib_batch_size)
    log(f"[DMQ] 2/6 quantize_preprocess -> the balance-factor model (record {record_file})")
    preprocess_model = amct.quantize_preprocess(config_file=config_file,
                                                record_file=record_file, model=model,
                                                input_data=input_data)
    log(f"[DMQ] 3/6 Exactly one forward pass on the {batch_num} x {args.calib_batch_size} "
        f"calibration images: the balance factors")
    calibrate(preprocess_model, [np.concatenate(batches)])
    log(f"[DMQ] 4/6 quantize_model -> {modified_onnx_file}")
    calibration_model = amct.quantize_model(
        config_file=config_file, modified_onnx_model=modified_onnx_file,
        record_file=record_file, model=model, input_data=input_data,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES)
    log(f"[DMQ] 5/6 Calibration: {batch_num} batch(es) of {args.calib_batch_size} training "
        f"images")
    calibrate(calibration_model, batches)
    dmq_path = f"{prefix}_dmq"
    log(f"[DMQ] 6/6 save_model -> {dmq_path}_{{fake_quant,deploy,qdq}}_model.onnx")
    amct.save_model(modified_onnx_file=modified_onnx_file, record_file=record_file,
                    save_path=dmq_path)

    # ---- without DMQ, for comparison: plain PTQ with the same batch_num
    plain_config = f"{prefix}_plain_quant_config.json"
    plain_record = f"{prefix}_plain_record.txt"
    plain_onnx = f"{prefix}_plain_modified_model.onnx"
    plain_path = f"{prefix}_plain"
    log(f"[DMQ] Without DMQ: create_quant_config, quantize_model, calibration, save_model -> "
        f"{plain_path}_{{fake_quant,deploy,qdq}}_model.onnx")
    amct.create_quant_config(config_file=plain_config, model=model, input_data=input_data,
                             skip_layers=[], batch_num=batch_num)
    plain_model = amct.quantize_model(
        config_file=plain_config, modified_onnx_model=plain_onnx, record_file=plain_record,
        model=model, input_data=input_data, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES)
    calibrate(plain_model, batches)
    amct.save_model(modified_onnx_file=plain_onnx, record_file=plain_record,
                    save_path=plain_path)

    fp32_onnx_file = f"{prefix}_fp32.onnx"
    export_fp32_onnx(model, input_data, fp32_onnx_file)
    rows = [("FP32", fp32_onnx_file),
            ("Fake-quant without DMQ", f"{plain_path}_fake_quant_model.onnx"),
            ("Fake-quant with DMQ", f"{dmq_path}_fake_quant_model.onnx")]
    results = [(name, onnx_accuracy(path, images, labels, args.threads), path)
               for name, path in rows]
    log("")
    log(f"[Result] Model '{args.model}'; test accuracy in ONNX Runtime on {len(labels)} "
        f"images; calibration on {batch_num} x {args.calib_batch_size} training images; "
        f"{config_defination}")
    width = max(len(name) for name, _ in rows)
    log(f" {'Model':<{width}} | Test accuracy")
    log(f"-{'-' * width}-+-{'-' * 18}")
    for name, (correct, total), _ in results:
        log(f" {name:<{width}} | {100.0 * correct / total:.2f}% ({correct}/{total})")
    (_, (plain_ok, total), _), (_, (dmq_ok, _), _) = results[1], results[2]
    log(f"[Result] DMQ changes the quantized accuracy by "
        f"{100.0 * (dmq_ok - plain_ok) / total:+.2f} points")
    return 0


if __name__ == "__main__":
    from amct_core.errors import AmctError

    try:
        raise SystemExit(main())
    except AmctError as error:  # a bad argument, config or model for AMCT: its message says why
        raise SystemExit(f"[DMQ] ERROR: {error}") from None
