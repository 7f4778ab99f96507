"""amct_pytorch: the PyTorch plugin of the AMCT model-compression toolkit.

Tensor decomposition lives in :mod:`amct_pytorch.tensor_decompose`.
"""
__version__ = "0.1.0"
