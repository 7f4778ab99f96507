"""Post-training quantization of ONNX models: the front end (reference §3.1, seed 训练后量化 /
手工量化).

The flow is the reference's, with ONNX Runtime in place of PyTorch:

1. :func:`create_quant_config` finds the quantizable layers (§3.5,
   :func:`amct_onnx.layers.find_quant_layers`) and writes the JSON config (§3.2), from the
   arguments or from a ``.cfg``.
2. :func:`quantize_model` validates the config against the model, folds BatchNormalization
   (``do_fusion``; :mod:`amct_onnx.fusion`), writes the ARQ weight factors to the record (§3.4
   ARQ; the reference's ``WeightsCalibrationPass``) and writes the *modified ONNX*: the FP32
   model in which every quantizable node is named after its layer.
3. :func:`calibrate` runs ``batch_num`` batches through the modified ONNX in plain ONNX Runtime,
   with the input of every enabled layer exposed as an extra output, feeds IFMR / HFMG (§3.4)
   and merges the activation factors into the record.
4. :func:`amct_onnx.save.save_model` writes the fake-quant, deploy and QDQ models (§4).

**Node names.** A layer is named by its node's name (the config and record key). Nodes without
a name are named by :func:`amct_onnx.layers.assign_node_names` (``<op_type>_<k>``, graph
order) each time a model file is loaded, so the config that :func:`create_quant_config` writes
matches the model :func:`quantize_model` reads.

**Constant inputs.** Initializers that are also listed as graph inputs (required below IR
version 4, common in old model-zoo files) are treated as constants: they are removed from the
graph inputs of the loaded model (its IR version raised to 4), so their layers can be
quantized and folded.

**Calibration settings.** :func:`calibrate` receives only the modified ONNX and the record, so
:func:`quantize_model` stores what it needs in the modified model's ``metadata_props`` under
:data:`CALIBRATION_METADATA_KEY`, as JSON::

    {"version": 1, "batch_num": N,
     "layers": {"<layer>": {"tensor": "<input tensor>", "act_algo": "ifmr" | "hfmg",
                            "kwargs": {<IfmrCalibrator / HfmgCalibrator arguments>}}},
     "default": {"act_algo": "ifmr", "kwargs": {...}},
     "dmq": {"<layer>": <migration strength>}}      (only when the config enables DMQ)

**DMQ** (reference §3.4, ``dmq_balancer_param`` in the config): the reference's
``quantize_preprocess`` forward becomes a first pass of :func:`calibrate` over the same
``batch_num`` batches, which takes the per-channel maxima of each balanced layer's input; the
balance factors ``s`` (``tensor_balance_factor``) and the ARQ factors of ``W·s`` replace the
layer's weight factors in the record, and the activation calibration sees ``X / s``. Grouped
convolutions are not balanced (a warning says so).

``default`` holds the parameters of the extra tensors the QDQ writer asks for (record keys
``tensor:<name>``): IFMR with the defaults of the JSON config, ``asymmetric`` =
``activation_offset``. To change any of it, edit the config and run :func:`quantize_model`
again.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from amct_core.atomic_file import write_atomically
from amct_core.errors import AmctError, AmctFileNotFoundError, AmctValueError, ConfigError
from amct_core.logger import get_logger
from amct_core.quant.arq import arq_weight
from amct_core.quant.config import (
    ActivationQuantParams,
    LayerQuantConfig,
    build_quant_config,
    build_quant_config_from_cfg,
    load_quant_config,
    write_quant_config,
)
from amct_core.quant.dmq import (
    apply_balance,
    balance_activation,
    dmq_balance_factors,
    weight_in_channel_abs_max,
)
from amct_core.quant.hfmg import HfmgCalibrator
from amct_core.quant.ifmr import IfmrCalibrator, ifmr
from amct_core.quant.layers import QuantLayer
from amct_core.quant.record import (
    TENSOR_KEY_PREFIX,
    LayerRecord,
    read_record,
    tensor_key,
    write_record,
)

from .fusion import fold_batchnorm
from .graph import OnnxGraph, serialize_within_limit, tensor_elem_types
from .layers import QuantLayerInfo, assign_node_names, find_quant_layers
from .writers.qdq import qdq_calibration_tensors

LOGGER = get_logger("amct_onnx")

#: ``metadata_props`` key of the modified ONNX holding the calibration settings (module doc).
CALIBRATION_METADATA_KEY = "amct_onnx.calibration"
_METADATA_VERSION = 1
#: Protobuf cannot serialize a message of 2 GiB or more; larger models go through a file.
_PROTOBUF_LIMIT = 2 ** 31 - 2 ** 26

__all__ = ["CALIBRATION_METADATA_KEY", "calibrate", "create_quant_config", "load_model",
           "quantize_model"]


# --------------------------------------------------------------------------------------------
# Public API


def create_quant_config(config_file: str | os.PathLike, model_file: str | os.PathLike,
                        skip_layers: Iterable[str] | None = None, batch_num: int = 1,
                        activation_offset: bool = True,
                        config_defination: str | os.PathLike | None = None) -> dict:
    """Write the JSON quantization config of ``model_file`` to ``config_file`` (reference §3.1
    ``create_quant_config``, §3.2 JSON config) and return it.

    Every quantizable layer (§3.5) gets an entry with the default ARQ + IFMR parameters
    (``asymmetric`` = ``activation_offset``); the layers in ``skip_layers`` get
    ``quant_enable: false``. With ``config_defination`` (a ``.cfg`` in protobuf text format,
    §3.2) the config is built from that file and ``skip_layers``, ``batch_num`` and
    ``activation_offset`` are ignored, as in the reference. A skip layer that is not a
    quantizable layer of the model raises :class:`~amct_core.errors.ConfigError` naming the
    model and listing the layers there are.
    """
    model = load_model(model_file)
    layers = [info.layer for info in _quant_layers(model, model_file)]
    if config_defination is not None:
        ignored = [name for name, value, default in
                   (("skip_layers", skip_layers, None), ("batch_num", batch_num, 1),
                    ("activation_offset", activation_offset, True)) if value != default]
        if ignored:
            LOGGER.warning("config_defination is given, so %s ignored; set them in %s.",
                           ", ".join(ignored), os.fspath(config_defination))
        config = build_quant_config_from_cfg(layers, os.fspath(config_defination))
    else:
        skip = _check_skip_layers(skip_layers, layers, model_file)
        config = build_quant_config(layers, skip_layers=skip, batch_num=batch_num,
                                    activation_offset=activation_offset)
    write_quant_config(os.fspath(config_file), config)
    enabled = sum(1 for key, value in config.items()
                  if isinstance(value, dict) and value.get("quant_enable"))
    LOGGER.info("Quantization config written to %s: %d quantizable layer(s), %d enabled.",
                os.fspath(config_file), len(layers), enabled)
    return config


def quantize_model(config_file: str | os.PathLike, model_file: str | os.PathLike,
                   modified_onnx_file: str | os.PathLike,
                   record_file: str | os.PathLike) -> onnx.ModelProto:
    """Prepare ``model_file`` for calibration (reference §3.1 ``quantize_model``) and return
    the modified model.

    Steps: load ``config_file`` and validate it against the model's layers; fold
    BatchNormalization when ``do_fusion`` (except ``skip_fusion_layers``); compute the ARQ
    weight factors of every enabled layer with weights (§3.4) and write a new ``record_file``
    holding them (factors of an earlier run are dropped); write ``modified_onnx_file``, the
    FP32 model whose quantizable nodes are named after their layers, with the calibration
    settings in its metadata (module docstring). Then run :func:`calibrate` with ``batch_num``
    batches.
    """
    model = load_model(model_file)
    infos = _quant_layers(model, model_file)
    config = load_quant_config(os.fspath(config_file), [info.layer for info in infos])
    enabled = config.enabled_layers()
    if config.do_fusion:
        fused = fold_batchnorm(model, config.skip_fusion_layers, in_place=True)
        model = fused.model
        if fused.fused:
            LOGGER.info("Folded %d BatchNormalization node(s).", len(fused.fused))
    by_name = {info.name: info for info in find_quant_layers(model)}

    records: dict[str, LayerRecord] = {}
    settings: dict[str, tuple[str, ActivationQuantParams]] = {}
    dmq: dict[str, float] = {}
    graph = OnnxGraph(model)
    for name, layer_config in enabled.items():
        info = by_name.get(name)
        if info is None:  # cannot happen for a validated config; guard against a fold bug
            raise ConfigError(f"Quantization config '{os.fspath(config_file)}': layer "
                              f"'{name}' is not a quantizable layer of the folded model.")
        records[name] = _layer_record(graph, info, layer_config,
                                      config.fakequant_precision_mode)
        settings[name] = (info.input_name, layer_config.activation)
        if layer_config.dmq_balancer_param is not None:
            reason = _dmq_unsupported(info)
            if reason is None:
                dmq[name] = float(layer_config.dmq_balancer_param)
            else:
                LOGGER.warning("Layer %s: DMQ (dmq_balancer_param) is not applied: %s.", name,
                               reason)
    write_record(os.fspath(record_file), records)
    LOGGER.info("ARQ weight factors of %d layer(s) written to %s.",
                sum(1 for r in records.values() if r.has_weight_factors),
                os.fspath(record_file))

    set_calibration_settings(model, config.batch_num, settings,
                             ActivationQuantParams(asymmetric=bool(config.activation_offset)),
                             dmq=dmq)
    if dmq:
        LOGGER.info("DMQ balancing of %d layer(s): the balance factors are computed from the "
                    "calibration batches.", len(dmq))
    _save_onnx(model, modified_onnx_file)
    LOGGER.info("Modified ONNX model written to %s; calibrate it with %d batch(es).",
                os.fspath(modified_onnx_file), config.batch_num)
    return model


def calibrate(modified_onnx_file: str | os.PathLike, record_file: str | os.PathLike,
              input_batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, LayerRecord]:
    """Run the calibration batches and write the activation factors to ``record_file``
    (reference §3.1: "the caller then runs batch_num forward passes"; §3.4 IFMR / HFMG);
    return the record entries written.

    ``input_batches`` yields ``{input name: numpy array}`` dicts; exactly ``batch_num`` of them
    (stored in the modified model by :func:`quantize_model`) are taken, one log line each. The
    model runs in plain ONNX Runtime (no custom-op library) with the input tensor of every
    enabled layer, and each tensor the QDQ writer asks for (``qdq_calibration_tensors``; record
    key ``tensor:<name>``, default activation parameters), exposed as outputs. Layers reading
    the same tensor with the same parameters share one calibrator. HFMG keeps a fixed-size
    histogram per calibrator; IFMR keeps the values of the batches, as the reference's does.

    Raises :class:`~amct_core.errors.AmctValueError` when a batch does not match the model's
    inputs or fewer than ``batch_num`` batches come; then nothing is written.
    """
    model_file = os.fspath(modified_onnx_file)
    record_file = os.fspath(record_file)
    model = load_model(model_file)
    plan = _calibration_plan(model, model_file)
    # the record quantize_model wrote: it must exist and hold every layer (else it is stale)
    records = read_record(record_file)
    stale = [name for name in plan.layer_names if name not in records]
    if stale:
        raise AmctValueError(
            f"Record file '{record_file}' has no entry for layer(s) {stale} of "
            f"'{model_file}': it was not written by the quantize_model call that wrote this "
            f"model. Pass the record_file given to quantize_model.")

    nothing_written = f"Nothing was written to '{record_file}'."
    transforms: dict[tuple[str, str], Callable[[np.ndarray], np.ndarray]] = {}
    if plan.dmq:
        # DMQ needs the batches twice: once for the per-channel maxima, once to calibrate the
        # balanced inputs (the reference's quantize_preprocess forward, then quantize_model's)
        input_batches = list(itertools.islice(iter(input_batches), plan.batch_num))
        balances = _dmq_balances(model, model_file, plan, input_batches, records,
                                 nothing_written)
        for record_key, key in plan.targets:
            if record_key in balances:
                factors, axis = balances[record_key][:2]
                transforms[key] = functools.partial(balance_activation, factors=factors,
                                                    channel_axis=axis)
    results = _run_calibration(model, model_file, plan, input_batches, nothing_written,
                               transforms)
    if plan.dmq:
        for name, (factors, _axis, scale_w, offset_w) in balances.items():
            records[name].tensor_balance_factor = factors
            records[name].scale_w, records[name].offset_w = scale_w, offset_w
    written: dict[str, LayerRecord] = {}
    for record_key, calibrator_key in plan.targets:
        scale, offset = results[calibrator_key]
        act_type = records[record_key].act_type if record_key in records else "INT8"
        written[record_key] = LayerRecord(
            scale_d=float(np.float32(np.asarray(scale).reshape(-1)[0])),
            offset_d=int(np.asarray(offset).reshape(-1)[0]),
            act_type=act_type, dst_type=act_type)
    for key, record in written.items():  # merge into the entries read above, write once
        if key in records:
            records[key].scale_d, records[key].offset_d = record.scale_d, record.offset_d
        else:
            records[key] = record
    write_record(record_file, records)
    tensor_count = sum(key.startswith(TENSOR_KEY_PREFIX) for key in written)
    LOGGER.info("Activation factors of %d layer(s) and %d extra tensor(s) written to %s.",
                len(written) - tensor_count, tensor_count, record_file)
    return written


def calibrate_tensors(modified_onnx_file: str | os.PathLike,
                      input_batches: Iterable[Mapping[str, np.ndarray]]
                      ) -> dict[str, LayerRecord]:
    """The ``tensor:<name>`` activation factors only (the QDQ writer's extra tensors), from
    ``batch_num`` batches run through ``modified_onnx_file``; nothing is written.

    For a front end that calibrates its layers itself (the PyTorch calibration model) and
    runs its captured calibration inputs through the modified ONNX for these tensors, whose
    settings :func:`set_calibration_settings` stored there.
    """
    model_file = os.fspath(modified_onnx_file)
    model = load_model(model_file)
    plan = _calibration_plan(model, model_file)
    targets = [(key, used) for key, used in plan.targets if key.startswith(TENSOR_KEY_PREFIX)]
    calibrators = {used: plan.calibrators[used] for _, used in targets}
    plan = _Plan(plan.batch_num, plan.layer_names,
                 list(dict.fromkeys(tensor for tensor, _ in calibrators)), calibrators, targets,
                 plan.types)
    if not targets:
        return {}
    results = _run_calibration(model, model_file, plan, input_batches, "")
    return {key: LayerRecord(scale_d=float(np.float32(np.asarray(results[used][0]).reshape(-1)[0])),
                             offset_d=int(np.asarray(results[used][1]).reshape(-1)[0]))
            for key, used in targets}


def set_calibration_settings(model: onnx.ModelProto, batch_num: int,
                             layers: Mapping[str, tuple[str, ActivationQuantParams]],
                             default: ActivationQuantParams,
                             dmq: Mapping[str, float] | None = None) -> None:
    """Store in ``model``'s metadata what calibration needs (module docstring): ``batch_num``,
    each enabled layer's input tensor and activation parameters, the parameters of the QDQ
    writer's extra tensors, and the DMQ migration strength of the layers balanced by
    :func:`calibrate`."""
    metadata = {"version": _METADATA_VERSION, "batch_num": int(batch_num),
                "layers": {name: {"tensor": tensor, **_calibrator_setting(params)}
                           for name, (tensor, params) in layers.items()},
                "default": _calibrator_setting(default)}
    if dmq:
        metadata["dmq"] = {name: float(strength) for name, strength in dmq.items()}
    _set_metadata(model, CALIBRATION_METADATA_KEY, json.dumps(metadata))


def _run_calibration(model: onnx.ModelProto, model_file: str, plan: _Plan,
                     input_batches: Iterable[Mapping[str, np.ndarray]],
                     nothing_written: str,
                     transforms: Mapping[tuple[str, str], Callable] | None = None) -> dict:
    """Run ``batch_num`` batches with the plan's tensors exposed as outputs, feed the
    calibrators and return their results by calibrator key."""
    graph = OnnxGraph(model)
    input_names = list(graph.graph_inputs)
    constants = {tensor: value for tensor in plan.tensors
                 if tensor not in input_names
                 and (value := graph.constant_value(tensor)) is not None}
    fetched = [tensor for tensor in plan.tensors
               if tensor not in input_names and tensor not in constants]
    session = _session_with_outputs(model, fetched, plan.types)
    calibrators = {key: _make_calibrator(setting) for key, setting in plan.calibrators.items()}

    batch_num = plan.batch_num
    iterator = iter(input_batches)
    done = 0
    while done < batch_num:
        try:
            batch = next(iterator)
        except StopIteration:
            break
        feeds = _check_feeds(batch, input_names, done, batch_num, model_file)
        try:
            values = session.run(fetched, feeds) if fetched else []
        except Exception as error:  # onnxruntime raises its own exception types
            raise AmctValueError(
                f"Calibration batch {done + 1}/{batch_num} does not run through "
                f"'{model_file}': {error}. Check the shapes and dtypes of the inputs."
            ) from None
        tensors = dict(zip(fetched, values, strict=True))
        tensors.update(constants)
        # the caller may reuse its input buffers: keep copies of the inputs IFMR accumulates
        tensors.update((name, np.array(value, dtype=np.float32))
                       for name, value in feeds.items() if name in plan.tensors)
        for key, calibrator in calibrators.items():
            value = tensors[key[0]]
            if transforms and key in transforms:
                value = transforms[key](value)
            calibrator.update(value)
        del tensors, values
        done += 1
        # calibrate_tensors replays batches a front end has already reported (nothing_written
        # is empty there): its progress goes to the debug level.
        LOGGER.log(logging.INFO if nothing_written else logging.DEBUG,
                   "Calibration batch %d/%d done.", done, batch_num)
    if done < batch_num:
        raise AmctValueError(
            f"Calibration got {done} batch(es), but '{model_file}' was made for "
            f"batch_num={batch_num}. Provide {batch_num} batches, or lower batch_num in the "
            f"config and run quantize_model again. {nothing_written}".rstrip())

    LOGGER.info("Searching the activation factors (%d calibrator(s)).", len(calibrators))
    return _results(calibrators, plan, model_file)


# --------------------------------------------------------------------------------------------
# Model files


def load_model(model_file: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model for quantization: name its nodes and treat initializers listed as
    graph inputs as constants (module docstring). Raises
    :class:`~amct_core.errors.AmctFileNotFoundError` / :class:`~amct_core.errors.AmctValueError`
    naming the file."""
    path = os.fspath(model_file)
    if not os.path.isfile(path):
        raise AmctFileNotFoundError(f"ONNX model '{path}' does not exist. Pass the path of an "
                                    f".onnx file.")
    try:
        model = onnx.load(path)
    except Exception as error:  # onnx raises DecodeError, ValueError, OSError ...
        raise AmctValueError(f"'{path}' is not an ONNX model ({type(error).__name__}: "
                             f"{error}). Pass an .onnx file.") from None
    if not model.HasField("graph") or not model.graph.node:
        raise AmctValueError(f"'{path}' is not an ONNX model (it has no graph nodes). Pass an "
                             f".onnx file.")
    assign_node_names(model)
    _initializers_out_of_inputs(model)
    return model


def _initializers_out_of_inputs(model: onnx.ModelProto) -> None:
    graph = model.graph
    constants = {tensor.name for tensor in graph.initializer}
    kept = [value for value in graph.input if value.name not in constants]
    if len(kept) == len(graph.input):
        return
    del graph.input[:]
    graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 4)


