"""The quantization-aware-training configs (reference §3.2): the JSON config and the simple .cfg.

**JSON config** (``config.json``), written by ``create_quant_retrain_config`` and edited by
hand (seed, 量化感知训练 手工调优)::

    {
        "version": 1,
        "batch_num": 1,
        "conv1": {
            "retrain_enable": true,
            "retrain_data_config": {"algo": "ulq_quantize", "dst_type": "INT8"},
            "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": true,
                                      "dst_type": "INT8"}
        },
        "layer2.0.conv1": {
            "retrain_enable": true,
            "retrain_data_config": {"algo": "ulq_quantize", "dst_type": "INT8",
                                    "fixed_min": true},
            "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": true,
                                      "dst_type": "INT8"}
        }
    }

* ``batch_num``: the number of training batches whose activations initialise the ULQ clips
  (IFMR); the quantization factors exist only after that many training steps.
* ``retrain_data_config``: ULQ (``algo`` ``ulq_quantize``); optional ``clip_max`` and
  ``clip_min`` (initial clips, both or neither, ``clip_min < 0 < clip_max`` unless
  ``fixed_min``) and ``fixed_min`` (clip_min held at 0: written true by
  ``create_quant_retrain_config`` for a layer whose input comes from a ReLU, reference §3.4).
* ``retrain_weight_config``: ``arq_retrain`` (min-max on every step) or ``ulq_retrain``
  (learnable clip); ``channel_wise`` defaults to true and must be false for linear layers.
* ``dst_type``: ``INT8`` (activations also ``INT16``). ``INT4`` is in the reference's schema but
  its deploy weights are not packed by this toolkit yet, so it is refused with that reason.

Layers that the config does not name, or names with ``retrain_enable`` false, stay in float.
Layer kinds: ``conv`` (Conv2d, Conv3d), ``conv_transpose`` and ``linear`` (reference §3.5 and
the single-op table of the seed); avgpool is not retrained.

**Simple config** (``.cfg``): protobuf text format of ``AMCTRetrainConfig``
(``amct_core/proto/retrain_config.proto``), turned into the JSON config by
:func:`build_retrain_config_from_cfg`; per layer the data and weight algorithms each come from
the most specific config that sets them: ``override_layer_configs`` > ``override_layer_types`` >
the top-level ``retrain_data_quant_config`` / ``retrain_weight_quant_config`` > defaults.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from amct_core.atomic_file import write_atomically
from amct_core.errors import ConfigError
from amct_core.proto import retrain_config_pb2 as pb
from amct_core.quant.config import (
    FieldChecker,
    _check_argument,
    _known_names,
    _known_types,
    _layers_by_name,
    _preview,
    _show,
    read_cfg_message,
    read_json_config,
)
from amct_core.quant.layers import QuantLayer

CONFIG_VERSION = 1
GLOBAL_KEYS = ("version", "batch_num")
LAYER_KEYS = ("retrain_enable", "retrain_data_config", "retrain_weight_config")
DATA_KEYS = ("algo", "dst_type", "clip_max", "clip_min", "fixed_min")
WEIGHT_KEYS = ("algo", "channel_wise", "dst_type")
DATA_ALGOS = ("ulq_quantize",)
WEIGHT_ALGOS = ("arq_retrain", "ulq_retrain")
DATA_TYPES = ("INT8", "INT16")
WEIGHT_TYPES = ("INT8",)
#: Layer kinds that quantization-aware training handles (reference §3.5).
RETRAIN_KINDS = ("conv", "conv_transpose", "linear")


@dataclass(frozen=True)
class RetrainDataConfig:
    """``retrain_data_config`` of one layer: ULQ on the layer's input (reference §3.4)."""

    algo: str = "ulq_quantize"
    dst_type: str = "INT8"
    clip_max: float | None = None
    clip_min: float | None = None
    fixed_min: bool = False

    @property
    def num_bits(self) -> int:
        return int(self.dst_type[3:])

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"algo": self.algo, "dst_type": self.dst_type}
        if self.clip_max is not None:
            data["clip_max"] = self.clip_max
            data["clip_min"] = self.clip_min
        if self.fixed_min:
            data["fixed_min"] = True
        return data


