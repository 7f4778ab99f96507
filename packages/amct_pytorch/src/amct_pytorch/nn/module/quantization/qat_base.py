"""Shared machinery of the single-op QAT layers (reference §4 "Single-op QAT modules").

A QAT layer subclasses its torch layer (``isinstance(m, nn.Conv2d)`` stays true, the state
dict keeps ``weight``/``bias``) and adds ``act_quantizer`` (ULQ, learnable clips) and
``wts_quantizer`` (ARQ retrain, or ULQ retrain). Config (the seed's example, all keys
optional)::

    {"retrain_enable": True,
     "retrain_data_config": {"dst_type": "INT8", "batch_num": 1, "fixed_min": False,
                             "clip_min": None, "clip_max": None},
     "retrain_weight_config": {"dst_type": "INT8", "weights_retrain_algo": "arq_retrain",
                               "channel_wise": True}}

``dst_type`` is INT8, INT4 or INT16; ``clip_min``/``clip_max`` None means IFMR
initialisation; ``channel_wise`` defaults to True for convolutions and must be False for
``LinearQAT``. The generated QAT JSON spells the algorithms ``"algo"`` (``ulq_quantize`` /
``arq_retrain``); that key is accepted too.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from amct_core.errors import AmctTypeError, ConfigError, QuantizationError, UnsupportedLayerError
from amct_pytorch.qat.quantizers import (
    ArqWeightQuantizer,
    UlqActivationQuantizer,
    UlqWeightQuantizer,
    check_not_replica,
)

#: The layer kinds and their QAT classes' names.
LAYER_KINDS = {"Conv2d": "Conv2dQAT", "ConvTranspose2d": "ConvTranspose2dQAT",
               "Conv3d": "Conv3dQAT", "Linear": "LinearQAT"}

#: dst_type → bits.
DST_TYPES = {"INT4": 4, "INT8": 8, "INT16": 16}

WEIGHTS_RETRAIN_ALGOS = ("arq_retrain", "ulq_retrain")

_TOP_KEYS = ("retrain_enable", "retrain_data_config", "retrain_weight_config")
_DATA_KEYS = ("algo", "dst_type", "batch_num", "fixed_min", "clip_min", "clip_max")
_WEIGHT_KEYS = ("algo", "dst_type", "weights_retrain_algo", "channel_wise")


@dataclass(frozen=True)
class QatFactors:
    """Quantization factors a QAT layer's current state implies (record fields, reference §3.3):
    ``scale_d``/``offset_d`` of the activation, ``scale_w``/``offset_w`` (float32/int64 arrays,
    one value or one per channel) of the weight, and the bit widths."""

    scale_d: float
    offset_d: int
    scale_w: np.ndarray
    offset_w: np.ndarray
    act_bits: int
    wts_bits: int


def _check_keys(section: dict, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"QAT config {where} must be a dict, got {type(section).__name__}.")
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f"QAT config {where} has unknown key(s) {unknown}; allowed keys are "
                          f"{list(allowed)}.")


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"QAT config key {key} must be true or false, got {value!r}.")
    return bool(value)


def _dst_type(value: Any, key: str) -> str:
    if not isinstance(value, str) or value.upper() not in DST_TYPES:
        raise ConfigError(f"QAT config key {key} must be one of {list(DST_TYPES)}, "
                          f"got {value!r}.")
    return value.upper()


def _clip(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"QAT config key {key} must be a number or None, got {value!r}.")
    if not math.isfinite(float(value)):
        raise ConfigError(f"QAT config key {key} must be finite, got {value!r}.")
    return float(value)


def normalize_qat_config(config: dict | None, layer_kind: str) -> dict:
    """Validate a single-op QAT config and return it with every default filled in.

    ``layer_kind`` is ``Conv2d``, ``ConvTranspose2d``, ``Conv3d`` or ``Linear``. Returns
    ``{"retrain_enable": bool, "retrain_data_config": {"algo": "ulq_quantize", "dst_type",
    "batch_num", "fixed_min", "clip_min", "clip_max"}, "retrain_weight_config": {"dst_type",
    "weights_retrain_algo", "channel_wise"}}``. Raises :class:`ConfigError` naming the key.
    """
    if layer_kind not in LAYER_KINDS:
        raise ConfigError(f"layer_kind must be one of {list(LAYER_KINDS)}, got {layer_kind!r}.")
    module = LAYER_KINDS[layer_kind]
    config = {} if config is None else config
    _check_keys(config, _TOP_KEYS, f"of {module}")
    enable = _bool(config.get("retrain_enable", True), "retrain_enable")
    data = config.get("retrain_data_config", {}) or {}
    _check_keys(data, _DATA_KEYS, "retrain_data_config")
    weight = config.get("retrain_weight_config", {}) or {}
    _check_keys(weight, _WEIGHT_KEYS, "retrain_weight_config")

    algo = data.get("algo", "ulq_quantize")
    if algo != "ulq_quantize":
        raise ConfigError(f"QAT config key retrain_data_config.algo must be 'ulq_quantize', "
                          f"got {algo!r}.")
    batch_num = data.get("batch_num", 1)
    if isinstance(batch_num, bool) or not isinstance(batch_num, (int, np.integer)) \
            or batch_num < 1:
        raise ConfigError(f"QAT config key retrain_data_config.batch_num must be an integer "
                          f">= 1, got {batch_num!r}.")
    fixed_min = _bool(data.get("fixed_min", False), "retrain_data_config.fixed_min")
    clip_max = _clip(data.get("clip_max"), "retrain_data_config.clip_max")
    clip_min = _clip(data.get("clip_min"), "retrain_data_config.clip_min")
    if (clip_max is None) != (clip_min is None):
        raise ConfigError("QAT config keys retrain_data_config.clip_max and clip_min must be "
                          "given together (or both None for IFMR initialisation), got "
                          f"clip_max={clip_max!r}, clip_min={clip_min!r}.")
    if clip_max is not None:
        if clip_min >= clip_max:
            raise ConfigError(f"QAT config needs retrain_data_config.clip_min < clip_max, got "
                              f"clip_min={clip_min!r} >= clip_max={clip_max!r}.")
        if clip_max <= 0 or clip_min > 0:
            raise ConfigError(
                "QAT config retrain_data_config clips must include 0 (clip_max > 0 and "
                f"clip_min <= 0), got clip_max={clip_max!r}, clip_min={clip_min!r}.")
        if fixed_min and clip_min != 0:
            raise ConfigError(f"QAT config has retrain_data_config.fixed_min=true, which fixes "
                              f"clip_min at 0, but clip_min={clip_min!r}; set clip_min to 0.")

    wts_algo = weight.get("weights_retrain_algo", weight.get("algo", "arq_retrain"))
    if "algo" in weight and weight["algo"] != wts_algo:
        raise ConfigError(
            f"QAT config retrain_weight_config has algo={weight['algo']!r} and "
            f"weights_retrain_algo={wts_algo!r}; give one of them.")
    if wts_algo not in WEIGHTS_RETRAIN_ALGOS:
        raise ConfigError(f"QAT config key retrain_weight_config.weights_retrain_algo must be "
                          f"one of {list(WEIGHTS_RETRAIN_ALGOS)}, got {wts_algo!r}.")
    channel_wise = _bool(weight.get("channel_wise", layer_kind != "Linear"),
                         "retrain_weight_config.channel_wise")
    if channel_wise and layer_kind == "Linear":
        raise ConfigError("QAT config key retrain_weight_config.channel_wise must be false for "
                          "LinearQAT: Linear weights are quantized per tensor.")
    return {
        "retrain_enable": enable,
        "retrain_data_config": {
            "algo": "ulq_quantize",
            "dst_type": _dst_type(data.get("dst_type", "INT8"), "retrain_data_config.dst_type"),
            "batch_num": int(batch_num), "fixed_min": fixed_min,
            "clip_min": clip_min, "clip_max": clip_max},
        "retrain_weight_config": {
            "dst_type": _dst_type(weight.get("dst_type", "INT8"),
                                  "retrain_weight_config.dst_type"),
            "weights_retrain_algo": wts_algo, "channel_wise": channel_wise},
    }


class QatLayerMixin:
    """The QAT part of a single-op layer; the subclass sets ``LAYER_KIND``,
    ``WEIGHT_AXIS`` (the channel axis of the weight), ``INPUT_NDIM`` (None: any) and
    implements ``_float_forward(x, weight)``."""

    LAYER_KIND = ""
    WEIGHT_AXIS = 0
    INPUT_NDIM: int | None = None

    def _setup_qat(self, config: dict | None) -> None:
        cls = type(self).__name__
        padding_mode = getattr(self, "padding_mode", "zeros")
        if padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{cls}: padding_mode={padding_mode!r} is not supported; QAT layers need "
                "padding_mode='zeros'.")
        if self.LAYER_KIND == "Conv3d" and self.dilation[0] != 1:
            raise UnsupportedLayerError(
                f"{cls}: dilation_d={self.dilation[0]} (dilation={tuple(self.dilation)}) is not "
                "supported; Conv3dQAT needs the depth dilation to be 1.")
        if self.weight.dtype != torch.float32:
            raise UnsupportedLayerError(
                f"{cls}: dtype {self.weight.dtype} is not supported; QAT layers are float32.")
        self.qat_config = normalize_qat_config(config, self.LAYER_KIND)
        self.retrain_enable = self.qat_config["retrain_enable"]
        data = self.qat_config["retrain_data_config"]
        weight = self.qat_config["retrain_weight_config"]
        device = self.weight.device
        if not self.retrain_enable:
            self.act_quantizer = None
            self.wts_quantizer = None
            return
        self.act_quantizer = UlqActivationQuantizer(
            num_bits=DST_TYPES[data["dst_type"]], batch_num=data["batch_num"],
            fixed_min=data["fixed_min"], clip_max=data["clip_max"], clip_min=data["clip_min"],
            name=f"{cls} activation quantizer", device=device)
        bits = DST_TYPES[weight["dst_type"]]
        if weight["weights_retrain_algo"] == "arq_retrain":
            self.wts_quantizer = ArqWeightQuantizer(
                num_bits=bits, channel_wise=weight["channel_wise"], axis=self.WEIGHT_AXIS,
                name=f"{cls} weight quantizer")
        else:
            self.wts_quantizer = UlqWeightQuantizer(
                self.weight.shape[self.WEIGHT_AXIS], num_bits=bits,
                channel_wise=weight["channel_wise"], axis=self.WEIGHT_AXIS,
                name=f"{cls} weight quantizer", device=device)

    def _check_input(self, x: torch.Tensor) -> None:
        cls = type(self).__name__
        check_not_replica(self, cls)
        if not isinstance(x, torch.Tensor):
            raise AmctTypeError(f"{cls}: the input must be a torch.Tensor, got "
                                f"{type(x).__name__}.")
        if x.dtype != torch.float32:
            raise QuantizationError(
                f"{cls}: only float32 input is supported, got {x.dtype}; convert the input "
                "(and the model) to float32.")
        if self.INPUT_NDIM is not None and x.dim() != self.INPUT_NDIM:
            raise QuantizationError(
                f"{cls}: only {self.INPUT_NDIM}-D input is supported, got a {x.dim()}-D input "
                f"of shape {tuple(x.shape)}.")

    def _quantized_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        if torch.compiler.is_exporting():
            raise QuantizationError(
                f"{type(self).__name__}: QAT layers export to ONNX through the TorchScript "
                "exporter, which writes their QuantizeLinear/DequantizeLinear nodes; call "
                "torch.onnx.export(..., dynamo=False). torch.export / the dynamo exporter "
                "cannot trace them.")
        if not self.retrain_enable:
            return x, self.weight
        return self.act_quantizer(x), self.wts_quantizer(self.weight)

    def quant_factors(self) -> QatFactors:
        """The factors the current clips and weight imply (raises :class:`QuantizationError`
        naming the layer when the activation clips are not initialised yet)."""
        cls = type(self).__name__
        if not self.retrain_enable:
            raise QuantizationError(f"{cls}: retrain_enable is false; the layer has no "
                                    "quantization factors.")
        if not self.act_quantizer.is_initialized:
            raise QuantizationError(
                f"{cls}: the activation clips are not initialised; run "
                f"{self.act_quantizer.batch_num} training-mode forward(s) first (or configure "
                "retrain_data_config clip_max/clip_min).")
        scale_d, offset_d = self.act_quantizer.scale_offset()
        scale_w, offset_w = self.wts_quantizer.scale_offset(self.weight)
        return QatFactors(scale_d=scale_d, offset_d=offset_d, scale_w=scale_w,
                          offset_w=offset_w, act_bits=self.act_quantizer.num_bits,
                          wts_bits=self.wts_quantizer.num_bits)

    @classmethod
    def _from_float_checked(cls, mod: nn.Module, float_cls: type[nn.Module],
                            kwargs: dict, config: dict | None):
        if not isinstance(mod, float_cls) or isinstance(mod, QatLayerMixin):
            raise UnsupportedLayerError(
                f"{cls.__name__}.from_float needs a torch.nn.{float_cls.__name__} (not a QAT "
                f"layer), got {type(mod).__name__}.")
        if type(mod).forward is not float_cls.forward:
            raise UnsupportedLayerError(
                f"{cls.__name__}.from_float: {type(mod).__name__} subclasses "
                f"torch.nn.{float_cls.__name__} with its own forward, which the QAT layer "
                f"would replace by the plain {float_cls.__name__} computation; quantize the "
                f"layers inside it, or keep it in float.")
        weight = mod.weight
        qat = cls(**kwargs, bias=mod.bias is not None, device=weight.device,
                  dtype=weight.dtype, config=copy.deepcopy(config))
        with torch.no_grad():
            qat.weight.copy_(weight)
            if mod.bias is not None:
                qat.bias.copy_(mod.bias)
        qat.train(mod.training)
        return qat
