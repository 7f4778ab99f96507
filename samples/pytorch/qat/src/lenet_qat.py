"""Single-op QAT, training from scratch: LeNet built from QAT layers (manual,
单算子模式的量化感知训练, Training from scratch).

1. the QAT config dict of the manual (ULQ activations, IFMR over the first ``--batch-num``
   batches; ARQ-retrain weights per tensor, as ``LinearQAT`` requires);
2. LeNet built from ``Conv2dQAT`` and ``LinearQAT`` exactly as in the manual (Sigmoid
   activations, average pooling), trained from scratch on MNIST (Adam, cosine schedule);
3. ``torch.onnx.export`` (``dynamo=False``, opset 13) of the trained network: the intermediate
   QDQ model ``inter_model.onnx`` (QuantizeLinear / DequantizeLinear pairs);
4. ``convert_qat_model('inter_model.onnx', './outputs/lenet')``: the fake-quant model
   ``outputs/lenet_fake_quant_model.onnx`` (ONNX Runtime), the deploy model
   ``outputs/lenet_deploy_model.onnx`` and ``outputs/record.txt``;
5. the fake-quant model validated in ONNX Runtime.

The accuracy on the test digits is printed after each stage: the QAT model in PyTorch, the
QDQ model and the fake-quant model in ONNX Runtime.

    python src/lenet_qat.py
    python src/lenet_qat.py --epochs 20 --data-path data
"""
from __future__ import annotations

import argparse
import os

import qat_utils  # noqa: F401  (puts the PTQ sample's src folder on sys.path)
import torch
import torch.nn as nn
from qat_utils import (
    accuracy_line,
    add_data_arguments,
    export_onnx,
    load_data,
    log,
    onnx_accuracy,
    positive_float,
    positive_int,
    single_op_config,
    test_split,
    torch_accuracy,
    train_steps,
    training_tensors,
)

from amct_onnx.convert_model import convert_qat_model
from amct_pytorch.nn.module.quantization.conv2d import Conv2dQAT
from amct_pytorch.nn.module.quantization.linear import LinearQAT


def build_lenet(config: dict) -> nn.Sequential:
    """LeNet of QAT layers, as in the manual's Training-from-scratch example."""
    return torch.nn.Sequential(
        Conv2dQAT(1, 6, kernel_size=5, padding=2, config=config), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        Conv2dQAT(6, 16, kernel_size=5, config=config), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        LinearQAT(16 * 5 * 5, 120, config=config), nn.Sigmoid(),
        LinearQAT(120, 84, config=config), nn.Sigmoid(),
        LinearQAT(84, 10, config=config),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=positive_int, default=8,
                        help="training epochs over the training digits (default: 8)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps; overrides --epochs (default: from --epochs)")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="training batch size (default: 64)")
    parser.add_argument("--lr", type=positive_float, default=0.005,
                        help="initial learning rate of Adam, cosine schedule (default: 0.005)")
    parser.add_argument("--batch-num", type=positive_int, default=10,
                        help="training batches whose activations initialise the ULQ clips "
                             "(retrain_data_config.batch_num, default: 10)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--log-steps", type=positive_int, default=50,
                        help="print the training loss every this many steps (default: 50)")
    parser.add_argument("--onnx-file", default="inter_model.onnx",
                        help="the exported QDQ model (default: inter_model.onnx)")
    parser.add_argument("--output-dir", default="outputs",
                        help="folder of the converted models and record (default: outputs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_data(args.data_path)
    images, labels = training_tensors(data)
    test_images, test_labels = test_split(data, args.eval_size)
    steps = args.steps or args.epochs * max(1, len(labels) // args.batch_size)
    if steps < args.batch_num:
        raise SystemExit(f"--steps {steps} is less than --batch-num {args.batch_num}: the ULQ "
                         f"clips are initialised over the first batch_num training steps")

    # QAT layer config (manual: QAT算子量化配置项); LinearQAT has no channel-wise weights.
    config = single_op_config(args.batch_num, channel_wise=False)
    torch.manual_seed(args.seed)
    net = build_lenet(config)
    log(f"[QAT] LeNet of Conv2dQAT / LinearQAT layers, trained from scratch: {steps} steps of "
        f"{args.batch_size} digits, Adam lr {args.lr}, batch_num {args.batch_num}")
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    train_steps(net, optimizer, images, labels, start=0, stop=steps, total=steps,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                log_steps=args.log_steps)
    log(accuracy_line("QAT model", "PyTorch", torch_accuracy(net, test_images, test_labels)))

    # Export the intermediate (QDQ) model.
    export_onnx(net, torch.from_numpy(test_images[:1]), args.onnx_file)
    log(f"[Export] QDQ model written to {args.onnx_file}")
    log(accuracy_line(f"QDQ model {args.onnx_file}", "ONNX Runtime",
                      onnx_accuracy(args.onnx_file, test_images, test_labels)))

    # Fake-quant and deploy models.
    save_path = os.path.join(args.output_dir, "lenet")
    convert_qat_model(args.onnx_file, save_path)
    fake_quant = f"{save_path}_fake_quant_model.onnx"
    for path in (fake_quant, f"{save_path}_deploy_model.onnx",
                 os.path.join(args.output_dir, "record.txt")):
        log(f"[Convert] Written: {path}")

    # Accuracy of the fake-quant model (simulation of the deployed INT8 model).
    log(accuracy_line("Fake-quant model", "ONNX Runtime",
                      onnx_accuracy(fake_quant, test_images, test_labels)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
