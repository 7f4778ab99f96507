"""amct_onnx: post-training quantization of ONNX models and the quantized ONNX writers.

Public API (reference §3.1): :func:`create_quant_config`, :func:`quantize_model`,
:func:`calibrate` (ONNX Runtime takes the place of the user's forward passes) and
:func:`save_model`. The command line is ``amct_onnx calibration`` (:mod:`amct_onnx.cli`).
"""
from amct_onnx.calibration import calibrate, create_quant_config, quantize_model
from amct_onnx.save import save_model

__version__ = "0.1.0"

__all__ = ["calibrate", "create_quant_config", "quantize_model", "save_model"]
