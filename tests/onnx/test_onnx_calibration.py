"""create_quant_config / quantize_model / calibrate of amct_onnx (reference §3.1–§3.5).

Models are built with onnx.helper: ``resnet_like`` (fixed-seed numpy weights) and
``digits_mlp`` (an sklearn MLPClassifier trained on the sklearn digits set). Factors are checked
against independent computations: activations from onnx's ReferenceEvaluator (pure numpy, not
ONNX Runtime) run on the modified model (whose BN folding is checked against ONNX Runtime
separately; the evaluator's own BatchNormalization disagrees with ONNX Runtime and numpy in
onnx 1.18), or plain numpy for the MLP; then ``ifmr``/``hfmg`` of amct_core on those values,
and min-max scales computed here for ARQ.
"""
import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from ptq_model_zoo import (
    bn_node,
    bn_params,
    conv_weight,
    digits_mlp,
    float_input,
    make_model,
    resnet_like,
    run,
)

import amct_onnx
from amct_core.errors import (
    AmctFileNotFoundError,
    AmctValueError,
    ConfigError,
    QuantizationError,
)
from amct_core.quant.ifmr import ifmr
from amct_core.quant.record import read_record, tensor_key
from amct_onnx.calibration import CALIBRATION_METADATA_KEY
from amct_onnx.layers import find_quant_layers
from amct_onnx.writers.qdq import qdq_calibration_tensors

RESNET_LAYERS = ["Conv_0", "Conv_1", "Conv_2", "Conv_3", "Conv_4", "AveragePool_0", "Gemm_0"]


def _batches(rng, count, shape, name="input"):
    return [{name: rng.normal(0, 1, shape).astype(np.float32)} for _ in range(count)]


def _save(model, folder, name="model.onnx"):
    path = os.path.join(folder, name)
    onnx.save(model, path)
    return path


def _flow(folder, model, batches, batch_num=None, calibrate=True, **config_args):
    model_file = _save(model, folder)
    config = os.path.join(folder, "config.json")
    modified = os.path.join(folder, "modified.onnx")
    record = os.path.join(folder, "record.txt")
    amct_onnx.create_quant_config(config, model_file,
                                  batch_num=batch_num or len(batches), **config_args)
    amct_onnx.quantize_model(config, model_file, modified, record)
    if calibrate:
        amct_onnx.calibrate(modified, record, batches)
    return model_file, config, modified, record


def _arq_scales(rows):
    """Symmetric min-max scale per row (reference §3.4 ARQ), computed here in float64."""
    rows = np.asarray(rows, np.float64)
    top, bottom = rows.max(axis=1), rows.min(axis=1)
    return np.where(-bottom > top, -bottom / 128.0, np.maximum(top, -bottom) / 127.0)


def _edit_config(path, edit):
    with open(path, encoding="utf-8") as stream:
        data = json.load(stream)
    edit(data)
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(data, stream)


# --------------------------------------------------------------------------------------------
# create_quant_config


def test_create_quant_config_names_unnamed_nodes_deterministically(tmp_path):
    model_file = _save(resnet_like(named=False), tmp_path)
    first = amct_onnx.create_quant_config(tmp_path / "a.json", model_file, batch_num=3)
    second = amct_onnx.create_quant_config(tmp_path / "b.json", model_file, batch_num=3)
    assert first == second
    layers = [key for key, value in first.items() if isinstance(value, dict)]
    assert layers == RESNET_LAYERS
    assert first["batch_num"] == 3 and first["activation_offset"] is True
    with open(tmp_path / "a.json", encoding="utf-8") as stream:
        assert json.load(stream) == first
    assert first["Gemm_0"]["weight_quant_params"]["channel_wise"] is False
    assert first["Conv_0"]["weight_quant_params"]["channel_wise"] is True
    assert "weight_quant_params" not in first["AveragePool_0"]


def test_create_quant_config_skip_layers_and_offset(tmp_path):
    model_file = _save(resnet_like(), tmp_path)
    config = amct_onnx.create_quant_config(tmp_path / "c.json", model_file,
                                           skip_layers=["stem", "fc"], activation_offset=False)
    assert config["stem"]["quant_enable"] is False and config["fc"]["quant_enable"] is False
    assert config["b1_conv1"]["quant_enable"] is True
    assert config["b1_conv1"]["activation_quant_params"]["asymmetric"] is False


