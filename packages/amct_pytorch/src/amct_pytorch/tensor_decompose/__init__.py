"""Tensor decomposition of ``torch.nn.Conv2d`` layers (spatial-separable SVD).

``auto_decomposition`` splits every eligible conv of a trained model into two smaller convs;
``decompose_network`` rebuilds that structure from the information file so saved decomposed
weights can be loaded.
"""
from amct_pytorch.tensor_decompose.tensor_decompose import auto_decomposition, decompose_network

__all__ = ["auto_decomposition", "decompose_network"]
