"""Tests of the quantization-aware training samples (samples/pytorch/qat).

The three scripts run as subprocesses, with small flags, from a temporary copy of the sample
folder next to a copy of the PTQ sample (whose network, training and data loading they use),
on the embedded MNIST subset:

* ``lenet_qat.py``: LeNet of Conv2dQAT / LinearQAT trained from scratch, exported, converted;
* ``finetune_qat.py``: the residual CNN (its FP32 weights trained first by the script, which
  the graph-based runs then find) fine-tuned after ``from_float`` replacement;
* ``retrain_qat.py``: graph-based QAT, in one process and with two processes under
  ``python -m torch.distributed.run`` (gloo), interrupted and resumed.

The printed accuracy lines are parsed; the ONNX Runtime accuracies are recomputed here from the
written models, the ONNX models' operators and the records are checked, and a resumed run must
print the same losses as an uninterrupted run.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sample_runs import SAMPLES, copy_samples, launch_two_ranks, load_module, run_script

from amct_core.quant.record import read_record

pytestmark = pytest.mark.slow

EVAL_SIZE = 300
ACCURACY = re.compile(r"^(?:\[default(?P<rank>\d)\]:)?\[Accuracy\] (?P<stage>.+) "
                      r"\((?P<runtime>PyTorch|ONNX Runtime)\): (?P<accuracy>\d+\.\d\d)% "
                      r"\((?P<correct>\d+)/(?P<total>\d+)\)$", re.M)
LOSS = re.compile(r"^(?:\[default0\]:)?\[Train\] Step: (\d+)/(\d+), Epoch: \d+, "
                  r"Loss: (\d+\.\d{6})$", re.M)
#: The 17 layers of MnistResNet: 16 convolutions and the classifier.
RESNET_LAYERS = 17
RESNET_FP32 = ["--train-steps", "40", "--train-batch-size", "32"]
RETRAIN = ["--steps", "24", "--batch-size", "16", "--log-steps", "4",
           "--eval-size", str(EVAL_SIZE)]


def accuracies(output: str) -> dict[str, float]:
    """``{"<stage> (<runtime>)": accuracy}`` of the printed lines, each line checked."""
    found = {}
    for match in ACCURACY.finditer(output):
        correct, total = int(match["correct"]), int(match["total"])
        assert total == EVAL_SIZE, match[0]
        assert match["accuracy"] == f"{100 * correct / total:.2f}", match[0]
        found[f"{match['stage']} ({match['runtime']})"] = 100.0 * correct / total
    return found


def losses(output: str) -> dict[int, str]:
    return {int(step): loss for step, _, loss in LOSS.findall(output)}


def eval_images(sample: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first EVAL_SIZE normalized test digits, loaded here with the PTQ sample's module."""
    data_utils = load_module(sample.parent / "ptq" / "src" / "data_utils.py",
                             "qat_test_data_utils")
    return data_utils.test_split(data_utils.mnist_data.load_mnist(None), EVAL_SIZE)



def onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def onnx_accuracy(path: Path, sample: Path) -> float:
    images, labels = eval_images(sample)
    return 100.0 * float((onnx_logits(path, images).argmax(axis=1) == labels).mean())


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def torchrun(cwd: Path, *args: str) -> str:
    """``python -m torch.distributed.run --nproc_per_node=2 src/retrain_qat.py <args>``;
    returns the rank-prefixed output."""
    return launch_two_ranks(cwd, "torch.distributed.run", "src/retrain_qat.py", *args)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of samples/common, samples/pytorch/qat and samples/pytorch/ptq (no weights)."""
    root = tmp_path_factory.mktemp("qat_samples")
    target = copy_samples(root, "pytorch/qat")
    shutil.copytree(SAMPLES / "pytorch" / "ptq", root / "samples" / "pytorch" / "ptq",
                    ignore=shutil.ignore_patterns("__pycache__", "model", "data", "amct_log"))
    return target


@pytest.fixture(scope="module")
def finetune_output(sample: Path) -> str:
    """finetune_qat.py, which first trains the FP32 weights into model/resnet.pth."""
    return run_script(sample, "src/finetune_qat.py", *RESNET_FP32, "--steps", "20",
                      "--batch-size", "16", "--batch-num", "5", "--log-steps", "10",
                      "--eval-size", str(EVAL_SIZE))


def test_lenet_from_scratch(sample: Path) -> None:
    out = run_script(sample, "src/lenet_qat.py", "--steps", "250", "--batch-num", "5",
                     "--log-steps", "50", "--eval-size", str(EVAL_SIZE))
    assert "[Data] WARNING: using the embedded MNIST subset" in out.splitlines()[0]
    found = accuracies(out)
    assert list(found) == ["QAT model (PyTorch)", "QDQ model inter_model.onnx (ONNX Runtime)",
                           "Fake-quant model (ONNX Runtime)"], out
    qat = found["QAT model (PyTorch)"]
    assert qat > 60.0, out  # 250 steps from scratch: far above chance (10%)
    assert abs(found["Fake-quant model (ONNX Runtime)"] - qat) <= 2.0, out
    assert sorted(losses(out)) == [50, 100, 150, 200, 250]

    qdq, outputs = sample / "inter_model.onnx", sample / "outputs"
    fake_quant = outputs / "lenet_fake_quant_model.onnx"
    deploy = outputs / "lenet_deploy_model.onnx"
    for path in (qdq, fake_quant, deploy, outputs / "record.txt"):
        assert path.is_file(), path
    # The exported model is a QDQ model; the converted ones have no QDQ nodes left.
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "Sigmoid",
            "AveragePool"} <= op_types(qdq)
    assert not {"QuantizeLinear", "DequantizeLinear"} & op_types(fake_quant)
    assert {"AscendQuant", "AscendDequant"} <= op_types(deploy)
    # 2 Conv2dQAT + 3 LinearQAT, per-tensor weights (channel_wise False in the config).
    records = read_record(str(outputs / "record.txt"))
    layers = [name for name, record in records.items() if record.has_data_factors
              and np.asarray(record.scale_w).size]
    assert len(layers) == 5, records
    assert all(np.asarray(records[name].scale_w).size == 1 for name in layers)
    # The printed ONNX Runtime accuracy is the one of the written model.
    assert onnx_accuracy(fake_quant, sample) == pytest.approx(
        found["Fake-quant model (ONNX Runtime)"])
    images, _ = eval_images(sample)
    assert (onnx_logits(qdq, images).argmax(1) == onnx_logits(fake_quant, images).argmax(1)
            ).mean() > 0.98


def test_finetune_from_float(sample: Path, finetune_output: str) -> None:
    out = finetune_output
    assert "[FP32] No trained weights found: training 'resnet' first (40 steps" in out
    assert (sample / "model" / "resnet.pth").is_file()
    replaced = re.search(r"^\[QAT\] (\d+) layers replaced by QAT layers: (.+)$", out, re.M)
    assert replaced is not None and int(replaced[1]) == RESNET_LAYERS, out
    assert replaced[2].split(", ")[-1] == "fc"
    found = accuracies(out)
    assert list(found) == ["FP32 model (PyTorch)", "QAT model (PyTorch)",
                           "QDQ model resnet_inter_model.onnx (ONNX Runtime)",
                           "Fake-quant model (ONNX Runtime)"], out
    fp32, qat = found["FP32 model (PyTorch)"], found["QAT model (PyTorch)"]
    assert fp32 > 70.0, out
    assert qat >= fp32 - 5.0, out
    assert abs(found["Fake-quant model (ONNX Runtime)"] - qat) <= 2.0, out

    outputs = sample / "outputs"
    fake_quant = outputs / "resnet_fake_quant_model.onnx"
    for path in (sample / "resnet_inter_model.onnx", fake_quant,
                 outputs / "resnet_deploy_model.onnx", outputs / "resnet_record.txt"):
        assert path.is_file(), path
    assert onnx_accuracy(fake_quant, sample) == pytest.approx(
        found["Fake-quant model (ONNX Runtime)"])
    # Convolutions per output channel, the classifier per tensor.
    records = read_record(str(outputs / "resnet_record.txt"))
    weights = {name: np.asarray(record.scale_w).size for name, record in records.items()
               if record.has_data_factors and np.asarray(record.scale_w).size}
    assert len(weights) == RESNET_LAYERS, records
    assert sorted(weights.values())[0] == 1 and sum(size > 1 for size in weights.values()) == 16


def test_retrain_single_process_and_resume(sample: Path, finetune_output: str) -> None:
    assert finetune_output  # the FP32 weights model/resnet.pth exist now
    full = run_script(sample, "src/retrain_qat.py", *RETRAIN, "--record-file",
                      "single/record.txt", "--config-file", "single/config.json",
                      "--save-path", "single/resnet")
    assert "[FP32] No trained weights found" not in full
    assert "[FP32] FP32 model 'resnet' with the weights of model/resnet.pth" in full
    found = accuracies(full)
    assert list(found) == ["FP32 model (PyTorch)", "QAT model (PyTorch)",
                           "Fake-quant model (ONNX Runtime)"], full
    assert found["QAT model (PyTorch)"] >= found["FP32 model (PyTorch)"] - 5.0, full
    assert abs(found["Fake-quant model (ONNX Runtime)"] - found["QAT model (PyTorch)"]) <= 2.0
    single = sample / "single"
    for name in ("config.json", "record.txt", "resnet_fake_quant_model.onnx",
                 "resnet_deploy_model.onnx", "resnet_qdq_model.onnx"):
        assert (single / name).is_file(), name
    assert onnx_accuracy(single / "resnet_fake_quant_model.onnx", sample) == pytest.approx(
        found["Fake-quant model (ONNX Runtime)"])
    records = read_record(str(single / "record.txt"))
    assert sum(record.has_data_factors for record in records.values()) >= RESNET_LAYERS

    # Interrupted after step 12 and resumed: the same losses as the uninterrupted run.
    common = [*RETRAIN, "--record-file", "resumed/record.txt", "--config-file",
              "resumed/config.json", "--save-path", "resumed/resnet",
              "--checkpoint", "resumed/ckpt.pth"]
    first = run_script(sample, "src/retrain_qat.py", *common, "--interrupt-after", "12")
    assert "[QAT] Interrupted after step 12: checkpoint saved to resumed/ckpt.pth" in first
    assert not (sample / "resumed" / "resnet_fake_quant_model.onnx").exists()
    second = run_script(sample, "src/retrain_qat.py", *common, "--resume", "resumed/ckpt.pth")
    assert "Restored the retrain model from resumed/ckpt.pth (step 12)" in second
    expected = losses(full)
    assert sorted(expected) == [4, 8, 12, 16, 20, 24]
    assert losses(first) == {s: v for s, v in expected.items() if s <= 12}
    assert losses(second) == {s: v for s, v in expected.items() if s > 12}
    assert accuracies(second) == found

    # A resumed run with other settings would not continue the same run: refused.
    other = run_script(sample, "src/retrain_qat.py", *common, "--resume", "resumed/ckpt.pth",
                       "--seed", "2", expect_rc=1)
    assert "resumed/ckpt.pth was saved by a run with other settings: seed 1 (now 2)" in other
    # An interruption before the clips are initialised is refused.
    refused = run_script(sample, "src/retrain_qat.py", *common, "--interrupt-after", "3",
                         expect_rc=1)
    assert "--interrupt-after 3 is less than batch_num 10" in refused


@pytest.mark.skipif(os.name == "nt", reason="gloo process group on localhost")
def test_retrain_two_processes_interrupt_and_resume(sample: Path,
                                                    finetune_output: str) -> None:
    assert finetune_output
    first = torchrun(sample, *RETRAIN, "--interrupt-after", "12")
    assert "[default0]:[QAT] Graph-based QAT of 'resnet': DistributedDataParallel, backend " \
           "gloo, 2 processes" in first
    assert "[default0]:[QAT] Interrupted after step 12: checkpoint saved to " \
           "ckpt/resnet_retrain.pth" in first
    assert "[default1]:[QAT]" not in first  # rank 0 alone reports and saves
    assert (sample / "ckpt" / "resnet_retrain.pth").is_file()

    second = torchrun(sample, *RETRAIN, "--resume", "ckpt/resnet_retrain.pth")
    assert "[default0]:[DDP] Records of all 2 ranks identical: True" in second
    found = accuracies(second)
    assert list(found) == ["FP32 model (PyTorch)", "QAT model (PyTorch)",
                           "Fake-quant model (ONNX Runtime)"], second
    assert found["QAT model (PyTorch)"] >= found["FP32 model (PyTorch)"] - 5.0, second
    assert abs(found["Fake-quant model (ONNX Runtime)"] - found["QAT model (PyTorch)"]) <= 2.0
    assert sorted(losses(first)) == [4, 8, 12] and sorted(losses(second)) == [16, 20, 24]
    # Each rank wrote its own record with the same factors (rank 0's was then rewritten by
    # save_quant_retrain_model with the weight factors of the BN-folded weights).
    rank0 = read_record(str(sample / "tmp" / "record.txt"))
    rank1 = read_record(str(sample / "tmp" / "record_rank1.txt"))
    assert len(rank1) == RESNET_LAYERS and rank1.keys() <= rank0.keys()
    for name, record in rank1.items():
        assert (record.scale_d, record.offset_d) == (rank0[name].scale_d,
                                                     rank0[name].offset_d), name
    for path in ("tmp/config.json", "result/resnet_fake_quant_model.onnx",
                 "result/resnet_deploy_model.onnx", "result/resnet_qdq_model.onnx"):
        assert (sample / path).is_file(), path
    assert onnx_accuracy(sample / "result" / "resnet_fake_quant_model.onnx", sample) == \
        pytest.approx(found["Fake-quant model (ONNX Runtime)"])
