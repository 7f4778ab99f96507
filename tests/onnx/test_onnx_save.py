"""save_model: the three files, the untouched inputs, and the errors (file, layer named).

The model is built with onnx.helper with seeded Gaussian (He-scaled) weights; the record holds
min-max activation factors of a seeded Gaussian batch and ARQ weight factors.
"""
import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx_quant_models import ModelBuilder, he, make_record, run, save, value

from amct_core.errors import (
    AmctFileNotFoundError,
    AmctValueError,
    RecordFileError,
    UnsupportedLayerError,
)
from amct_core.quant.record import LayerRecord, tensor_key, write_record
from amct_onnx.save import output_paths, save_model

X = np.random.default_rng(31).standard_normal((2, 3, 8, 8)).astype(np.float32)


def make_model(opset=13):
    b = ModelBuilder(30)
    y = b.conv("x", 3, 8, "conv1")
    y = b.node("Relu", [y], name="relu")
    y = b.conv(y, 8, 8, "conv2")
    y = b.node("GlobalAveragePool", [y], name="gap")
    y = b.node("Flatten", [y], name="flatten")
    b.node("Gemm", [y, b.constant("fc.w", he(b.rng, [4, 8], 8))], name="fc", transB=1,
           outputs=["out"])
    return b.build([value("x", [2, 3, 8, 8])], [value("out", [2, 4])], opset)


@pytest.fixture
def files(tmp_path):
    model = make_model()
    model_file = save(model, str(tmp_path / "in" / "modified.onnx"))
    record_file = str(tmp_path / "in" / "record.txt")
    write_record(record_file, make_record(model, {"x": X}, tensors=["conv2_out3"]))
    return model_file, record_file, str(tmp_path / "out" / "net")


def digest(path):
    with open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def test_writes_three_models_and_leaves_the_inputs(files, capsys):
    model_file, record_file, prefix = files
    before = digest(model_file), digest(record_file)
    paths = save_model(model_file, record_file, prefix)
    assert paths == {"fake_quant": prefix + "_fake_quant_model.onnx",
                     "deploy": prefix + "_deploy_model.onnx",
                     "qdq": prefix + "_qdq_model.onnx"}
    assert all(os.path.isfile(p) for p in paths.values())
    assert (digest(model_file), digest(record_file)) == before
    fp32 = run(onnx.load(model_file), {"x": X})[0]
    fake = run(onnx.load(paths["fake_quant"]), {"x": X})[0]
    qdq = run(onnx.load(paths["qdq"]), {"x": X})[0]
    spread = fp32.max() - fp32.min()
    assert np.abs(fake - fp32).max() < 0.1 * spread
    assert np.abs(qdq - fake).max() < 0.05 * spread
    deploy_ops = [n.op_type for n in onnx.load(paths["deploy"]).graph.node]
    assert deploy_ops.count("AscendQuant") == 3 and deploy_ops.count("AscendDequant") == 3
    log = capsys.readouterr().out
    assert "- INFO - [AMCT]:[AMCT]: Quantize layer conv1 (Conv): INT8 activations" in log
    assert f"The deploy model is written to {paths['deploy']}" in log
    assert not [f for f in os.listdir(os.path.dirname(prefix)) if f.endswith(".tmp")]


def test_only_recorded_layers_are_quantized(files, tmp_path):
    model_file, _, prefix = files
    record_file = str(tmp_path / "partial.txt")
    write_record(record_file, make_record(onnx.load(model_file), {"x": X},
                                          layer_names=["conv2"]))
    paths = save_model(model_file, record_file, prefix)
    deploy = onnx.load(paths["deploy"])
    assert [n.name for n in deploy.graph.node if n.op_type == "AscendQuant"] == ["conv2.quant"]
    weights = {t.name: t.data_type for t in deploy.graph.initializer}
    assert weights["conv1.weight"] == onnx.TensorProto.FLOAT
    assert weights["conv2.weight"] == onnx.TensorProto.INT8


def test_missing_files(files):
    model_file, record_file, prefix = files
    with pytest.raises(AmctFileNotFoundError, match="'nowhere.onnx' does not exist"):
        save_model("nowhere.onnx", record_file, prefix)
    with pytest.raises(AmctFileNotFoundError, match="Record file 'nothing.txt' does not exist"):
        save_model(model_file, "nothing.txt", prefix)
    assert not os.path.exists(os.path.dirname(prefix))


def test_corrupt_record(files):
    model_file, record_file, prefix = files
    with open(record_file, "a", encoding="utf-8") as stream:
        stream.write("record { key: 'conv1' value { scale_d: oops } }\n")
    with pytest.raises(RecordFileError, match=f"Record file '{record_file}'.*line"):
        save_model(model_file, record_file, prefix)


