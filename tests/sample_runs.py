"""Helpers shared by the sample tests: run a sample script from a copy, read its AMCT log lines.

``tests/`` is on ``sys.path`` (pytest puts a rootdir conftest's folder there), so test modules
in any subfolder import this as ``sample_runs``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
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
