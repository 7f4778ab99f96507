"""``Conv3dQAT``: ``nn.Conv3d`` with ULQ input and ARQ/ULQ-retrain weight fake-quant
(reference §4; padding_mode ``zeros``, dilation_d 1, 5-D float32 input)."""
from __future__ import annotations

import torch
from torch import nn

from amct_pytorch.nn.module.quantization.qat_base import QatLayerMixin


class Conv3dQAT(QatLayerMixin, nn.Conv3d):
    """Single-op QAT ``Conv3d``; ``config`` as in
    :func:`~amct_pytorch.nn.module.quantization.qat_base.normalize_qat_config`."""

    LAYER_KIND = "Conv3d"
    WEIGHT_AXIS = 0
    INPUT_NDIM = 5

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", device=None,
                 dtype=None, config: dict | None = None) -> None:
        nn.Conv3d.__init__(self, in_channels, out_channels, kernel_size, stride=stride,
                           padding=padding, dilation=dilation, groups=groups, bias=bias,
                           padding_mode=padding_mode, device=device, dtype=dtype)
        self._setup_qat(config)

    @classmethod
    def from_float(cls, mod: nn.Conv3d, config: dict | None = None) -> Conv3dQAT:
        """A ``Conv3dQAT`` with ``mod``'s arguments and copies of its weight and bias."""
        kwargs = {}
        if isinstance(mod, nn.Conv3d):
            kwargs = dict(in_channels=mod.in_channels, out_channels=mod.out_channels,
                          kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
                          dilation=mod.dilation, groups=mod.groups,
                          padding_mode=mod.padding_mode)
        return cls._from_float_checked(mod, nn.Conv3d, kwargs, config)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x, weight = self._quantized_operands(input)
        return self._conv_forward(x, weight, self.bias)
