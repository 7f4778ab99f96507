"""The post-training-quantization configs (reference §3.2): the JSON config and the simple .cfg.

**JSON config** (``config.json``), written by ``create_quant_config`` and edited by hand
(seed, 手工调优)::

    {
        "version": 1,
        "batch_num": 1,
        "activation_offset": true,
        "do_fusion": true,
        "skip_fusion_layers": [],
        "conv1": {
            "quant_enable": true,
            "activation_quant_params": {"num_bits": 8, "max_percentile": 0.999999,
                "min_percentile": 0.999999, "search_range": [0.7, 1.3], "search_step": 0.01,
                "act_algo": "ifmr", "asymmetric": true},
            "weight_quant_params": {"num_bits": 8, "wts_algo": "arq_quantize",
                "channel_wise": true}
        }
    }

HFMG layers carry ``{"num_bits", "act_algo": "hfmg", "num_of_bins", "asymmetric"}``; a layer
gets ``"dmq_balancer_param"`` (the DMQ migration strength) only when DMQ is configured; avgpool
layers have no ``weight_quant_params``. A top-level ``"fakequant_precision_mode"`` is written
only when the .cfg sets it. Decisions of this implementation:

* Skipped layers (``skip_layers``, ``skip_layer_types``) are written with ``"quant_enable":
  false`` and their default parameters, so that enabling one by hand is a one-word edit.
  Deleting a layer's entry also skips it (seed: "将该层的配置删除也可跳过该层量化").
* Keys the reference marks optional may be left out and take their defaults (``asymmetric``
  defaults to ``activation_offset``); ``num_bits`` is required in a parameter object that is
  present. A layer with weights whose entry has no ``weight_quant_params`` gets ARQ defaults.
* Weight ``num_bits``: 8, or 6 and 7 for ``conv`` layers (reference .cfg ``quant_bits``:
  INT6/INT7 for Conv2d only; their factors are recorded as INT8). Activation ``num_bits``: 8 or
  16. ``wts_algo`` is ``arq_quantize`` (AdaRound is not implemented).
* ``channel_wise`` must be false for ``linear`` layers (per-tensor weights, reference §3.2 and
  §3.4).

**Simple config** (``.cfg``): protobuf text format of ``AMCTConfig``
(``amct_core/proto/calibration_config.proto``), turned into the JSON config by
:func:`build_quant_config_from_cfg`. Per layer, each algorithm group (weights, activations,
DMQ) comes from the most specific config that sets it: ``override_layer_configs`` >
``override_layer_types`` > ``common_config`` > defaults; ``asymmetric`` falls back along the same
chain, then to ``activation_offset``. Unset fields inside the chosen algorithm take the proto
defaults. From ``common_config``, settings a layer kind cannot take are adapted (linear weights
per tensor, INT6/INT7 only on conv, no weights or DMQ on avgpool); named explicitly in an
override they are an error. As in AMCT, an optional field or oneof member given twice keeps the
last value.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import text_format
from google.protobuf.message import Message

from amct_core.atomic_file import write_atomically
from amct_core.errors import AmctFileNotFoundError, AmctTypeError, AmctValueError, ConfigError
from amct_core.proto import calibration_config_pb2 as cfg_pb2
from amct_core.quant.layers import QuantLayer

CONFIG_VERSION = 1
#: Top-level keys of the JSON config; every other top-level key is a layer name.
GLOBAL_KEYS = ("version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers",
               "fakequant_precision_mode")
ACT_ALGOS = ("ifmr", "hfmg")
WTS_ALGOS = ("arq_quantize",)
ACT_NUM_BITS = (8, 16)
WTS_NUM_BITS = (8,)
#: Weight bit widths allowed on ``conv`` layers only (reference: quant_bits INT6/INT7, Conv2d).
CONV_WTS_NUM_BITS = (6, 7, 8)
NUM_OF_BINS = (1024, 2048, 4096, 8192)
DMQ_RANGE = (0.2, 0.8)
FAKEQUANT_PRECISION_MODES = ("DEFAULT", "FORCE_FP16_QUANT")
LAYER_KEYS = ("quant_enable", "dmq_balancer_param", "activation_quant_params",
              "weight_quant_params")
IFMR_KEYS = ("num_bits", "max_percentile", "min_percentile", "search_range", "search_step",
             "act_algo", "asymmetric")
HFMG_KEYS = ("num_bits", "act_algo", "num_of_bins", "asymmetric")
WEIGHT_KEYS = ("num_bits", "wts_algo", "channel_wise")


# --------------------------------------------------------------------------------------------
# Typed view of the JSON config


@dataclass(frozen=True)
class ActivationQuantParams:
    """``activation_quant_params`` of one layer (IFMR or HFMG, reference §3.2 and §3.4).

    Fields of the algorithm not chosen keep their defaults and are not written.
    """

    act_algo: str = "ifmr"
    num_bits: int = 8
    asymmetric: bool = True
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range: tuple[float, float] = (0.7, 1.3)
    search_step: float = 0.01
    num_of_bins: int = 4096

    @property
    def symmetric(self) -> bool:
        return not self.asymmetric

    def calibrator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ifmr``/``IfmrCalibrator`` or ``hfmg``/``HfmgCalibrator``."""
        if self.act_algo == "hfmg":
            return {"num_bits": self.num_bits, "symmetric": self.symmetric,
                    "num_of_bins": self.num_of_bins}
        return {"num_bits": self.num_bits, "symmetric": self.symmetric,
                "max_percentile": self.max_percentile, "min_percentile": self.min_percentile,
                "search_range": tuple(self.search_range), "search_step": self.search_step}

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in the reference's order."""
        if self.act_algo == "hfmg":
            return {"num_bits": self.num_bits, "act_algo": "hfmg",
                    "num_of_bins": self.num_of_bins, "asymmetric": self.asymmetric}
        return {"num_bits": self.num_bits, "max_percentile": self.max_percentile,
                "min_percentile": self.min_percentile, "search_range": list(self.search_range),
                "search_step": self.search_step, "act_algo": "ifmr",
                "asymmetric": self.asymmetric}


