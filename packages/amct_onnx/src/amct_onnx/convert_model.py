"""``convert_qat_model``: the fake-quant and deploy models of a QDQ ONNX model (reference §4,
``convert_qat_model``; record §3.3).

A QDQ model (QuantizeLinear / DequantizeLinear around float ops, as torch exports a QAT model
or ``onnxruntime.quantization.quantize_static`` writes one) is read by
:mod:`amct_onnx.qdq_import` into a float model plus a record, and the writers of
``save_model`` produce:

* ``<prefix>_fake_quant_model.onnx``: standard ops, runs in ONNX Runtime and computes what the
  QDQ model computes. Each layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight)
  reads ``clip(round(x * (1/scale_d)) + offset_d, -128, 127) - offset_d`` and integer
  weights ``W_int - offset_w`` (the source integers), adds the bias ``round(b / (scale_w *
  scale_d))`` (the source INT32 bias when it has that scale) and multiplies by
  ``deq_scale = scale_w * scale_d``; every other quantized activation reads the same chain
  followed by ``Mul(scale_d)``;
* ``<prefix>_deploy_model.onnx``: AscendQuant / AscendDequant / AscendAntiQuant, INT8 weights,
  INT32 bias, for the ATC tool;
* the record (``scale_d``/``offset_d``/``scale_w``/``offset_w`` per layer, ``tensor:<name>``
  entries for the activations quantized outside layers).

UINT8 activations are written on the int8 grid of the record (``offset_d = zero_point - 128``),
which gives the same values. The differences to the QDQ model in ONNX Runtime are float
rounding: the integer sums times ``deq_scale`` instead of float sums of dequantized values
(relative 1e-6), ``x * (1/scale)`` instead of ``x / scale`` before rounding (an element exactly
on a rounding boundary may move by one step), and a float source bias requantized to
``round(b / deq_scale) * deq_scale`` (half a step of ``deq_scale`` at most).
"""
from __future__ import annotations

import os

import onnx

from amct_core.errors import AmctFileNotFoundError, AmctValueError
from amct_core.logger import get_logger
from amct_core.quant.record import write_record

from .qdq_import import ImportedModel, import_qdq_model
from .save import MODEL_SUFFIXES, output_paths, write_model
from .writers.common import LayerFactors, check_opset, collect_factors
from .writers.deploy import build_deploy_model
from .writers.fake_quant import build_fake_quant_model

LOGGER = get_logger("amct_onnx")

#: The record file's name when ``record_file`` is not given (in ``save_path``'s folder).
DEFAULT_RECORD_NAME = "record.txt"


