"""Quantization, framework-free (reference §3): the formulas, the weight (ARQ) and activation
(IFMR, HFMG) calibration algorithms, bias quantization, the record file and the configs."""