def test_not_an_onnx_file(files, tmp_path):
    _, record_file, prefix = files
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model")
    with pytest.raises(AmctValueError, match="bad.onnx' is not an ONNX model"):
        save_model(str(bad), record_file, prefix)


def records_of(model_file):
    return make_record(onnx.load(model_file), {"x": X})


def test_record_layer_not_in_the_model(files, tmp_path):
    model_file, _, prefix = files
    records = records_of(model_file)
    records["ghost"] = LayerRecord(scale_d=0.1, offset_d=0)
    records["relu"] = LayerRecord(scale_d=0.1, offset_d=0)
    record_file = write_record(str(tmp_path / "r.txt"), records)
    with pytest.raises(RecordFileError, match=r"layer 'ghost', which is not a node of the "
                                              r"model in model '.*modified\.onnx'"):
        save_model(model_file, record_file, prefix)
    del records["ghost"]
    record_file = write_record(str(tmp_path / "r.txt"), records)
    with pytest.raises(RecordFileError, match="layer 'relu', which is a Relu node"):
        save_model(model_file, record_file, prefix)
    assert not os.path.exists(os.path.dirname(prefix))


def test_record_tensor_not_in_the_model(files, tmp_path):
    model_file, _, prefix = files
    records = records_of(model_file)
    records[tensor_key("missing")] = LayerRecord(scale_d=0.1, offset_d=0)
    record_file = write_record(str(tmp_path / "r.txt"), records)
    with pytest.raises(RecordFileError, match="'tensor:missing'.*no tensor 'missing'"):
        save_model(model_file, record_file, prefix)


def test_layer_lacking_factors(files, tmp_path):
    model_file, _, prefix = files
    records = records_of(model_file)
    records["conv2"] = LayerRecord(scale_d=records["conv2"].scale_d, offset_d=0)
    records["fc"] = LayerRecord(scale_w=records["fc"].scale_w)
    record_file = write_record(str(tmp_path / "r.txt"), records)
    with pytest.raises(RecordFileError) as error:
        save_model(model_file, record_file, prefix)
    text = str(error.value)
    assert "'conv2' (no scale_w)" in text and "'fc' (no scale_d, offset_d)" in text
    assert record_file in text and "batch_num" in text


def test_recorded_layer_that_cannot_be_quantized(tmp_path):
    b = ModelBuilder(32)
    weight = b.constant("w", he(b.rng, [3, 3, 1, 1], 3))
    y = b.node("Conv", ["x", weight], name="a", kernel_shape=[1, 1])
    b.node("Conv", [y, weight], name="b", kernel_shape=[1, 1], outputs=["out"])
    model = b.build([value("x", [1, 3, 4, 4])], [value("out", None)])
    model_file = save(model, str(tmp_path / "shared.onnx"))
    record_file = write_record(str(tmp_path / "r.txt"), {"a": LayerRecord(
        scale_d=0.1, offset_d=0, scale_w=np.float32([0.01]), offset_w=np.int64([0]))})
    with pytest.raises(UnsupportedLayerError, match="layer 'a'.*'w' is shared"):
        save_model(model_file, record_file, str(tmp_path / "o" / "m"))


def test_old_opset_is_rejected(tmp_path):
    model = make_model(opset=10)
    model_file = save(model, str(tmp_path / "old.onnx"))
    record_file = write_record(str(tmp_path / "r.txt"), {})
    with pytest.raises(UnsupportedLayerError, match="old.onnx' uses ONNX opset 10"):
        save_model(model_file, record_file, str(tmp_path / "o" / "m"))


def test_save_path_must_be_a_prefix_and_not_overwrite_inputs(files, tmp_path):
    model_file, record_file, _ = files
    with pytest.raises(AmctValueError, match="file-name prefix"):
        save_model(model_file, record_file, str(tmp_path))
    with pytest.raises(AmctValueError, match="file-name prefix"):
        output_paths("results/")
    victim = str(tmp_path / "x_deploy_model.onnx")
    os.replace(model_file, victim)
    before = digest(victim)
    with pytest.raises(AmctValueError, match="would overwrite the input file"):
        save_model(victim, record_file, str(tmp_path / "x"))
    assert digest(victim) == before


def test_existing_outputs_are_replaced(files):
    model_file, record_file, prefix = files
    os.makedirs(os.path.dirname(prefix))
    with open(prefix + "_qdq_model.onnx", "wb") as stream:
        stream.write(b"old")
    save_model(model_file, record_file, prefix)
    onnx.checker.check_model(onnx.load(prefix + "_qdq_model.onnx"))
