"""amct_pytorch: the PyTorch plugin of the AMCT model-compression toolkit.

Graph-based post-training quantization (reference §3.1): :func:`create_quant_config`,
:func:`quantize_model` and :func:`save_model`; the eager API of the seed's first example:
:func:`quantize` and :func:`convert`; DMQ balancing: :func:`quantize_preprocess`;
accuracy-based automatic calibration:
:func:`accuracy_based_auto_calibration`; graph-based quantization-aware training:
:func:`create_quant_retrain_config`, :func:`create_quant_retrain_model`,
:func:`restore_quant_retrain_model` and :func:`save_quant_retrain_model` (the single-op QAT
modules are in :mod:`amct_pytorch.nn.module.quantization`). Tensor decomposition lives in
:mod:`amct_pytorch.tensor_decompose`. The quantization API is imported on first use, so
``import amct_pytorch.tensor_decompose`` does not load ONNX Runtime.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "create_quant_config": "amct_pytorch.ptq.quantize_tool",
    "quantize_model": "amct_pytorch.ptq.quantize_tool",
    "save_model": "amct_pytorch.ptq.quantize_tool",
    "quantize": "amct_pytorch.eager.quantize",
    "convert": "amct_pytorch.eager.quantize",
    "accuracy_based_auto_calibration": "amct_pytorch.ptq.auto_calibration",
    "quantize_preprocess": "amct_pytorch.ptq.dmq_preprocess",
    "create_quant_retrain_config": "amct_pytorch.qat.retrain_tool",
    "create_quant_retrain_model": "amct_pytorch.qat.retrain_tool",
    "restore_quant_retrain_model": "amct_pytorch.qat.retrain_tool",
    "save_quant_retrain_model": "amct_pytorch.qat.retrain_tool",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'amct_pytorch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
