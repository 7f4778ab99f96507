"""Graph-based post-training quantization (reference §3.1): config, calibration model, save."""
