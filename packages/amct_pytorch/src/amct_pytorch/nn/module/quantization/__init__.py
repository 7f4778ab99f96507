"""Single-op QAT layers (reference §4; seed "单算子模式的量化感知训练").

``Conv2dQAT``, ``ConvTranspose2dQAT``, ``Conv3dQAT`` and ``LinearQAT`` subclass their torch
layers, fake-quantize the input (ULQ, learnable clips) and the weight (ARQ retrain or ULQ
retrain) on every step, and export to ONNX as ``QuantizeLinear → DequantizeLinear`` pairs.
"""
from amct_pytorch.nn.module.quantization.conv2d import Conv2dQAT
from amct_pytorch.nn.module.quantization.conv3d import Conv3dQAT
from amct_pytorch.nn.module.quantization.conv_transpose_2d import ConvTranspose2dQAT
from amct_pytorch.nn.module.quantization.linear import LinearQAT
from amct_pytorch.nn.module.quantization.qat_base import QatFactors, normalize_qat_config

__all__ = ["Conv2dQAT", "Conv3dQAT", "ConvTranspose2dQAT", "LinearQAT", "QatFactors",
           "normalize_qat_config"]
