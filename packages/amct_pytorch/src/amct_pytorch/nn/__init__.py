"""Neural-network layers of amct_pytorch: the single-op QAT layers live in
:mod:`amct_pytorch.nn.module.quantization` (reference §4)."""
