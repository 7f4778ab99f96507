"""Tests of the post-training quantization samples (samples/pytorch/ptq, samples/onnx/ptq).

The scripts run as subprocesses from a temporary copy of both sample folders (the ONNX sample
reuses the PyTorch sample's network, training and weights), on the embedded MNIST subset, with
few training steps and 500 test images. The printed result tables are parsed: every row is
there, in order, and the quantized models stay within a few points of the FP32 accuracy.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from sample_runs import SAMPLES, amct_messages, assert_in_order, copy_samples, run_script

EVAL_SIZE = 500
FAST_EVAL = ["--eval-size", str(EVAL_SIZE), "--latency-batch", "32", "--latency-runs", "3"]
#: Largest accuracy drop (percentage points) allowed from FP32 to a quantized model.
MAX_DROP = 3.0

TABLE_ROW = re.compile(
    r"^ (?P<model>FP32|Calibration model|Fake-quant model|QDQ model) +"
    r"\| (?P<runtime>PyTorch|ONNX Runtime) +"
    r"\| (?P<accuracy>\d+\.\d\d)% \((?P<correct>\d+)/(?P<total>\d+)\) +"
    r"\| (?P<latency>-|\d+\.\d\d ms)$", re.M)
PYTORCH_ROWS = [("FP32", "PyTorch"), ("FP32", "ONNX Runtime"), ("Calibration model", "PyTorch"),
                ("Fake-quant model", "ONNX Runtime"), ("QDQ model", "ONNX Runtime")]
ONNX_ROWS = [("FP32", "ONNX Runtime"), ("Fake-quant model", "ONNX Runtime"),
             ("QDQ model", "ONNX Runtime")]
TIMED = {("FP32", "ONNX Runtime"), ("QDQ model", "ONNX Runtime")}
PTQ_LOG = [
    "Create quant config file ",
    "Generate modified onnx file ",
    "Quantize model success: run the calibration model on 2 batch(es).",
    "Calibration batch 1/2 done.",
    "Calibration batch 2/2 done.",
    "Calibration done: ",
    "The fake-quant model is written to ",
    "The deploy model is written to ",
    "The qdq model is written to ",
]


def result_table(output: str, expected_rows: list[tuple[str, str]]
                 ) -> dict[tuple[str, str], dict[str, float | str]]:
    """The rows of the printed table by (model, runtime), checked for order and consistency."""
    rows = [match.groupdict() for match in TABLE_ROW.finditer(output)]
    assert [(row["model"], row["runtime"]) for row in rows] == expected_rows, output
    table = {}
    for row in rows:
        key = (row["model"], row["runtime"])
        correct, total = int(row["correct"]), int(row["total"])
        assert total == EVAL_SIZE
        assert row["accuracy"] == f"{100 * correct / total:.2f}"
        if key in TIMED:
            assert row["latency"].endswith(" ms") and float(row["latency"][:-3]) > 0
        else:
            assert row["latency"] == "-"
        table[key] = {"correct": correct, "accuracy": 100 * correct / total}
    return table


def check_accuracies(table: dict, fp32_key: tuple[str, str], min_fp32: float) -> None:
    fp32 = table[fp32_key]["accuracy"]
    assert fp32 >= min_fp32, table
    for key, row in table.items():
        assert row["accuracy"] >= fp32 - MAX_DROP, (key, table)


def output_files(prefix: Path) -> list[Path]:
    return [Path(f"{prefix}_{kind}_model.onnx") for kind in ("fake_quant", "deploy", "qdq")]


def copy_ptq_samples(root: Path) -> Path:
    """Copy samples/common, samples/pytorch/ptq and samples/onnx/ptq (without trained weights
    or outputs) under ``root``; return the copy of ``samples``."""
    copy_samples(root, "pytorch/ptq")
    shutil.copytree(SAMPLES / "onnx" / "ptq", root / "samples" / "onnx" / "ptq",
                    ignore=shutil.ignore_patterns("__pycache__", "model", "data", "amct_log"))
    return root / "samples"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_ptq_samples(tmp_path_factory.mktemp("ptq_samples"))


@pytest.fixture(scope="module")
def resnet_weights(workdir: Path) -> tuple[Path, str]:
    """The residual network trained briefly by the PyTorch sample's train.py."""
    sample = workdir / "pytorch" / "ptq"
    output = run_script(sample, "src/train.py", "--model", "resnet", "--steps", "40",
                        "--log-steps", "20")
    return sample / "model" / "resnet.pth", output


