"""amct_tensorflow: the TensorFlow plugin of the AMCT model-compression toolkit.

Tensor decomposition lives in :mod:`amct_tensorflow.tensor_decompose`.
"""
__version__ = "0.1.0"