@dataclass(frozen=True)
class RetrainWeightConfig:
    """``retrain_weight_config`` of one layer (reference §3.4 ARQ retrain / ULQ retrain)."""

    algo: str = "arq_retrain"
    channel_wise: bool = True
    dst_type: str = "INT8"

    @property
    def num_bits(self) -> int:
        return int(self.dst_type[3:])

    def to_json(self) -> dict[str, Any]:
        return {"algo": self.algo, "channel_wise": self.channel_wise, "dst_type": self.dst_type}


@dataclass(frozen=True)
class LayerRetrainConfig:
    name: str
    retrain_enable: bool = True
    data: RetrainDataConfig = field(default_factory=RetrainDataConfig)
    weight: RetrainWeightConfig = field(default_factory=RetrainWeightConfig)

    def to_json(self) -> dict[str, Any]:
        return {"retrain_enable": self.retrain_enable,
                "retrain_data_config": self.data.to_json(),
                "retrain_weight_config": self.weight.to_json()}

    def single_op_config(self, batch_num: int) -> dict[str, Any]:
        """The same settings in the single-op QAT modules' config dict (reference §4:
        ``retrain_data_config{dst_type, batch_num, fixed_min, clip_min, clip_max}``,
        ``retrain_weight_config{dst_type, weights_retrain_algo, channel_wise}``)."""
        return {"retrain_data_config": {"dst_type": self.data.dst_type, "batch_num": batch_num,
                                        "fixed_min": self.data.fixed_min,
                                        "clip_min": self.data.clip_min,
                                        "clip_max": self.data.clip_max},
                "retrain_weight_config": {"dst_type": self.weight.dst_type,
                                          "weights_retrain_algo": self.weight.algo,
                                          "channel_wise": self.weight.channel_wise}}


@dataclass
class RetrainConfig:
    """A validated QAT JSON config; ``layers`` in file order."""

    batch_num: int = 1
    layers: dict[str, LayerRetrainConfig] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def enabled_layers(self) -> dict[str, LayerRetrainConfig]:
        return {name: layer for name, layer in self.layers.items() if layer.retrain_enable}

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": self.version, "batch_num": self.batch_num}
        for name, layer in self.layers.items():
            data[name] = layer.to_json()
        return data


def retrain_layers(layers: Iterable[QuantLayer]) -> list[QuantLayer]:
    """The layers quantization-aware training handles (kinds :data:`RETRAIN_KINDS`)."""
    return [layer for layer in layers if layer.kind in RETRAIN_KINDS]


def _default_layer(layer: QuantLayer, enabled: bool, fixed_min: bool) -> LayerRetrainConfig:
    return LayerRetrainConfig(name=layer.name, retrain_enable=enabled,
                              data=RetrainDataConfig(fixed_min=fixed_min),
                              weight=RetrainWeightConfig(channel_wise=layer.kind != "linear"))


def build_retrain_config(layers: Sequence[QuantLayer], after_relu: Iterable[str] = (),
                         batch_num: int = 1,
                         skip_layers: Iterable[str] | None = None) -> dict[str, Any]:
    """The default QAT JSON config of ``layers`` (reference §3.1
    ``create_quant_retrain_config``, §3.2): ULQ activations (``fixed_min`` for the layers in
    ``after_relu``), 8-bit ARQ-retrain weights, channel-wise except for linear layers."""
    by_name = _layers_by_name(retrain_layers(layers))
    _check_argument("batch_num", batch_num, int, lambda v: v >= 1, "an integer >= 1")
    skipped = _known_names(skip_layers or (), by_name, "the skip_layers argument",
                           "create_quant_retrain_config")
    relu = set(after_relu)
    config = RetrainConfig(batch_num=batch_num)
    for name, layer in by_name.items():
        config.layers[name] = _default_layer(layer, name not in skipped, name in relu)
    return config.to_json()


