"""Graph-based quantization-aware training of a torch model (reference §3.1 QAT, seed 量化感知训练).

1. :func:`create_quant_retrain_config` exports the model to ONNX, finds the layers QAT handles
   (Conv2d, Conv3d, ConvTranspose2d, Linear) and writes the JSON config (or builds it from a
   retrain ``.cfg``); a layer whose input comes from a ReLU gets ``fixed_min``.
2. :func:`create_quant_retrain_model` replaces each enabled layer *of the model passed in* by
   its single-op QAT module (:mod:`amct_pytorch.nn.module.quantization`: ULQ on the input, ARQ
   or ULQ retrain on the weight) and returns the model. Create the optimizer afterwards.
3. The user trains. The ULQ clips are initialised by IFMR over the first ``batch_num`` training
   batches (under DistributedDataParallel they are averaged across ranks), then learned.
4. The first eval-mode forward after training writes the quantization factors of every layer
   to the record file (again after each later stretch of training).
5. :func:`save_quant_retrain_model` folds Conv+BN of the float model the QAT layers hold, takes
   the activation factors from the record and the weight factors of the (folded) weights, and
   writes the fake-quant, deploy and QDQ ONNX models (``amct_onnx``).

After an interruption, :func:`restore_quant_retrain_model` rebuilds the QAT model from the
original model and loads a checkpoint saved during training (clips and their initialised state
included), so training continues where it stopped.
"""
from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from amct_core.atomic_file import write_atomically
from amct_core.errors import (
    AmctFileNotFoundError,
    AmctTypeError,
    AmctValueError,
    QuantizationError,
    RecordFileError,
)
from amct_core.logger import get_logger
from amct_core.quant.arq import arq_weight
from amct_core.quant.config import ActivationQuantParams
from amct_core.quant.record import LayerRecord, read_record, write_record
from amct_core.quant.retrain_config import (
    build_retrain_config,
    build_retrain_config_from_cfg,
    load_retrain_config,
    retrain_layers,
    write_retrain_config,
)
from amct_onnx.calibration import set_calibration_settings
from amct_onnx.graph import OnnxGraph
from amct_onnx.layers import find_quant_layers
from amct_onnx.save import save_model as _save_onnx_models
from amct_pytorch.module_tree import replace_submodule
from amct_pytorch.nn.module.quantization.conv2d import Conv2dQAT
from amct_pytorch.nn.module.quantization.conv3d import Conv3dQAT
from amct_pytorch.nn.module.quantization.conv_transpose_2d import ConvTranspose2dQAT
from amct_pytorch.nn.module.quantization.linear import LinearQAT
from amct_pytorch.ptq.bn_fusion import fuse_conv_bn
from amct_pytorch.ptq.calibration_model import weight_axis
from amct_pytorch.ptq.onnx_graph import TracedGraph, as_input_tuple, trace
from amct_pytorch.ptq.quantize_tool import _graph_input_names, _modified_onnx, _tensor_factors

LOGGER = get_logger("amct_pytorch")

#: torch layer class -> its single-op QAT module (exact classes: a subclass may override
#: ``forward``, which the QAT module would lose).
QAT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: Conv2dQAT, nn.Conv3d: Conv3dQAT, nn.ConvTranspose2d: ConvTranspose2dQAT,
    nn.Linear: LinearQAT}
_QAT_TYPES = tuple(QAT_MODULES.values())
#: ops through which a non-negative tensor stays non-negative (for fixed_min after a ReLU)
_SIGN_PRESERVING = ("MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape",
                    "Identity", "Transpose", "Squeeze", "Unsqueeze")


