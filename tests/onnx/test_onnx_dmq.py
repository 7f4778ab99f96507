"""DMQ balancing in the ONNX front end (reference §3.4): the balance factors come from the
calibration batches, the weights are requantized balanced, and the fake-quant model's error
against float drops on an input with outlier channels.

Data: sklearn's handwritten digits (8×8), one digit per input channel. Two channels are scaled
by ``FACTOR`` and the conv weights that read them divided by it: the float model computes the
same function, but its input now has the outlier channels DMQ is for (the case of SmoothQuant
and of the reference's DMQ: activations with outliers that the weights compensate)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_quant_models import ModelBuilder, he, value

import amct_onnx
from amct_core.quant.record import read_record

datasets = pytest.importorskip("sklearn.datasets")

CHANNELS = 8
OUTLIERS = (2, 5)
FACTOR = 100.0


def _batches(count: int = 4, size: int = 16) -> list[dict[str, np.ndarray]]:
    images = datasets.load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8)
    needed = count * size * CHANNELS
    x = images[:needed].reshape(count * size, CHANNELS, 8, 8)
    x[:, list(OUTLIERS)] *= FACTOR
    return [{"input": x[i * size:(i + 1) * size]} for i in range(count)]


def _model() -> onnx.ModelProto:
    builder = ModelBuilder(seed=3)
    y = builder.conv("input", CHANNELS, 16, "conv")
    weight = next(init for init in builder.initializers if init.name == "conv.weight")
    array = onnx.numpy_helper.to_array(weight).copy()
    array[:, list(OUTLIERS)] /= FACTOR
    weight.CopyFrom(onnx.numpy_helper.from_array(array, "conv.weight"))
    y = builder.node("Relu", [y])
    y = builder.node("Flatten", [y])
    weight = he(builder.rng, [16 * 64, 10], 16 * 64)  # MatMul layout (in, out)
    y = builder.node("MatMul", [y, builder.constant("fc.weight", weight)], name="fc",
                     outputs=["output"])
    return builder.build([value("input", [None, CHANNELS, 8, 8])],
                         [value("output", [None, 10])])


def _quantize(tmp_path, dmq: bool, batches) -> tuple[str, dict]:
    folder = tmp_path / ("dmq" if dmq else "plain")
    folder.mkdir()
    model_file = str(folder / "model.onnx")
    onnx.save(_model(), model_file)
    cfg = folder / "quant.cfg"
    dmq_line = "common_config { dmq_balancer { migration_strength: 0.5 } }\n" if dmq else ""
    cfg.write_text("batch_num: 4\n" + dmq_line)
    config = str(folder / "config.json")
    amct_onnx.create_quant_config(config, model_file, config_defination=str(cfg))
    modified, record = str(folder / "modified.onnx"), str(folder / "record.txt")
    amct_onnx.quantize_model(config, model_file, modified, record)
    amct_onnx.calibrate(modified, record, iter(batches))  # a one-pass iterator is enough
    paths = amct_onnx.save_model(modified, record, str(folder / "model"))
    return paths["fake_quant"], read_record(record)


def _run(path: str, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run(
        None, feeds)[0]


def test_dmq_factors_follow_the_formula_and_lower_the_error(tmp_path):
    batches = _batches()
    model = _model()
    plain_file, _ = _quantize(tmp_path, False, batches)
    dmq_file, records = _quantize(tmp_path, True, batches)

    x = np.concatenate([batch["input"] for batch in batches])
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    conv_w = weights["conv.weight"]  # (Cout, Cin, 3, 3)
    expected = np.sqrt(np.abs(x).max(axis=(0, 2, 3))) / np.sqrt(np.abs(conv_w).max(axis=(0, 2, 3)))
    np.testing.assert_allclose(records["conv"].tensor_balance_factor, expected, rtol=1e-5)
    assert records["conv"].tensor_balance_factor.size == CHANNELS
    assert records["fc"].tensor_balance_factor.size == 16 * 64  # MatMul: rows of (in, out)
    # the weight factors are those of the balanced weight W·s (per output channel)
    rows = (conv_w * expected.reshape(1, -1, 1, 1)).reshape(16, -1)
    low, high = np.abs(rows.min(axis=1)), np.abs(rows.max(axis=1))
    arq = np.where(low > high, low / 128, high / 127)  # symmetric ARQ, reference §3.4
    np.testing.assert_allclose(records["conv"].scale_w, arq, rtol=1e-5)

    reference = ort.InferenceSession(model.SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    float_out = reference.run(None, {"input": x})[0]
    plain_error = np.abs(_run(plain_file, {"input": x}) - float_out).mean()
    dmq_error = np.abs(_run(dmq_file, {"input": x}) - float_out).mean()
    assert dmq_error < 0.5 * plain_error


def test_dmq_is_skipped_with_a_warning_for_grouped_convolutions(tmp_path, caplog):
    builder = ModelBuilder(seed=1)
    y = builder.conv("input", CHANNELS, CHANNELS, "dw", group=CHANNELS)
    builder.node("Relu", [y], outputs=["output"])
    model = builder.build([value("input", [None, CHANNELS, 8, 8])],
                          [value("output", [None, CHANNELS, 8, 8])])
    model_file = str(tmp_path / "dw.onnx")
    onnx.save(model, model_file)
    cfg = tmp_path / "quant.cfg"
    cfg.write_text("common_config { dmq_balancer { migration_strength: 0.5 } }\n")
    config = str(tmp_path / "config.json")
    amct_onnx.create_quant_config(config, model_file, config_defination=str(cfg))
    record = str(tmp_path / "record.txt")
    with caplog.at_level("WARNING"):
        amct_onnx.quantize_model(config, model_file, str(tmp_path / "m.onnx"), record)
    assert "grouped convolution" in caplog.text
    amct_onnx.calibrate(str(tmp_path / "m.onnx"), record, _batches(1))
    assert read_record(record)["dw"].tensor_balance_factor.size == 0


def test_too_few_batches_with_dmq_write_nothing(tmp_path):
    folder = tmp_path
    model_file = str(folder / "model.onnx")
    onnx.save(_model(), model_file)
    cfg = folder / "quant.cfg"
    cfg.write_text("batch_num: 4\ncommon_config { dmq_balancer { migration_strength: 0.5 } }\n")
    config = str(folder / "config.json")
    amct_onnx.create_quant_config(config, model_file, config_defination=str(cfg))
    modified, record = str(folder / "modified.onnx"), str(folder / "record.txt")
    amct_onnx.quantize_model(config, model_file, modified, record)
    before = open(record).read()
    with pytest.raises(Exception, match="batch_num=4"):
        amct_onnx.calibrate(modified, record, _batches(2))
    assert open(record).read() == before