def _save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> str:
    """Write ``model`` atomically; a model over the protobuf limit keeps its tensors in
    ``<file>.data`` next to it."""
    path = os.fspath(path)
    data = serialize_within_limit(model, _PROTOBUF_LIMIT)
    if data is not None:
        return write_atomically(path, data)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data")
    return path


def _quant_layers(model: onnx.ModelProto, model_file) -> list[QuantLayerInfo]:
    infos = find_quant_layers(model)
    if not infos:
        LOGGER.warning("'%s' has no quantizable layer (Conv, ConvTranspose, Gemm, MatMul with "
                       "a constant weight, AveragePool).", os.fspath(model_file))
    return infos


def _check_skip_layers(skip_layers, layers: list[QuantLayer], model_file) -> list[str]:
    if skip_layers is None:
        return []
    skip = [skip_layers] if isinstance(skip_layers, str) else list(skip_layers)
    names = [layer.name for layer in layers]
    unknown = [name for name in skip if name not in names]
    if unknown:
        shown = ", ".join(repr(name) for name in names[:20])
        more = f" ... ({len(names)} in all)" if len(names) > 20 else ""
        raise ConfigError(
            f"skip_layers: {', '.join(repr(name) for name in unknown)} is not a quantizable "
            f"layer of '{os.fspath(model_file)}'. Quantizable layers: {shown or '(none)'}"
            f"{more}. Correct or remove the name.")
    return skip


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


