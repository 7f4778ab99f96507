"""The quantized ONNX writers (reference §4): ``fake_quant``, ``deploy`` and ``qdq``; ``common``
holds what they share (the integer tensors computed from the record)."""
