"""Single-op QAT, fine-tune: the layers of a trained residual CNN replaced by QAT layers with
``from_float`` (manual, 单算子模式的量化感知训练, Fine-tune).

1. the trained FP32 ``MnistResNet`` of the PTQ sample (``--pretrained-path``, or
   ``../ptq/model/resnet.pth``, or ``model/resnet.pth`` of this folder, trained first when
   absent); its accuracy is printed;
2. every ``nn.Conv2d`` replaced by ``Conv2dQAT.from_float(module, config=config)`` (ARQ-retrain
   weights per output channel) and the ``nn.Linear`` by ``LinearQAT.from_float`` (per tensor:
   ``LinearQAT`` has no channel-wise weights), the ``_set_module`` way of the manual;
3. fine-tuning (SGD with momentum, cosine schedule); the ULQ clips are initialised by IFMR over
   the first ``--batch-num`` batches, then learned;
4. ``torch.onnx.export`` (``dynamo=False``, opset 13): the QDQ model ``resnet_inter_model.onnx``;
5. ``convert_qat_model(..., './outputs/resnet')``: ``outputs/resnet_fake_quant_model.onnx``,
   ``outputs/resnet_deploy_model.onnx`` and the record ``outputs/resnet_record.txt``;
6. the fake-quant model validated in ONNX Runtime.

Printed: the accuracy of the FP32 model, of the QAT model (PyTorch), of the QDQ model and of
the fake-quant model (ONNX Runtime).

    python src/finetune_qat.py
    python src/finetune_qat.py --pretrained-path ../ptq/model/resnet.pth --steps 300
"""
from __future__ import annotations

import argparse
import os

import qat_utils  # noqa: F401  (puts the PTQ sample's src folder on sys.path)
import torch
from qat_utils import (
    accuracy_line,
    add_data_arguments,
    add_fp32_arguments,
    export_onnx,
    fp32_model,
    load_data,
    log,
    onnx_accuracy,
    positive_float,
    positive_int,
    set_module,
    single_op_config,
    test_split,
    torch_accuracy,
    train_steps,
    training_tensors,
)
from torch import nn

from amct_onnx.convert_model import convert_qat_model
from amct_pytorch.nn.module.quantization.conv2d import Conv2dQAT
from amct_pytorch.nn.module.quantization.linear import LinearQAT


def replace_with_qat(model: nn.Module, batch_num: int) -> list[str]:
    """Replace every ``nn.Conv2d`` (channel-wise weights) and ``nn.Linear`` (per-tensor
    weights) of ``model`` by its QAT layer, built with ``from_float``; return their names."""
    conv_config = single_op_config(batch_num, channel_wise=True)
    linear_config = single_op_config(batch_num, channel_wise=False)
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d):
            set_module(model, name, Conv2dQAT.from_float(module, config=conv_config))
        elif isinstance(module, nn.Linear):
            set_module(model, name, LinearQAT.from_float(module, config=linear_config))
        else:
            continue
        replaced.append(name)
    return replaced


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    add_fp32_arguments(parser)
    parser.add_argument("--steps", type=positive_int, default=100,
                        help="fine-tuning steps (default: 100)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="fine-tuning batch size (default: 32)")
    parser.add_argument("--lr", type=positive_float, default=0.005,
                        help="initial learning rate of SGD with momentum 0.9, cosine schedule "
                             "(default: 0.005)")
    parser.add_argument("--batch-num", type=positive_int, default=10,
                        help="training batches whose activations initialise the ULQ clips "
                             "(retrain_data_config.batch_num, default: 10)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--log-steps", type=positive_int, default=20,
                        help="print the training loss every this many steps (default: 20)")
    parser.add_argument("--onnx-file", default="resnet_inter_model.onnx",
                        help="the exported QDQ model (default: resnet_inter_model.onnx)")
    parser.add_argument("--output-dir", default="outputs",
                        help="folder of the converted models and record (default: outputs)")
    args = parser.parse_args(argv)
    if args.steps < args.batch_num:
        parser.error(f"--steps {args.steps} is less than --batch-num {args.batch_num}: the ULQ "
                     f"clips are initialised over the first batch_num training steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_data(args.data_path)
    images, labels = training_tensors(data)
    test_images, test_labels = test_split(data, args.eval_size)

    model = fp32_model(args, data, "FP32")
    log(accuracy_line("FP32 model", "PyTorch", torch_accuracy(model, test_images, test_labels)))

    # Replace the torch layers by QAT layers (manual: 将模型中原生算子替换为qat算子).
    replaced = replace_with_qat(model, args.batch_num)
    log(f"[QAT] {len(replaced)} layers replaced by QAT layers: {', '.join(replaced)}")

    # Fine-tune.
    log(f"[QAT] Fine-tuning: {args.steps} steps of {args.batch_size} digits, SGD lr {args.lr}, "
        f"batch_num {args.batch_num}")
    torch.manual_seed(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    train_steps(model, optimizer, images, labels, start=0, stop=args.steps, total=args.steps,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                log_steps=args.log_steps)
    log(accuracy_line("QAT model", "PyTorch", torch_accuracy(model, test_images, test_labels)))

    # Export the intermediate (QDQ) model.
    export_onnx(model, torch.from_numpy(test_images[:1]), args.onnx_file)
    log(f"[Export] QDQ model written to {args.onnx_file}")
    log(accuracy_line(f"QDQ model {args.onnx_file}", "ONNX Runtime",
                      onnx_accuracy(args.onnx_file, test_images, test_labels)))

    # Fake-quant and deploy models.
    save_path = os.path.join(args.output_dir, "resnet")
    # The record is named after the model, so that it does not replace lenet_qat.py's.
    record = f"{save_path}_record.txt"
    convert_qat_model(args.onnx_file, save_path, record)
    fake_quant = f"{save_path}_fake_quant_model.onnx"
    for path in (fake_quant, f"{save_path}_deploy_model.onnx", record):
        log(f"[Convert] Written: {path}")
    log(accuracy_line("Fake-quant model", "ONNX Runtime",
                      onnx_accuracy(fake_quant, test_images, test_labels)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
