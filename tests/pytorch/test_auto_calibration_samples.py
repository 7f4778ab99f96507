"""Tests of the accuracy-based auto-calibration and DMQ samples (samples/pytorch/auto_calibration).

The scripts run as subprocesses from a temporary copy of the sample folder, next to a copy of
the PTQ sample (whose network, training and data loading they use), on the embedded MNIST
subset. The residual network is trained briefly by the PTQ sample's train.py, which the
samples find on their own (``../ptq/model/resnet.pth``). The printed tables are parsed and the
written files (config, search history, ranking, record, ONNX models) are checked; the printed
ONNX Runtime accuracies are recomputed here from the written models.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sample_runs import (
    SAMPLES,
    amct_messages,
    assert_in_order,
    copy_samples,
    load_module,
    run_script,
)

from amct_core.quant.record import read_record

EVAL_SIZE = 300
FRAGILE_LAYER = "layer2.1.conv2"
HISTORY = Path("amct_log") / "accuracy_based_auto_calibration_record.json"
RANKING = "accuracy_based_auto_calibration_ranking_information.json"
AUTO_ROW = re.compile(r"^ (?P<model>FP32|Initial config \(all layers quantized\)|"
                      r"Fake-quant model \(final config\)) +\| (?P<runtime>PyTorch|ONNX Runtime)"
                      r" +\| (?P<accuracy>\d+\.\d\d)% \((?P<correct>\d+)/(?P<total>\d+)\)$", re.M)
DMQ_ROW = re.compile(r"^ (?P<model>FP32|Fake-quant without DMQ|Fake-quant with DMQ) +"
                     r"\| (?P<accuracy>\d+\.\d\d)% \((?P<correct>\d+)/(?P<total>\d+)\)$", re.M)


def rows(pattern: re.Pattern, output: str) -> list[dict[str, str]]:
    found = [match.groupdict() for match in pattern.finditer(output)]
    for row in found:
        assert int(row["total"]) == EVAL_SIZE, row
        assert row["accuracy"] == f"{100 * int(row['correct']) / EVAL_SIZE:.2f}", row
    return found


def onnx_correct(path: Path, sample: Path) -> int:
    """Correct predictions of an ONNX model on the first EVAL_SIZE test digits, computed
    here with the sample's own data loading (same normalization)."""
    data_utils = load_module(sample.parent / "ptq" / "src" / "data_utils.py",
                             "autocal_test_data_utils")
    images, labels = data_utils.test_split(data_utils.mnist_data.load_mnist(None), EVAL_SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": images})[0]
    return int((logits.argmax(axis=1) == labels).sum())


def copy_sample(root: Path) -> Path:
    """Copy samples/common, samples/pytorch/auto_calibration and samples/pytorch/ptq (without
    weights or outputs) under ``root``; return the auto-calibration sample's copy."""
    target = copy_samples(root, "pytorch/auto_calibration")
    shutil.copytree(SAMPLES / "pytorch" / "ptq", root / "samples" / "pytorch" / "ptq",
                    ignore=shutil.ignore_patterns("__pycache__", "model", "data", "amct_log"))
    return target


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample copy, with the residual network trained (40 steps) in the PTQ sample's
    default place."""
    target = copy_sample(tmp_path_factory.mktemp("auto_calibration_samples"))
    ptq = target.parent / "ptq"
    run_script(ptq, "src/train.py", "--model", "resnet", "--steps", "40", "--log-steps", "20")
    assert (ptq / "model" / "resnet.pth").is_file()
    return target


@pytest.mark.slow
def test_auto_calibration_sample_rolls_back_the_fragile_layer(sample: Path) -> None:
    # a check of 1 point (3 of the 300 digits): robust to the briefly trained network
    output = run_script(sample, "src/auto_calibration_sample.py", "--eval-size",
                        str(EVAL_SIZE), "--expected-acc-loss", "1")
    assert "[Data] WARNING: using the embedded MNIST subset" in output
    weights = Path("..", "ptq", "model", "resnet.pth")
    assert f"[AutoCalib] FP32 model 'resnet' with the weights of {weights}" in output
    assert "No trained weights found" not in output
    assert f"[AutoCalib] Made {FRAGILE_LAYER} fragile: 2 of its input channels x10000" in output
    assert_in_order(amct_messages(output), [
        "Create quant config file model/auto_calibration/resnet_quant_config.json success.",
        "Auto calibration: original model metric ",
        "Auto calibration trial 0 (initial config): 0 layer(s) rolled back [",
        "Auto calibration: the accuracy check failed; 17 layer(s) ranked by CosineSimilarity",
        "Auto calibration trial 1: ",
        "Layer ranking (least similar first):",
        "The fake-quant model is written to model/auto_calibration/resnet_fake_quant_model.onnx",
        f"Auto calibration done: 1 layer(s) rolled back ['{FRAGILE_LAYER}']",
    ])

    out = sample / "model" / "auto_calibration"
    history = json.loads((sample / HISTORY).read_text())
    assert history["result"] == [FRAGILE_LAYER]
    assert history["initial"]["passed"] is False
    ranking = json.loads((out / RANKING).read_text())
    assert next(iter(ranking)) == FRAGILE_LAYER and len(ranking) == 17
    config = json.loads((out / "resnet_quant_config.json").read_text())
    disabled = [name for name, entry in config.items()
                if isinstance(entry, dict) and entry.get("quant_enable") is False]
    assert disabled == [FRAGILE_LAYER]
    assert FRAGILE_LAYER not in read_record(out / "resnet_record.txt")
    for kind in ("fake_quant", "deploy", "qdq"):
        assert (out / f"resnet_{kind}_model.onnx").is_file(), kind

    table = {(row["model"], row["runtime"]): int(row["correct"])
             for row in rows(AUTO_ROW, output)}
    assert list(table) == [("FP32", "PyTorch"), ("FP32", "ONNX Runtime"),
                           ("Initial config (all layers quantized)", "PyTorch"),
                           ("Fake-quant model (final config)", "ONNX Runtime")]
    fp32 = table["FP32", "PyTorch"]
    assert fp32 >= 0.8 * EVAL_SIZE
    assert abs(table["FP32", "ONNX Runtime"] - fp32) <= 1
    # the fragile layer ruins plain PTQ; rolling it back recovers (check: loss < 1 point;
    # ONNX Runtime may round one digit differently from the PyTorch calibration model)
    assert table["Initial config (all layers quantized)", "PyTorch"] < fp32 - 0.05 * EVAL_SIZE
    final = table["Fake-quant model (final config)", "ONNX Runtime"]
    assert final >= fp32 - 0.01 * EVAL_SIZE - 1
    assert final == onnx_correct(out / "resnet_fake_quant_model.onnx", sample)
    assert re.search(rf"^\[Result\] Layers rolled back to FP32: 1 of 17: {FRAGILE_LAYER}$",
                     output, re.M)
    evaluations = re.search(r"^\[Result\] Evaluations: (\d+) \(1 FP32 \+ 1 initial config \+ "
                            r"(\d+) search trial\(s\)\)", output, re.M)
    assert evaluations and int(evaluations[1]) == 2 + int(evaluations[2])
    assert int(evaluations[2]) == len(history["trials"])
    assert int(evaluations[1]) <= 2 + np.log2(17)


@pytest.mark.slow
def test_auto_calibration_sample_that_cannot_pass_writes_no_model(sample: Path) -> None:
    # cnn weights are absent: trained first (few steps); a loss below -100 points (a gain of
    # more than 100 points) never passes
    output = run_script(sample, "src/auto_calibration_sample.py", "--model", "cnn",
                        "--train-steps", "60", "--expected-acc-loss", "-100", "--eval-size",
                        str(EVAL_SIZE), "--output-dir", "fail", expect_rc=1)
    assert "[AutoCalib] No trained weights found: training 'cnn' first (60 steps" in output
    assert (sample / "model" / "cnn.pth").is_file()
    assert "Auto calibration failed: no configuration tried passes the accuracy check" in output
    assert "[Result] FAILED: no configuration passed the check; no quantized model was " \
           "written and fail/cnn_quant_config.json is unchanged" in output
    assert not list((sample / "fail").glob("*_model.onnx"))
    config = json.loads((sample / "fail" / "cnn_quant_config.json").read_text())
    assert all(entry["quant_enable"] for entry in config.values()
               if isinstance(entry, dict) and "quant_enable" in entry)
    history = json.loads((sample / HISTORY).read_text())
    assert history["result"] is None
    assert [row["model"] for row in rows(AUTO_ROW, output)] == [
        "FP32", "FP32", "Initial config (all layers quantized)"]


@pytest.mark.slow
def test_dmq_sample_recovers_the_fragile_layer(sample: Path) -> None:
    output = run_script(sample, "src/dmq_sample.py", "--eval-size", str(EVAL_SIZE))
    named = re.search(rf"^\[DMQ\] Made {re.escape(FRAGILE_LAYER)} fragile: 2 of its input "
                      r"channels x10000 \(channels (\d+), (\d+), the most active on the first "
                      r"calibration batch\)", output, re.M)
    assert named, output
    assert_in_order(amct_messages(output), [
        "Create quant config file model/dmq/resnet_dmq_quant_config.json success.",
        "Quantize preprocess success: run the model on exactly one batch",
        "DMQ done: the balance factors of 17 layer(s) are in model/dmq/resnet_dmq_record.txt",
        "Generate modified onnx file model/dmq/resnet_dmq_modified_model.onnx success.",
        "DMQ: read the balance factors of 17 layer(s)",
        "Calibration batch 1/1 done.",
        "The fake-quant model is written to model/dmq/resnet_dmq_fake_quant_model.onnx",
        "Create quant config file model/dmq/resnet_plain_quant_config.json success.",
        "The fake-quant model is written to model/dmq/resnet_plain_fake_quant_model.onnx",
    ])
    out = sample / "model" / "dmq"
    cfg = (out / "dmq_quant.cfg").read_text()
    assert "batch_num : 1" in cfg and "migration_strength : 0.5" in cfg
    config = json.loads((out / "resnet_dmq_quant_config.json").read_text())
    assert config[FRAGILE_LAYER]["dmq_balancer_param"] == 0.5
    records = read_record(out / "resnet_dmq_record.txt")
    factors = records[FRAGILE_LAYER].tensor_balance_factor
    assert factors.shape == (64,)  # the input channels of layer2.1.conv2
    # the two outlier channels (x 10^4 input, / 10^4 weight) get factors 10^4 times larger
    # than they would have had: far above every other channel's
    outliers = [int(channel) for channel in named.groups()]
    others = np.delete(factors, outliers)
    assert factors[outliers].min() > 100 * others.max()
    assert not read_record(out / "resnet_plain_record.txt")[FRAGILE_LAYER] \
        .tensor_balance_factor.size

    table = {row["model"]: int(row["correct"]) for row in rows(DMQ_ROW, output)}
    assert list(table) == ["FP32", "Fake-quant without DMQ", "Fake-quant with DMQ"]
    fp32 = table["FP32"]
    assert fp32 >= 0.8 * EVAL_SIZE
    assert table["Fake-quant without DMQ"] < fp32 - 0.05 * EVAL_SIZE
    assert table["Fake-quant with DMQ"] >= fp32 - 0.02 * EVAL_SIZE
    assert table["Fake-quant with DMQ"] == onnx_correct(out / "resnet_dmq_fake_quant_model.onnx",
                                                        sample)
    assert table["Fake-quant without DMQ"] == onnx_correct(
        out / "resnet_plain_fake_quant_model.onnx", sample)
    gain = re.search(r"^\[Result\] DMQ changes the quantized accuracy by ([+-]\d+\.\d\d) points$",
                     output, re.M)
    expected = 100 * (table["Fake-quant with DMQ"] - table["Fake-quant without DMQ"]) / EVAL_SIZE
    assert gain and gain[1] == f"{expected:+.2f}"


def test_dmq_sample_reports_a_bad_config(tmp_path: Path) -> None:
    sample = copy_sample(tmp_path)
    bad = sample / "bad.cfg"
    bad.write_text("batch_num : 1\ncommon_config : { dmq_balancer : { migration_strength : 0.9 "
                   "} }\n")
    output = run_script(sample, "src/dmq_sample.py", "--model", "cnn", "--train-steps", "1",
                        "--config-defination", "bad.cfg", expect_rc=1)
    assert "[DMQ] ERROR: " in output and "migration_strength must be in [0.2, 0.8]" in output
    assert "Traceback" not in output
    output = run_script(sample, "src/dmq_sample.py", "--config-defination", "nothing.cfg",
                        expect_rc=2)
    assert "--config-defination: file not found: nothing.cfg" in output