# --------------------------------------------------------------------------------------------
# Weights (ARQ, reference §3.4)


def _layer_record(graph: OnnxGraph, info: QuantLayerInfo, layer_config: LayerQuantConfig,
                  precision_mode: str) -> LayerRecord:
    """The record entry ``quantize_model`` writes: types, and the ARQ weight factors."""
    act_type = _type_name(layer_config.activation.num_bits)
    record = LayerRecord(act_type=act_type, dst_type=act_type,
                         fakequant_precision_mode=precision_mode)
    if info.weight_name is None:
        return record
    params = layer_config.weight
    num_bits = params.num_bits if params is not None else 8
    channel_wise = params.channel_wise if params is not None else info.kind != "linear"
    scale, offset = arq_weight(graph.initializer_array(info.weight_name), num_bits=num_bits,
                               channel_wise=channel_wise, axis=info.channel_axis)
    record.scale_w = np.asarray(scale, dtype=np.float32).reshape(-1)
    record.offset_w = np.asarray(offset, dtype=np.int64).reshape(-1)
    record.wts_type = "INT8" if num_bits <= 8 else _type_name(num_bits)  # INT6/7 stored in INT8
    return record


def _type_name(num_bits: int) -> str:
    return f"INT{int(num_bits)}"


# --------------------------------------------------------------------------------------------
# DMQ (reference §3.4)


