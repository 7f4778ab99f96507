"""Compare the FP32 ONNX model with the models ``amct_onnx calibration`` wrote, in ONNX Runtime.

Prints the test accuracy of the FP32, fake-quant and QDQ models and the latency of one batch
of the FP32 and QDQ models (the deploy model holds Ascend custom ops and does not run in ONNX
Runtime). numpy and onnxruntime only.

    python src/evaluate.py --fp32-model model/resnet.onnx --quant-prefix model/quant/resnet
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PYTORCH_SAMPLE_SRC = Path(__file__).resolve().parents[3] / "pytorch" / "ptq" / "src"
if str(PYTORCH_SAMPLE_SRC) not in sys.path:
    sys.path.insert(0, str(PYTORCH_SAMPLE_SRC))

from data_utils import load_data, log, test_split  # noqa: E402
from ort_utils import (  # noqa: E402
    accuracy,
    latencies_ms,
    make_session,
    percent,
    predict,
    print_table,
)

QUANT_SUFFIXES = {"fake_quant": "_fake_quant_model.onnx", "qdq": "_qdq_model.onnx"}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; the model files must exist."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--fp32-model", default=os.path.join("model", "resnet.onnx"),
                        help="the FP32 ONNX model (from src/export_model.py)")
    parser.add_argument("--quant-prefix", default=os.path.join("model", "quant", "resnet"),
                        help="the --save_path given to amct_onnx calibration")
    parser.add_argument("--data-path", default="data",
                        help="MNIST folder; the embedded 5,000-digit subset is used when no "
                             "MNIST is there")
    parser.add_argument("--eval-size", type=positive_int, default=None,
                        help="evaluate on the first this many test images (default: all)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="ONNX Runtime intra-op threads")
    parser.add_argument("--latency-batch", type=positive_int, default=64,
                        help="test images per batch in the latency measurement")
    parser.add_argument("--latency-runs", type=positive_int, default=20,
                        help="timed runs per model (the median is printed)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.fp32_model):
        parser.error(f"--fp32-model: file not found: {args.fp32_model} (write it with: python "
                     f"src/export_model.py)")
    args.quant_models = {kind: args.quant_prefix + suffix
                         for kind, suffix in QUANT_SUFFIXES.items()}
    missing = [path for path in args.quant_models.values() if not os.path.isfile(path)]
    if missing:
        parser.error(f"--quant-prefix {args.quant_prefix}: missing {', '.join(missing)} (write "
                     f"them with: amct_onnx calibration --model {args.fp32_model} --save_path "
                     f"{args.quant_prefix} --data_dir data/calibration --batch_num 2)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_data(args.data_path)
    images, labels = test_split(data, args.eval_size)
    fp32 = make_session(args.fp32_model, args.threads)
    fake_quant = make_session(args.quant_models["fake_quant"], args.threads)
    qdq = make_session(args.quant_models["qdq"], args.threads)
    results = {name: accuracy(predict(session, images), labels)
               for name, session in (("fp32", fp32), ("fake_quant", fake_quant), ("qdq", qdq))}
    latency_batch = images[:args.latency_batch]
    fp32_ms, qdq_ms = latencies_ms([fp32, qdq], latency_batch, args.latency_runs)

    log("")
    log(f"[Result] {args.fp32_model} vs {args.quant_prefix}_*: test accuracy on {len(labels)} "
        f"images")
    log(f"[Result] Latency: median of {args.latency_runs} runs on a batch of "
        f"{len(latency_batch)} test images, ONNX Runtime CPU, {args.threads} intra-op "
        f"thread(s)")
    print_table([
        ("FP32", "ONNX Runtime", percent(*results["fp32"]), f"{fp32_ms:.2f} ms"),
        ("Fake-quant model", "ONNX Runtime", percent(*results["fake_quant"]), "-"),
        ("QDQ model", "ONNX Runtime", percent(*results["qdq"]), f"{qdq_ms:.2f} ms"),
    ])
    log(f"[Result] QDQ / FP32 latency in ONNX Runtime: {qdq_ms / fp32_ms:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
