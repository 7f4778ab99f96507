"""DMQ balancing preprocessing of a torch model (reference §3.1 ``quantize_preprocess``, §3.4
DMQ; seed 量化数据均衡预处理).

:func:`quantize_preprocess` works on a copy of the model: Conv+BN folding as
:func:`~amct_pytorch.ptq.quantize_tool.quantize_model` does it (config ``do_fusion``), then every
enabled layer with ``dmq_balancer_param`` (Linear, Conv2d, Conv3d, ConvTranspose2d) is wrapped
in a :class:`DmqObserverLayer`. The user runs **exactly one** forward pass: the wrappers record
``max|X_j|`` per input channel of the layer's input, and after the pass the balance factors

    s_j = max|X_j|^α / max|W_j|^(1 − α)        (α = the layer's migration strength)

are computed from the (folded) weight (:func:`amct_core.quant.dmq.dmq_balance_factors`) and
merged into the record as ``tensor_balance_factor``. :func:`quantize_model` and
:func:`save_model` then quantize ``x / s`` and ``W · s``. A second forward raises, since the
factors of one calibration pass are already in the record.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import torch
from torch import nn

from amct_core.errors import AmctValueError, ConfigError, UnsupportedLayerError
from amct_core.logger import get_logger
from amct_core.quant.config import load_quant_config
from amct_core.quant.dmq import dmq_balance_factors, weight_in_channel_abs_max
from amct_core.quant.layers import QuantLayer
from amct_core.quant.record import LayerRecord, merge_record
from amct_pytorch.module_tree import replace_submodule
from amct_pytorch.ptq.bn_fusion import fuse_conv_bn
from amct_pytorch.ptq.onnx_graph import trace
from amct_pytorch.ptq.quantize_tool import _check_model

LOGGER = get_logger("amct_pytorch")

#: The module types DMQ balances (reference §3.4).
DMQ_MODULES = (nn.Linear, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


class DmqSession:
    """Accumulates per-channel activation maxima during the single forward pass and writes
    the balance factors to the record after it."""

    def __init__(self, layers: dict[str, tuple[QuantLayer, nn.Module, float]],
                 record_file: str) -> None:
        self.layers = layers
        self.record_file = record_file
        self.act_max: dict[str, torch.Tensor] = {}
        self.done = False

    def observe(self, name: str, channel_max: torch.Tensor) -> None:
        seen = self.act_max.get(name)
        self.act_max[name] = channel_max if seen is None else torch.maximum(seen, channel_max)

    def before_forward(self) -> None:
        if self.done:
            raise AmctValueError(
                "quantize_preprocess: DMQ takes exactly one forward pass, and this model has "
                f"already run it (the balance factors are in {self.record_file!r}). Call "
                "quantize_model next, or call quantize_preprocess again for a new pass.")

    def finish(self) -> None:
        missing = [name for name in self.layers if name not in self.act_max]
        if missing:
            raise AmctValueError(
                f"quantize_preprocess: the forward pass did not reach the DMQ layers "
                f"{missing}; run the model on calibration data that goes through every layer.")
        records = {}
        for name, (layer, module, strength) in self.layers.items():
            weight = module.weight.detach().cpu().float().numpy()
            w_max = weight_in_channel_abs_max(weight, layer.kind, getattr(module, "groups", 1))
            act = self.act_max[name].cpu().numpy().astype(np.float32)
            records[name] = LayerRecord(tensor_balance_factor=dmq_balance_factors(
                act, w_max, strength))
        merge_record(self.record_file, records)
        self.done = True
        self.act_max.clear()
        LOGGER.info("DMQ done: the balance factors of %d layer(s) are in %s.", len(records),
                    self.record_file)


class DmqObserverLayer(nn.Module):
    """A DMQ layer during :func:`quantize_preprocess`: records ``max|X_j|`` per input channel
    of its input and returns the layer's own output."""

    def __init__(self, module: nn.Module, layer: QuantLayer, session: DmqSession) -> None:
        super().__init__()
        self.module = module
        self.layer = layer
        self._session = session

    def extra_repr(self) -> str:
        return f"layer={self.layer.name!r}"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._session.done:
            if self.layer.kind == "linear":
                axis = x.dim() - 1
            else:  # (N, C, spatial...) or unbatched (C, spatial...)
                axis = x.dim() - (self.module.weight.dim() - 1)
            moved = x.detach().float().abs().movedim(axis, 0)
            self._session.observe(self.layer.name, moved.reshape(moved.shape[0], -1).amax(1))
        return self.module(x, *args, **kwargs)


def quantize_preprocess(config_file: str | os.PathLike, record_file: str | os.PathLike,
                        model: nn.Module, input_data: object) -> nn.Module:
    """Return a copy of ``model`` that computes the DMQ balance factors in one forward pass
    (reference §3.1 ``quantize_preprocess``).

    ``config_file`` is the JSON config made by ``create_quant_config`` from a ``.cfg`` with
    ``dmq_balancer { migration_strength }``; ``input_data`` is an example input for tracing.
    Run the returned model exactly once on calibration data: the factors are then merged into
    ``record_file`` as ``tensor_balance_factor``. The model passed in is not changed.
    """
    _check_model(model, "quantize_preprocess")
    if record_file is None:
        raise AmctValueError("quantize_preprocess: record_file is required")
    balanced = copy.deepcopy(model).eval()
    traced = trace(balanced, input_data)
    config = load_quant_config(config_file, traced.layers)
    if config.do_fusion and traced.bn_pairs:
        fuse_conv_bn(balanced, traced.bn_pairs, config.skip_fusion_layers)
        traced = trace(balanced, input_data)
    found = {layer.name: layer for layer in traced.layers}
    layers: dict[str, tuple[QuantLayer, nn.Module, float]] = {}
    for name, cfg in config.enabled_layers().items():
        if cfg.dmq_balancer_param is None or name not in found:
            continue
        module = balanced.get_submodule(name)
        if not isinstance(module, DMQ_MODULES):
            raise UnsupportedLayerError(
                f"quantize_preprocess: layer {name!r} ({type(module).__name__}) has "
                "dmq_balancer_param, but DMQ supports only Linear, Conv2d, Conv3d and "
                "ConvTranspose2d. Remove dmq_balancer for this layer.")
        if getattr(module, "groups", 1) != 1:
            raise UnsupportedLayerError(
                f"quantize_preprocess: layer {name!r} is a grouped convolution (groups "
                f"{module.groups}); DMQ applies only to ungrouped ones. Remove dmq_balancer "
                "for this layer.")
        layers[name] = (found[name], module, float(cfg.dmq_balancer_param))
    if not layers:
        raise ConfigError(
            f"quantize_preprocess: no enabled layer of {os.fspath(config_file)!r} has "
            "dmq_balancer_param. Create the config from a .cfg with dmq_balancer "
            "{ migration_strength } (create_quant_config(config_defination=...)).")
    session = DmqSession(layers, os.fspath(record_file))
    for name, (layer, module, _strength) in layers.items():
        replace_submodule(balanced, name, DmqObserverLayer(module, layer, session))
    balanced.register_forward_pre_hook(lambda _m, _args: session.before_forward())
    balanced.register_forward_hook(lambda _m, _args, _out: session.finish())
    LOGGER.info("Quantize preprocess success: run the model on exactly one batch to compute "
                "the DMQ balance factors of %d layer(s).", len(layers))
    return balanced