def build_retrain_config_from_cfg(layers: Sequence[QuantLayer], cfg_path: str | os.PathLike,
                                  after_relu: Iterable[str] = ()) -> dict[str, Any]:
    """The QAT JSON config of ``layers`` from a simple config (``AMCTRetrainConfig`` text
    format, reference §3.2). ``fixed_min`` is set for the layers in ``after_relu`` unless the
    .cfg sets it. Raises :class:`AmctFileNotFoundError` for a missing file and
    :class:`ConfigError` (file, line and column, or the layer and field) otherwise."""
    path = os.fspath(cfg_path)
    message = _parse_cfg(path)
    by_name = _layers_by_name(retrain_layers(layers))
    types = {layer.layer_type for layer in by_name.values()}
    source = f"Simple config '{path}'"

    def fail(what: str) -> ConfigError:
        return ConfigError(f"Simple config '{path}': {what}")

    if message.batch_num < 1:
        raise fail("batch_num must be >= 1, got 0.")
    skipped = (_known_names(message.skip_layers, by_name, "skip_layers", source)
               | _known_names(message.quant_skip_layers, by_name, "quant_skip_layers", source))
    skipped_types = (_known_types(message.skip_layer_types, types, "skip_layer_types", path)
                     | _known_types(message.quant_skip_types, types, "quant_skip_types", path))
    chains: dict[str, list[tuple[str, Any]]] = {name: [] for name in by_name}
    seen: set[str] = set()
    for override in message.override_layer_configs:
        _known_names([override.layer_name], by_name, "override_layer_configs", source)
        if override.layer_name in seen:
            raise fail(f"layer '{override.layer_name}' has two override_layer_configs entries. "
                       f"Merge them into one.")
        seen.add(override.layer_name)
        chains[override.layer_name].append(
            (f"override_layer_configs '{override.layer_name}'", override))
    seen_types: set[str] = set()
    for override in message.override_layer_types:
        _known_types([override.layer_type], types, "override_layer_types", path)
        if override.layer_type in seen_types:
            raise fail(f"layer type '{override.layer_type}' has two override_layer_types "
                       f"entries. Merge them into one.")
        seen_types.add(override.layer_type)
        for name, layer in by_name.items():
            if layer.layer_type == override.layer_type:
                chains[name].append((f"override_layer_types '{override.layer_type}'", override))
    relu = set(after_relu)
    config = RetrainConfig(batch_num=message.batch_num)
    for name, layer in by_name.items():
        chain = [*chains[name], ("the top-level config", message)]
        config.layers[name] = _resolve_layer(
            layer, chain, name in relu,
            enabled=name not in skipped and layer.layer_type not in skipped_types, fail=fail)
    data = config.to_json()
    retrain_config_from_dict(data, by_name.values(), source=path)
    return data


def _parse_cfg(path: str) -> pb.AMCTRetrainConfig:
    def prune_hint(reason: str) -> str:
        return (" Pruning (prune_config, regular_prune_*) is not supported by this toolkit yet."
                if "prune" in reason else "")

    return read_cfg_message(path, pb.AMCTRetrainConfig(), "AMCTRetrainConfig",
                            "retrain .cfg file", prune_hint)


def _resolve_layer(layer: QuantLayer, chain: list[tuple[str, Any]], after_relu: bool,
                   enabled: bool, fail) -> LayerRetrainConfig:
    """One layer's config from its chain of .cfg messages, most specific first."""
    data = RetrainDataConfig(fixed_min=after_relu)
    for where, source in chain:
        if source.HasField("retrain_data_quant_config") and \
                source.retrain_data_quant_config.HasField("ulq_quantize"):
            ulq = source.retrain_data_quant_config.ulq_quantize
            dst_type = _type_name(ulq.dst_type, f"{where}: ulq_quantize.dst_type", fail,
                                  DATA_TYPES)
            clip_max = clip_min = None
            if ulq.HasField("clip_max_min"):
                clip_max = float(ulq.clip_max_min.clip_max)
                clip_min = float(ulq.clip_max_min.clip_min)
            fixed_min = ulq.fixed_min if ulq.HasField("fixed_min") else after_relu
            data = RetrainDataConfig(dst_type=dst_type, clip_max=clip_max, clip_min=clip_min,
                                     fixed_min=fixed_min)
            break
    weight = RetrainWeightConfig(channel_wise=layer.kind != "linear")
    for where, source in chain:
        if not source.HasField("retrain_weight_quant_config"):
            continue
        algo = source.retrain_weight_quant_config.WhichOneof("weight_quant_algo")
        if algo is None:
            continue
        params = getattr(source.retrain_weight_quant_config, algo)
        channel_wise = params.channel_wise
        if layer.kind == "linear" and channel_wise:
            if params.HasField("channel_wise") and where != "the top-level config":
                raise fail(f"{where}: layer '{layer.name}' is a linear layer, whose weights are "
                           f"quantized per tensor; set {algo}.channel_wise to false.")
            channel_wise = False
        weight = RetrainWeightConfig(
            algo=algo, channel_wise=channel_wise,
            dst_type=_type_name(params.dst_type, f"{where}: {algo}.dst_type", fail,
                                WEIGHT_TYPES))
        break
    return LayerRetrainConfig(name=layer.name, retrain_enable=enabled, data=data, weight=weight)


