"""``LinearQAT``: ``nn.Linear`` with ULQ input and ARQ/ULQ-retrain weight fake-quant
(reference §4; per-tensor weights only, float32 input)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from amct_pytorch.nn.module.quantization.qat_base import QatLayerMixin


class LinearQAT(QatLayerMixin, nn.Linear):
    """Single-op QAT ``Linear``; ``config`` as in
    :func:`~amct_pytorch.nn.module.quantization.qat_base.normalize_qat_config`
    (``channel_wise`` must be false)."""

    LAYER_KIND = "Linear"
    WEIGHT_AXIS = 0
    INPUT_NDIM = None

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 config: dict | None = None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device,
                           dtype=dtype)
        self._setup_qat(config)

    @classmethod
    def from_float(cls, mod: nn.Linear, config: dict | None = None) -> LinearQAT:
        """A ``LinearQAT`` with ``mod``'s sizes and copies of its weight and bias."""
        kwargs = {}
        if isinstance(mod, nn.Linear):
            kwargs = dict(in_features=mod.in_features, out_features=mod.out_features)
        return cls._from_float_checked(mod, nn.Linear, kwargs, config)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x, weight = self._quantized_operands(input)
        return F.linear(x, weight, self.bias)