def convert_qat_model(model_file: str | os.PathLike, save_path: str | os.PathLike,
                      record_file: str | os.PathLike | None = None) -> dict[str, str]:
    """Convert the QDQ ONNX model ``model_file`` into
    ``<save_path>_fake_quant_model.onnx``, ``<save_path>_deploy_model.onnx`` and a record
    file (reference §4, ``convert_qat_model``); returns ``{"fake_quant": ..., "deploy": ...,
    "record": ...}``.

    ``save_path`` is a folder and a file-name prefix (``out/model``). ``record_file`` defaults
    to ``record.txt`` in ``save_path``'s folder.

    Conv / ConvTranspose (per-tensor or per-output-channel weights) and Gemm / MatMul
    (per-tensor weights) whose input is a Q/DQ pair and whose weight is a DQ of a constant
    become quantized layers; every other activation Q/DQ pair becomes AscendQuant +
    AscendAntiQuant, and a QuantizeLinear that is a graph output AscendQuant alone (module
    docstring, :mod:`amct_onnx.qdq_import`).

    Raises :class:`AmctFileNotFoundError` for a missing model, :class:`AmctValueError` for a
    bad ``save_path``, a file that is not ONNX or a Q/DQ pair with different factors, and
    :class:`~amct_core.errors.UnsupportedLayerError` for what cannot be converted
    (per-channel activations, 16-bit / float8 types, integer ops such as QLinearConv, a DQ of
    a non-constant tensor no Q produces ...), each naming the node and the tensor. Nothing
    is written then: both models are built before any file is written, and each file is
    written atomically.
    """
    model_file = os.fspath(model_file)
    prefix = os.fspath(save_path)
    paths = {kind: path for kind, path in output_paths(prefix).items()
             if kind in ("fake_quant", "deploy")}
    if record_file is None:
        record_file = os.path.join(os.path.dirname(prefix), DEFAULT_RECORD_NAME)
    record_file = os.fspath(record_file)
    if os.path.isdir(record_file):
        raise AmctValueError(f"record_file {record_file!r} is a folder; pass a file path such "
                             f"as {os.path.join(record_file, DEFAULT_RECORD_NAME)!r}.")
    model = _load(model_file)
    source = os.path.realpath(model_file)
    written = [*paths.values(), record_file]
    if source in {os.path.realpath(path) for path in written}:
        raise AmctValueError(f"save_path {prefix!r} / record_file {record_file!r} would "
                             f"overwrite the input model {model_file!r}; choose another one.")
    if len({os.path.realpath(path) for path in written}) != len(written):
        raise AmctValueError(f"record_file {record_file!r} is one of the model files "
                             f"{list(paths.values())}; choose another name.")
    check_opset(model, model_file)
    imported = import_qdq_model(model, model_file)
    layers, _ = collect_factors(imported.model, imported.layer_records, record_file,
                                model_file)
    _keep_source_integers(layers, imported)
    if not layers and not imported.tensor_quants:
        LOGGER.warning("Model %s holds no QuantizeLinear / DequantizeLinear pair; the models "
                       "are written without quantization.", model_file)
    built = {
        "fake_quant": build_fake_quant_model(imported.model, layers, imported.tensor_quants),
        "deploy": build_deploy_model(imported.model, layers, imported.tensor_quants),
    }
    write_record(record_file, imported.records)
    for kind, converted in built.items():
        write_model(converted, paths[kind])
        LOGGER.info("The %s model is written to %s.", kind.replace("_", "-"), paths[kind])
    LOGGER.info("convert_qat_model: %d layer(s) and %d other activation(s) quantized; the "
                "record is written to %s.", len(layers), len(imported.tensor_quants),
                record_file)
    return {**paths, "record": record_file}


def _keep_source_integers(layers: list[LayerFactors], imported: ImportedModel) -> None:
    """Give each layer the source's weight integers (the requantized float weight gives the
    same, see qdq_import) and, when the source bias DQ has the scale ``scale_w * scale_d``
    the writers use, the source's INT32 bias."""
    for layer in layers:
        ints = imported.weight_ints.get(layer.name)
        if ints is not None and layer.weight_int is not None:
            if ints.shape != layer.weight_int.shape:
                raise AmctValueError(f"internal error: weight of layer {layer.name!r} changed "
                                     "shape in the conversion")
            changed = int((ints != layer.weight_int).sum())
            if changed:
                LOGGER.debug("Layer %s: %d requantized weight values differ from the "
                             "source's; the source's are kept.", layer.name, changed)
            layer.weight_int = ints
        bias = imported.bias_ints.get(layer.name)
        if bias is None or layer.bias_int is None:
            continue
        ints, scale = bias
        deq = layer.deq_scale.reshape(-1)
        if scale.size in (1, deq.size) and deq.size in (1, ints.size) and \
                ints.size == layer.bias_int.size and bool((scale == deq).all()):
            layer.bias_int = ints.astype(layer.bias_int.dtype)
        else:
            LOGGER.info("Layer %s: the source bias scale differs from scale_w * scale_d; the "
                        "bias is requantized with scale_w * scale_d.", layer.name)


def _load(model_file: str) -> onnx.ModelProto:
    if not os.path.isfile(model_file):
        what = "is a folder" if os.path.isdir(model_file) else "does not exist"
        raise AmctFileNotFoundError(f"QDQ ONNX model '{model_file}' {what}. Pass the .onnx "
                                    "file of the quantization-aware trained model.")
    try:
        return onnx.load(model_file)
    except Exception as error:  # onnx raises DecodeError, ValueError, OSError ...
        raise AmctValueError(f"'{model_file}' is not an ONNX model ({type(error).__name__}: "
                             f"{error}). Pass the QDQ .onnx file.") from None


__all__ = ["DEFAULT_RECORD_NAME", "MODEL_SUFFIXES", "convert_qat_model"]
