"""The eager quantization API: quantize and convert (seed 004, first example)."""
