"""Quantization-aware training (QAT) for PyTorch (reference §3.1 QAT, §3.4 ULQ/ARQ retrain, §4).

:mod:`amct_pytorch.qat.functional` holds the autograd Functions of the fake-quantization
(ULQ activations, ARQ/ULQ-retrain weights) with their ONNX ``QuantizeLinear →
DequantizeLinear`` symbolics; :mod:`amct_pytorch.qat.quantizers` the ``nn.Module`` quantizers
that own the learnable clips. The single-op QAT layers built on them live in
:mod:`amct_pytorch.nn.module.quantization`.
"""
