"""Build script of amct-onnx: only resolves where amct-core comes from.

Installed from a checkout of the monorepo (``pip install ./packages/amct_onnx``), the
dependency points at the sibling ``packages/amct_core`` folder; built anywhere else it asks for
the released amct-core of the same version. amct-onnx never depends on a training framework.
"""
from pathlib import Path

from setuptools import setup

_VERSION = "0.1.0"
_HERE = Path(__file__).resolve().parent
_SIBLING_CORE = _HERE.parent / "amct_core"

if (_SIBLING_CORE / "pyproject.toml").is_file():
    _CORE = f"amct-core @ {_SIBLING_CORE.as_uri()}"
else:
    _CORE = f"amct-core=={_VERSION}"

setup(install_requires=[_CORE, "numpy>=1.24", "onnx>=1.14", "onnxruntime>=1.16"])