@dataclass(frozen=True)
class WeightQuantParams:
    """``weight_quant_params`` of one layer: ARQ (reference §3.2 and §3.4)."""

    num_bits: int = 8
    channel_wise: bool = True
    wts_algo: str = "arq_quantize"

    def to_json(self) -> dict[str, Any]:
        return {"num_bits": self.num_bits, "wts_algo": self.wts_algo,
                "channel_wise": self.channel_wise}


@dataclass(frozen=True)
class LayerQuantConfig:
    """The config of one layer. ``weight_quant_params`` is None for a layer without weights
    (avgpool), or when the file gives none and the layer kinds are unknown."""

    name: str
    quant_enable: bool = True
    activation_quant_params: ActivationQuantParams = field(
        default_factory=ActivationQuantParams)
    weight_quant_params: WeightQuantParams | None = None
    dmq_balancer_param: float | None = None

    @property
    def activation(self) -> ActivationQuantParams:
        """Short name of :attr:`activation_quant_params`."""
        return self.activation_quant_params

    @property
    def weight(self) -> WeightQuantParams | None:
        """Short name of :attr:`weight_quant_params`."""
        return self.weight_quant_params

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"quant_enable": self.quant_enable}
        if self.dmq_balancer_param is not None:
            entry["dmq_balancer_param"] = self.dmq_balancer_param
        entry["activation_quant_params"] = self.activation_quant_params.to_json()
        if self.weight_quant_params is not None:
            entry["weight_quant_params"] = self.weight_quant_params.to_json()
        return entry


@dataclass
class QuantConfig:
    """A validated JSON config. ``layers`` holds the layers the file names, in file order."""

    batch_num: int = 1
    activation_offset: bool = True
    do_fusion: bool = True
    skip_fusion_layers: tuple[str, ...] = ()
    layers: dict[str, LayerQuantConfig] = field(default_factory=dict)
    fakequant_precision_mode: str = "DEFAULT"
    version: int = CONFIG_VERSION

    def enabled_layers(self) -> dict[str, LayerQuantConfig]:
        """The layers to quantize (``quant_enable`` true), by name, in file order."""
        return {name: layer for name, layer in self.layers.items() if layer.quant_enable}

    @property
    def dmq_enabled(self) -> bool:
        """Some enabled layer has a DMQ migration strength (quantize_preprocess needed)."""
        return any(layer.dmq_balancer_param is not None
                   for layer in self.enabled_layers().values())

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in the reference's order."""
        data: dict[str, Any] = {"version": self.version, "batch_num": self.batch_num,
                                "activation_offset": self.activation_offset,
                                "do_fusion": self.do_fusion,
                                "skip_fusion_layers": list(self.skip_fusion_layers)}
        if self.fakequant_precision_mode != "DEFAULT":
            data["fakequant_precision_mode"] = self.fakequant_precision_mode
        for name, layer in self.layers.items():
            data[name] = layer.to_json()
        return data


# --------------------------------------------------------------------------------------------
# Building the JSON config


