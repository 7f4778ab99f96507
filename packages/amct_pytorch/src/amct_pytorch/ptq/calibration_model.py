"""The calibration model that ``quantize_model`` returns (reference §3.1, PTQ steps 3–4).

Each enabled layer is wrapped in a :class:`QuantCalibrationLayer`. While the model runs its
``batch_num`` calibration batches the wrapper feeds the layer's input to the layer's
activation algorithm (IFMR or HFMG) and returns the layer's float output unchanged. After the
last batch the factors are written to the record file and every wrapper switches to the
quantized computation the fake-quant ONNX model performs (reference §4):

    x_q = clip(round(x · (1/scale_d)) + offset_d, −2^(b−1), 2^(b−1)−1) − offset_d
    y   = (layer(x_q; W_int − offset_w, b_int)) · scale_w · scale_d

with ``W_int`` the ARQ-quantized weight and ``b_int = round(b / (scale_w·scale_d))``, so the
calibrated model can be evaluated in PyTorch and gives the fake-quant model's numbers.

A layer with DMQ balance factors ``s`` (record ``tensor_balance_factor``, reference §3.4)
observes and quantizes ``x · (1/s)`` instead of ``x`` and quantizes ``W · s`` instead of ``W``,
as the fake-quant ONNX does (``Mul(x, 1/s)`` with ``1/s`` rounded to float32); its float output
during calibration is the layer's own, unbalanced.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from amct_core.logger import get_logger
from amct_core.quant.arq import quantize_weight
from amct_core.quant.bias import quantize_bias
from amct_core.quant.config import LayerQuantConfig
from amct_core.quant.dmq import apply_balance
from amct_core.quant.hfmg import HfmgCalibrator
from amct_core.quant.ifmr import IfmrCalibrator
from amct_core.quant.layers import QuantLayer
from amct_core.quant.record import LayerRecord, merge_and_read_record
from amct_core.quant.scale_offset import int_range
from amct_pytorch.module_tree import replace_submodule

LOGGER = get_logger("amct_pytorch")


def make_calibrator(layer_config: LayerQuantConfig):
    """The IFMR or HFMG accumulator a layer's ``activation_quant_params`` ask for."""
    params = layer_config.activation_quant_params
    if params.act_algo == "hfmg":
        return HfmgCalibrator(**params.calibrator_kwargs())
    return IfmrCalibrator(**params.calibrator_kwargs())


