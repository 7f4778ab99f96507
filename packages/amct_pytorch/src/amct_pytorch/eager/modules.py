"""Modules of the eager API: the calibration module ``quantize`` inserts and the deploy module
``convert`` produces (reference §3.1, new eager API; minmax algorithm).

Weights: min-max per tensor or per output channel, symmetric (offset 0) or asymmetric,
``w_int = clip(round(w/scale) + offset)`` with the core's formulas (reference §3.4). Inputs
(optional): min-max over the ``batch_num`` calibration batches, per tensor.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from amct_core.quant.arq import quantize_weight
from amct_core.quant.scale_offset import int_range, scale_offset_from_range


def minmax_weight_factors(weight: np.ndarray, num_bits: int, symmetric: bool,
                          per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Min-max scale and offset of a weight (C, ...) per channel or per tensor."""
    rows = weight.reshape(weight.shape[0], -1)
    if per_channel:
        lo, hi = rows.min(axis=1), rows.max(axis=1)
    else:
        lo, hi = rows.min().reshape(1), rows.max().reshape(1)
    scale, offset = scale_offset_from_range(lo, hi, num_bits, symmetric=symmetric)
    return np.asarray(scale, np.float32).reshape(-1), np.asarray(offset, np.int64).reshape(-1)


def _float_op(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return module._conv_forward(x, weight, bias)


def _channel_shape(weight: torch.Tensor) -> tuple[int, ...]:
    return (-1, *([1] * (weight.dim() - 1)))


class _InputObserver:
    """Running min and max of a layer's input over the calibration batches."""

    def __init__(self) -> None:
        self.low = np.inf
        self.high = -np.inf
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        data = x.detach()
        self.low = min(self.low, float(data.min()))
        self.high = max(self.high, float(data.max()))
        self.batches += 1


class MinMaxQuantModule(nn.Module):
    """Calibration module of ``quantize``: the layer with fake-quantized weights (and inputs
    once ``batch_num`` batches have been observed)."""

    def __init__(self, module: nn.Module, name: str, weight_cfg: dict,
                 input_cfg: dict | None, batch_num: int) -> None:
        super().__init__()
        self.module = module
        self.layer_name = name
        self.weight_bits = weight_cfg["num_bits"]
        weight = module.weight.detach().float().cpu().numpy()
        scale, offset = minmax_weight_factors(weight, self.weight_bits, weight_cfg["symmetric"],
                                              weight_cfg["strategy"] == "channel")
        w_int = quantize_weight(weight, scale, offset, self.weight_bits, axis=0)
        device = module.weight.device
        self.register_buffer("weight_int", torch.from_numpy(w_int.astype(np.int8)).to(device))
        self.register_buffer("weight_scale", torch.from_numpy(scale).to(device))
        self.register_buffer("weight_offset", torch.from_numpy(offset.astype(np.float32))
                             .to(device))
        self.input_cfg = input_cfg
        self.batch_num = batch_num
        self._observer = _InputObserver() if input_cfg else None
        self.register_buffer("input_scale", None)
        self.register_buffer("input_offset", None)

    def dequantized_weight(self) -> torch.Tensor:
        shape = _channel_shape(self.module.weight)
        return ((self.weight_int.float() - self.weight_offset.reshape(shape))
                * self.weight_scale.reshape(shape)).to(self.module.weight.dtype)

    def _fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = int_range(self.input_cfg["num_bits"])
        inv = 1.0 / self.input_scale
        q = torch.clamp(torch.round(x.float() * inv) + self.input_offset, qmin, qmax)
        return ((q - self.input_offset) * self.input_scale).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer is not None and self.input_scale is None:
            self._observer.update(x)
            if self._observer.batches >= self.batch_num:
                scale, offset = scale_offset_from_range(
                    self._observer.low, self._observer.high, self.input_cfg["num_bits"],
                    symmetric=self.input_cfg["symmetric"])
                self.input_scale = torch.tensor(float(scale), device=x.device)
                self.input_offset = torch.tensor(float(offset), device=x.device)
        elif self.input_scale is not None:
            x = self._fake_quant_input(x)
        return _float_op(self.module, x, self.dequantized_weight(), self.module.bias)


class QuantDeployModule(nn.Module):
    """Deploy module of ``convert``: INT8 weight with its scale and offset (and input factors),
    dequantized on the fly so the model runs in PyTorch."""

    def __init__(self, calibrated: MinMaxQuantModule) -> None:
        super().__init__()
        module = calibrated.module
        self.layer_name = calibrated.layer_name
        self.kind = "linear" if isinstance(module, nn.Linear) else "conv"
        self.register_buffer("weight_int", calibrated.weight_int.clone())
        self.register_buffer("weight_scale", calibrated.weight_scale.clone())
        self.register_buffer("weight_offset", calibrated.weight_offset.clone())
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().clone())
        self.register_buffer("input_scale", calibrated.input_scale)
        self.register_buffer("input_offset", calibrated.input_offset)
        self.input_bits = calibrated.input_cfg["num_bits"] if calibrated.input_cfg else None
        self.weight_dtype = module.weight.dtype
        if self.kind == "conv":
            self.stride, self.padding = module.stride, module.padding
            self.dilation, self.groups = module.dilation, module.groups

    def extra_repr(self) -> str:
        return f"layer={self.layer_name!r}, weight=int8{tuple(self.weight_int.shape)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            qmin, qmax = int_range(self.input_bits)
            q = torch.clamp(torch.round(x.float() * (1.0 / self.input_scale))
                            + self.input_offset, qmin, qmax)
            x = ((q - self.input_offset) * self.input_scale).to(x.dtype)
        shape = _channel_shape(self.weight_int)
        weight = ((self.weight_int.float() - self.weight_offset.reshape(shape))
                  * self.weight_scale.reshape(shape)).to(self.weight_dtype)
        if self.kind == "linear":
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)
