"""The ``amct_onnx`` command line (reference §3.1 flow; §4 names the CLI form
``amct_onnx <command> --model m.onnx --save_path out/prefix``).

``amct_onnx calibration`` runs the whole post-training quantization of one ONNX model::

    amct_onnx calibration --model M.onnx --save_path out/prefix --data_dir DIR
                          [--config_file config.json|simple.cfg] [--batch_num N]
                          [--skip_layers NAME ...]

``DIR`` holds the calibration batches as ``.npy`` files: for a single-input model one file per
batch, taken in file-name order; for any model one sub-folder per input, named after the input,
holding one file per batch (the i-th files of the sub-folders form batch i). The steps are
``create_quant_config`` (skipped when ``--config_file`` is a JSON config; from the ``.cfg`` when
it is a simple config), ``quantize_model``, ``calibrate`` and ``save_model``. The modified ONNX
model lives in a temporary folder; the JSON config (when generated) and the record are kept
next to the outputs as ``<prefix>_quant_config.json`` and ``<prefix>_record.txt``, so a config
can be tuned by hand (seed, 手工调优) and passed back with ``--config_file``.

``amct_onnx convert`` turns a QDQ ONNX model (a QAT model exported with QuantizeLinear /
DequantizeLinear, or a ``quantize_static`` QDQ model) into the fake-quant and deploy models
(reference §4, ``convert_qat_model``)::

    amct_onnx convert --model M.onnx --save_path out/prefix [--record_file R]

writing ``out/prefix_fake_quant_model.onnx``, ``out/prefix_deploy_model.onnx`` and the record
(default ``out/record.txt``).

Exit codes: 0 on success; 2 for a bad argument or input (missing or non-ONNX model, empty or
mismatched data folder, fewer batches than ``batch_num``, invalid config ...), with one
``error:`` line saying what to change.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from amct_core.errors import AmctError
from amct_core.logger import get_logger
from amct_core.quant.config import load_quant_config

from .calibration import calibrate, create_quant_config, load_model, quantize_model
from .convert_model import convert_qat_model
from .graph import OnnxGraph
from .save import output_paths, save_model

LOGGER = get_logger("amct_onnx")
PROG = "amct_onnx"
#: Exit code for a bad argument or input (argparse's own code for usage errors).
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument or input of the command line (exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``amct_onnx`` command line with ``argv`` (default ``sys.argv[1:]``); returns
    the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except (UsageError, AmctError) as error:
        sys.stderr.write(f"{PROG} {args.command}: error: {error}\n")
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="AMCT for ONNX models: post-training quantization and QDQ "
                               "model conversion.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    calibration = commands.add_parser(
        "calibration", help="quantize a model with calibration data (PTQ)",
        description="Post-training quantization: create_quant_config, quantize_model, "
                    "calibrate on the batches in --data_dir, save_model.")
    calibration.add_argument("--model", required=True, help="the FP32 ONNX model")
    calibration.add_argument(
        "--save_path", required=True,
        help="folder and file-name prefix of the outputs, e.g. out/resnet (writes "
             "out/resnet_fake_quant_model.onnx, _deploy_model.onnx, _qdq_model.onnx)")
    calibration.add_argument(
        "--data_dir", required=True,
        help="calibration batches: one .npy per batch (single-input model, file-name order), "
             "or one sub-folder per input name holding its batches")
    calibration.add_argument(
        "--config_file",
        help="a JSON config (from create_quant_config, possibly edited) or a simple .cfg; "
             "without it the default config is generated")
    calibration.add_argument("--batch_num", type=_positive_int,
                             help="number of calibration batches (default 1; not with "
                                  "--config_file)")
    calibration.add_argument("--skip_layers", nargs="+", metavar="LAYER",
                             help="layers (node names) left in FP32, space or comma separated "
                                  "(not with --config_file)")
    calibration.set_defaults(run=_run_calibration)
    convert = commands.add_parser(
        "convert", help="convert a QDQ (QuantizeLinear/DequantizeLinear) model",
        description="convert_qat_model: turn a QDQ ONNX model (QAT export, quantize_static) "
                    "into the fake-quant and deploy models and a record file.")
    convert.add_argument("--model", required=True, help="the QDQ ONNX model")
    convert.add_argument(
        "--save_path", required=True,
        help="folder and file-name prefix of the outputs, e.g. out/resnet (writes "
             "out/resnet_fake_quant_model.onnx and out/resnet_deploy_model.onnx)")
    convert.add_argument("--record_file",
                         help="the record file to write (default: record.txt in the folder "
                              "of --save_path)")
    convert.set_defaults(run=_run_convert)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# calibration


def _run_calibration(args: argparse.Namespace) -> int:
    model_file = _check_model_file(args.model)
    model = load_model(model_file)
    paths = output_paths(args.save_path)
    config_kind = _config_kind(args)
    inputs = _model_inputs(model)
    batches = discover_batches(args.data_dir, inputs)

    kept_config = args.save_path + "_quant_config.json"
    kept_record = args.save_path + "_record.txt"
    with tempfile.TemporaryDirectory(prefix="amct_onnx_") as work:
        config_file = os.path.join(work, "quant_config.json")
        record_file = os.path.join(work, "record.txt")
        modified_file = os.path.join(work, "modified_model.onnx")
        LOGGER.info("[1/4] Quantization config.")
        if config_kind == "json":
            config_file = os.path.abspath(args.config_file)
        elif config_kind == "cfg":
            create_quant_config(config_file, model_file, config_defination=args.config_file)
        else:
            create_quant_config(config_file, model_file, skip_layers=_split(args.skip_layers),
                                batch_num=args.batch_num or 1)
        batch_num = load_quant_config(config_file).batch_num
        if len(batches) < batch_num:
            raise UsageError(
                f"--data_dir '{args.data_dir}' holds {len(batches)} batch(es) but batch_num is "
                f"{batch_num}. Add batches or lower batch_num.")
        if len(batches) > batch_num:
            LOGGER.info("--data_dir holds %d batches; the first %d (batch_num) are used.",
                        len(batches), batch_num)
        LOGGER.info("[2/4] quantize_model.")
        quantize_model(config_file, model_file, modified_file, record_file)
        LOGGER.info("[3/4] Calibration on %d batch(es) from %s.", batch_num, args.data_dir)
        calibrate(modified_file, record_file, _load_batches(batches[:batch_num], inputs))
        LOGGER.info("[4/4] save_model.")
        written = save_model(modified_file, record_file, args.save_path)
        os.makedirs(os.path.dirname(os.path.abspath(kept_record)), exist_ok=True)
        shutil.copyfile(record_file, kept_record)
        if config_kind != "json":
            shutil.copyfile(config_file, kept_config)
    for kind in ("fake_quant", "deploy", "qdq"):
        LOGGER.info("%s model: %s", kind, written.get(kind, paths[kind]))
    LOGGER.info("Record: %s%s", kept_record,
                f"; config: {kept_config}" if config_kind != "json" else "")
    return 0


# --------------------------------------------------------------------------------------------
# convert


def _run_convert(args: argparse.Namespace) -> int:
    model_file = _check_model_file(args.model)
    if args.record_file is not None and os.path.isdir(args.record_file):
        raise UsageError(f"--record_file '{args.record_file}' is a folder. Pass a file path "
                         f"such as {os.path.join(args.record_file, 'record.txt')}.")
    written = convert_qat_model(model_file, args.save_path, args.record_file)
    for kind in ("fake_quant", "deploy"):
        LOGGER.info("%s model: %s", kind, written[kind])
    LOGGER.info("Record: %s", written["record"])
    return 0


def _check_model_file(path: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"--model '{path}' does not exist. Pass the path of an .onnx file.")
    if not os.path.isfile(path):
        raise UsageError(f"--model '{path}' is not a file. Pass the path of an .onnx file.")
    return path


def _config_kind(args: argparse.Namespace) -> str | None:
    if args.config_file is None:
        return None
    given = [name for name, value in (("--batch_num", args.batch_num),
                                      ("--skip_layers", args.skip_layers)) if value]
    if given:
        raise UsageError(f"{' and '.join(given)} cannot be combined with --config_file: the "
                         f"config sets them (batch_num, quant_enable / skip_layers). Edit the "
                         f"config or leave out --config_file.")
    if not os.path.isfile(args.config_file):
        raise UsageError(f"--config_file '{args.config_file}' does not exist.")
    suffix = os.path.splitext(args.config_file)[1].lower()
    if suffix == ".json":
        return "json"
    if suffix == ".cfg":
        return "cfg"
    raise UsageError(f"--config_file '{args.config_file}' must be a JSON config (.json) or a "
                     f"simple config (.cfg, protobuf text format).")


def _split(names: list[str] | None) -> list[str] | None:
    if not names:
        return None
    return [part for name in names for part in name.split(",") if part]


# --------------------------------------------------------------------------------------------
# Calibration data


@dataclass(frozen=True)
class ModelInput:
    """A graph input: name, numpy dtype, and dims (None where dynamic; None when unknown)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...] | None


