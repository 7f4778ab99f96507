"""``amct_onnx convert`` (amct_onnx.cli, reference §4 ``convert_qat_model``): outputs, error
texts, exit codes.

The QDQ model is built with onnx.helper: a Conv whose input is a QuantizeLinear /
DequantizeLinear pair and whose weight is a DequantizeLinear of fixed-seed INT8 integers,
followed by Relu and an output Q/DQ pair. Most runs call ``main(argv)`` in process; one goes
through ``python -m amct_onnx``.
"""
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from amct_core.quant.record import read_record
from amct_onnx.cli import main


def qdq_conv_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {"xs": np.float32(0.02), "xz": np.uint8(128),
             "w": rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8),
             "ws": np.float32(0.01), "wz": np.int8(0), "ys": np.float32(0.05),
             "yz": np.uint8(0)}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x_q"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="w_dq"),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["rq"], name="r_q"),
        helper.make_node("DequantizeLinear", ["rq", "ys", "yz"], ["y"], name="r_dq"),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _model(tmp_path, model=None, name="qdq.onnx"):
    path = tmp_path / name
    onnx.save(model if model is not None else qdq_conv_model(), path)
    return str(path)


def _call(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _run(path, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def test_convert_writes_models_and_default_record(tmp_path, capsys):
    source = _model(tmp_path)
    code, _, err = _call(capsys, "convert", "--model", source, "--save_path",
                         tmp_path / "out" / "net")
    assert code == 0, err
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["net_deploy_model.onnx", "net_fake_quant_model.onnx",
                                       "record.txt"]
    record = read_record(out / "record.txt")
    assert record["conv"].scale_d == np.float32(0.02) and record["conv"].offset_d == 0
    assert record["tensor:r"].offset_d == -128
    x = np.random.default_rng(1).uniform(-2, 2, (1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(str(out / "net_fake_quant_model.onnx"), x),
                               _run(source, x), rtol=0, atol=1e-6)
    deploy = onnx.load(out / "net_deploy_model.onnx")
    ops = [node.op_type for node in deploy.graph.node]
    assert ops.count("AscendQuant") == 2 and "AscendDequant" in ops and "AscendAntiQuant" in ops


def test_convert_record_file_option(tmp_path, capsys):
    code, _, err = _call(capsys, "convert", "--model", _model(tmp_path), "--save_path",
                         tmp_path / "out" / "net", "--record_file", tmp_path / "r" / "qat.txt")
    assert code == 0, err
    assert set(read_record(tmp_path / "r" / "qat.txt")) == {"conv", "tensor:r"}
    assert not (tmp_path / "out" / "record.txt").exists()


def test_python_dash_m_convert(tmp_path):
    source = _model(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "amct_onnx", "convert", "--model", source, "--save_path",
         str(tmp_path / "m" / "net")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "net_deploy_model.onnx").is_file()


def _one_error_line(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("amct_onnx convert: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_convert_bad_arguments_exit_2(tmp_path, capsys):
    source = _model(tmp_path)
    code, _, err = _call(capsys, "convert", "--model", tmp_path / "nope.onnx", "--save_path",
                         tmp_path / "o" / "m")
    assert code == 2
    _one_error_line(err, "--model", "nope.onnx", "does not exist")

    code, _, err = _call(capsys, "convert", "--model", tmp_path, "--save_path",
                         tmp_path / "o" / "m")
    assert code == 2
    _one_error_line(err, "is not a file")

    folder = tmp_path / "folder"
    folder.mkdir()
    code, _, err = _call(capsys, "convert", "--model", source, "--save_path", folder)
    assert code == 2
    _one_error_line(err, "save_path", "file-name prefix")

    code, _, err = _call(capsys, "convert", "--model", source, "--save_path",
                         tmp_path / "o" / "m", "--record_file", folder)
    assert code == 2
    _one_error_line(err, "--record_file", "is a folder")

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not onnx")
    code, _, err = _call(capsys, "convert", "--model", junk, "--save_path",
                         tmp_path / "o" / "m")
    assert code == 2
    _one_error_line(err, "junk.onnx", "not an ONNX model")

    per_channel = qdq_conv_model()
    for tensor in per_channel.graph.initializer:
        if tensor.name in ("xs", "xz"):
            value = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(np.full(3, value, value.dtype), tensor.name))
    code, _, err = _call(capsys, "convert", "--model", _model(tmp_path, per_channel, "pc.onnx"),
                         "--save_path", tmp_path / "o" / "m")
    assert code == 2
    _one_error_line(err, "QuantizeLinear node 'x_q'", "per channel")
    assert not (tmp_path / "o").exists() and not any(folder.iterdir())


def test_convert_missing_required_argument_is_a_usage_error(tmp_path, capsys):
    try:
        main(["convert", "--model", _model(tmp_path)])
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("argparse accepted a missing --save_path")
    assert "--save_path" in capsys.readouterr().err
