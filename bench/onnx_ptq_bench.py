"""Wall time of the amct_onnx post-training quantization against ONNX Runtime's own.

amct_onnx: ``create_quant_config`` + ``quantize_model`` (BN folding, ARQ) + ``calibrate``
(IFMR, the reference's default) + ``save_model`` (fake-quant, deploy and QDQ models).
ONNX Runtime: ``onnxruntime.quantization.quantize_static`` with MinMax calibration,
``per_channel=True``, QDQ format, uint8 activations / int8 weights. Both get the same batches
and write their files to a temporary folder; each is run once to warm up, then ``--runs``
times alternately, and the medians are printed with their ratio.

Models (onnx.helper, seeded Gaussian weights, Conv-BN-Relu, residual Adds):

* ``cifar``: a CIFAR ResNet (stem, three stages of ``--blocks`` basic blocks with 16, 32, 64
  channels at 32, 16, 8 pixels, 1x1 strided projections, GlobalAveragePool, Gemm);
* ``flat``: tests/onnx/ptq_model_zoo.resnet_like, 32 channels at 32x32 throughout (much
  activation data per FLOP: the hardest case for IFMR against MinMax).

    python bench/onnx_ptq_bench.py [--model cifar|flat] [--batch 16] [--batches 2]
                                   [--blocks 1] [--runs 5]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "onnx"))
os.environ.setdefault("AMCT_LOG_LEVEL", "WARNING")

from ptq_model_zoo import (
    bn_node,
    bn_params,
    conv_weight,
    float_input,
    make_model,
    resnet_like,
)

import amct_onnx


def cifar_resnet(blocks: int = 1, width: int = 16, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    init: dict[str, np.ndarray] = {}
    nodes: list[onnx.NodeProto] = []

    def conv(x: str, cin: int, cout: int, k: int, stride: int) -> str:
        name = f"conv{len(nodes)}"
        init[f"{name}.w"] = conv_weight(rng, (cout, cin, k, k))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [name], name=name,
                                      kernel_shape=[k, k], pads=[k // 2] * 4,
                                      strides=[stride] * 2))
        init.update(bn_params(rng, f"{name}_bn", cout))
        nodes.append(bn_node(f"{name}_bn", name, f"{name}.bn"))
        return f"{name}.bn"

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}.r"], name=f"{x}_relu"))
        return f"{x}.r"

    x, cin = relu(conv("input", 3, width, 3, 1)), width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for block in range(blocks):
            stride = 2 if stage and not block else 1
            y = conv(relu(conv(x, cin, cout, 3, stride)), cout, cout, 3, 1)
            shortcut = conv(x, cin, cout, 1, stride) if stride != 1 or cin != cout else x
            add = f"add{stage}_{block}"
            nodes.append(helper.make_node("Add", [y, shortcut], [add], name=add))
            x, cin = relu(add), cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    init["fc.w"] = conv_weight(rng, (10, cin))
    init["fc.b"] = np.zeros(10, np.float32)
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc",
                                  transB=1))
    return make_model(nodes, [float_input("input", ["N", 3, 32, 32])],
                      [float_input("logits", ["N", 10])], init, 13)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("cifar", "flat"), default="cifar")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice on pre-processing

    model = cifar_resnet(args.blocks) if args.model == "cifar" else resnet_like(channels=32)
    work = tempfile.mkdtemp(prefix="onnx_ptq_bench_")
    path = os.path.join(work, "model.onnx")
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    batches = [{"input": rng.normal(0, 1, (args.batch, 3, 32, 32)).astype(np.float32)}
               for _ in range(args.batches)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    def in_work(name: str) -> str:
        return os.path.join(work, name)

    def amct() -> None:
        amct_onnx.create_quant_config(in_work("config.json"), path, batch_num=args.batches)
        amct_onnx.quantize_model(in_work("config.json"), path, in_work("modified.onnx"),
                                 in_work("record.txt"))
        amct_onnx.calibrate(in_work("modified.onnx"), in_work("record.txt"), batches)
        amct_onnx.save_model(in_work("modified.onnx"), in_work("record.txt"),
                             in_work("out/model"))

    def ort() -> None:
        quantize_static(path, in_work("ort_qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)

    times: dict[str, list[float]] = {"amct_onnx": [], "quantize_static": []}
    amct()
    ort()
    for _ in range(args.runs):
        for name, run in (("amct_onnx", amct), ("quantize_static", ort)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"model {args.model} (blocks {args.blocks}), {args.batches} batch(es) of "
          f"{args.batch}x3x32x32, {os.cpu_count()} CPU(s)")
    for name, values in times.items():
        print(f"  {name:16s} median {medians[name]:.3f} s  "
              f"runs {', '.join(f'{value:.3f}' for value in values)}")
    print(f"  ratio amct_onnx / quantize_static: "
          f"{medians['amct_onnx'] / medians['quantize_static']:.2f}")


if __name__ == "__main__":
    main()