def _check_model(model: object, api: str) -> nn.Module:
    if isinstance(model, nn.DataParallel):
        raise AmctTypeError(f"{api}: DataParallel is not supported by quantization-aware "
                            f"training; train with DistributedDataParallel (one process per "
                            f"device), and pass the model before wrapping it.")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise AmctTypeError(f"{api}: pass the model itself, not the DistributedDataParallel "
                            f"wrapper; wrap the model this function returns.")
    if not isinstance(model, nn.Module):
        raise AmctTypeError(f"{api}: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
    return model


def _after_relu(traced: TracedGraph) -> set[str]:
    """Layers whose data input is the output of a ReLU (maybe through max-pooling or
    reshaping): non-negative, so ULQ holds clip_min at 0 (reference §3.4 ``fixed_min``)."""
    view = OnnxGraph(traced.model)
    found = set()
    for name, index in traced.layer_nodes.items():
        tensor = traced.model.graph.node[index].input[0]
        for _ in range(8):
            producer = view.producer(tensor)
            if producer is None:
                break
            if producer.op_type == "Relu":
                found.add(name)
                break
            if producer.op_type not in _SIGN_PRESERVING:
                break
            tensor = producer.input[0]
    return found


def _log_skipped(traced: TracedGraph) -> None:
    for name, reason in traced.skipped.items():
        LOGGER.info("Layer %s is not retrained: %s.", name, reason)


def create_quant_retrain_config(config_file: str | os.PathLike, model: nn.Module,
                                input_data: object,
                                config_defination: str | os.PathLike | None = None) -> None:
    """Write the QAT JSON config of ``model`` to ``config_file`` (reference §3.1, §3.2).

    Every Conv2d, Conv3d, ConvTranspose2d and Linear layer gets ULQ activations and 8-bit
    ARQ-retrain weights (channel-wise except Linear); with ``config_defination`` (a retrain
    ``.cfg``) the config comes from that file.
    """
    _check_model(model, "create_quant_retrain_config")
    traced = trace(model, input_data)
    _log_skipped(traced)
    relu = _after_relu(traced)
    if config_defination is not None:
        config = build_retrain_config_from_cfg(traced.layers, os.fspath(config_defination),
                                               after_relu=relu)
    else:
        config = build_retrain_config(traced.layers, after_relu=relu)
    write_retrain_config(config_file, config)
    LOGGER.info("Create quant retrain config file %s success.", os.fspath(config_file))


class RetrainSession:
    """Writes the record on the first eval-mode forward after training (reference §3.1).

    Registered as forward pre- and post-hooks of the retrain model's root module.
    """

    def __init__(self, record_file: str, layers: Mapping[str, nn.Module]) -> None:
        self.record_file = record_file
        self.layers = dict(layers)
        self.trained = True  # the first eval forward writes whatever exists
        self.warned = False

    def before_forward(self, module: nn.Module, _inputs: Any) -> None:
        if module.training:
            self.trained = True

    def after_forward(self, module: nn.Module, _inputs: Any, _output: Any) -> None:
        if module.training or not self.trained:
            return
        pending = [name for name, layer in self.layers.items() if not _initialised(layer)]
        if pending:
            if not self.warned:
                LOGGER.warning("Quant factors not written to %s yet: layer(s) %s have no "
                               "factors; train at least batch_num step(s) first.",
                               self.record_file, ", ".join(pending[:5]))
                self.warned = True
            return
        self.write()
        self.trained = False

    def records(self) -> dict[str, LayerRecord]:
        return {name: _layer_record(name, layer) for name, layer in self.layers.items()}

    def write(self) -> None:
        write_record(self.record_file, self.records())
        LOGGER.info("Write the quant factors of %d layer(s) to record file %s.",
                    len(self.layers), self.record_file)


def _initialised(layer: nn.Module) -> bool:
    try:
        layer.quant_factors()
    except QuantizationError:
        return False
    return True


def _layer_record(name: str, layer: nn.Module) -> LayerRecord:
    factors = layer.quant_factors()
    return LayerRecord(scale_d=float(factors.scale_d), offset_d=int(factors.offset_d),
                       scale_w=np.asarray(factors.scale_w, np.float32).reshape(-1),
                       offset_w=np.asarray(factors.offset_w, np.int64).reshape(-1),
                       act_type=f"INT{factors.act_bits}", wts_type=f"INT{factors.wts_bits}")


def create_quant_retrain_model(config_file: str | os.PathLike, model: nn.Module,
                               record_file: str | os.PathLike, input_data: object) -> nn.Module:
    """Replace the enabled layers of ``model`` by their QAT modules, in place, and return it
    (reference §3.1 ``create_quant_retrain_model``). Build the optimizer from the returned
    model. ``record_file`` receives the factors on the first eval-mode forward after training.
    """
    _check_model(model, "create_quant_retrain_model")
    if record_file is None:
        raise AmctValueError("create_quant_retrain_model: record_file is required.")
    if any(isinstance(module, _QAT_TYPES) for module in model.modules()):
        raise AmctValueError("create_quant_retrain_model: the model already holds QAT modules "
                             "(it was returned by create_quant_retrain_model). Pass the "
                             "original float model.")
    traced = trace(model, input_data)
    _log_skipped(traced)
    config = load_retrain_config(config_file, retrain_layers(traced.layers))
    replaced: dict[str, nn.Module] = {}
    for name, layer_config in config.enabled_layers().items():
        module = model.get_submodule(name)
        qat_class = QAT_MODULES.get(type(module))
        if qat_class is None:
            LOGGER.warning("Layer %s is not retrained: %s is a subclass of a torch layer, "
                           "whose forward the QAT module would replace.", name,
                           type(module).__name__)
            continue
        qat = qat_class.from_float(module,
                                   config=layer_config.single_op_config(config.batch_num))
        qat.train(module.training)
        for part, quantizer in (("activation", qat.act_quantizer),
                                ("weight", qat.wts_quantizer)):
            if quantizer is not None:  # messages name the layer, not only its class
                quantizer.name = f"layer {name} ({type(qat).__name__}) {part} quantizer"
        replace_submodule(model, name, qat)
        replaced[name] = qat
    if not replaced:
        LOGGER.warning("create_quant_retrain_model: no layer is enabled in %s; the model is "
                       "returned unchanged.", os.fspath(config_file))
    session = RetrainSession(os.fspath(record_file), replaced)
    _remove_sessions(model)
    model.register_forward_pre_hook(session.before_forward)
    model.register_forward_hook(session.after_forward)
    LOGGER.info("Create quant retrain model success: %d layer(s) retrained (batch_num %d).",
                len(replaced), config.batch_num)
    return model


def _remove_sessions(model: nn.Module) -> None:
    """Drop the record-writing hooks a :class:`RetrainSession` put on ``model``."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, hook in list(hooks.items()):
            if isinstance(getattr(hook, "__self__", None), RetrainSession):
                del hooks[key]


def restore_quant_retrain_model(config_file: str | os.PathLike, model: nn.Module,
                                record_file: str | os.PathLike, input_data: object,
                                pth_file: str | os.PathLike,
                                state_dict_name: str | None = None) -> nn.Module:
    """:func:`create_quant_retrain_model`, then load the checkpoint ``pth_file`` saved while
    training (``torch.save(model.state_dict())``, or a dict holding it under
    ``state_dict_name``), so training resumes with the learned clips (reference §3.1).

    The checkpoint is read with ``torch.load(weights_only=True)``; keys saved from a
    DistributedDataParallel wrapper (``module.`` prefix) are accepted.
    """
    path = os.fspath(pth_file)
    if not os.path.isfile(path):
        raise AmctFileNotFoundError(f"restore_quant_retrain_model: pth_file {path!r} does not "
                                    f"exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise AmctValueError(f"restore_quant_retrain_model: cannot read pth_file {path!r} as a "
                             f"weights-only torch checkpoint ({type(error).__name__}: {error})."
                             ) from None
    state = checkpoint
    if state_dict_name is not None:
        if not isinstance(checkpoint, Mapping) or state_dict_name not in checkpoint:
            keys = list(checkpoint)[:10] if isinstance(checkpoint, Mapping) else []
            raise AmctValueError(f"restore_quant_retrain_model: pth_file {path!r} has no entry "
                                 f"{state_dict_name!r} (state_dict_name); its keys: {keys}.")
        state = checkpoint[state_dict_name]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise AmctValueError(f"restore_quant_retrain_model: pth_file {path!r} does not hold a "
                             f"state dict{'' if state_dict_name else ' at its top level'}; "
                             f"pass state_dict_name to pick the entry that holds it.")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    model = create_quant_retrain_model(config_file, model, record_file, input_data)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise AmctValueError(
            f"restore_quant_retrain_model: pth_file {path!r} does not match the retrain model "
            f"built from {os.fspath(config_file)!r}: missing keys "
            f"{result.missing_keys[:10]}, unexpected keys {result.unexpected_keys[:10]}. Save "
            f"the checkpoint from the model create_quant_retrain_model returned, with the same "
            f"config.")
    LOGGER.info("Restore quant retrain model from %s success.", path)
    return model


def _float_module(qat: nn.Module) -> nn.Module:
    """The torch layer a QAT module wraps, with the same weight and bias (float)."""
    weight = qat.weight.detach()
    common = {"device": weight.device, "dtype": weight.dtype}
    has_bias = qat.bias is not None
    if isinstance(qat, nn.Linear):
        layer = nn.Linear(qat.in_features, qat.out_features, bias=has_bias, **common)
    elif isinstance(qat, nn.ConvTranspose2d):
        layer = nn.ConvTranspose2d(qat.in_channels, qat.out_channels, qat.kernel_size,
                                   stride=qat.stride, padding=qat.padding,
                                   output_padding=qat.output_padding, groups=qat.groups,
                                   bias=has_bias, dilation=qat.dilation,
                                   padding_mode=qat.padding_mode, **common)
    else:
        base = nn.Conv3d if isinstance(qat, nn.Conv3d) else nn.Conv2d
        layer = base(qat.in_channels, qat.out_channels, qat.kernel_size, stride=qat.stride,
                     padding=qat.padding, dilation=qat.dilation, groups=qat.groups,
                     bias=has_bias, padding_mode=qat.padding_mode, **common)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if has_bias:
            layer.bias.copy_(qat.bias.detach())
    return layer.train(qat.training)


def save_quant_retrain_model(config_file: str | os.PathLike, model: nn.Module,
                             record_file: str | os.PathLike, save_path: str | os.PathLike,
                             input_data: object, input_names=None, output_names=None,
                             dynamic_axes=None) -> None:
    """Write ``<save_path>_fake_quant_model.onnx``, ``<save_path>_deploy_model.onnx`` and
    ``<save_path>_qdq_model.onnx`` of a trained QAT model (reference §3.1
    ``save_quant_retrain_model``).

    The activation factors come from ``record_file`` (written by the first eval-mode forward
    after training). The float layers are rebuilt from the QAT modules, Conv+BN pairs are
    folded, and the weight factors are those of the folded weights (with channel-wise
    weights folding does not change the integer weights); the record is rewritten with them,
    so it matches the saved models. The model passed in is not changed.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    _check_model(model, "save_quant_retrain_model")
    qat_layers = {name: module for name, module in model.named_modules()
                  if isinstance(module, _QAT_TYPES)}
    if not qat_layers:
        raise AmctValueError("save_quant_retrain_model: the model holds no QAT layer; pass the "
                             "model create_quant_retrain_model (or restore_quant_retrain_model) "
                             "returned.")
    record_path = os.fspath(record_file)
    if not os.path.isfile(record_path):
        raise AmctFileNotFoundError(
            f"save_quant_retrain_model: record file {record_path!r} does not exist. Run one "
            f"eval-mode forward of the retrain model after training: it writes the factors.")
    records = read_record(record_path)
    missing = [name for name in qat_layers if name not in records
               or not records[name].has_data_factors]
    if missing:
        raise RecordFileError(
            f"save_quant_retrain_model: record file {record_path!r} has no activation factors "
            f"for layer(s) {missing[:10]}. Run one eval-mode forward of the retrain model after "
            f"training (at least batch_num steps) before saving.")
    _warn_if_stale(qat_layers, records, record_path)

    float_model = copy.deepcopy(model)
    _remove_sessions(float_model)
    for name in qat_layers:
        replace_submodule(float_model, name, _float_module(float_model.get_submodule(name)))
    float_model.eval()
    traced = trace(float_model, input_data, input_names, output_names, dynamic_axes)
    config = load_retrain_config(config_file)
    pairs = [(conv, bn) for conv, bn in traced.bn_pairs if conv in qat_layers]
    if pairs:
        fuse_conv_bn(float_model, pairs)
        traced = trace(float_model, input_data, input_names, output_names, dynamic_axes)
    known = {layer.name for layer in traced.layers}
    lost = [name for name in qat_layers if name not in known]
    if lost:
        raise QuantizationError(f"save_quant_retrain_model: layer(s) {lost[:10]} are not "
                                f"quantizable layers of the exported model "
                                f"({[traced.skipped.get(n, 'not found') for n in lost[:10]]}).")
    final = {}
    for name in qat_layers:
        module = float_model.get_submodule(name)
        layer_config = config.layers.get(name)
        channel_wise = (layer_config.weight.channel_wise if layer_config is not None
                        else np.asarray(records[name].scale_w).size > 1)
        record = records[name]
        weight = module.weight.detach().cpu().float().numpy()
        bits = record.num_bits_w
        record.scale_w, record.offset_w = arq_weight(weight, bits, channel_wise,
                                                     axis=weight_axis(module))
        final[name] = record
    extra = {key: value for key, value in records.items() if key not in qat_layers}
    modified = _modified_onnx(traced, list(qat_layers))
    inputs_of = {info.name: info.input_name for info in find_quant_layers(modified)}
    set_calibration_settings(
        modified, 1, {name: (inputs_of[name], ActivationQuantParams(num_bits=record.num_bits_d))
                      for name, record in final.items()}, ActivationQuantParams())
    with tempfile.TemporaryDirectory(prefix="amct_retrain_") as folder:
        onnx_file = os.path.join(folder, "modified.onnx")
        write_atomically(onnx_file, modified.SerializeToString())
        # Factors of the tensors between layers, for the QDQ model only (input_data).
        tensors = _tensor_factors(onnx_file, _graph_input_names(modified),
                                  [_numpy_batch(input_data)])
        write_record(record_path, {**extra, **tensors, **final})
        _save_onnx_models(onnx_file, record_path, save_path)
    LOGGER.info("save_quant_retrain_model: %d layer(s) quantized, %d Conv+BN pair(s) folded.",
                len(final), len(pairs))


def _numpy_batch(input_data: object) -> tuple:
    return tuple(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
                 for value in as_input_tuple(input_data))


def _warn_if_stale(layers: Mapping[str, nn.Module], records: Mapping[str, LayerRecord],
                   record_path: str) -> None:
    for name, layer in layers.items():
        try:
            factors = layer.quant_factors()
        except QuantizationError:
            continue
        record = records[name]
        if not np.isclose(np.float32(factors.scale_d), np.float32(record.scale_d),
                          rtol=1e-6) or int(factors.offset_d) != int(record.offset_d):
            LOGGER.warning("Record file %s holds factors of layer %s that differ from the "
                           "model's current clips (trained after the last eval-mode forward?); "
                           "the record's are used. Run one eval-mode forward before saving to "
                           "use the current ones.", record_path, name)
            return
