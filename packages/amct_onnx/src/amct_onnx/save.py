"""``save_model``: the quantized ONNX models from a modified ONNX model and its record
(reference §3.1 ``save_model``, §3.3 record, §4 model layouts).

Writes, for ``save_path = <folder>/<prefix>``:

* ``<prefix>_fake_quant_model.onnx``: runs in ONNX Runtime, simulates the quantized accuracy
  (``writers.fake_quant``);
* ``<prefix>_deploy_model.onnx``: AscendQuant / AscendDequant custom ops, INT8 weights and INT32
  bias, for the ATC tool (``writers.deploy``);
* ``<prefix>_qdq_model.onnx``: standard QuantizeLinear / DequantizeLinear that ONNX Runtime runs
  with int8 kernels (``writers.qdq``).

Exactly the layers with factors in the record are quantized; the rest stay FP32. All three
models are built before any is written, and each is written atomically; the input files are
only read.
"""
from __future__ import annotations

import os

import onnx

from amct_core.atomic_file import write_atomically
from amct_core.errors import AmctFileNotFoundError, AmctValueError
from amct_core.logger import get_logger
from amct_core.quant.record import read_record

from .graph import serialize_within_limit
from .writers.common import check_opset, collect_factors
from .writers.deploy import build_deploy_model
from .writers.fake_quant import build_fake_quant_model
from .writers.qdq import DEFAULT_ACTIVATION_TYPE, build_qdq_model

LOGGER = get_logger("amct_onnx")

#: File-name suffixes of the written models (reference §3.1 ``generate_onnx_file_name``).
MODEL_SUFFIXES = {"fake_quant": "_fake_quant_model.onnx", "deploy": "_deploy_model.onnx",
                  "qdq": "_qdq_model.onnx"}

#: Protobuf's message size limit: larger models keep their tensors in an external file.
_PROTOBUF_LIMIT = 2 ** 31 - 2 ** 26


def output_paths(save_path: str | os.PathLike) -> dict[str, str]:
    """``{"fake_quant": ..., "deploy": ..., "qdq": ...}``: the files ``save_model`` writes for
    ``save_path`` (a folder and a file-name prefix)."""
    prefix = os.fspath(save_path)
    if not prefix or prefix.endswith((os.sep, "/")) or os.path.isdir(prefix):
        raise AmctValueError(
            f"save_path {prefix!r} must be a folder followed by a file-name prefix, e.g. "
            f"'./results/model' (giving ./results/model{MODEL_SUFFIXES['deploy']} ...).")
    return {kind: prefix + suffix for kind, suffix in MODEL_SUFFIXES.items()}


def save_model(modified_onnx_file: str | os.PathLike, record_file: str | os.PathLike,
               save_path: str | os.PathLike,
               qdq_activation_type: str = DEFAULT_ACTIVATION_TYPE) -> dict[str, str]:
    """Write the fake-quant, deploy and QDQ models of ``modified_onnx_file`` quantized with the
    factors of ``record_file`` (module docstring); returns the written paths by kind.

    Raises :class:`AmctFileNotFoundError` for a missing input file,
    :class:`~amct_core.errors.RecordFileError` for a corrupt record, a record layer that is not
    a quantizable node of the model, or a layer lacking factors, and
    :class:`~amct_core.errors.UnsupportedLayerError` for a model below opset 11 or a recorded
    layer that cannot be quantized; every message names the file and the layer.
    """
    model_file = os.fspath(modified_onnx_file)
    record_file = os.fspath(record_file)
    paths = output_paths(save_path)
    model = _load(model_file)
    records = read_record(record_file)
    inputs = {os.path.realpath(model_file), os.path.realpath(record_file)}
    for path in paths.values():
        if os.path.realpath(path) in inputs:
            raise AmctValueError(f"save_path {os.fspath(save_path)!r} would overwrite the input "
                                 f"file {path!r}; choose another prefix.")
    check_opset(model, model_file)
    layers, tensors = collect_factors(model, records, record_file, model_file)
    if not layers:
        LOGGER.warning("Record file %s has factors for no layer of %s; the models are written "
                       "without quantized layers.", record_file, model_file)
    for layer in layers:
        LOGGER.info("Quantize layer %s (%s): INT%d activations, INT%d weights%s.", layer.name,
                    layer.info.op_type, layer.data.num_bits, layer.num_bits_w,
                    ", channel-wise" if layer.channel_wise else "")
    built = {
        "fake_quant": build_fake_quant_model(model, layers),
        "deploy": build_deploy_model(model, layers),
        "qdq": build_qdq_model(model, layers, tensors, qdq_activation_type),
    }
    for kind, quantized in built.items():
        write_model(quantized, paths[kind])
        LOGGER.info("The %s model is written to %s.", kind.replace("_", "-"), paths[kind])
    return paths


def _load(model_file: str) -> onnx.ModelProto:
    if not os.path.isfile(model_file):
        raise AmctFileNotFoundError(
            f"Modified ONNX file '{model_file}' does not exist. Pass the file quantize_model "
            f"wrote (modified_onnx_file).")
    try:
        return onnx.load(model_file)
    except Exception as error:  # onnx raises DecodeError, ValueError, OSError ...
        raise AmctValueError(f"'{model_file}' is not an ONNX model ({type(error).__name__}: "
                             f"{error}). Pass the modified ONNX file quantize_model wrote."
                             ) from None


def write_model(model: onnx.ModelProto, path: str) -> None:
    """Write ``model`` to ``path`` atomically; a model beyond protobuf's 2 GiB limit keeps its
    tensors in ``<file>.data`` next to it."""
    data = serialize_within_limit(model, _PROTOBUF_LIMIT)
    if data is not None:
        write_atomically(path, data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data")