def _model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    graph = OnnxGraph(model)
    inputs = []
    for value in model.graph.input:
        if value.name not in graph.graph_inputs:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)) \
            if tensor_type.elem_type else np.dtype(np.float32)
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0
                         else None for dim in tensor_type.shape.dim)
        inputs.append(ModelInput(value.name, dtype, dims))
    return inputs


def discover_batches(data_dir: str, inputs: list[ModelInput]) -> list[dict[str, str]]:
    """The batch files of ``data_dir`` (module docstring) as ``[{input name: .npy path}]``,
    each file's header checked against the model input (rank, fixed dims, dtype kind).
    Raises :class:`UsageError` saying what is wrong."""
    if not os.path.exists(data_dir):
        raise UsageError(f"--data_dir '{data_dir}' does not exist.")
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data_dir '{data_dir}' is not a folder.")
    names = [model_input.name for model_input in inputs]
    files = _npy_files(data_dir)
    folders = sorted(entry for entry in os.listdir(data_dir)
                     if os.path.isdir(os.path.join(data_dir, entry)))
    if files:
        if len(inputs) != 1:
            raise UsageError(
                f"--data_dir '{data_dir}' holds .npy files, but the model has {len(inputs)} "
                f"inputs {names}. Put the batches of each input in a sub-folder named after "
                f"it: {', '.join(os.path.join(data_dir, name) for name in names)}.")
        batches = [{names[0]: path} for path in files]
    elif folders:
        unknown = [folder for folder in folders if folder not in names]
        missing = [name for name in names if name not in folders]
        if missing or unknown:
            raise UsageError(
                f"--data_dir '{data_dir}': the sub-folders must be named after the model "
                f"inputs {names}; "
                + "; ".join(([f"no sub-folder for {missing}"] if missing else [])
                            + ([f"{unknown} are not inputs of the model"] if unknown
                               else [])) + ".")
        per_input = {name: _npy_files(os.path.join(data_dir, name)) for name in names}
        counts = {name: len(paths) for name, paths in per_input.items()}
        empty = [name for name, count in counts.items() if count == 0]
        if empty:
            raise UsageError(f"--data_dir '{data_dir}': the sub-folder(s) {empty} hold no "
                             f".npy file.")
        if len(set(counts.values())) != 1:
            raise UsageError(f"--data_dir '{data_dir}': the inputs have different numbers of "
                             f"batches {counts}; give each input the same number.")
        batches = [{name: per_input[name][index] for name in names}
                   for index in range(len(per_input[names[0]]))]
    else:
        raise UsageError(f"--data_dir '{data_dir}' is empty: it holds no .npy file and no "
                         f"sub-folder. Save each calibration batch with numpy.save().")
    by_name = {model_input.name: model_input for model_input in inputs}
    for batch in batches:
        for name, path in batch.items():
            _check_header(path, by_name[name])
    return batches


