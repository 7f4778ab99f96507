"""Graph-based post-training quantization of a torch model (reference §3.1, seed 手工量化).

1. :func:`create_quant_config` exports the model to ONNX, finds its quantizable layers and
   writes the JSON config (or builds it from a ``.cfg``).
2. :func:`quantize_model` works on a copy of the model: Conv+BN folding, ARQ weight factors
   into the record (of ``W · s`` for layers with DMQ factors from
   :func:`~amct_pytorch.ptq.dmq_preprocess.quantize_preprocess`), the *modified ONNX* (the
   folded FP32 model, unbalanced, whose quantizable nodes are named after their modules), and
   the calibration model it returns.
3. The user runs the calibration model on ``batch_num`` batches; the activation factors are
   written to the record after the last one.
4. :func:`save_model` writes the fake-quant, deploy and QDQ ONNX models (``amct_onnx``).

The user's model is never changed.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from amct_core.atomic_file import write_atomically
from amct_core.errors import AmctTypeError, AmctValueError, ConfigError, RecordFileError
from amct_core.logger import get_logger
from amct_core.quant.arq import arq_weight
from amct_core.quant.config import (
    ActivationQuantParams,
    build_quant_config,
    build_quant_config_from_cfg,
    load_quant_config,
    write_quant_config,
)
from amct_core.quant.dmq import apply_balance
from amct_core.quant.record import LayerRecord, read_record, write_record
from amct_onnx.calibration import calibrate_tensors, set_calibration_settings
from amct_onnx.graph import OnnxGraph
from amct_onnx.layers import find_quant_layers
from amct_onnx.save import save_model as _save_onnx_models
from amct_pytorch.ptq.bn_fusion import fuse_conv_bn
from amct_pytorch.ptq.calibration_model import CalibrationSession, weight_axis, wrap_layers
from amct_pytorch.ptq.onnx_graph import TracedGraph, trace

LOGGER = get_logger("amct_pytorch")


def _check_model(model: object, api: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise AmctTypeError(f"{api}: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
    return model


def _log_skipped(traced: TracedGraph) -> None:
    for name, reason in traced.skipped.items():
        LOGGER.info("Layer %s is not quantized: %s.", name, reason)


def create_quant_config(config_file: str | os.PathLike, model: nn.Module, input_data: object,
                        skip_layers: Iterable[str] | None = None, batch_num: int = 1,
                        activation_offset: bool = True,
                        config_defination: str | os.PathLike | None = None) -> None:
    """Write the JSON quantization config of ``model`` to ``config_file``.

    Every quantizable layer gets the default ARQ (weights) and IFMR (activations) parameters;
    ``skip_layers`` are written with ``quant_enable`` false. When ``config_defination`` (a
    ``.cfg`` in protobuf text format) is given, the config comes from it and ``skip_layers``,
    ``batch_num`` and ``activation_offset`` are ignored (reference §3.1).
    """
    _check_model(model, "create_quant_config")
    traced = trace(model, input_data)
    _log_skipped(traced)
    if config_defination is not None:
        config = build_quant_config_from_cfg(traced.layers, os.fspath(config_defination))
    else:
        skip = list(skip_layers or [])
        unknown = [name for name in skip
                   if name not in {layer.name for layer in traced.layers}]
        if unknown:
            raise ConfigError(
                f"create_quant_config: skip_layers names {unknown} which are not quantizable "
                f"layers of the model (quantizable: "
                f"{[layer.name for layer in traced.layers][:20]}).")
        config = build_quant_config(traced.layers, skip, batch_num, activation_offset)
    write_quant_config(config_file, config)
    LOGGER.info("Create quant config file %s success.", os.fspath(config_file))


def _fold_parameter_nodes(model: onnx.ModelProto) -> None:
    """Turn Identity/Transpose nodes whose input is an initializer into initializers, so each
    layer reads its weight directly (the contract of the ONNX writers)."""
    graph = model.graph
    changed = True
    while changed:
        changed = False
        initializers = {init.name: init for init in graph.initializer}
        for node in list(graph.node):
            if node.op_type not in ("Identity", "Transpose") or node.input[0] not in initializers:
                continue
            value = numpy_helper.to_array(initializers[node.input[0]])
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                value = np.transpose(value, perm)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value),
                                                             node.output[0]))
            graph.node.remove(node)
            changed = True
    OnnxGraph(model).remove_unused_initializers()


def _modified_onnx(traced: TracedGraph, layer_names: Iterable[str]) -> onnx.ModelProto:
    """The modified ONNX, made from ``traced.model`` itself (no copy: the caller has no
    further use for the export)."""
    model = traced.model
    in_use = {node.name for node in model.graph.node}
    for name in layer_names:
        node = model.graph.node[traced.layer_nodes[name]]
        if name in in_use and node.name != name:
            raise AmctValueError(f"cannot name the ONNX node of layer {name!r}: another node "
                                 f"already has that name")
        node.name = name
    _fold_parameter_nodes(model)
    return model


def quantize_model(config_file: str | os.PathLike,
                   modfied_onnx_file: str | os.PathLike | None = None,
                   record_file: str | os.PathLike | None = None, model: nn.Module | None = None,
                   input_data: object = None, input_names=None, output_names=None,
                   dynamic_axes=None, *, modified_onnx_file: str | os.PathLike | None = None,
                   modified_onnx_model: str | os.PathLike | None = None) -> nn.Module:
    """Return the calibration model of ``model`` and write the modified ONNX and the weight
    factors (reference §3.1 ``quantize_model``).

    The parameter keeps the reference's spelling ``modfied_onnx_file``; the keywords
    ``modified_onnx_file`` and ``modified_onnx_model`` (the seed's example) are accepted too.
    Run the returned model on exactly ``batch_num`` batches: the activation factors are
    written to ``record_file`` after the last one, and the model then computes the quantized
    result. The model passed in is not changed.
    """
    onnx_file = _one_path("quantize_model", modfied_onnx_file, modified_onnx_file,
                          modified_onnx_model)
    if record_file is None:
        raise AmctValueError("quantize_model: record_file is required")
    _check_model(model, "quantize_model")
    calibration = copy.deepcopy(model).eval()
    traced = trace(calibration, input_data, input_names, output_names, dynamic_axes)
    config = load_quant_config(config_file, traced.layers)
    if config.do_fusion and traced.bn_pairs:
        fuse_conv_bn(calibration, traced.bn_pairs, config.skip_fusion_layers)
        traced = trace(calibration, input_data, input_names, output_names, dynamic_axes)
    layers = {layer.name: layer for layer in traced.layers}
    enabled = {name: (layers[name], cfg) for name, cfg in config.enabled_layers().items()
               if name in layers}
    modified = _modified_onnx(traced, enabled)
    inputs_of = {info.name: info.input_name for info in find_quant_layers(modified)}
    set_calibration_settings(
        modified, config.batch_num,
        {name: (inputs_of[name], cfg.activation_quant_params) for name, (_, cfg)
         in enabled.items()},
        ActivationQuantParams(asymmetric=bool(config.activation_offset)))
    write_atomically(onnx_file, modified.SerializeToString())
    LOGGER.info("Generate modified onnx file %s success.", os.fspath(onnx_file))

    balances = (_balance_factors(record_file, enabled, calibration)
                if config.dmq_enabled else {})
    records = {}
    for name, (layer, cfg) in enabled.items():
        record = LayerRecord(act_type=f"INT{cfg.activation_quant_params.num_bits}")
        if layer.has_weight:
            module = calibration.get_submodule(name)
            weight_cfg = cfg.weight_quant_params
            weight = module.weight.detach().cpu().float().numpy()
            if name in balances:
                weight = apply_balance(weight, balances[name], layer.kind,
                                       getattr(module, "groups", 1))
                record.tensor_balance_factor = balances[name]
            scale, offset = arq_weight(weight, weight_cfg.num_bits, weight_cfg.channel_wise,
                                       axis=weight_axis(module))
            record.scale_w, record.offset_w = scale, offset
            record.wts_type = f"INT{weight_cfg.num_bits}"
        records[name] = record
    write_record(record_file, records)
    graph_inputs = _graph_input_names(modified)
    session = CalibrationSession(enabled, config.batch_num, record_file,
                                 on_finish=lambda batches: _tensor_factors(
                                     onnx_file, graph_inputs, batches))
    wrap_layers(calibration, session, balances)
    LOGGER.info("Quantize model success: run the calibration model on %d batch(es).",
                config.batch_num)
    return calibration


def _balance_factors(record_file: str | os.PathLike, enabled: dict, calibration: nn.Module
                     ) -> dict[str, np.ndarray]:
    """The DMQ factors (``tensor_balance_factor``) of the enabled layers with
    ``dmq_balancer_param``, read from ``record_file`` and checked against the layers' input
    channel counts (reference §3.1: with DMQ the record must already exist)."""
    dmq_layers = [name for name, (_layer, cfg) in enabled.items()
                  if cfg.dmq_balancer_param is not None]
    if not dmq_layers:
        return {}
    path = os.fspath(record_file)
    todo = ("Run amct_pytorch.quantize_preprocess with this config and record file, then "
            "exactly one forward pass of the model it returns, before quantize_model.")
    if not os.path.exists(path):
        raise RecordFileError(f"quantize_model: the config enables DMQ (dmq_balancer_param) "
                              f"but the record file {path!r} does not exist. {todo}")
    records = read_record(path)
    balances = {}
    for name in dmq_layers:
        module = calibration.get_submodule(name)
        channels = getattr(module, "in_features", None) or module.in_channels
        record = records.get(name)
        factors = (np.zeros(0, np.float32) if record is None
                   else np.asarray(record.tensor_balance_factor, np.float32).reshape(-1))
        if factors.size == 0:
            raise RecordFileError(f"quantize_model: layer {name!r} has dmq_balancer_param in "
                                  f"the config but no tensor_balance_factor in the record file "
                                  f"{path!r}. {todo}")
        if factors.size != channels:
            raise RecordFileError(f"quantize_model: layer {name!r} has {factors.size} "
                                  f"tensor_balance_factor values in the record file {path!r} "
                                  f"but {channels} input channels; the record does not belong "
                                  f"to this model. {todo}")
        balances[name] = factors
    LOGGER.info("DMQ: read the balance factors of %d layer(s) from %s.", len(balances), path)
    return balances


def _graph_input_names(model: onnx.ModelProto) -> list[str]:
    initializers = {init.name for init in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


def _tensor_factors(onnx_file: str, input_names: list[str],
                    batches: list[tuple]) -> dict[str, LayerRecord]:
    """Factors of the tensors the QDQ writer quantizes besides the layer inputs (outputs of
    the residual adds, ...): the captured calibration inputs run through the modified ONNX.
    Without them the QDQ model is still right but ONNX Runtime fuses fewer int8 kernels."""
    feeds = []
    for batch in batches:
        arrays = [value for value in batch if isinstance(value, np.ndarray)]
        if len(arrays) != len(input_names):
            LOGGER.warning("The calibration inputs (%d tensors) do not map onto the %d inputs "
                           "of %s; the QDQ model keeps the tensors between layers in float.",
                           len(arrays), len(input_names), onnx_file)
            return {}
        feeds.append(dict(zip(input_names, arrays, strict=True)))
    return calibrate_tensors(onnx_file, feeds)


def save_model(modfied_onnx_file: str | os.PathLike | None = None,
               record_file: str | os.PathLike | None = None,
               save_path: str | os.PathLike | None = None, *,
               modified_onnx_file: str | os.PathLike | None = None,
               modified_onnx_model: str | os.PathLike | None = None) -> None:
    """Write ``<save_path>_fake_quant_model.onnx``, ``<save_path>_deploy_model.onnx`` and
    ``<save_path>_qdq_model.onnx`` from the modified ONNX and the record (reference §3.1)."""
    onnx_file = _one_path("save_model", modfied_onnx_file, modified_onnx_file,
                          modified_onnx_model)
    if record_file is None or save_path is None:
        raise AmctValueError("save_model: record_file and save_path are required")
    _save_onnx_models(onnx_file, record_file, save_path)


def _one_path(api: str, *candidates) -> str:
    given = [c for c in candidates if c is not None]
    if len(given) != 1:
        raise AmctValueError(f"{api}: give the modified ONNX file once (modfied_onnx_file, "
                             f"also accepted as modified_onnx_file or modified_onnx_model); "
                             f"got {len(given)}")
    return os.fspath(given[0])