def build_quant_config(layers: Sequence[QuantLayer], skip_layers: Iterable[str] | None = None,
                       batch_num: int = 1, activation_offset: bool = True) -> dict[str, Any]:
    """The default JSON config of ``layers`` (reference §3.1 ``create_quant_config``, §3.2).

    Every layer gets IFMR activations (``asymmetric`` = ``activation_offset``) and, if it has
    weights, 8-bit ARQ weights, channel-wise except for linear layers. Layers in
    ``skip_layers`` are written with ``quant_enable`` false. Raises :class:`ConfigError` for a
    name in ``skip_layers`` that is not among ``layers``, and :class:`AmctValueError` /
    :class:`AmctTypeError` for a bad ``batch_num`` or ``activation_offset``.
    """
    by_name = _layers_by_name(layers)
    _check_argument("batch_num", batch_num, int, lambda v: v >= 1, "an integer >= 1")
    _check_argument("activation_offset", activation_offset, bool, None, "a bool")
    skipped = _known_names(skip_layers or (), by_name, "the skip_layers argument",
                           "create_quant_config")
    config = QuantConfig(batch_num=batch_num, activation_offset=activation_offset)
    for name, layer in by_name.items():
        config.layers[name] = LayerQuantConfig(
            name=name, quant_enable=name not in skipped,
            activation_quant_params=ActivationQuantParams(asymmetric=activation_offset),
            weight_quant_params=_default_weight(layer))
    return config.to_json()