def weight_axis(module: nn.Module) -> int:
    """The output-channel axis of a layer's weight (1 for transposed convs)."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


class QuantCalibrationLayer(nn.Module):
    """A quantizable layer inside the calibration model: observes, then simulates INT8."""

    def __init__(self, module: nn.Module, layer: QuantLayer,
                 session: CalibrationSession, balance: np.ndarray | None = None) -> None:
        super().__init__()
        self.module = module
        self.layer = layer
        self._session = session
        self.quantized = False
        #: DMQ factors s (float32, one per input channel) or None
        self.balance = None if balance is None else np.asarray(balance, np.float32).reshape(-1)
        inverse = None
        if self.balance is not None:
            inverse = torch.from_numpy((1.0 / self.balance.astype(np.float64)).astype(np.float32))
            weight = getattr(module, "weight", None)
            if weight is not None:
                inverse = inverse.to(weight.device)
        self.register_buffer("_inv_balance", inverse, persistent=False)

    def extra_repr(self) -> str:
        return f"layer={self.layer.name!r}, quantized={self.quantized}"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.quantized:
            self._session.observe(self.layer.name, self._balanced(x))
            return self.module(x, *args, **kwargs)
        return self._quantized_forward(x, *args, **kwargs)

    def _balanced(self, x: torch.Tensor) -> torch.Tensor:
        """``x · (1/s)`` along the input-channel axis (DMQ), or ``x`` without factors."""
        if self._inv_balance is None:
            return x
        if self.layer.kind == "linear":
            axis = x.dim() - 1
        else:  # (N, C, spatial...) or unbatched (C, spatial...)
            axis = x.dim() - (self.module.weight.dim() - 1)
        shape = [1] * x.dim()
        shape[axis] = self._inv_balance.numel()
        return x.float() * self._inv_balance.reshape(shape)

    # -- the INT8 simulation --------------------------------------------------------------
    @torch.no_grad()
    def load_factors(self, record: LayerRecord) -> None:
        """Precompute the integer weight, bias and dequant scale from ``record``."""
        module = self.module
        device = next(iter(module.parameters()), torch.zeros(())).device
        qmin, qmax = int_range(record.num_bits_d)
        self.register_buffer("_inv_scale_d", torch.tensor(
            np.float32(1.0) / np.float32(record.scale_d), device=device), persistent=False)
        self._offset_d = float(record.offset_d)
        self._qrange = (float(qmin), float(qmax))
        if not self.layer.has_weight:
            self.register_buffer("_deq", torch.tensor(np.float32(record.scale_d), device=device),
                                 persistent=False)
            self.quantized = True
            return
        weight = module.weight.detach().cpu().float().numpy()
        if self.balance is not None:
            weight = apply_balance(weight, self.balance, self.layer.kind,
                                   getattr(module, "groups", 1))
        axis = weight_axis(module)
        scale_w = np.asarray(record.scale_w, np.float32)
        offset_w = np.asarray(record.offset_w, np.float32)
        w_int = quantize_weight(weight, scale_w, offset_w, record.num_bits_w, axis=axis)
        offset_shape = [1] * weight.ndim
        offset_shape[axis] = offset_w.size
        w_float = w_int.astype(np.float32) - offset_w.reshape(offset_shape)
        deq = (scale_w * np.float32(record.scale_d)).astype(np.float32)
        bias = None
        if getattr(module, "bias", None) is not None:
            bias = quantize_bias(module.bias.detach().cpu().double().numpy(), scale_w,
                                 record.scale_d, layer=self.layer.name).astype(np.float32)
        self.register_buffer("_w", torch.from_numpy(w_float).to(device), persistent=False)
        self.register_buffer("_b", None if bias is None else torch.from_numpy(bias).to(device),
                             persistent=False)
        channels = deq.size
        if channels == 1:
            deq = deq.reshape(())
        elif self.layer.kind == "linear":
            deq = deq.reshape(channels)
        else:
            deq = deq.reshape(1, channels, *([1] * (weight.ndim - 2)))
        self.register_buffer("_deq", torch.from_numpy(np.ascontiguousarray(deq)).to(device),
                             persistent=False)
        self.quantized = True

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x.float() * self._inv_scale_d) + self._offset_d
        return torch.clamp(q, *self._qrange) - self._offset_d

    def _quantized_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        module = self.module
        xq = self._quantize_input(self._balanced(x))
        kind = self.layer.kind
        if kind == "avgpool":
            out = module(xq) * self._deq
        elif kind == "linear":
            out = F.linear(xq, self._w, self._b) * self._deq
        elif kind == "conv":
            out = module._conv_forward(xq, self._w, self._b) * self._deq
        else:
            out = self._conv_transpose(xq, *args, **kwargs) * self._deq
        return out.to(x.dtype)

    def _conv_transpose(self, xq: torch.Tensor, output_size=None) -> torch.Tensor:
        module = self.module
        spatial = module.weight.dim() - 2
        output_padding = module._output_padding(xq, output_size, module.stride, module.padding,
                                                module.kernel_size, spatial, module.dilation)
        function = F.conv_transpose2d if spatial == 2 else F.conv_transpose3d
        return function(xq, self._w, self._b, module.stride, module.padding, output_padding,
                        module.groups, module.dilation)


class CalibrationSession:
    """Counts calibration batches, accumulates activations and writes the record.

    ``on_finish`` (optional) gets the captured model inputs of every batch after the layer
    factors are written, and returns extra records to merge (the QDQ writer's tensor
    factors).
    """

    def __init__(self, layers: dict[str, tuple[QuantLayer, LayerQuantConfig]], batch_num: int,
                 record_file: str | os.PathLike,
                 on_finish: Callable[[list[tuple]], dict[str, LayerRecord]] | None = None
                 ) -> None:
        self.layers = layers
        self.batch_num = batch_num
        self.record_file = os.fspath(record_file)
        self.on_finish = on_finish
        self.calibrators = {name: make_calibrator(cfg) for name, (_, cfg) in layers.items()}
        self.wrappers: dict[str, QuantCalibrationLayer] = {}
        self.batches = 0
        self.inputs: list[tuple] = []
        self.done = False

    def observe(self, name: str, x: torch.Tensor) -> None:
        if not self.done:
            self.calibrators[name].update(x.detach().float().cpu().numpy())

    def capture_inputs(self, args: Sequence) -> None:
        if not self.done and self.on_finish is not None:
            self.inputs.append(tuple(a.detach().cpu().numpy() if isinstance(a, torch.Tensor)
                                     else a for a in args))

    def end_batch(self) -> None:
        if self.done:
            return
        self.batches += 1
        LOGGER.info("Calibration batch %d/%d done.", self.batches, self.batch_num)
        if self.batches >= self.batch_num:
            self.finish()

    def finish(self) -> None:
        records: dict[str, LayerRecord] = {}
        searched: list[tuple[object, tuple]] = []  # (calibrator, its result)
        for name, (_layer, config) in self.layers.items():
            calibrator = self.calibrators[name]
            # layers that read one tensor with the same settings share one IFMR search
            found = next((result for other, result in searched
                          if isinstance(calibrator, IfmrCalibrator)
                          and calibrator.same_state(other)), None)
            if found is None:
                found = calibrator.result()
                searched.append((calibrator, found))
            scale, offset = found
            bits = config.activation_quant_params.num_bits
            records[name] = LayerRecord(scale_d=float(np.asarray(scale).reshape(-1)[0]),
                                        offset_d=int(np.asarray(offset).reshape(-1)[0]),
                                        act_type=f"INT{bits}")
        if self.on_finish is not None:
            records.update(self.on_finish(self.inputs))
        saved = merge_and_read_record(self.record_file, records)
        for name, wrapper in self.wrappers.items():
            wrapper.load_factors(saved[name])
        self.done = True
        self.calibrators.clear()
        self.inputs.clear()
        LOGGER.info("Calibration done: the quantization factors of %d layers are in %s; the "
                    "calibration model now computes the quantized result.", len(self.layers),
                    self.record_file)


def wrap_layers(model: nn.Module, session: CalibrationSession,
                balances: dict[str, np.ndarray] | None = None) -> nn.Module:
    """Replace each layer of ``session`` in ``model`` by its wrapper and hook the batch
    counter on the model; returns ``model``. ``balances`` maps layers to their DMQ factors."""
    balances = balances or {}
    for name, (layer, _config) in session.layers.items():
        module = model.get_submodule(name)
        wrapper = QuantCalibrationLayer(module, layer, session, balances.get(name))
        replace_submodule(model, name, wrapper)
        session.wrappers[name] = wrapper
    model.register_forward_pre_hook(lambda _m, args: session.capture_inputs(args))
    model.register_forward_hook(lambda _m, _args, _out: session.end_batch())
    return model
