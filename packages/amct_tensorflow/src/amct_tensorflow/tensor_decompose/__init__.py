"""Tensor decomposition of TensorFlow Conv2D ops (spatial-separable SVD).

``auto_decomposition`` decomposes a trained checkpoint offline and writes the decomposed
checkpoint plus a graph-change file; ``decompose_graph`` applies that change to a freshly built
training graph so the decomposed checkpoint can be restored and fine-tuned.
"""
from amct_tensorflow.tensor_decompose.tensor_decompose import auto_decomposition, decompose_graph

__all__ = ["auto_decomposition", "decompose_graph"]
