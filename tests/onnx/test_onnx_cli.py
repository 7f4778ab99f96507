"""The ``amct_onnx calibration`` command line (amct_onnx.cli): outputs, error texts, exit codes.

Models come from ptq_model_zoo (onnx.helper, fixed-seed numpy weights; the digits MLP is an
sklearn MLPClassifier trained on sklearn's digits set). Most runs call ``main(argv)`` in
process; one goes through ``python -m amct_onnx`` and one through the console script.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper
from ptq_model_zoo import conv_weight, digits_mlp, float_input, make_model, resnet_like, run

from amct_core.quant.record import read_record
from amct_onnx.cli import main


def _model(tmp_path, model=None, name="model.onnx"):
    path = tmp_path / name
    onnx.save(model if model is not None else resnet_like(size=16), path)
    return str(path)


def _data(folder, count, shape=(2, 3, 16, 16), dtype=np.float32, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        np.save(folder / f"batch_{index:03d}.npy", rng.normal(0, 1, shape).astype(dtype))
    return str(folder)


def _call(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _two_input_model():
    rng = np.random.default_rng(1)
    init = {"wa": conv_weight(rng, (4, 3, 3, 3)), "wb": conv_weight(rng, (4, 2, 1, 1))}
    nodes = [helper.make_node("Conv", ["a", "wa"], ["ca"], name="conv_a", pads=[1] * 4),
             helper.make_node("Conv", ["b", "wb"], ["cb"], name="conv_b"),
             helper.make_node("Add", ["ca", "cb"], ["y"], name="add")]
    return make_model(nodes, [float_input("a", ["N", 3, 8, 8]), float_input("b", ["N", 2, 8, 8])],
                      [float_input("y", None)], init)


# --------------------------------------------------------------------------------------------
# Success


def test_calibration_writes_the_models_record_and_config(tmp_path, capsys):
    model = _model(tmp_path)
    data = _data(tmp_path / "data", 3)
    prefix = tmp_path / "out" / "net"
    code, out, err = _call(capsys, "calibration", "--model", model, "--save_path", prefix,
                           "--data_dir", data, "--batch_num", 2, "--skip_layers", "b2_dw,fc")
    assert code == 0, err
    for suffix in ("_fake_quant_model.onnx", "_deploy_model.onnx", "_qdq_model.onnx",
                   "_record.txt", "_quant_config.json"):
        assert os.path.isfile(f"{prefix}{suffix}"), suffix
    assert "Calibration batch 1/2 done." in out and "Calibration batch 2/2 done." in out
    assert "Calibration batch 3/" not in out
    config = json.loads((tmp_path / "out" / "net_quant_config.json").read_text())
    assert config["batch_num"] == 2
    assert config["b2_dw"]["quant_enable"] is False and config["fc"]["quant_enable"] is False
    records = read_record(f"{prefix}_record.txt")
    assert "b2_dw" not in records and "stem" in records and records["stem"].scale_d > 0
    fake = onnx.load(f"{prefix}_fake_quant_model.onnx")
    feeds = {"input": np.load(os.path.join(data, "batch_000.npy"))}
    reference = run(onnx.load(model), feeds)[0]
    assert np.abs(run(fake, feeds)[0] - reference).max() < 0.1 * np.abs(reference).max()
    assert not [name for name in os.listdir(tmp_path / "out") if "modified" in name]


def test_multi_input_model_with_one_folder_per_input(tmp_path, capsys):
    model = _model(tmp_path, _two_input_model())
    _data(tmp_path / "data" / "a", 2, (1, 3, 8, 8))
    _data(tmp_path / "data" / "b", 2, (1, 2, 8, 8), seed=1)
    code, _, err = _call(capsys, "calibration", "--model", model, "--save_path",
                         tmp_path / "out" / "two", "--data_dir", tmp_path / "data",
                         "--batch_num", 2)
    assert code == 0, err
    assert set(read_record(tmp_path / "out" / "two_record.txt")) >= {"conv_a", "conv_b"}


def test_json_config_file_is_used_as_given(tmp_path, capsys):
    model_path, x_train, x_test, y_test = digits_mlp()
    model = _model(tmp_path, model_path)
    data = tmp_path / "data"
    data.mkdir()
    for index in range(2):
        np.save(data / f"{index}.npy", x_train[index * 64:(index + 1) * 64])
    config = tmp_path / "tuned.json"
    assert _call(capsys, "calibration", "--model", model, "--save_path", tmp_path / "a" / "m",
                 "--data_dir", data, "--batch_num", 2)[0] == 0
    tuned = json.loads((tmp_path / "a" / "m_quant_config.json").read_text())
    tuned["fc2"]["quant_enable"] = False
    config.write_text(json.dumps(tuned))
    code, _, err = _call(capsys, "calibration", "--model", model, "--save_path",
                         tmp_path / "b" / "m", "--data_dir", data, "--config_file", config)
    assert code == 0, err
    keys = set(read_record(tmp_path / "b" / "m_record.txt"))
    assert {key for key in keys if not key.startswith("tensor:")} == {"fc1"}
    assert not (tmp_path / "b" / "m_quant_config.json").exists()
    fake = onnx.load(tmp_path / "b" / "m_fake_quant_model.onnx")
    accuracy = np.mean(np.argmax(run(fake, {"x": x_test})[0], axis=1) == y_test)
    assert accuracy > 0.9


def test_cfg_config_file(tmp_path, capsys):
    model = _model(tmp_path)
    cfg = tmp_path / "simple.cfg"
    cfg.write_text("batch_num: 2\ncommon_config { hfmg_quantize { num_of_bins: 1024 } }\n")
    code, _, err = _call(capsys, "calibration", "--model", model, "--save_path",
                         tmp_path / "out" / "m", "--data_dir", _data(tmp_path / "d", 2),
                         "--config_file", cfg)
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "m_quant_config.json").read_text())
    assert config["stem"]["activation_quant_params"]["act_algo"] == "hfmg"


def test_python_dash_m_and_console_script(tmp_path):
    model = _model(tmp_path)
    data = _data(tmp_path / "data", 1)
    env = dict(os.environ, AMCT_LOG_LEVEL="WARNING")
    done = subprocess.run([sys.executable, "-m", "amct_onnx", "calibration", "--model", model,
                           "--save_path", str(tmp_path / "out" / "m"), "--data_dir", data],
                          capture_output=True, text=True, cwd=tmp_path, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "m_deploy_model.onnx").is_file()
    done = subprocess.run([sys.executable, "-m", "amct_onnx", "calibration", "--model",
                           str(tmp_path / "nope.onnx"), "--save_path", "x", "--data_dir", data],
                          capture_output=True, text=True, cwd=tmp_path, env=env, check=False)
    assert done.returncode == 2 and "nope.onnx' does not exist" in done.stderr
    script = shutil.which("amct_onnx", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the amct_onnx console script is not installed in this environment")
    done = subprocess.run([script, "calibration", "--help"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0 and "--data_dir" in done.stdout


# --------------------------------------------------------------------------------------------
# Errors: exit code 2 and one clear line


def _error(capsys, *argv):
    code, _, err = _call(capsys, *argv)
    assert code == 2, err
    return err


def test_missing_model_and_non_onnx_model(tmp_path, capsys):
    data = _data(tmp_path / "data", 1)
    err = _error(capsys, "calibration", "--model", tmp_path / "missing.onnx", "--save_path",
                 tmp_path / "o" / "m", "--data_dir", data)
    assert "error: --model" in err and "missing.onnx' does not exist" in err
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    err = _error(capsys, "calibration", "--model", text, "--save_path", tmp_path / "o" / "m",
                 "--data_dir", data)
    assert "notes.onnx' is not an ONNX model" in err
    err = _error(capsys, "calibration", "--model", tmp_path, "--save_path", tmp_path / "o" / "m",
                 "--data_dir", data)
    assert "is not a file" in err


@pytest.mark.parametrize("case", ["missing", "file", "empty", "empty_subfolder"])
def test_bad_data_dir(tmp_path, capsys, case):
    model = _model(tmp_path)
    data = tmp_path / "data"
    if case == "file":
        data.write_text("x")
    elif case == "empty":
        data.mkdir()
    elif case == "empty_subfolder":
        (data / "input").mkdir(parents=True)
    err = _error(capsys, "calibration", "--model", model, "--save_path", tmp_path / "o" / "m",
                 "--data_dir", data)
    expected = {"missing": "does not exist", "file": "is not a folder",
                "empty": "is empty: it holds no .npy file", "empty_subfolder": "hold no .npy"}
    assert expected[case] in err


def test_input_name_mismatch(tmp_path, capsys):
    model = _model(tmp_path, _two_input_model())
    _data(tmp_path / "data" / "a", 1, (1, 3, 8, 8))
    _data(tmp_path / "data" / "c", 1, (1, 2, 8, 8))
    err = _error(capsys, "calibration", "--model", model, "--save_path", tmp_path / "o" / "m",
                 "--data_dir", tmp_path / "data")
    assert "no sub-folder for ['b']" in err and "['c'] are not inputs" in err
    flat = _data(tmp_path / "flat", 1, (1, 3, 8, 8))
    err = _error(capsys, "calibration", "--model", model, "--save_path", tmp_path / "o" / "m",
                 "--data_dir", flat)
    assert "the model has 2 inputs ['a', 'b']" in err


def test_unequal_batch_counts_per_input(tmp_path, capsys):
    model = _model(tmp_path, _two_input_model())
    _data(tmp_path / "data" / "a", 2, (1, 3, 8, 8))
    _data(tmp_path / "data" / "b", 1, (1, 2, 8, 8))
    err = _error(capsys, "calibration", "--model", model, "--save_path", tmp_path / "o" / "m",
                 "--data_dir", tmp_path / "data")
    assert "different numbers of batches" in err


def test_shape_and_dtype_mismatch(tmp_path, capsys):
    model = _model(tmp_path)
    data = _data(tmp_path / "shape", 1, (2, 3, 15, 16))
    err = _error(capsys, "calibration", "--model", model, "--save_path", tmp_path / "o" / "m",
                 "--data_dir", data)
    assert "has shape (2, 3, 15, 16) but model input 'input' has shape ('?', 3, 16, 16)" in err
    data = _data(tmp_path / "rank", 1, (3, 16, 16))
    assert "has shape (3, 16, 16)" in _error(capsys, "calibration", "--model", model,
                                             "--save_path", tmp_path / "o" / "m",
                                             "--data_dir", data)
    data = _data(tmp_path / "dtype", 1, dtype=np.int32)
    err = _error(capsys, "calibration", "--model", model, "--save_path", tmp_path / "o" / "m",
                 "--data_dir", data)
    assert "holds int32 data but model input 'input' is float32" in err
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "x.npy").write_text("not numpy")
    assert "is not a readable .npy file" in _error(capsys, "calibration", "--model", model,
                                                   "--save_path", tmp_path / "o" / "m",
                                                   "--data_dir", bad)


def test_float64_batches_are_accepted(tmp_path, capsys):
    model = _model(tmp_path)
    data = _data(tmp_path / "data", 1, dtype=np.float64)
    code, _, err = _call(capsys, "calibration", "--model", model, "--save_path",
                         tmp_path / "o" / "m", "--data_dir", data)
    assert code == 0, err


def test_fewer_batches_than_batch_num(tmp_path, capsys):
    model = _model(tmp_path)
    data = _data(tmp_path / "data", 2)
    err = _error(capsys, "calibration", "--model", model, "--save_path", tmp_path / "o" / "m",
                 "--data_dir", data, "--batch_num", 3)
    assert "holds 2 batch(es) but batch_num is 3" in err
    assert not (tmp_path / "o").exists()


def test_argument_errors(tmp_path, capsys):
    model = _model(tmp_path)
    data = _data(tmp_path / "data", 1)
    json_config = tmp_path / "c.json"
    json_config.write_text("{}")
    base = ["calibration", "--model", model, "--save_path", tmp_path / "o" / "m",
            "--data_dir", data]
    assert "cannot be combined with --config_file" in _error(
        capsys, *base, "--config_file", json_config, "--batch_num", 2)
    assert "--config_file" in _error(capsys, *base, "--config_file", tmp_path / "none.json")
    other = tmp_path / "c.yaml"
    other.write_text("x")
    assert "must be a JSON config (.json) or a simple config (.cfg" in _error(
        capsys, *base, "--config_file", other)
    err = _error(capsys, *base, "--skip_layers", "ghost")
    assert "'ghost' is not a quantizable layer" in err
    assert "save_path" in _error(capsys, "calibration", "--model", model, "--save_path",
                                 tmp_path, "--data_dir", data)
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, base), "--batch_num", "0"])
    assert exit_info.value.code == 2
    assert "must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["calibration", "--model", model])
    assert exit_info.value.code == 2
    assert main([]) == 2


def test_bad_json_config_names_the_key(tmp_path, capsys):
    model = _model(tmp_path)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"batch_num": 1, "stem": {"quant_enable": "yes"}}))
    err = _error(capsys, "calibration", "--model", model, "--save_path", tmp_path / "o" / "m",
                 "--data_dir", _data(tmp_path / "data", 1), "--config_file", config)
    assert "quant_enable" in err and "stem" in err