def test_create_quant_config_unknown_skip_layer_is_a_clear_error(tmp_path):
    model_file = _save(resnet_like(), tmp_path)
    with pytest.raises(ConfigError) as error:
        amct_onnx.create_quant_config(tmp_path / "c.json", model_file, skip_layers=["nope"])
    text = str(error.value)
    assert "'nope'" in text and "model.onnx" in text and "b1_conv1" in text
    assert not (tmp_path / "c.json").exists()


def test_create_quant_config_from_cfg_ignores_the_other_arguments(tmp_path):
    model_file = _save(resnet_like(), tmp_path)
    cfg = tmp_path / "simple.cfg"
    cfg.write_text('batch_num: 4\nactivation_offset: false\nskip_layers: "b2_dw"\n'
                   'common_config { hfmg_quantize { num_of_bins: 2048 } }\n')
    config = amct_onnx.create_quant_config(tmp_path / "c.json", model_file, skip_layers=["fc"],
                                           batch_num=2, config_defination=str(cfg))
    assert config["batch_num"] == 4
    assert config["b2_dw"]["quant_enable"] is False and config["fc"]["quant_enable"] is True
    act = config["stem"]["activation_quant_params"]
    assert act["act_algo"] == "hfmg" and act["num_of_bins"] == 2048
    assert act["asymmetric"] is False


def test_missing_and_non_onnx_model_files(tmp_path):
    with pytest.raises(AmctFileNotFoundError, match="does not exist"):
        amct_onnx.create_quant_config(tmp_path / "c.json", tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    with pytest.raises(AmctValueError, match="is not an ONNX model"):
        amct_onnx.create_quant_config(tmp_path / "c.json", bad)


# --------------------------------------------------------------------------------------------
# quantize_model


@pytest.mark.parametrize("opset", [11, 13])
def test_quantize_model_folds_bn_names_nodes_and_records_arq(tmp_path, opset):
    original = resnet_like(opset=opset, named=False)
    _, _, modified_file, record_file = _flow(tmp_path, original, [], batch_num=2,
                                             calibrate=False)
    modified = onnx.load(modified_file)
    assert "BatchNormalization" not in [node.op_type for node in modified.graph.node]
    infos = {info.name: info for info in find_quant_layers(modified)}
    assert list(infos) == RESNET_LAYERS
    feeds = {"input": np.random.default_rng(1).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)}
    np.testing.assert_allclose(run(modified, feeds)[0], run(original, feeds)[0], rtol=1e-5,
                               atol=1e-5)
    metadata = json.loads(next(p.value for p in modified.metadata_props
                               if p.key == CALIBRATION_METADATA_KEY))
    assert metadata["batch_num"] == 2
    assert metadata["layers"]["Conv_1"]["tensor"] == infos["Conv_1"].input_name

    records = read_record(record_file)
    assert list(records) == RESNET_LAYERS
    weights = {t.name: numpy_helper.to_array(t) for t in modified.graph.initializer}
    for name, info in infos.items():
        record = records[name]
        assert record.scale_d is None
        if info.weight_name is None:
            assert record.scale_w.size == 0
            continue
        weight = np.moveaxis(weights[info.weight_name], info.channel_axis, 0)
        rows = weight.reshape(weight.shape[0], -1).astype(np.float64)
        if name == "Gemm_0":  # linear: per tensor
            rows = rows.reshape(1, -1)
        np.testing.assert_allclose(record.scale_w, _arq_scales(rows), rtol=1e-6)
        assert not record.offset_w.any()


def test_quantize_model_do_fusion_false_and_skip_fusion_layers(tmp_path):
    model_file = _save(resnet_like(), tmp_path)
    config = tmp_path / "c.json"
    amct_onnx.create_quant_config(config, model_file)
    _edit_config(config, lambda data: data.update(skip_fusion_layers=["stem"]))
    amct_onnx.quantize_model(config, model_file, tmp_path / "m1.onnx", tmp_path / "r.txt")
    bn_inputs = [node.input[0] for node in onnx.load(tmp_path / "m1.onnx").graph.node
                 if node.op_type == "BatchNormalization"]
    assert bn_inputs == ["stem.c"]
    _edit_config(config, lambda data: data.update(do_fusion=False))
    amct_onnx.quantize_model(config, model_file, tmp_path / "m2.onnx", tmp_path / "r.txt")
    ops = [node.op_type for node in onnx.load(tmp_path / "m2.onnx").graph.node]
    assert ops.count("BatchNormalization") == 5