def _activation_channel_axis(info: QuantLayerInfo) -> int:
    """The channel axis of a layer's input: 1 for convolutions (NC...), the last axis for
    MatMul and Gemm (0 for Gemm with transA)."""
    if info.op_type == "Gemm":
        trans_a = next((a.i for a in info.node.attribute if a.name == "transA"), 0)
        return 0 if trans_a else 1
    return -1 if info.op_type == "MatMul" else 1


def _dmq_unsupported(info: QuantLayerInfo) -> str | None:
    """Why DMQ cannot balance a layer, or None (the writers balance ungrouped layers with a
    weight, reference §3.4)."""
    if info.weight_name is None:
        return "it has no weight"
    if info.group != 1:
        return f"it is a grouped convolution (group {info.group})"
    return None


def _core_layout(info: QuantLayerInfo, weight: np.ndarray) -> tuple[np.ndarray, str]:
    """The weight in the layout of :mod:`amct_core.quant.dmq` (PyTorch's), and its kind: a
    linear weight is (out, in), so Gemm without transB and MatMul weights are transposed."""
    if info.kind == "linear" and info.channel_axis != 0:
        return weight.T, "linear"
    return weight, info.kind


def _dmq_balances(model: onnx.ModelProto, model_file: str, plan: _Plan,
                  batches: list, records: Mapping[str, LayerRecord],
                  nothing_written: str) -> dict[str, tuple]:
    """``{layer: (s, activation channel axis, scale_w, offset_w)}``: the DMQ balance factors
    ``s_j = max|X_j|^α / max|W_j|^(1-α)`` from the per-channel maxima of the layers' inputs
    over the calibration batches, and the ARQ factors of the balanced weights ``W·s``."""
    infos = {info.name: info for info in find_quant_layers(model)}
    graph = OnnxGraph(model)
    tensors = {name: infos[name].input_name for name in plan.dmq}
    input_names = list(graph.graph_inputs)
    fetched = list(dict.fromkeys(t for t in tensors.values() if t not in input_names))
    session = _session_with_outputs(model, fetched, plan.types)
    maxima: dict[str, np.ndarray] = {}
    if len(batches) < plan.batch_num:
        raise AmctValueError(
            f"Calibration got {len(batches)} batch(es), but '{model_file}' was made for "
            f"batch_num={plan.batch_num}. {nothing_written}")
    for index, batch in enumerate(batches):
        feeds = _check_feeds(batch, input_names, index, plan.batch_num, model_file)
        values = dict(zip(fetched, session.run(fetched, feeds) if fetched else [],
                          strict=True))
        values.update(feeds)
        for name, tensor in tensors.items():
            data = np.abs(np.asarray(values[tensor], dtype=np.float32))
            axis = _activation_channel_axis(infos[name]) % data.ndim
            batch_max = data.max(axis=tuple(i for i in range(data.ndim) if i != axis))
            maxima[name] = batch_max if name not in maxima else np.maximum(maxima[name],
                                                                           batch_max)
    balances = {}
    for name, strength in plan.dmq.items():
        info = infos[name]
        weight = graph.initializer_array(info.weight_name).astype(np.float32)
        core_weight, kind = _core_layout(info, weight)
        factors = dmq_balance_factors(maxima[name], weight_in_channel_abs_max(core_weight, kind),
                                      strength)
        balanced = apply_balance(core_weight, factors, kind)
        if balanced.shape != weight.shape:
            balanced = balanced.T
        record = records[name]
        channel_wise = np.asarray(record.scale_w).size > 1
        scale_w, offset_w = arq_weight(balanced, record.num_bits_w, channel_wise,
                                       axis=info.channel_axis)
        balances[name] = (factors, _activation_channel_axis(info),
                          np.asarray(scale_w, np.float32).reshape(-1),
                          np.asarray(offset_w, np.int64).reshape(-1))
    LOGGER.info("DMQ balance factors of %d layer(s) computed from %d batch(es).", len(balances),
                len(batches))
    return balances


