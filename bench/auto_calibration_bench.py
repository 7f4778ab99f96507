"""Accuracy-based auto calibration (``amct_pytorch.accuracy_based_auto_calibration``) on a
residual CNN with one deliberately fragile layer.

The model is the residual MNIST CNN of the PyTorch PTQ sample (``MnistResNet``), trained and
cached exactly as ``bench/ptq_bench.py`` does (``bench/results/ptq_cache/``). It is then made
fragile in one layer: a few output channels of ``FRAGILE_BN`` (the BatchNorm after
``layer2.1.conv1``) are scaled by ``--outlier`` and the matching input channels of
``FRAGILE_LAYER`` (``layer2.1.conv2``) divided by it. ReLU is positively homogeneous, so the
float model computes the same function, but the input of ``layer2.1.conv2`` now has a few huge
outlier channels: 8-bit quantization of that input rounds the other channels to zero, and only
that layer is ruined by quantization.

Measured, with an evaluator on a fixed test subset (``--eval-size`` test digits; the check
passes when the loss is below 0.5 point):

* accuracy of the FP32 model, after plain PTQ (default config, every layer quantized) and after
  auto calibration (the saved fake-quant ONNX model, in ONNX Runtime);
* the layers rolled back, against the one that was made fragile;
* the number of ``evaluate`` calls against the goal of 2 + log2(number of quantizable layers);
* the wall time of the whole search as a multiple of one plain PTQ run
  (``create_quant_config`` + ``quantize_model`` + calibration + ``save_model``; median of
  ``--ptq-runs`` runs after a warm-up).

The numbers go to ``bench/results/auto_calibration_bench.json``; the models and AMCT's logs are
left in ``bench/results/auto_calibration_work/``.

    python bench/auto_calibration_bench.py [--data-path DIR] [--train-steps 400]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

# ptq_bench (imported before data_utils and amct_*) sets AMCT's log levels and the sample
# paths, and caches the trained model.
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import ptq_bench  # noqa: E402  (the bench folder, added just above)
import torch  # noqa: E402
from data_utils import calibration_batches, load_data, test_split  # noqa: E402
from ptq_bench import DYNAMIC_AXES, INPUT_NAME, OUTPUT_NAME, RESULTS, ROOT  # noqa: E402

import amct_pytorch  # noqa: E402
from amct_core.quant.config import load_quant_config  # noqa: E402
from amct_pytorch.common.auto_calibration import AutoCalibrationEvaluatorBase  # noqa: E402

FRAGILE_BN = "layer2.1.bn1"
FRAGILE_LAYER = "layer2.1.conv2"
GOAL_LOSS_PT = 0.5  # points of accuracy below FP32, at most (the evaluator's check)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-path", default=str(ROOT / "samples" / "pytorch" / "ptq" / "data"),
                        help="MNIST folder; the embedded 5,000-digit subset when there is none")
    parser.add_argument("--train-steps", type=int, default=400,
                        help="training steps of the model (cached, as in ptq_bench.py)")
    parser.add_argument("--retrain", action="store_true", help="train even when cached")
    parser.add_argument("--eval-size", type=int, default=1000,
                        help="test digits of the evaluator's fixed subset")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches")
    parser.add_argument("--calib-batch-size", type=int, default=32,
                        help="training digits per calibration batch")
    parser.add_argument("--outlier", type=float, default=1e4,
                        help="factor of the outlier channels of the fragile layer's input")
    parser.add_argument("--outlier-channels", type=int, default=2,
                        help="number of outlier channels")
    parser.add_argument("--ptq-runs", type=int, default=3,
                        help="timed plain PTQ runs after one warm-up (median)")
    args = parser.parse_args(argv)
    for name in ("train_steps", "eval_size", "calib_batches", "calib_batch_size",
                 "outlier_channels", "ptq_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.outlier <= 1:
        parser.error("--outlier must be above 1")
    return args


def make_fragile(trained: torch.nn.Module, factor: float, channels: int) -> torch.nn.Module:
    """The same float function, with ``channels`` outlier channels at the input of
    ``FRAGILE_LAYER``: BatchNorm scale and shift times ``factor``, the next conv's matching
    input channels divided by it."""
    model = copy.deepcopy(trained).eval()
    modules = dict(model.named_modules())
    bn, conv = modules[FRAGILE_BN], modules[FRAGILE_LAYER]
    with torch.no_grad():
        for channel in range(channels):
            bn.weight[channel] *= factor
            bn.bias[channel] *= factor
            conv.weight[:, channel] /= factor
    return model


def accuracy_pct(logits: np.ndarray | torch.Tensor, labels: np.ndarray) -> float:
    return 100.0 * float((np.asarray(logits).argmax(axis=1) == labels).mean())


class Evaluator(AutoCalibrationEvaluatorBase):
    """Calibration on the calibration batches; accuracy (percent) on a fixed test subset;
    passes when the loss is below ``GOAL_LOSS_PT`` points. Counts the ``evaluate`` calls."""

    def __init__(self, batches: Sequence[np.ndarray], images: np.ndarray,
                 labels: np.ndarray) -> None:
        self.batches = [torch.from_numpy(batch) for batch in batches]
        self.images = torch.from_numpy(images)
        self.labels = labels
        self.evaluations = 0

    def calibration(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in self.batches:
                model(batch)

    def evaluate(self, model: torch.nn.Module) -> float:
        self.evaluations += 1
        with torch.no_grad():
            return accuracy_pct(model(self.images).numpy(), self.labels)

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        loss = original_metric - new_metric
        return loss < GOAL_LOSS_PT, loss


def plain_ptq(model: torch.nn.Module, evaluator: Evaluator, example: torch.Tensor,
              folder: Path) -> torch.nn.Module:
    """One plain PTQ run (every layer quantized); returns the calibration model."""
    config, modified, record = (folder / "quant_config.json", folder / "modified.onnx",
                                folder / "record.txt")
    amct_pytorch.create_quant_config(str(config), model, example,
                                     batch_num=len(evaluator.batches))
    calibration = amct_pytorch.quantize_model(
        str(config), str(modified), str(record), model, example, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES)
    evaluator.calibration(calibration)
    amct_pytorch.save_model(str(modified), str(record), str(folder / "model"))
    return calibration


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return accuracy_pct(session.run(None, {INPUT_NAME: images})[0], labels)


def print_table(rows: list[tuple[str, str, str]]) -> None:
    header = ("Measure", "Value", "Goal")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)).rstrip()

    print(line(header))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = RESULTS / "auto_calibration_work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "ptq").mkdir(parents=True)
    (work / "auto").mkdir(parents=True)

    data = load_data(args.data_path)
    trained, weights, _ = ptq_bench.trained_resnet(data, args.train_steps, args.retrain)
    model = make_fragile(trained, args.outlier, args.outlier_channels)
    batches = calibration_batches(data, args.calib_batches, args.calib_batch_size)
    images, labels = test_split(data, args.eval_size)
    example = torch.from_numpy(batches[0])
    with torch.no_grad():
        float_diff = float((model(torch.from_numpy(images))
                            - trained(torch.from_numpy(images))).abs().max())
    print(f"[Bench] Fragile layer: {args.outlier_channels} output channels of {FRAGILE_BN} "
          f"scaled by {args.outlier:g}, the matching input channels of {FRAGILE_LAYER} divided "
          f"by it: same float function (max |logit difference| {float_diff:.2e}), but 8-bit "
          f"quantization of {FRAGILE_LAYER}'s input is ruined", flush=True)

    evaluator = Evaluator(batches, images, labels)
    fp32 = evaluator.evaluate(model)

    # ---- plain PTQ: one warm-up, then timed runs
    print(f"[Bench] Plain PTQ: 1 warm-up + {args.ptq_runs} timed run(s)", flush=True)
    ptq_times = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        calibration = plain_ptq(model, evaluator, example, work / "ptq")
        for _ in range(args.ptq_runs):
            start = time.perf_counter()
            calibration = plain_ptq(model, evaluator, example, work / "ptq")
            ptq_times.append(time.perf_counter() - start)
    ptq_s = statistics.median(ptq_times)
    ptq_acc = evaluator.evaluate(calibration)
    ptq_onnx_acc = onnx_accuracy(work / "ptq" / "model_fake_quant_model.onnx", images, labels)
    layers = list(load_quant_config(work / "ptq" / "quant_config.json").layers)

    # ---- auto calibration (in the work folder: AMCT writes ./amct_log there)
    config = work / "auto" / "quant_config.json"
    amct_pytorch.create_quant_config(str(config), model, example, batch_num=len(batches))
    evaluator.evaluations = 0
    print(f"[Bench] Auto calibration over {len(layers)} quantizable layers", flush=True)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            start = time.perf_counter()
            amct_pytorch.accuracy_based_auto_calibration(
                model, evaluator, str(config), str(work / "auto" / "record.txt"),
                str(work / "auto" / "model"), example, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES)
            auto_s = time.perf_counter() - start
    finally:
        os.chdir(cwd)
    history = json.loads((work / "amct_log" /
                          "accuracy_based_auto_calibration_record.json").read_text())
    rolled_back = history["result"]
    saved = work / "auto" / "model_fake_quant_model.onnx"
    auto_acc = onnx_accuracy(saved, images, labels) if saved.is_file() else None
    evaluations = evaluator.evaluations
    eval_goal = 2 + math.log2(len(layers))

    ratio = auto_s / ptq_s
    recovered = auto_acc is not None and fp32 - auto_acc < GOAL_LOSS_PT
    fewest = rolled_back == [FRAGILE_LAYER]
    rows = [
        ("Accuracy FP32", f"{fp32:.2f} %", ""),
        ("Accuracy plain PTQ", f"{ptq_acc:.2f} % ({ptq_acc - fp32:+.2f} pt)", ""),
        ("Accuracy auto calibration",
         "failed" if auto_acc is None else f"{auto_acc:.2f} % ({auto_acc - fp32:+.2f} pt)",
         f"> {fp32 - GOAL_LOSS_PT:.2f} %: {'met' if recovered else 'NOT met'}"),
        ("Layers rolled back",
         "none found" if rolled_back is None
         else f"{len(rolled_back)} of {len(layers)}: {', '.join(rolled_back) or '-'}",
         f"1 ({FRAGILE_LAYER}): {'met' if fewest else 'NOT met'}"),
        ("Evaluations", f"{evaluations} (1 FP32 + 1 initial + {len(history['trials'])} trials)",
         f"<= 2 + log2({len(layers)}) = {eval_goal:.2f}: "
         f"{'met' if evaluations <= eval_goal else 'NOT met'}"),
        ("Time plain PTQ (median)", f"{ptq_s:.2f} s", ""),
        ("Time auto calibration", f"{auto_s:.2f} s", ""),
        ("Auto / plain PTQ time", f"{ratio:.1f}x", ""),
    ]
    print()
    print(f"MnistResNet ({weights}; {len(labels)} test digits; {len(batches)}x"
          f"{args.calib_batch_size} calibration digits), os.cpu_count() = {os.cpu_count()}, "
          f"torch {torch.__version__}")
    print_table(rows)

    report = {
        "settings": {**vars(args), "weights": weights,
                     "fragile_bn": FRAGILE_BN, "fragile_layer": FRAGILE_LAYER,
                     "cpu_count": os.cpu_count(), "cpu": ptq_bench.cpu_name(),
                     "torch": torch.__version__, "test_digits": len(labels),
                     "embedded_subset": bool(data.is_embedded_subset)},
        "float_max_abs_logit_difference": float_diff,
        "accuracy_percent": {"fp32": fp32, "plain_ptq": ptq_acc,
                             "plain_ptq_fake_quant_onnx": ptq_onnx_acc,
                             "auto_calibration_fake_quant_onnx": auto_acc},
        "quantizable_layers": layers,
        "rolled_back": rolled_back,
        "ranking": history.get("ranking"),
        "trials": history.get("trials"),
        "evaluations": evaluations,
        "evaluations_goal": eval_goal,
        "time_s": {"plain_ptq_median": ptq_s, "plain_ptq_runs": ptq_times,
                   "auto_calibration": auto_s},
        "time_ratio_auto_over_plain_ptq": ratio,
        "goals": {"recovered_within_0_5_pt": recovered, "only_fragile_layer_rolled_back": fewest,
                  "evaluations_within_goal": evaluations <= eval_goal},
    }
    out = RESULTS / "auto_calibration_bench.json"
    partial = out.with_suffix(".json.part")
    partial.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(partial, out)
    print(f"\n[Bench] Written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