def test_quantize_model_rejects_a_config_of_another_model(tmp_path):
    model_file = _save(resnet_like(), tmp_path)
    config = tmp_path / "c.json"
    amct_onnx.create_quant_config(config, model_file)
    _edit_config(config, lambda data: data.update(ghost=data["stem"]))
    with pytest.raises(ConfigError, match="ghost"):
        amct_onnx.quantize_model(config, model_file, tmp_path / "m.onnx", tmp_path / "r.txt")
    assert not (tmp_path / "m.onnx").exists()


def test_matmul_and_conv_transpose_weights_use_axis_1(tmp_path):
    rng = np.random.default_rng(11)
    init = {"wt": conv_weight(rng, (4, 6, 3, 3)), "wm": conv_weight(rng, (6 * 7 * 7, 5))}
    init.update(bn_params(rng, "bn", 6))
    init["shape"] = np.array([0, -1], dtype=np.int64)
    nodes = [helper.make_node("ConvTranspose", ["x", "wt"], ["t"], name="deconv",
                              kernel_shape=[3, 3], strides=[2, 2]),
             bn_node("bn", "t", "tb"),
             helper.make_node("Reshape", ["tb", "shape"], ["flat"], name="reshape"),
             helper.make_node("MatMul", ["flat", "wm"], ["y"], name="mm")]
    model = make_model(nodes, [float_input("x", ["N", 4, 3, 3])], [float_input("y", None)],
                       init, opset=13)
    batches = _batches(rng, 2, (3, 4, 3, 3), "x")
    _, _, modified_file, record_file = _flow(tmp_path, model, batches)
    modified = onnx.load(modified_file)
    weights = {t.name: numpy_helper.to_array(t) for t in modified.graph.initializer}
    records = read_record(record_file)
    deconv_w = weights[next(n for n in modified.graph.node if n.name == "deconv").input[1]]
    np.testing.assert_allclose(records["deconv"].scale_w,
                               _arq_scales(np.moveaxis(deconv_w, 1, 0).reshape(6, -1)),
                               rtol=1e-6)
    assert records["mm"].scale_w.size == 1  # linear: per tensor by default
    np.testing.assert_allclose(records["mm"].scale_w, _arq_scales(init["wm"].reshape(1, -1)),
                               rtol=1e-6)
    flat = ReferenceEvaluator(modified).run
    values = np.concatenate([flat(["flat"], batch)[0].reshape(-1) for batch in batches])
    scale, offset = ifmr(values, symmetric=False)
    assert records["mm"].scale_d == pytest.approx(scale, rel=1e-4)
    assert records["mm"].offset_d == offset


def test_initializers_listed_as_inputs_are_constants(tmp_path):
    model = resnet_like(opset=8 + 3)
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    model_file = _save(model, tmp_path)
    config = amct_onnx.create_quant_config(tmp_path / "c.json", model_file)
    assert [k for k, v in config.items() if isinstance(v, dict)][:2] == ["stem", "b1_conv1"]


# --------------------------------------------------------------------------------------------
# calibrate


def _reference_activations(model, batches, tensors):
    evaluator = ReferenceEvaluator(model)
    values = {tensor: [] for tensor in tensors}
    for batch in batches:
        for tensor, value in zip(tensors, evaluator.run(list(tensors), batch), strict=True):
            values[tensor].append(np.asarray(value, np.float32).reshape(-1))
    return {tensor: np.concatenate(parts) for tensor, parts in values.items()}


@pytest.mark.parametrize("opset", [11, 13])
def test_calibrate_scale_d_equals_ifmr_of_the_activations(tmp_path, opset):
    original = resnet_like(opset=opset, size=16)
    rng = np.random.default_rng(3)
    batches = _batches(rng, 3, (2, 3, 16, 16))
    _, _, modified_file, record_file = _flow(tmp_path, original, batches)
    modified = onnx.load(modified_file)
    infos = find_quant_layers(modified)
    extra = qdq_calibration_tensors(modified, [info.name for info in infos])
    tensors = list(dict.fromkeys([info.input_name for info in infos] + extra))
    activations = _reference_activations(modified, batches, tensors)
    records = read_record(record_file)
    for info in infos:
        scale, offset = ifmr(activations[info.input_name], symmetric=False)
        record = records[info.name]
        assert record.scale_d == pytest.approx(scale, rel=1e-4), info.name
        assert record.offset_d == offset, info.name
        assert record.has_weight_factors == (info.weight_name is not None)
    assert extra, "the QDQ writer asks for some tensors of a residual model"
    for tensor in extra:
        scale, offset = ifmr(activations[tensor], symmetric=False)
        assert records[tensor_key(tensor)].scale_d == pytest.approx(scale, rel=1e-4)
        assert records[tensor_key(tensor)].offset_d == offset