# --------------------------------------------------------------------------------------------
# Calibration


def _calibrator_setting(params: ActivationQuantParams) -> dict:
    kwargs = params.calibrator_kwargs()
    if "search_range" in kwargs:
        kwargs["search_range"] = [float(value) for value in kwargs["search_range"]]
    return {"act_algo": params.act_algo, "kwargs": kwargs}


@dataclass
class _IfmrAccumulator:
    """IFMR over batches (reference §3.4 step 1: accumulate ``batch_num`` batches): keeps the
    batches as they come (no copy: ONNX Runtime returns fresh arrays, and calibrators of one
    tensor share them) and runs :func:`amct_core.quant.ifmr.ifmr` once on their
    concatenation, which is what ``IfmrCalibrator`` computes."""

    kwargs: dict
    parts: list[np.ndarray] = field(default_factory=list)

    def update(self, batch: np.ndarray) -> None:
        self.parts.append(np.asarray(batch, dtype=np.float32).reshape(-1))

    def result(self) -> tuple[float, int]:
        data = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)
        self.parts = []
        return ifmr(data, **self.kwargs)


def _make_calibrator(setting: dict) -> _IfmrAccumulator | HfmgCalibrator:
    """An IFMR accumulator or an ``HfmgCalibrator`` (reference §3.4) from a stored setting;
    HFMG merges each batch into a fixed-size histogram, so its memory is bounded."""
    kwargs = dict(setting["kwargs"])
    if setting["act_algo"] == "hfmg":
        return HfmgCalibrator(**kwargs)
    if "search_range" in kwargs:
        kwargs["search_range"] = tuple(kwargs["search_range"])
    IfmrCalibrator(**kwargs)  # checks the parameters before any batch runs
    return _IfmrAccumulator(kwargs)