@pytest.mark.slow
def test_pytorch_sample_trains_missing_weights_then_quantizes(workdir: Path) -> None:
    sample = workdir / "pytorch" / "ptq"
    output = run_script(sample, "src/ptq_sample.py", "--model", "cnn", "--train-steps", "80",
                        *FAST_EVAL)
    assert "[Data] WARNING: using the embedded MNIST subset" in output
    assert "[PTQ] No weights at model/cnn.pth: training 'cnn' first (80 steps" in output
    assert (sample / "model" / "cnn.pth").is_file()
    assert_in_order(amct_messages(output), PTQ_LOG)
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        assert f"Quantize layer {layer} (" in output
    for path in output_files(sample / "model" / "quant" / "cnn"):
        assert path.is_file(), path
    table = result_table(output, PYTORCH_ROWS)
    # Same network, same weights: PyTorch and ONNX Runtime differ by float rounding at most.
    assert abs(table["FP32", "PyTorch"]["correct"]
               - table["FP32", "ONNX Runtime"]["correct"]) <= 1
    check_accuracies(table, ("FP32", "PyTorch"), min_fp32=85.0)
    agree = re.search(r"agree on (\d+)/(\d+) predictions", output)
    assert agree and int(agree[2]) == EVAL_SIZE and int(agree[1]) >= EVAL_SIZE - 3, output
    # An AMCT error ends the script with its message, not a traceback.
    error = run_script(sample, "src/ptq_sample.py", "--model", "cnn", "--skip-layers", "conv3",
                       expect_rc=1)
    assert "[PTQ] ERROR: create_quant_config: skip_layers names ['conv3']" in error
    assert "Traceback" not in error


@pytest.mark.slow
def test_pytorch_sample_resnet_with_skipped_layer(workdir: Path,
                                                  resnet_weights: tuple[Path, str]) -> None:
    sample = workdir / "pytorch" / "ptq"
    weights, train_output = resnet_weights
    assert "[Train] Step: 40/40" in train_output and weights.is_file()
    output = run_script(sample, "src/ptq_sample.py", "--model", "resnet", "--pretrained-path",
                        "model/resnet.pth", "--skip-layers", "fc", "--output-dir", "out",
                        *FAST_EVAL)
    assert "[PTQ] No weights at" not in output  # they exist
    assert_in_order(amct_messages(output), PTQ_LOG)
    config = json.loads((sample / "out" / "resnet_quant_config.json").read_text())
    assert config["batch_num"] == 2 and config["fc"]["quant_enable"] is False
    assert "Quantize layer layer3.1.conv2 (Conv)" in output
    assert "Quantize layer fc " not in output
    for path in output_files(sample / "out" / "resnet"):
        assert path.is_file(), path
    check_accuracies(result_table(output, PYTORCH_ROWS), ("FP32", "PyTorch"), min_fp32=80.0)


@pytest.mark.slow
def test_onnx_sample_command_line_end_to_end(workdir: Path,
                                             resnet_weights: tuple[Path, str]) -> None:
    sample = workdir / "onnx" / "ptq"
    output = run_script(sample, "src/export_model.py")
    assert ("[Export] 'resnet' with the weights of "
            f"{Path('..', '..', 'pytorch', 'ptq', 'model', 'resnet.pth')}") in output
    assert "[Export] No trained weights found" not in output
    calibration = sorted(path.name for path in (sample / "data" / "calibration").iterdir())
    assert calibration == ["batch_000.npy", "batch_001.npy"]

    # The console script the README uses (run_script runs it with this interpreter), else
    # the module form of the same command line.
    script = Path(sys.executable).with_name("amct_onnx")
    command = [str(script)] if script.is_file() else ["-m", "amct_onnx"]
    cli = run_script(sample, *command, "calibration", "--model", "model/resnet.onnx",
                     "--save_path", "model/quant/resnet", "--data_dir", "data/calibration",
                     "--batch_num", "2")
    assert_in_order(amct_messages(cli), ["[1/4] Quantization config.", "[2/4] quantize_model.",
                                         "[3/4] Calibration on 2 batch(es)",
                                         "[4/4] save_model."])
    for path in output_files(sample / "model" / "quant" / "resnet"):
        assert path.is_file(), path

    result = run_script(sample, "src/evaluate.py", *FAST_EVAL)
    table = result_table(result, ONNX_ROWS)
    check_accuracies(table, ("FP32", "ONNX Runtime"), min_fp32=80.0)
    assert re.search(r"^\[Result\] QDQ / FP32 latency in ONNX Runtime: \d+\.\d\d$", result,
                     re.M)


def test_missing_files_are_named(tmp_path: Path) -> None:
    samples = copy_ptq_samples(tmp_path)
    output = run_script(samples / "pytorch" / "ptq", "src/ptq_sample.py", "--pretrained-path",
                        "nothing.pth", expect_rc=2)
    assert ("--pretrained-path: file not found: nothing.pth (train the weights with: python "
            "src/train.py --model resnet --save-path nothing.pth)") in output
    sample = samples / "onnx" / "ptq"
    (sample / "model").mkdir()
    (sample / "model" / "resnet.onnx").write_bytes(b"")
    output = run_script(sample, "src/evaluate.py", expect_rc=2)
    assert "missing model/quant/resnet_fake_quant_model.onnx, " \
           "model/quant/resnet_qdq_model.onnx" in output
    assert "amct_onnx calibration --model model/resnet.onnx" in output
    output = run_script(sample, "src/evaluate.py", "--fp32-model", "nothing.onnx",
                        expect_rc=2)
    assert "--fp32-model: file not found: nothing.onnx" in output