def test_calibrate_mlp_against_numpy_activations_with_layer_params(tmp_path):
    model, x_train, _, _ = digits_mlp()
    batches = [{"x": x_train[i:i + 100]} for i in range(0, 300, 100)]
    model_file = _save(model, tmp_path)
    config = tmp_path / "c.json"
    amct_onnx.create_quant_config(config, model_file, batch_num=3, activation_offset=False)

    def edit(data):
        data["fc2"]["activation_quant_params"].update(num_bits=16, search_range=[0.8, 1.2],
                                                      search_step=0.05, max_percentile=0.999)
    _edit_config(config, edit)
    modified, record = tmp_path / "m.onnx", tmp_path / "r.txt"
    amct_onnx.quantize_model(config, model_file, modified, record)
    written = amct_onnx.calibrate(modified, record, iter(batches))

    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.concatenate([batch["x"] for batch in batches])
    hidden = np.maximum(x @ weights["fc1.weight"] + weights["fc1.bias"], 0).astype(np.float32)
    records = read_record(record)
    scale, offset = ifmr(x, symmetric=True)
    assert records["fc1"].scale_d == pytest.approx(scale, rel=1e-5) and offset == 0
    assert records["fc1"].act_type == "INT8"
    scale, _ = ifmr(hidden, num_bits=16, symmetric=True, max_percentile=0.999,
                    search_range=(0.8, 1.2), search_step=0.05)
    assert records["fc2"].scale_d == pytest.approx(scale, rel=1e-4)
    assert records["fc2"].act_type == "INT16"
    assert written["fc2"].scale_d == records["fc2"].scale_d


def test_calibrate_hfmg_layer(tmp_path):
    hfmg = pytest.importorskip("amct_core.quant.hfmg")
    model, x_train, _, _ = digits_mlp()
    batches = [{"x": x_train[i:i + 200]} for i in range(0, 400, 200)]
    model_file = _save(model, tmp_path)
    config = tmp_path / "c.json"
    amct_onnx.create_quant_config(config, model_file, batch_num=2)
    _edit_config(config, lambda data: data["fc2"].update(activation_quant_params={
        "num_bits": 8, "act_algo": "hfmg", "num_of_bins": 1024, "asymmetric": True}))
    amct_onnx.quantize_model(config, model_file, tmp_path / "m.onnx", tmp_path / "r.txt")
    amct_onnx.calibrate(tmp_path / "m.onnx", tmp_path / "r.txt", batches)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    reference = hfmg.HfmgCalibrator(num_bits=8, symmetric=False, num_of_bins=1024)
    for batch in batches:
        reference.update(np.maximum(batch["x"] @ weights["fc1.weight"] + weights["fc1.bias"],
                                    0).astype(np.float32))
    scale, offset = reference.result()
    record = read_record(tmp_path / "r.txt")["fc2"]
    assert record.scale_d == pytest.approx(float(scale), rel=1e-4)
    assert record.offset_d == int(offset)


