"""amct_onnx: post-training quantization of ONNX models and the quantized ONNX writers.

Public API (reference §3.1): :func:`create_quant_config`, :func:`quantize_model`,
:func:`calibrate` (ONNX Runtime takes the place of the user's forward passes) and
:func:`save_model`; :func:`convert_qat_model` (reference §4) turns a QDQ model (from
quantization-aware training or another tool) into the fake-quant and deploy models. The command
line is ``amct_onnx calibration`` and ``amct_onnx convert`` (:mod:`amct_onnx.cli`).
"""
from amct_onnx.calibration import calibrate, create_quant_config, quantize_model
from amct_onnx.convert_model import convert_qat_model
from amct_onnx.save import save_model

__version__ = "0.1.0"

__all__ = ["calibrate", "convert_qat_model", "create_quant_config", "quantize_model",
           "save_model"]