def _npy_files(folder: str) -> list[str]:
    return [os.path.join(folder, entry) for entry in sorted(os.listdir(folder))
            if entry.lower().endswith(".npy") and os.path.isfile(os.path.join(folder, entry))]


def _check_header(path: str, model_input: ModelInput) -> None:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, OSError, EOFError ...
        raise UsageError(f"'{path}' is not a readable .npy file ({type(error).__name__}: "
                         f"{error}).") from None
    shape, dtype = tuple(array.shape), array.dtype
    del array
    if dtype.kind != model_input.dtype.kind and not (
            dtype.kind in "iu" and model_input.dtype.kind in "iu"):
        raise UsageError(f"'{path}' holds {dtype} data but model input '{model_input.name}' "
                         f"is {model_input.dtype}. Save the batch as {model_input.dtype}.")
    dims = model_input.dims
    if dims is None:
        return
    fixed = tuple("?" if dim is None else dim for dim in dims)
    if len(shape) != len(dims) or any(want is not None and want != got
                                      for want, got in zip(dims, shape, strict=True)):
        raise UsageError(f"'{path}' has shape {shape} but model input '{model_input.name}' "
                         f"has shape {fixed} (? = any size).")


def _load_batches(batches: list[dict[str, str]], inputs: list[ModelInput]
                  ) -> Iterator[dict[str, np.ndarray]]:
    dtypes = {model_input.name: model_input.dtype for model_input in inputs}
    for batch in batches:
        yield {name: np.load(path, allow_pickle=False).astype(dtypes[name], copy=False)
               for name, path in batch.items()}