def _results(calibrators: dict, plan: _Plan, model_file: str) -> dict:
    """``result()`` of every calibrator, one after the other (each IFMR accumulator drops its
    batches once searched, so at most one concatenation is alive); an error names the record
    keys that use the calibrator."""
    results = {}
    for key, calibrator in calibrators.items():
        try:
            results[key] = calibrator.result()
        except AmctError as error:
            users = [record_key for record_key, used in plan.targets if used == key]
            raise type(error)(f"Calibration of {', '.join(users)} (tensor '{key[0]}' of "
                              f"'{model_file}') failed: {error}") from None
    return results


@dataclass
class _Plan:
    """What :func:`calibrate` computes: ``calibrators`` by (tensor, settings JSON); ``targets``
    pairs each record key with its calibrator; ``types``: the model's ``tensor_elem_types``."""

    batch_num: int
    layer_names: list[str]
    tensors: list[str]
    calibrators: dict[tuple[str, str], dict]
    targets: list[tuple[str, tuple[str, str]]]
    types: dict[str, int]
    #: layer -> DMQ migration strength, for the layers :func:`calibrate` balances
    dmq: dict[str, float] = field(default_factory=dict)


def _calibration_plan(model: onnx.ModelProto, model_file: str) -> _Plan:
    text = next((prop.value for prop in model.metadata_props
                 if prop.key == CALIBRATION_METADATA_KEY), None)
    if text is None:
        raise AmctValueError(
            f"'{model_file}' holds no calibration settings (metadata "
            f"'{CALIBRATION_METADATA_KEY}'): it is not a modified ONNX model written by "
            f"quantize_model. Run quantize_model and calibrate the model it writes.")
    try:
        metadata = json.loads(text)
        batch_num = int(metadata["batch_num"])
        layers = {str(name): (str(setting["tensor"]),
                              {"act_algo": setting["act_algo"], "kwargs": setting["kwargs"]})
                  for name, setting in metadata["layers"].items()}
        default = {"act_algo": metadata["default"]["act_algo"],
                   "kwargs": metadata["default"]["kwargs"]}
        dmq = {str(name): float(strength)
               for name, strength in metadata.get("dmq", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise AmctValueError(
            f"'{model_file}': the calibration settings (metadata "
            f"'{CALIBRATION_METADATA_KEY}') are damaged ({type(error).__name__}: {error}). "
            f"Run quantize_model again.") from None
    if batch_num < 1:
        raise AmctValueError(f"'{model_file}': batch_num is {batch_num} in the calibration "
                             f"settings; it must be at least 1. Run quantize_model again.")
    calibrators: dict[tuple[str, str], dict] = {}
    targets: list[tuple[str, tuple[str, str]]] = []

    def add(record_key: str, tensor: str, setting: dict) -> None:
        key = (tensor, json.dumps(setting, sort_keys=True))
        if record_key in dmq:  # its calibrator sees its own balanced input: not shared
            key = (tensor, f"{key[1]} dmq:{record_key}")
        calibrators.setdefault(key, setting)
        targets.append((record_key, key))

    for name, (tensor, setting) in layers.items():
        add(name, tensor, setting)
    types = tensor_elem_types(model)  # once, for the plan and the calibration outputs
    for tensor in qdq_calibration_tensors(model, list(layers), types):
        add(tensor_key(tensor), tensor, default)
    tensors = list(dict.fromkeys(tensor for tensor, _ in calibrators))
    unknown = [name for name in dmq if name not in layers]
    if unknown:
        raise AmctValueError(f"'{model_file}': the calibration settings balance layer(s) "
                             f"{unknown} that are not calibrated. Run quantize_model again.")
    return _Plan(batch_num, list(layers), tensors, calibrators, targets, types, dmq)


def _session_with_outputs(model: onnx.ModelProto, tensors: list[str],
                          types: dict[str, int]) -> ort.InferenceSession:
    """A session of ``model`` that also outputs ``tensors`` (typed by ``types``, the model's
    ``tensor_elem_types``, else FLOAT). The outputs are added to ``model`` for the session
    and removed again, so the model is not copied."""
    outputs = model.graph.output
    count = len(outputs)
    present = {value.name for value in outputs}
    for tensor in tensors:
        if tensor not in present:
            outputs.append(onnx.helper.make_tensor_value_info(
                tensor, types.get(tensor, onnx.TensorProto.FLOAT), None))
    try:
        return _session(model)
    finally:
        del outputs[count:]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    data = serialize_within_limit(model, _PROTOBUF_LIMIT)
    if data is not None:
        return ort.InferenceSession(data, options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="amct_onnx_") as folder:
        path = os.path.join(folder, "calibration.onnx")
        _save_onnx(model, path)
        return ort.InferenceSession(path, options, providers=providers)


def _check_feeds(batch, expected: list[str], index: int, batch_num: int,
                 model_file: str) -> dict[str, np.ndarray]:
    where = f"Calibration batch {index + 1}/{batch_num}"
    if not isinstance(batch, Mapping):
        raise AmctValueError(
            f"{where} is a {type(batch).__name__}; each batch must be a dict {{input name: "
            f"numpy array}} with the inputs of '{model_file}': {expected}.")
    missing = [name for name in expected if name not in batch]
    unknown = [name for name in batch if name not in expected]
    if missing or unknown:
        problems = ([f"missing {missing}"] if missing else []) + (
            [f"unknown {unknown}"] if unknown else [])
        raise AmctValueError(f"{where}: {' and '.join(problems)}; the inputs of "
                             f"'{model_file}' are {expected}.")
    return {name: np.asarray(batch[name]) for name in expected}