def build_quant_config_from_cfg(layers: Sequence[QuantLayer],
                                cfg_path: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of ``layers`` from a simple config file (reference §3.2, ``.cfg``).

    The .cfg replaces the ``skip_layers``/``batch_num``/``activation_offset`` arguments of
    :func:`build_quant_config`. Raises :class:`AmctFileNotFoundError` when the file does not
    exist and :class:`ConfigError` when it does not parse (line and column given), names a
    layer or layer type that ``layers`` lacks, or holds a value out of range.
    """
    path = os.fspath(cfg_path)
    message = _parse_cfg(path)
    by_name = _layers_by_name(layers)
    types = {layer.layer_type for layer in by_name.values()}
    source = f"Simple config '{path}'"

    def fail(what: str) -> ConfigError:
        return ConfigError(f"Simple config '{path}': {what}")

    if message.batch_num < 1:
        raise fail("batch_num must be >= 1, got 0. Set batch_num to the number of "
                   "calibration batches.")
    skipped = _known_names(message.skip_layers, by_name, "skip_layers", source)
    skipped_types = _known_types(message.skip_layer_types, types, "skip_layer_types", path)
    skip_fusion = _known_names(message.skip_fusion_layers, by_name, "skip_fusion_layers",
                               source)
    common = message.common_config if message.HasField("common_config") else None
    if common is not None:
        _check_calibration_config(common, "common_config", fail)
    by_type: dict[str, cfg_pb2.CalibrationConfig] = {}
    for override in message.override_layer_types:
        where = f"override_layer_types '{override.layer_type}'"
        _known_types([override.layer_type], types, "override_layer_types", path)
        if override.layer_type in by_type:
            raise fail(f"layer type '{override.layer_type}' has two override_layer_types "
                       f"entries. Merge them into one.")
        _check_calibration_config(override.calibration_config, where, fail)
        by_type[override.layer_type] = override.calibration_config
    by_layer: dict[str, cfg_pb2.CalibrationConfig] = {}
    for override in message.override_layer_configs:
        where = f"override_layer_configs '{override.layer_name}'"
        _known_names([override.layer_name], by_name, "override_layer_configs", source)
        if override.layer_name in by_layer:
            raise fail(f"layer '{override.layer_name}' has two override_layer_configs "
                       f"entries. Merge them into one.")
        _check_calibration_config(override.calibration_config, where, fail)
        by_layer[override.layer_name] = override.calibration_config

    config = QuantConfig(batch_num=message.batch_num,
                         activation_offset=message.activation_offset,
                         do_fusion=message.do_fusion,
                         skip_fusion_layers=tuple(dict.fromkeys(skip_fusion)))
    if message.HasField("fakequant_precision_mode"):
        config.fakequant_precision_mode = cfg_pb2.FakequantPrecisionMode.Name(
            message.fakequant_precision_mode)
    for name, layer in by_name.items():
        chain = []
        if name in by_layer:
            chain.append((f"override_layer_configs '{name}'", by_layer[name]))
        if layer.layer_type in by_type:
            chain.append((f"override_layer_types '{layer.layer_type}'",
                          by_type[layer.layer_type]))
        if common is not None:
            chain.append(("common_config", common))
        config.layers[name] = _resolve_layer(
            layer, chain, message.activation_offset,
            enabled=name not in skipped and layer.layer_type not in skipped_types, fail=fail)
    data = config.to_json()
    quant_config_from_dict(data, by_name.values(), source=path)  # the checks of a loaded file
    return data


def _default_weight(layer: QuantLayer) -> WeightQuantParams | None:
    if not layer.has_weight:
        return None
    return WeightQuantParams(channel_wise=layer.kind in ("conv", "conv_transpose"))


def _parse_cfg(path: str) -> cfg_pb2.AMCTConfig:
    return read_cfg_message(path, cfg_pb2.AMCTConfig(), "AMCTConfig", ".cfg file")


def read_cfg_message(path: str, message: Message, schema: str, kind: str,
                     hint: Callable[[str], str] | None = None) -> Message:
    """Parse the simple config ``path`` (protobuf text format of ``schema``, reference §3.2)
    into ``message``. :class:`AmctFileNotFoundError` names the missing file (``kind``: what
    to pass as config_defination); :class:`ConfigError` gives the line and column of a parse
    error, with ``hint(reason)`` appended when given."""
    if not os.path.isfile(path):
        raise AmctFileNotFoundError(f"Simple config '{path}' does not exist. Pass the path of "
                                    f"an existing {kind} as config_defination.")
    text = _read_utf8(path, "Simple config")
    try:
        text_format.Merge(text, message)
    except text_format.ParseError as error:
        reason = str(error)
        head, separator, tail = reason.partition(" : ")
        if separator and head.replace(":", "").isdigit():
            reason = tail
        raise ConfigError(
            f"Simple config '{path}' is not valid (protobuf text format of {schema}, "
            f"reference §3.2): line {error.GetLine()}, column {error.GetColumn()}: {reason}."
            f"{hint(reason) if hint else ''} Fix the file.") from None
    return message


def _read_utf8(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text ({error}).") from None


def read_json_config(path: str, what: str, creator: str) -> Any:
    """The JSON object of config file ``path`` (``what``: "Quantization config" ...), parsed
    strictly: a key twice in one object, NaN/Infinity and malformed JSON raise
    :class:`ConfigError` with the line and column; a missing file raises
    :class:`AmctFileNotFoundError` that says to run ``creator``."""
    if not os.path.isfile(path):
        raise AmctFileNotFoundError(f"{what} '{path}' does not exist. Create it with {creator}, "
                                    f"or pass the right config_file.")
    text = _read_utf8(path, what)

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for key, value in pairs:
            if key in data:
                raise ConfigError(
                    f"{what} '{path}': key '{key}' appears twice in one object. "
                    f"Keys (layer names included) must be unique; keep one.")
            data[key] = value
        return data

    def reject_constant(constant: str) -> Any:
        raise ConfigError(f"{what} '{path}': {constant} is not a valid value; "
                          f"use a finite number.")

    try:
        return json.loads(text, object_pairs_hook=unique_keys, parse_constant=reject_constant)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{what} '{path}' is not valid JSON: line {error.lineno}, column "
            f"{error.colno}: {error.msg}. Fix the file, or create it again with "
            f"{creator}.") from None


def _check_calibration_config(config: cfg_pb2.CalibrationConfig, where: str, fail) -> None:
    """Range checks of one CalibrationConfig of a .cfg, with the .cfg's field names."""
    if config.WhichOneof("wts_quant_algo") == "ada_quantize":
        raise fail(f"{where}: ada_quantize (AdaRound) is not supported by this toolkit. Use "
                   f"arq_quantize.")
    if config.HasField("arq_quantize"):
        bits = config.arq_quantize.quant_bits
        if bits not in CONV_WTS_NUM_BITS:
            raise fail(f"{where}: arq_quantize.quant_bits must be one of 6, 7, 8, got {bits}.")
    algo = config.WhichOneof("act_quant_algo")
    if algo == "ifmr_quantize":
        ifmr = config.ifmr_quantize
        for name in ("max_percentile", "min_percentile"):
            value = getattr(ifmr, name)
            if not 0.5 < value <= 1:
                raise fail(f"{where}: ifmr_quantize.{name} must be in (0.5, 1], got {value}.")
        start, end, step = ifmr.search_range_start, ifmr.search_range_end, ifmr.search_step
        if not 0 < start < end:
            raise fail(f"{where}: ifmr_quantize needs 0 < search_range_start < "
                       f"search_range_end, got {start} and {end}.")
        if not 0 < step <= end - start:
            raise fail(f"{where}: ifmr_quantize.search_step must be in (0, search_range_end - "
                       f"search_range_start] = (0, {end - start:g}], got {step}.")
    elif algo == "hfmg_quantize":
        bins = config.hfmg_quantize.num_of_bins
        if bins not in NUM_OF_BINS:
            raise fail(f"{where}: hfmg_quantize.num_of_bins must be one of "
                       f"{', '.join(map(str, NUM_OF_BINS))}, got {bins}.")
    if config.HasField("dmq_balancer"):
        strength = config.dmq_balancer.migration_strength
        if not DMQ_RANGE[0] <= strength <= DMQ_RANGE[1]:
            raise fail(f"{where}: dmq_balancer.migration_strength must be in [0.2, 0.8], got "
                       f"{strength}.")


def _resolve_layer(layer: QuantLayer, chain: list[tuple[str, cfg_pb2.CalibrationConfig]],
                   activation_offset: bool, enabled: bool, fail) -> LayerQuantConfig:
    """One layer's config from its override chain (most specific first), reference §3.2."""

    def first(test):
        return next(((where, config) for where, config in chain if test(config)), (None, None))

    where, config = first(lambda c: c.WhichOneof("wts_quant_algo") is not None)
    weight = _default_weight(layer)
    explicit = where is not None and where != "common_config"
    if config is not None and layer.has_weight:
        arq = config.arq_quantize
        channel_wise = arq.channel_wise
        if layer.kind not in ("conv", "conv_transpose") and channel_wise:
            if explicit and arq.HasField("channel_wise"):
                raise fail(f"{where}: layer '{layer.name}' is a {layer.kind} layer, whose "
                           f"weights are quantized per tensor; set arq_quantize.channel_wise "
                           f"to false.")
            channel_wise = False
        bits = arq.quant_bits
        if bits != 8 and layer.kind != "conv":
            if explicit:
                raise fail(f"{where}: arq_quantize.quant_bits {bits} is for conv layers only; "
                           f"layer '{layer.name}' is a {layer.kind} layer. Use 8.")
            bits = 8
        weight = WeightQuantParams(num_bits=bits, channel_wise=channel_wise)
    elif explicit and not layer.has_weight:
        raise fail(f"{where}: layer '{layer.name}' is an avgpool layer, which has no weights; "
                   f"remove the weight algorithm from this override.")

    where, config = first(lambda c: c.WhichOneof("act_quant_algo") is not None)
    asymmetric = activation_offset
    for _, candidate in chain:
        algo = candidate.WhichOneof("act_quant_algo")
        if algo is not None and getattr(candidate, algo).HasField("asymmetric"):
            asymmetric = getattr(candidate, algo).asymmetric
            break
    if config is None or config.WhichOneof("act_quant_algo") == "ifmr_quantize":
        ifmr = config.ifmr_quantize if config is not None else cfg_pb2.FMRQuantize()
        activation = ActivationQuantParams(
            act_algo="ifmr", num_bits=_dst_bits(ifmr.dst_type), asymmetric=asymmetric,
            max_percentile=ifmr.max_percentile, min_percentile=ifmr.min_percentile,
            search_range=(ifmr.search_range_start, ifmr.search_range_end),
            search_step=ifmr.search_step)
    else:
        hfmg = config.hfmg_quantize
        activation = ActivationQuantParams(act_algo="hfmg", num_bits=_dst_bits(hfmg.dst_type),
                                           asymmetric=asymmetric, num_of_bins=hfmg.num_of_bins)

    where, config = first(lambda c: c.HasField("dmq_balancer"))
    dmq = None
    if config is not None:
        if layer.has_weight:
            dmq = config.dmq_balancer.migration_strength
        elif where != "common_config":
            raise fail(f"{where}: layer '{layer.name}' is an avgpool layer; DMQ applies to "
                       f"layers with weights only. Remove dmq_balancer from this override.")
    return LayerQuantConfig(name=layer.name, quant_enable=enabled,
                            activation_quant_params=activation, weight_quant_params=weight,
                            dmq_balancer_param=dmq)


def _dst_bits(dst_type: int) -> int:
    return 16 if dst_type == cfg_pb2.INT16 else 8


def _layers_by_name(layers: Iterable[QuantLayer]) -> dict[str, QuantLayer]:
    by_name: dict[str, QuantLayer] = {}
    for layer in layers:
        if not isinstance(layer, QuantLayer):
            raise AmctTypeError(f"layers must hold QuantLayer objects, got "
                                f"{type(layer).__name__}.")
        if layer.name in by_name:
            raise ConfigError(f"Layer name '{layer.name}' appears twice among the quantizable "
                              f"layers; config keys must be unique.")
        if layer.name in GLOBAL_KEYS:
            raise ConfigError(f"Layer name '{layer.name}' is also a top-level key of the "
                              f"quantization config; rename the layer.")
        by_name[layer.name] = layer
    return by_name


def _known_names(names: Iterable[str], by_name: Mapping[str, QuantLayer], what: str,
                 source: str) -> set[str]:
    """``names`` as a set; :class:`ConfigError` (``source``: what holds the list) for a name
    that is not a quantizable layer."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ConfigError(
            f"{source}: {what} names layer(s) that are not quantizable layers of the model: "
            f"{', '.join(repr(n) for n in unknown)}. Quantizable layers: "
            f"{_preview(by_name)}. Remove or correct them.")
    return set(names)


def _known_types(types: Iterable[str], known: set[str], what: str, path: str) -> set[str]:
    unknown = [layer_type for layer_type in types if layer_type not in known]
    if unknown:
        raise ConfigError(
            f"Simple config '{path}': {what} names layer type(s) that no quantizable layer of "
            f"the model has: {', '.join(repr(t) for t in unknown)}. Types present: "
            f"{_preview(sorted(known))}.")
    return set(types)


def _preview(names: Iterable[str], limit: int = 10) -> str:
    names = list(names)
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "") if names \
        else "(none)"


def _check_argument(name: str, value: Any, kind: type, test, expected: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AmctTypeError(f"Argument '{name}' must be {expected}, got {value!r}.")
    if test is not None and not test(value):
        raise AmctValueError(f"Argument '{name}' must be {expected}, got {value!r}.")


# --------------------------------------------------------------------------------------------
# Writing and loading the JSON config


def write_quant_config(path: str | os.PathLike,
                       config: Mapping[str, Any] | QuantConfig) -> str:
    """Write ``config`` (a JSON dict or a :class:`QuantConfig`) to ``path`` as JSON, indent 4.

    The config is validated first; on :class:`ConfigError` nothing is written and an existing
    file is left as it was. The write is atomic. Returns ``path`` as a str.
    """
    path = os.fspath(path)
    data = config.to_json() if isinstance(config, QuantConfig) else dict(config)
    quant_config_from_dict(data, source=path)
    text = json.dumps(data, indent=4, ensure_ascii=False) + "\n"
    return write_atomically(path, text.encode("utf-8"))


def load_quant_config(path: str | os.PathLike,
                      layers: Iterable[QuantLayer] | None = None) -> QuantConfig:
    """Read and validate a JSON config (reference §3.2).

    With ``layers`` (the model's quantizable layers), every layer key must name one of them,
    and the layer kinds are checked (no ``weight_quant_params`` on avgpool, ``channel_wise``
    false on linear, INT6/INT7 weights on conv only). Raises :class:`AmctFileNotFoundError`
    for a missing file and :class:`ConfigError`, naming the file, layer and key, for anything
    else.
    """
    path = os.fspath(path)
    data = read_json_config(path, "Quantization config", "create_quant_config")
    return quant_config_from_dict(data, layers, source=path)


def quant_config_from_dict(data: Any, layers: Iterable[QuantLayer] | None = None,
                           source: str = "<config>") -> QuantConfig:
    """Validate a JSON config held in memory; ``source`` names it in error messages.

    The checks of :func:`load_quant_config`.
    """
    return _Validator(source, None if layers is None else _layers_by_name(layers)).config(data)


class FieldChecker:
    """Typed getters for a JSON config; every error names the file (``LABEL`` and the
    source), the layer and the key. Shared by the PTQ and QAT config validators."""

    LABEL = "Config"

    def __init__(self, source: str, layers: dict[str, QuantLayer] | None) -> None:
        self.source = source
        self.layers = layers

    def fail(self, key: str, what: str, layer: str | None = None) -> ConfigError:
        where = f"layer '{layer}', key '{key}'" if layer is not None else f"key '{key}'"
        return ConfigError(f"{self.LABEL} '{self.source}': {where}: {what}")

    # typed getters --------------------------------------------------------------------------

    def boolean(self, value: Any, key: str, layer: str | None = None) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {_show(value)}.", layer)
        return value

    def integer(self, value: Any, key: str, layer: str | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {_show(value)}.", layer)
        return value

    def number(self, value: Any, key: str, layer: str | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise self.fail(key, f"must be a number, got {_show(value)}.", layer)
        return float(value)

    def obj(self, value: Any, key: str, layer: str | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a JSON object, got {_show(value)}.", layer)
        return value


class _Validator(FieldChecker):
    """Validation of the PTQ JSON config."""

    LABEL = "Quantization config"

    # the file -------------------------------------------------------------------------------

    def config(self, data: Any) -> QuantConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"Quantization config '{self.source}' must hold a JSON object "
                              f"(the reference's config.json), got {_show(data)}.")
        config = QuantConfig()
        version = self.integer(data.get("version", CONFIG_VERSION), "version")
        if version != CONFIG_VERSION:
            raise self.fail("version", f"must be {CONFIG_VERSION} (the only version), got "
                                       f"{version}.")
        config.batch_num = self.integer(data.get("batch_num", 1), "batch_num")
        if config.batch_num < 1:
            raise self.fail("batch_num", f"must be >= 1, got {config.batch_num}. Set it to the "
                                         f"number of calibration batches.")
        config.activation_offset = self.boolean(data.get("activation_offset", True),
                                                "activation_offset")
        config.do_fusion = self.boolean(data.get("do_fusion", True), "do_fusion")
        config.skip_fusion_layers = self.skip_fusion_layers(data.get("skip_fusion_layers", []))
        mode = data.get("fakequant_precision_mode", "DEFAULT")
        if mode not in FAKEQUANT_PRECISION_MODES:
            raise self.fail("fakequant_precision_mode",
                            f"must be one of {', '.join(FAKEQUANT_PRECISION_MODES)}, got "
                            f"{_show(mode)}.")
        config.fakequant_precision_mode = mode
        for key, value in data.items():
            if key in GLOBAL_KEYS:
                continue
            if self.layers is not None and key not in self.layers:
                what = ("is a layer that is not a quantizable layer of the model"
                        if isinstance(value, dict) else "is not a known top-level key")
                raise self.fail(key, f"{what}. Top-level keys: {', '.join(GLOBAL_KEYS)}; "
                                     f"layers: {_preview(self.layers)}. Remove or rename it.")
            if not isinstance(value, dict):
                raise self.fail(key, f"is not a known top-level key (known: "
                                     f"{', '.join(GLOBAL_KEYS)}), and a layer entry must be a "
                                     f"JSON object; got {_show(value)}.")
            config.layers[key] = self.layer(key, value, config.activation_offset)
        return config

    def skip_fusion_layers(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail("skip_fusion_layers", f"must be a list of layer names, got "
                                                  f"{_show(value)}.")
        if self.layers is not None:
            unknown = [name for name in value if name not in self.layers]
            if unknown:
                raise self.fail("skip_fusion_layers",
                                f"names layer(s) that are not quantizable layers of the model: "
                                f"{', '.join(repr(n) for n in unknown)}.")
        return tuple(value)

    # one layer ------------------------------------------------------------------------------

    def layer(self, name: str, entry: dict[str, Any], activation_offset: bool) -> LayerQuantConfig:
        for key in entry:
            if key not in LAYER_KEYS:
                raise self.fail(key, f"is not a layer key (known: {', '.join(LAYER_KEYS)}). "
                                     f"Remove it.", name)
        kind = self.layers[name].kind if self.layers is not None else None
        quant_enable = self.boolean(entry.get("quant_enable", True), "quant_enable", name)
        dmq = None
        if "dmq_balancer_param" in entry:
            dmq = self.number(entry["dmq_balancer_param"], "dmq_balancer_param", name)
            if not DMQ_RANGE[0] <= dmq <= DMQ_RANGE[1]:
                raise self.fail("dmq_balancer_param", f"the DMQ migration strength must be in "
                                                      f"[0.2, 0.8], got {dmq:g}.", name)
            if kind == "avgpool":
                raise self.fail("dmq_balancer_param", "DMQ applies to layers with weights; "
                                                      "this is an avgpool layer. Remove it.",
                                name)
        if "activation_quant_params" in entry:
            activation = self.activation(name, entry["activation_quant_params"],
                                         activation_offset)
        else:
            activation = ActivationQuantParams(asymmetric=activation_offset)
        if "weight_quant_params" in entry:
            if kind == "avgpool":
                raise self.fail("weight_quant_params", "an avgpool layer has no weights. "
                                                       "Remove weight_quant_params.", name)
            weight = self.weight(name, entry["weight_quant_params"], kind)
        else:
            weight = (None if kind is None
                      else _default_weight(self.layers[name]))  # type: ignore[index]
        return LayerQuantConfig(name=name, quant_enable=quant_enable,
                                activation_quant_params=activation,
                                weight_quant_params=weight, dmq_balancer_param=dmq)

    def activation(self, name: str, value: Any, activation_offset: bool) -> ActivationQuantParams:
        prefix = "activation_quant_params"
        params = self.obj(value, prefix, name)
        algo = params.get("act_algo", "ifmr")
        if algo not in ACT_ALGOS:
            raise self.fail(f"{prefix}.act_algo", f"must be 'ifmr' or 'hfmg', got "
                                                  f"{_show(algo)}.", name)
        allowed = IFMR_KEYS if algo == "ifmr" else HFMG_KEYS
        for key in params:
            if key not in allowed:
                owner = ("act_algo 'hfmg'" if key in HFMG_KEYS else "act_algo 'ifmr'"
                         if key in IFMR_KEYS else None)
                what = (f"belongs to {owner}, but act_algo is '{algo}'" if owner
                        else "is not an activation parameter")
                raise self.fail(f"{prefix}.{key}", f"{what} (keys of '{algo}': "
                                                   f"{', '.join(allowed)}). Remove it.", name)
        if "num_bits" not in params:
            raise self.fail(f"{prefix}.num_bits", "is required (8 or 16).", name)
        bits = self.integer(params["num_bits"], f"{prefix}.num_bits", name)
        if bits not in ACT_NUM_BITS:
            raise self.fail(f"{prefix}.num_bits", f"must be 8 or 16, got {bits}.", name)
        asymmetric = self.boolean(params.get("asymmetric", activation_offset),
                                  f"{prefix}.asymmetric", name)
        if algo == "hfmg":
            bins = self.integer(params.get("num_of_bins", 4096), f"{prefix}.num_of_bins", name)
            if bins not in NUM_OF_BINS:
                raise self.fail(f"{prefix}.num_of_bins", f"must be one of "
                                f"{', '.join(map(str, NUM_OF_BINS))}, got {bins}.", name)
            return ActivationQuantParams(act_algo="hfmg", num_bits=bits, asymmetric=asymmetric,
                                         num_of_bins=bins)
        percentiles = []
        for key in ("max_percentile", "min_percentile"):
            percentile = self.number(params.get(key, 0.999999), f"{prefix}.{key}", name)
            if not 0.5 < percentile <= 1:
                raise self.fail(f"{prefix}.{key}", f"must be in (0.5, 1], got {percentile:g}.",
                                name)
            percentiles.append(percentile)
        search_range = params.get("search_range", [0.7, 1.3])
        if not isinstance(search_range, list) or len(search_range) != 2:
            raise self.fail(f"{prefix}.search_range", f"must be a list of two numbers "
                                                      f"[start, end], got {_show(search_range)}.",
                            name)
        start = self.number(search_range[0], f"{prefix}.search_range", name)
        end = self.number(search_range[1], f"{prefix}.search_range", name)
        if not 0 < start < end:
            raise self.fail(f"{prefix}.search_range", f"needs 0 < start < end, got "
                                                      f"[{start:g}, {end:g}].", name)
        step = self.number(params.get("search_step", 0.01), f"{prefix}.search_step", name)
        if not 0 < step <= end - start:
            raise self.fail(f"{prefix}.search_step", f"must be in (0, end - start] = (0, "
                                                     f"{end - start:g}], got {step:g}.", name)
        return ActivationQuantParams(act_algo="ifmr", num_bits=bits, asymmetric=asymmetric,
                                     max_percentile=percentiles[0],
                                     min_percentile=percentiles[1],
                                     search_range=(start, end), search_step=step)

    def weight(self, name: str, value: Any, kind: str | None) -> WeightQuantParams:
        prefix = "weight_quant_params"
        params = self.obj(value, prefix, name)
        for key in params:
            if key not in WEIGHT_KEYS:
                raise self.fail(f"{prefix}.{key}", f"is not a weight parameter (known: "
                                                   f"{', '.join(WEIGHT_KEYS)}). Remove it.", name)
        algo = params.get("wts_algo", "arq_quantize")
        if algo not in WTS_ALGOS:
            raise self.fail(f"{prefix}.wts_algo", f"must be 'arq_quantize' (the only weight "
                                                  f"algorithm implemented), got {_show(algo)}.",
                            name)
        if "num_bits" not in params:
            raise self.fail(f"{prefix}.num_bits", "is required (8).", name)
        bits = self.integer(params["num_bits"], f"{prefix}.num_bits", name)
        allowed = CONV_WTS_NUM_BITS if kind in (None, "conv") else WTS_NUM_BITS
        if bits not in allowed:
            extra = "" if kind in (None, "conv") else " (6 and 7 are for conv layers only)"
            raise self.fail(f"{prefix}.num_bits", f"must be one of "
                                                  f"{', '.join(map(str, allowed))}{extra}, got "
                                                  f"{bits}.", name)
        default_channel_wise = kind in (None, "conv", "conv_transpose")
        channel_wise = self.boolean(params.get("channel_wise", default_channel_wise),
                                    f"{prefix}.channel_wise", name)
        if channel_wise and kind == "linear":
            raise self.fail(f"{prefix}.channel_wise", "must be false for a linear layer (its "
                                                      "weights are quantized per tensor, "
                                                      "reference §3.2). Set it to false.", name)
        return WeightQuantParams(num_bits=bits, channel_wise=channel_wise, wts_algo=algo)


def _show(value: Any) -> str:
    """``value`` as JSON text (true, null, "x"), for error messages."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