def test_layers_reading_one_tensor_share_a_calibrator(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    init = {"w1": conv_weight(rng, (4, 3, 3, 3)), "w2": conv_weight(rng, (4, 3, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="c2"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model = make_model(nodes, [float_input("x", ["N", 3, 8, 8])], [float_input("y", None)],
                       init)
    import amct_onnx.calibration as calibration

    made = []
    original = calibration._make_calibrator
    monkeypatch.setattr(calibration, "_make_calibrator",
                        lambda setting: made.append(setting) or original(setting))
    batches = _batches(rng, 2, (2, 3, 8, 8), "x")
    _, _, _, record_file = _flow(tmp_path, model, batches)
    records = read_record(record_file)
    assert records["c1"].scale_d == records["c2"].scale_d
    layer_calibrators = len(made) - len(qdq_calibration_tensors(model, ["c1", "c2"]))
    assert layer_calibrators == 1


def test_fewer_batches_than_batch_num_writes_nothing(tmp_path):
    rng = np.random.default_rng(6)
    batches = _batches(rng, 2, (1, 3, 16, 16))
    _, _, modified, record = _flow(tmp_path, resnet_like(size=16), batches, batch_num=3,
                                   calibrate=False)
    before = (tmp_path / "record.txt").read_bytes()
    with pytest.raises(AmctValueError, match=r"got 2 batch\(es\).*batch_num=3.*Nothing was"):
        amct_onnx.calibrate(modified, record, batches)
    assert (tmp_path / "record.txt").read_bytes() == before


def test_exactly_batch_num_batches_are_read_with_one_log_line_each(tmp_path, capsys):
    rng = np.random.default_rng(7)
    taken = []

    def endless():
        while True:
            taken.append(1)
            yield {"input": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)}

    _flow(tmp_path, resnet_like(size=16), endless(), batch_num=3)
    assert len(taken) == 3
    out = capsys.readouterr().out
    assert [line.split("[AMCT]:[AMCT]: ")[1] for line in out.splitlines()
            if "Calibration batch" in line] == [f"Calibration batch {i}/3 done."
                                                 for i in (1, 2, 3)]


def test_bad_batches_are_clear_errors(tmp_path):
    rng = np.random.default_rng(8)
    _, _, modified, record = _flow(tmp_path, resnet_like(size=16), [], batch_num=1,
                                   calibrate=False)
    with pytest.raises(AmctValueError, match=r"missing \['input'\].*unknown \['image'\]"):
        amct_onnx.calibrate(modified, record, [{"image": np.zeros((1, 3, 16, 16), np.float32)}])
    with pytest.raises(AmctValueError, match="must be a dict"):
        amct_onnx.calibrate(modified, record, [np.zeros((1, 3, 16, 16), np.float32)])
    with pytest.raises(AmctValueError, match="does not run through"):
        amct_onnx.calibrate(modified, record, _batches(rng, 1, (1, 3, 16, 8)))


def test_nan_activations_name_the_layer_and_write_nothing(tmp_path):
    rng = np.random.default_rng(10)
    nodes = [helper.make_node("Log", ["x"], ["logx"], name="log"),
             helper.make_node("Conv", ["logx", "w"], ["y"], name="conv")]
    model = make_model(nodes, [float_input("x", ["N", 3, 4, 4])], [float_input("y", None)],
                       {"w": conv_weight(rng, (2, 3, 1, 1))})
    batches = _batches(rng, 1, (1, 3, 4, 4), "x")  # negative values: Log gives NaN
    _, _, modified, record = _flow(tmp_path, model, batches, calibrate=False)
    before = (tmp_path / "record.txt").read_bytes()
    with pytest.raises(QuantizationError, match=r"Calibration of conv \(tensor 'logx'.*NaN"):
        amct_onnx.calibrate(modified, record, batches)
    assert (tmp_path / "record.txt").read_bytes() == before


def test_calibrate_needs_a_modified_model_and_its_record(tmp_path):
    model_file, _, modified, record = _flow(tmp_path, resnet_like(size=16), [], batch_num=1,
                                            calibrate=False)
    batches = _batches(np.random.default_rng(9), 1, (1, 3, 16, 16))
    with pytest.raises(AmctValueError, match="not a modified ONNX model written by "
                                             "quantize_model"):
        amct_onnx.calibrate(model_file, record, batches)
    with pytest.raises(AmctFileNotFoundError):
        amct_onnx.calibrate(modified, tmp_path / "other.txt", batches)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(AmctValueError, match="no entry for layer"):
        amct_onnx.calibrate(modified, tmp_path / "empty.txt", batches)


@pytest.mark.parametrize("opset", [11, 13])
def test_digits_mlp_end_to_end_keeps_accuracy(tmp_path, opset):
    model, x_train, x_test, y_test = digits_mlp(opset=opset)
    batches = [{"x": x_train[i:i + 32]} for i in range(0, 128, 32)]
    _, _, modified, record = _flow(tmp_path, model, batches)
    paths = amct_onnx.save_model(modified, record, tmp_path / "out" / "digits")
    fp32 = np.mean(np.argmax(run(model, {"x": x_test})[0], axis=1) == y_test)
    assert fp32 > 0.9
    for kind in ("fake_quant", "qdq"):
        quantized = onnx.load(paths[kind])
        accuracy = np.mean(np.argmax(run(quantized, {"x": x_test})[0], axis=1) == y_test)
        assert accuracy >= fp32 - 0.02, kind
    assert os.path.isfile(paths["deploy"])


def test_public_api():
    assert sorted(amct_onnx.__all__) == ["calibrate", "convert_qat_model",
                                         "create_quant_config", "quantize_model", "save_model"]
