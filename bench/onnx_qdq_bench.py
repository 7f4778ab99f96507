"""ONNX Runtime speed of the QDQ model save_model writes, against the FP32 model.

The model is a ResNet-18-like net built with onnx.helper (stem conv + Relu + MaxPool, four
stages of two basic blocks with 1x1 strided projections, GlobalAveragePool, Flatten, Gemm:
20 convolutions), with seeded Gaussian (He-scaled) weights: the cost depends on the shapes, not
on the values. The record holds min-max activation factors measured on one batch of Gaussian
input plus the ``tensor:`` entries ``qdq_calibration_tensors`` asks for, and ARQ per-channel
weight factors. Both models run with ``intra_op_num_threads`` threads, ORT_ENABLE_ALL, batch
``--batch``; the models take turns run by run (the machine may be shared), and the script prints the
median and best latency of each and the speed-up, the ops of the
optimized QDQ graph (QLinearConv ... when ORT fused them) and the largest difference between
the QDQ and fake-quant outputs.

    python bench/onnx_qdq_bench.py [--batch 32] [--size 32] [--threads 2] [--runs 10]
                                   [--activation-type uint8|int8]
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "onnx"))

from onnx_quant_models import make_record, resnet_like, session

from amct_onnx.writers.common import collect_factors
from amct_onnx.writers.fake_quant import build_fake_quant_model
from amct_onnx.writers.qdq import build_qdq_model, qdq_calibration_tensors


def latencies(models: list[onnx.ModelProto], feeds: dict, threads: int, runs: int,
              optimized: list[str | None]) -> list[list[float]]:
    """Seconds per run of each model; the models take turns, so that a machine shared with
    other jobs slows them alike."""
    sessions = [session(m, threads=threads, optimized_path=o)
                for m, o in zip(models, optimized, strict=True)]
    for sess in sessions:
        for _ in range(2):
            sess.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for sess, spent in zip(sessions, times, strict=True):
            start = time.perf_counter()
            sess.run(None, feeds)
            spent.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--activation-type", default="uint8", choices=("uint8", "int8"))
    parser.add_argument("--channels", default="64,128,256,512")
    args = parser.parse_args()
    channels = tuple(int(c) for c in args.channels.split(","))
    model = resnet_like(channels=channels, size=args.size, blocks_per_stage=2)
    convs = sum(node.op_type == "Conv" for node in model.graph.node)
    feeds = {"input": np.random.default_rng(0).standard_normal(
        (args.batch, 3, args.size, args.size)).astype(np.float32)}
    record = make_record(model, feeds, tensors=qdq_calibration_tensors(model))
    layers, tensors = collect_factors(model, record)
    qdq = build_qdq_model(model, layers, tensors, args.activation_type)
    fake = build_fake_quant_model(model, layers)
    with tempfile.TemporaryDirectory() as folder:
        optimized = os.path.join(folder, "qdq_optimized.onnx")
        fp32_t, qdq_t = latencies([model, qdq], feeds, args.threads, args.runs,
                                  [None, optimized])
        ops = collections.Counter(node.op_type for node in onnx.load(optimized).graph.node)
    difference = np.abs(session(qdq).run(None, feeds)[0] - session(fake).run(None, feeds)[0])
    print(f"model: ResNet-like, {convs} convs, channels {channels}, input "
          f"{args.batch}x3x{args.size}x{args.size}; {args.threads} threads, ORT_ENABLE_ALL, "
          f"{args.activation_type} activations")
    for label, pick in (("median", statistics.median), ("best", min)):
        fp32_s, qdq_s = pick(fp32_t), pick(qdq_t)
        print(f"{label}: FP32 {fp32_s * 1e3:.1f} ms, QDQ {qdq_s * 1e3:.1f} ms: speed-up "
              f"{fp32_s / qdq_s:.2f}x")
    print(f"optimized QDQ graph ops: {dict(ops)}")
    print(f"max |QDQ - fake-quant| on the logits: {difference.max():.4f}")


if __name__ == "__main__":
    main()
