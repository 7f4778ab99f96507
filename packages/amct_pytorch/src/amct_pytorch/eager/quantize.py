"""The eager quantization API of the seed's first example (reference §3.1, new eager API).

    amct.quantize(model, cfg)   # in place: Linear / Conv2d -> calibration modules
    amct.convert(model)         # in place: calibration modules -> INT8 deploy modules

``cfg``::

    {'batch_num': 1,
     'quant_cfg': {'weights': {'type': 'int8', 'symmetric': True, 'strategy': 'tensor'},
                   'inputs':  {'type': 'int8', 'symmetric': False, 'strategy': 'tensor'}},
     'algorithm': {'minmax'},
     'skip_layers': ['fc']}          # substring match on module names

Supported here: the ``minmax`` algorithm, INT8 weights (per ``tensor`` or ``channel``,
symmetric or not) and optional INT8 per-tensor inputs, on ``nn.Linear`` and ``nn.Conv2d``
(padding_mode ``zeros``). Other algorithms and types raise an error that says so.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from amct_core.errors import AmctTypeError, ConfigError
from amct_core.logger import get_logger
from amct_pytorch.eager.modules import MinMaxQuantModule, QuantDeployModule
from amct_pytorch.module_tree import replace_submodule

LOGGER = get_logger("amct_pytorch")

_TOP_KEYS = {"batch_num", "quant_cfg", "algorithm", "skip_layers"}
_WEIGHT_KEYS = {"type", "symmetric", "strategy", "group_size"}
_INPUT_KEYS = {"type", "symmetric", "strategy"}
_ALGORITHMS = {"minmax"}
_KNOWN_ALGORITHMS = {"awq", "gptq", "minmax", "smoothquant", "ofmr", "mxquant", "cast",
                     "quantile"}


def _fail(key: str, what: str) -> ConfigError:
    return ConfigError(f"quantize config: {key}: {what}")


def _check_keys(section: Mapping, allowed: set[str], where: str) -> None:
    if not isinstance(section, Mapping):
        raise _fail(where, f"must be a dict, got {type(section).__name__}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _tensor_cfg(section: Mapping, where: str, strategies: tuple[str, ...]) -> dict:
    kind = section.get("type", "int8")
    if kind != "int8":
        raise _fail(f"{where}.type", f"{kind!r} is not supported by this toolkit's eager API; "
                    f"use 'int8' (or the graph-based create_quant_config/quantize_model flow)")
    symmetric = section.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise _fail(f"{where}.symmetric", f"must be true or false, got {symmetric!r}")
    strategy = section.get("strategy", "tensor")
    if strategy not in strategies:
        raise _fail(f"{where}.strategy", f"{strategy!r} is not supported; use one of "
                    f"{list(strategies)}")
    return {"num_bits": 8, "symmetric": symmetric, "strategy": strategy}


def parse_config(config: Mapping) -> dict:
    """Validate an eager config and return it normalised."""
    _check_keys(config, _TOP_KEYS, "config")
    batch_num = config.get("batch_num", 1)
    if not isinstance(batch_num, int) or isinstance(batch_num, bool) or batch_num < 1:
        raise _fail("batch_num", f"must be an integer >= 1, got {batch_num!r}")
    quant_cfg = config.get("quant_cfg", {})
    _check_keys(quant_cfg, {"weights", "inputs"}, "quant_cfg")
    if "weights" not in quant_cfg:
        raise _fail("quant_cfg.weights", "is required (the weight quantization settings)")
    _check_keys(quant_cfg["weights"], _WEIGHT_KEYS, "quant_cfg.weights")
    if "group_size" in quant_cfg["weights"]:
        raise _fail("quant_cfg.weights.group_size", "group quantization is not supported; "
                    "use strategy 'tensor' or 'channel'")
    weights = _tensor_cfg(quant_cfg["weights"], "quant_cfg.weights", ("tensor", "channel"))
    inputs = None
    if "inputs" in quant_cfg:
        _check_keys(quant_cfg["inputs"], _INPUT_KEYS, "quant_cfg.inputs")
        inputs = _tensor_cfg(quant_cfg["inputs"], "quant_cfg.inputs", ("tensor",))
    algorithm = config.get("algorithm", {"minmax"})
    names = [algorithm] if isinstance(algorithm, str) else list(algorithm)
    for name in names:
        if name not in _ALGORITHMS:
            known = "is not an algorithm" if name not in _KNOWN_ALGORITHMS else \
                "is not implemented in this toolkit yet"
            raise _fail("algorithm", f"{name!r} {known}; supported: {sorted(_ALGORITHMS)}")
    skip = config.get("skip_layers", [])
    if isinstance(skip, str) or not all(isinstance(item, str) for item in skip):
        raise _fail("skip_layers", "must be a list of layer-name substrings")
    return {"batch_num": batch_num, "weights": weights, "inputs": inputs,
            "skip_layers": list(skip)}


def quantize(model: nn.Module, config: Mapping) -> nn.Module:
    """Insert calibration modules into ``model`` in place (seed: 生成量化校准模型).

    Each ``nn.Linear`` and ``nn.Conv2d`` whose name contains none of ``skip_layers`` gets
    min-max quantized weights; with ``quant_cfg.inputs`` its input is observed over
    ``batch_num`` batches and quantized afterwards. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise AmctTypeError(f"quantize: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
    cfg = parse_config(config)
    targets = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(part in name for part in cfg["skip_layers"]):
            LOGGER.info("Layer %s is skipped (skip_layers).", name)
            continue
        if getattr(module, "padding_mode", "zeros") != "zeros":
            LOGGER.info("Layer %s is not quantized: padding_mode %s.", name, module.padding_mode)
            continue
        targets.append((name, module))
    if any(isinstance(m, MinMaxQuantModule) for m in model.modules()):
        raise ConfigError("quantize: the model already holds calibration modules; call "
                          "quantize on the original model once")
    for name, module in targets:
        calibration = MinMaxQuantModule(module, name, cfg["weights"], cfg["inputs"],
                                        cfg["batch_num"])
        replace_submodule(model, name, calibration)
        LOGGER.info("Quantize layer %s.", name)
    LOGGER.info("quantize: %d layer(s) replaced by calibration modules.", len(targets))
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace the calibration modules of ``model`` by INT8 deploy modules, in place (seed:
    生成量化部署模型). Input quantization needs its ``batch_num`` calibration batches first."""
    calibrated = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, MinMaxQuantModule)]
    if not calibrated:
        raise ConfigError("convert: the model holds no calibration module; call "
                          "amct_pytorch.quantize(model, cfg) first")
    for name, module in calibrated:
        if module.input_cfg and module.input_scale is None:
            raise ConfigError(
                f"convert: layer {name!r} has seen {module._observer.batches} of "
                f"{module.batch_num} calibration batches; run the model on batch_num batches "
                f"before convert")
    for name, module in calibrated:
        replace_submodule(model, name, QuantDeployModule(module))
    LOGGER.info("convert: %d layer(s) converted to INT8 deploy modules.", len(calibrated))
    return model
