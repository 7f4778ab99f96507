"""Build script of amct-pytorch: where amct-core and amct-onnx come from, and the optional
C extension of the QAT kernels.

Installed from a checkout of the monorepo (``pip install ./packages/amct_pytorch``), the
dependencies point at the sibling ``packages/amct_core`` and ``packages/amct_onnx`` folders, so
one command brings the core, the ONNX writers and torch, and never TensorFlow. Built anywhere
else it asks for the released versions of the same number.

``amct_pytorch.qat._fused_quant`` (plain C, no torch headers) fuses the element-wise passes of
the QAT fake-quantization. It is optional: without a C compiler the install goes on and the
QAT layers run the same arithmetic as separate torch operations, slower.
"""
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_VERSION = "0.1.0"
_HERE = Path(__file__).resolve().parent


def _sibling(name: str) -> str:
    folder = _HERE.parent / name.replace("-", "_")
    if (folder / "pyproject.toml").is_file():
        return f"{name} @ {folder.as_uri()}"
    return f"{name}=={_VERSION}"


class _BuildExt(build_ext):
    """Adds the optimisation flags the kernels are written for where the compiler is a
    GCC-like one. Never -ffast-math, and no fused multiply-add contraction: every product must
    be rounded to float32 as in torch and the core."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for ext in self.extensions:
                ext.extra_compile_args = ["-O3", "-fno-trapping-math", "-fopenmp-simd",
                                          "-ffp-contract=off"]
        super().build_extensions()


_FUSED_QUANT = Extension("amct_pytorch.qat._fused_quant",
                         sources=["src/amct_pytorch/qat/_fused_quant.c"], optional=True)

# amct-onnx writes the quantized ONNX models (save_model) and brings onnx and onnxruntime.
setup(install_requires=[_sibling("amct-core"), _sibling("amct-onnx"), "numpy>=1.24",
                        "torch>=2.1"],
      ext_modules=[_FUSED_QUANT], cmdclass={"build_ext": _BuildExt})
