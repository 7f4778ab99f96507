"""Build script of amct-pytorch: only resolves where amct-core and amct-onnx come from.

Installed from a checkout of the monorepo (``pip install ./packages/amct_pytorch``), the
dependencies point at the sibling ``packages/amct_core`` and ``packages/amct_onnx`` folders, so
one command brings the core, the ONNX writers and torch, and never TensorFlow. Built anywhere
else it asks for the released versions of the same number.
"""
from pathlib import Path

from setuptools import setup

_VERSION = "0.1.0"
_HERE = Path(__file__).resolve().parent


def _sibling(name: str) -> str:
    folder = _HERE.parent / name.replace("-", "_")
    if (folder / "pyproject.toml").is_file():
        return f"{name} @ {folder.as_uri()}"
    return f"{name}=={_VERSION}"


# amct-onnx writes the quantized ONNX models (save_model) and brings onnx and onnxruntime.
setup(install_requires=[_sibling("amct-core"), _sibling("amct-onnx"), "numpy>=1.24",
                        "torch>=2.1"])
