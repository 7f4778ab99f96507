"""Helpers shared by the sample tests: run a sample script from a copy, read its AMCT log lines.

``tests/`` is on ``sys.path`` (pytest puts a rootdir conftest's folder there), so test modules
in any subfolder import this as ``sample_runs``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
AMCT = "[AMCT]:[AMCT]: "


def amct_messages(output: str) -> list[str]:
    """The message part of every AMCT log line in ``output``, in order."""
    return [line.split(AMCT, 1)[1] for line in output.splitlines() if AMCT in line]


def assert_in_order(messages: list[str], expected: list[str]) -> None:
    """Each expected message starts one of ``messages``, in this order (others may be between)."""
    position = 0
    for wanted in expected:
        for index in range(position, len(messages)):
            if messages[index].startswith(wanted):
                position = index + 1
                break
        else:
            raise AssertionError(f"AMCT log line {wanted!r} missing or out of order in "
                                 f"{messages}")


def load_module(path: Path, name: str) -> ModuleType:
    """Import a file under a unique module name (sample modules have generic names)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def copy_samples(dest: Path, sample: str) -> Path:
    """Copy samples/common and ``samples/<sample>`` (e.g. ``pytorch/tensor_decompose``) to
    ``dest``; return the sample copy, from which the scripts run as the seeds show."""
    ignore = shutil.ignore_patterns("__pycache__", "model", "data", "amct_log")
    shutil.copytree(SAMPLES / "common", dest / "samples" / "common", ignore=ignore)
    target = dest / "samples" / sample
    shutil.copytree(SAMPLES / sample, target, ignore=ignore)
    return target


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1"})
    return env


def run_script(cwd: Path, *args: str, expect_rc: int = 0) -> str:
    """Run ``python <args>`` in ``cwd``; return stdout and stderr together."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=script_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, check=False)
    assert proc.returncode == expect_rc, (
        f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}")
    return proc.stdout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_two_ranks(cwd: Path, launcher: str, script: str, *args: str) -> str:
    """Run ``python -m <launcher> --nproc_per_node=2 <script> <args>`` (``launcher`` is
    ``torch.distributed.run`` or ``torch.distributed.launch``) on CPU; return what each rank
    printed, every line prefixed ``[default<rank>]:`` as ``--tee`` prints it, rank 0 first,
    each rank's stdout (where the AMCT log goes) before its stderr.

    The lines come from the per-rank files the launcher writes under ``--log-dir``, not from
    its console copy: the launcher copies those files to the console while the ranks still
    write them, and a read that lands in the middle of a write cuts a line in two, the second
    half without its prefix (seen once in a few hundred runs: a rank's log line missing).
    """
    env = script_env()
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="ranks-") as log_dir:
        command = [sys.executable, "-m", launcher, "--nproc_per_node=2", "--tee=3",
                   f"--log-dir={log_dir}", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", script, *args]
        proc = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
        assert proc.returncode == 0, f"{' '.join(command)} exited with {proc.returncode}:\n" \
                                     f"{proc.stdout}"
        lines = []
        for rank in (0, 1):
            files = [sorted(Path(log_dir).glob(f"*/attempt_*/{rank}/{stream}.log"))
                     for stream in ("stdout", "stderr")]
            assert all(len(found) == 1 for found in files), \
                f"rank {rank}'s log files under --log-dir: {files}\n{proc.stdout}"
            for found in files:
                lines += [f"[default{rank}]:{line}"
                          for line in found[0].read_text(errors="replace").splitlines()]
    return "\n".join(lines) + "\n"
