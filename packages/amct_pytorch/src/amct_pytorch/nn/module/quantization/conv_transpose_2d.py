"""``ConvTranspose2dQAT``: ``nn.ConvTranspose2d`` with ULQ input and ARQ/ULQ-retrain weight
fake-quant (reference §4; padding_mode ``zeros``, 4-D float32 input). The weight's layout is
``(Cin, Cout/groups, kH, kW)``, so per-channel weight factors lie along axis 1."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from amct_pytorch.nn.module.quantization.qat_base import QatLayerMixin


class ConvTranspose2dQAT(QatLayerMixin, nn.ConvTranspose2d):
    """Single-op QAT ``ConvTranspose2d``; ``config`` as in
    :func:`~amct_pytorch.nn.module.quantization.qat_base.normalize_qat_config`."""

    LAYER_KIND = "ConvTranspose2d"
    WEIGHT_AXIS = 1
    INPUT_NDIM = 4

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, padding_mode="zeros",
                 device=None, dtype=None, config: dict | None = None) -> None:
        nn.ConvTranspose2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride,
                                    padding=padding, output_padding=output_padding,
                                    groups=groups, bias=bias, dilation=dilation,
                                    padding_mode=padding_mode, device=device, dtype=dtype)
        self._setup_qat(config)

    @classmethod
    def from_float(cls, mod: nn.ConvTranspose2d,
                   config: dict | None = None) -> ConvTranspose2dQAT:
        """A ``ConvTranspose2dQAT`` with ``mod``'s arguments and copies of its weight and
        bias."""
        kwargs = {}
        if isinstance(mod, nn.ConvTranspose2d):
            kwargs = dict(in_channels=mod.in_channels, out_channels=mod.out_channels,
                          kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
                          output_padding=mod.output_padding, groups=mod.groups,
                          dilation=mod.dilation, padding_mode=mod.padding_mode)
        return cls._from_float_checked(mod, nn.ConvTranspose2d, kwargs, config)

    def forward(self, input: torch.Tensor,
                output_size: list[int] | None = None) -> torch.Tensor:
        x, weight = self._quantized_operands(input)
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(x, weight, self.bias, self.stride, self.padding,
                                  output_padding, self.groups, self.dilation)