def _type_name(value: int, where: str, fail, allowed: Sequence[str]) -> str:
    name = pb.DataType.Name(value)
    if name not in allowed:
        raise fail(f"{where} {name} is not supported by this toolkit (supported: "
                   f"{', '.join(allowed)}).")
    return name


# --------------------------------------------------------------------------------------------
# Writing, loading and validating the JSON config


def write_retrain_config(path: str | os.PathLike,
                         config: Mapping[str, Any] | RetrainConfig) -> str:
    """Validate ``config`` and write it to ``path`` as JSON (indent 4), atomically."""
    path = os.fspath(path)
    data = config.to_json() if isinstance(config, RetrainConfig) else dict(config)
    retrain_config_from_dict(data, source=path)
    text = json.dumps(data, indent=4, ensure_ascii=False) + "\n"
    return write_atomically(path, text.encode("utf-8"))


def load_retrain_config(path: str | os.PathLike,
                        layers: Iterable[QuantLayer] | None = None) -> RetrainConfig:
    """Read and validate a QAT JSON config. With ``layers`` (the model's quantizable layers),
    every layer key must name one that quantization-aware training handles. Raises
    :class:`AmctFileNotFoundError` for a missing file and :class:`ConfigError`, naming the file,
    layer and key, for anything else."""
    path = os.fspath(path)
    data = read_json_config(path, "Retrain config", "create_quant_retrain_config")
    return retrain_config_from_dict(data, layers, source=path)


def retrain_config_from_dict(data: Any, layers: Iterable[QuantLayer] | None = None,
                             source: str = "<config>") -> RetrainConfig:
    """Validate a QAT JSON config held in memory (the checks of :func:`load_retrain_config`)."""
    known = None if layers is None else _layers_by_name(retrain_layers(layers))
    return _Validator(source, known).config(data)


