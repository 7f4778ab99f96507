"""ONNX Runtime helpers of the quantization samples: accuracy, latency and the result table.

numpy and onnxruntime only (no torch), so the ONNX sample's ``evaluate.py`` uses them too.
Latency: the sessions run with ``intra_op_num_threads`` threads, one inter-op thread and all
graph optimizations (ONNX Runtime then fuses the QDQ model's QuantizeLinear / DequantizeLinear
pairs into int8 kernels such as QLinearConv); after a warm-up the models take turns run by
run, so that other load on the machine slows them alike, and the median is reported. The
intra-op threads do not spin between runs: a session that just ran would otherwise keep its
threads busy and slow the next model down.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort


def make_session(path: str, threads: int = 2) -> ort.InferenceSession:
    """A CPU inference session of the ONNX model at ``path``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def predict(session: ort.InferenceSession, images: np.ndarray,
            batch_size: int = 500) -> np.ndarray:
    """The logits of ``images`` (normalized, ``(N, 1, 28, 28)``), computed in batches."""
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: images[start:start + batch_size]})[0]
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """(correct predictions, number of images)."""
    return int((logits.argmax(axis=1) == labels).sum()), len(labels)


def latencies_ms(sessions: Sequence[ort.InferenceSession], batch: np.ndarray,
                 runs: int = 20, warmup: int = 3) -> list[float]:
    """Median milliseconds per run of ``batch`` for each session (module docstring)."""
    feeds = [{session.get_inputs()[0].name: batch} for session in sessions]
    for session, feed in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for session, feed, spent in zip(sessions, feeds, times, strict=True):
            start = time.perf_counter()
            session.run(None, feed)
            spent.append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(spent) for spent in times]


def percent(correct: int, total: int) -> str:
    """``98.10% (981/1000)``."""
    return f"{100.0 * correct / total:.2f}% ({correct}/{total})"


def print_table(rows: Sequence[tuple[str, str, str, str]]) -> None:
    """Print rows of (model, runs in, test accuracy, latency) as a plain-text table."""
    header = ("Model", "Runs in", "Test accuracy", "Latency/batch")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    rule = "+".join("-" * (width + 2) for width in widths)

    def line(cells: Sequence[str]) -> str:
        return "|".join(f" {cell:<{width}} " for cell, width in zip(cells, widths,
                                                                     strict=True)).rstrip()

    print(line(header), flush=True)
    print(rule, flush=True)
    for row in rows:
        print(line(row), flush=True)
