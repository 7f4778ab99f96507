"""Two-process (gloo, CPU) run of the distributed script of the tensor-decomposition sample.

A baseline is trained with ``python -m torch.distributed.launch`` (which passes
``--local-rank``), then fine-tuned in online decomposition mode with
``python -m torch.distributed.run`` (torchrun, which sets ``LOCAL_RANK``). Rank 0 decomposes,
rank 1 rebuilds the structure with decompose_network, and both must end with identical weights.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sample_runs import AMCT, assert_in_order, copy_samples, launch_two_ranks

TEST_LINE = re.compile(
    r"^\[default0\]:\[Test\] Loss: \d+\.\d{6}, Accuracy: (\d+\.\d{2})% \((\d+)/(\d+)\)$", re.M)
CHECKSUM = re.compile(r"^\[default(\d)\]:\[Rank (\d)\] Final weights checksum: ([0-9a-f]{64})$",
                      re.M)
FAST = ["--test-batch-size", "500", "--log-steps", "5", "--seed", "3"]

pytestmark = pytest.mark.slow


def rank_messages(output: str, rank: int) -> list[str]:
    prefix = f"[default{rank}]:"
    return [line.split(AMCT, 1)[1] for line in output.splitlines()
            if line.startswith(prefix) and AMCT in line]


def checksums(output: str) -> dict[int, str]:
    found = {}
    for local, rank, digest in CHECKSUM.findall(output):
        assert local == rank
        found[int(rank)] = digest
    assert sorted(found) == [0, 1], output
    return found


def test_two_process_online_decomposition(tmp_path: Path) -> None:
    workdir = copy_samples(tmp_path, "pytorch/tensor_decompose")

    base = launch_two_ranks(workdir, "torch.distributed.launch", "src/ddp_train.py",
                            "--save-path", "model/ddp/baseline.pth", "--steps", "15", *FAST)
    assert (workdir / "model" / "ddp" / "baseline.pth").is_file()
    assert len(TEST_LINE.findall(base)) == 1
    assert len(set(checksums(base).values())) == 1

    out = launch_two_ranks(workdir, "torch.distributed.run", "src/ddp_train.py",
                           "--lr", "0.001",
                           "--save-path", "model/ddp/online/decomposed_finetuned.pth",
                           "--pretrained-path", "model/ddp/baseline.pth",
                           "--tensor-decompose",
                           "--decompose-info-path", "model/ddp/online/decompose_info.json",
                           "--decomposed-weights-path", "model/ddp/online/decomposed_weights.pth",
                           "--run-mode", "online", "--steps", "10", *FAST)

    rank0, rank1 = rank_messages(out, 0), rank_messages(out, 1)
    assert_in_order(rank0, [
        "auto_decomposition start.", "Processing: 'conv1'", "Processing: 'conv2'",
        "Decomposition information file is saved to: ",
        "Decompose: 'conv2' -> ['conv2.0', 'conv2.1']", "auto_decomposition complete."])
    assert not any("decompose_network" in m for m in rank0)
    assert_in_order(rank1, ["decompose_network start.",
                            "Decompose: 'conv2' -> ['conv2.0', 'conv2.1']",
                            "decompose_network complete."])
    assert not any("auto_decomposition" in m for m in rank1)
    assert "[default1]:[Rank 1] Loaded decomposed weights from " \
           "model/ddp/online/decomposed_weights.pth" in out

    results = TEST_LINE.findall(out)
    assert len(results) == 1, out  # rank 0 only
    accuracy, _, total = results[0]
    assert int(total) == 1000 and float(accuracy) > 50.0
    online_dir = workdir / "model" / "ddp" / "online"
    for name in ("decompose_info.json", "decomposed_weights.pth", "decomposed_finetuned.pth"):
        assert (online_dir / name).is_file(), name
    assert not list(online_dir.glob("*.tmp*")), "temporary files left behind"

    digests = checksums(out)
    assert digests[0] == digests[1], "ranks ended with different weights"

    # The saved checkpoint is exactly what rank 1 holds: recompute its checksum here.
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'src')\n"
        "from model import Net\n"
        "from train_utils import weights_checksum\n"
        "from amct_pytorch.tensor_decompose import decompose_network\n"
        "model, _ = decompose_network(Net(), 'model/ddp/online/decompose_info.json')\n"
        "model.load_state_dict(torch.load('model/ddp/online/decomposed_finetuned.pth',\n"
        "                                 weights_only=True))\n"
        "print('CHECKSUM', weights_checksum(model))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stdout
    assert f"CHECKSUM {digests[1]}" in proc.stdout

    # Offline mode: every rank rebuilds the structure from the same files, nobody decomposes.
    offline = launch_two_ranks(
        workdir, "torch.distributed.run", "src/ddp_train.py",
        "--lr", "0.001",
        "--save-path", "model/ddp/offline/decomposed_finetuned.pth",
        "--tensor-decompose",
        "--decompose-info-path", "model/ddp/online/decompose_info.json",
        "--decomposed-weights-path", "model/ddp/online/decomposed_weights.pth",
        "--run-mode", "offline", "--steps", "5", *FAST)
    for rank in (0, 1):
        messages = rank_messages(offline, rank)
        assert_in_order(messages, ["decompose_network start.",
                                   "Decompose: 'conv2' -> ['conv2.0', 'conv2.1']",
                                   "decompose_network complete."])
        assert not any("auto_decomposition" in m for m in messages)
    offline_digests = checksums(offline)
    assert offline_digests[0] == offline_digests[1], "ranks ended with different weights"
    assert (workdir / "model" / "ddp" / "offline" / "decomposed_finetuned.pth").is_file()