class _Validator(FieldChecker):
    """Validation of the QAT JSON config."""

    LABEL = "Retrain config"

    def choice(self, value: Any, key: str, layer: str, allowed: Sequence[str],
               refused: Mapping[str, str] | None = None) -> str:
        if refused and value in refused:
            raise self.fail(key, refused[value], layer)
        if value not in allowed:
            raise self.fail(key, f"must be one of {', '.join(map(repr, allowed))}, got "
                                 f"{_show(value)}.", layer)
        return value

    def config(self, data: Any) -> RetrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"Retrain config '{self.source}' must hold a JSON object, got "
                              f"{_show(data)}.")
        version = data.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION or isinstance(version, bool):
            raise self.fail("version", f"must be {CONFIG_VERSION}, got {_show(version)}.")
        batch_num = data.get("batch_num", 1)
        if isinstance(batch_num, bool) or not isinstance(batch_num, int) or batch_num < 1:
            raise self.fail("batch_num", f"must be an integer >= 1 (the number of training "
                                         f"batches that initialise the clips), got "
                                         f"{_show(batch_num)}.")
        config = RetrainConfig(batch_num=batch_num)
        for key, value in data.items():
            if key in GLOBAL_KEYS:
                continue
            if self.layers is not None and key not in self.layers:
                raise self.fail(key, f"is not a layer that quantization-aware training handles "
                                     f"in this model (top-level keys: "
                                     f"{', '.join(GLOBAL_KEYS)}; layers: "
                                     f"{_preview(self.layers)}). Remove or rename it.")
            if not isinstance(value, dict):
                raise self.fail(key, f"a layer entry must be a JSON object, got "
                                     f"{_show(value)}.")
            config.layers[key] = self.layer(key, value)
        return config

    def layer(self, name: str, entry: dict[str, Any]) -> LayerRetrainConfig:
        for key in entry:
            if key not in LAYER_KEYS:
                raise self.fail(key, f"is not a layer key (known: {', '.join(LAYER_KEYS)}). "
                                     f"Remove it.", name)
        kind = self.layers[name].kind if self.layers is not None else None
        enabled = self.boolean(entry.get("retrain_enable", True), "retrain_enable", name)
        data = self.data(name, entry.get("retrain_data_config", {}))
        weight = self.weight(name, entry.get("retrain_weight_config", {}), kind)
        return LayerRetrainConfig(name=name, retrain_enable=enabled, data=data, weight=weight)

    def data(self, name: str, params: Any) -> RetrainDataConfig:
        prefix = "retrain_data_config"
        if not isinstance(params, dict):
            raise self.fail(prefix, f"must be a JSON object, got {_show(params)}.", name)
        for key in params:
            if key not in DATA_KEYS:
                raise self.fail(f"{prefix}.{key}", f"is not a ULQ parameter (known: "
                                                   f"{', '.join(DATA_KEYS)}). Remove it.", name)
        algo = self.choice(params.get("algo", "ulq_quantize"), f"{prefix}.algo", name,
                           DATA_ALGOS)
        dst_type = self.choice(params.get("dst_type", "INT8"), f"{prefix}.dst_type", name,
                               DATA_TYPES, {"INT4": "INT4 is not supported by this toolkit "
                                                    "yet; use INT8."})
        fixed_min = self.boolean(params.get("fixed_min", False), f"{prefix}.fixed_min", name)
        has_max, has_min = "clip_max" in params, "clip_min" in params
        clip_max = clip_min = None
        if has_max != has_min:
            raise self.fail(f"{prefix}.{'clip_min' if has_max else 'clip_max'}",
                            "clip_max and clip_min are given together or not at all.", name)
        if has_max and (params["clip_max"] is not None or params["clip_min"] is not None):
            clip_max = self.number(params["clip_max"], f"{prefix}.clip_max", name)
            clip_min = self.number(params["clip_min"], f"{prefix}.clip_min", name)
            if not clip_max > 0:
                raise self.fail(f"{prefix}.clip_max", f"must be > 0 (the range must hold 0), "
                                                      f"got {clip_max:g}.", name)
            if fixed_min and clip_min != 0:
                raise self.fail(f"{prefix}.clip_min", f"must be 0 when fixed_min is true, got "
                                                      f"{clip_min:g}.", name)
            if not fixed_min and not clip_min < 0:
                raise self.fail(f"{prefix}.clip_min", f"must be < 0 (the range must hold 0; set "
                                                      f"fixed_min for a range starting at 0), "
                                                      f"got {clip_min:g}.", name)
        return RetrainDataConfig(algo=algo, dst_type=dst_type, clip_max=clip_max,
                                 clip_min=clip_min, fixed_min=fixed_min)

    def weight(self, name: str, params: Any, kind: str | None) -> RetrainWeightConfig:
        prefix = "retrain_weight_config"
        if not isinstance(params, dict):
            raise self.fail(prefix, f"must be a JSON object, got {_show(params)}.", name)
        for key in params:
            if key not in WEIGHT_KEYS:
                raise self.fail(f"{prefix}.{key}", f"is not a weight parameter (known: "
                                                   f"{', '.join(WEIGHT_KEYS)}). Remove it.", name)
        algo = self.choice(params.get("algo", "arq_retrain"), f"{prefix}.algo", name,
                           WEIGHT_ALGOS)
        dst_type = self.choice(params.get("dst_type", "INT8"), f"{prefix}.dst_type", name,
                               WEIGHT_TYPES, {"INT4": "INT4 weights are not supported by this "
                                                      "toolkit yet; use INT8."})
        channel_wise = self.boolean(params.get("channel_wise", kind != "linear"),
                                    f"{prefix}.channel_wise", name)
        if channel_wise and kind == "linear":
            raise self.fail(f"{prefix}.channel_wise", "must be false for a linear layer (its "
                                                      "weights are quantized per tensor, "
                                                      "reference §3.2). Set it to false.", name)
        return RetrainWeightConfig(algo=algo, channel_wise=channel_wise, dst_type=dst_type)
