"""Modules of :mod:`amct_pytorch.nn`; see :mod:`amct_pytorch.nn.module.quantization`."""
