"""Accuracy-based automatic calibration of a torch model (accuracy_based_auto_calibration).

The model is conftest's PtqNet trained on real MNIST, made fragile in exactly one layer: two
output channels of ``edge`` (which is not quantizable: reflect padding) are scaled by 1e4 and
the matching input columns of ``fc`` divided by 1e4. The float function is unchanged (ReLU is
positively homogeneous), but ``fc``'s input now has two outlier channels, so 8-bit activation
quantization of ``fc`` rounds the other 14 channels to zero (and per-tensor weight quantization
zeroes the tiny columns): only ``fc`` is ruined by quantization.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import amct_pytorch as amct
from amct_core.auto_calibration import StrategyBase
from amct_core.quant.config import load_quant_config
from amct_core.quant.record import read_record
from amct_pytorch.common.auto_calibration import AutoCalibrationEvaluatorBase

OUTLIER = 1e4
OUTLIER_CHANNELS = (0, 1)
TOLERANCE = 0.02


def _fragile(trained: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(trained)
    with torch.no_grad():
        for channel in OUTLIER_CHANNELS:
            model.edge.weight[channel] *= OUTLIER
            model.edge.bias[channel] *= OUTLIER
            features = slice(channel * 144, (channel + 1) * 144)
            model.fc.weight[:, features] /= OUTLIER
    return model.eval()


def _accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor) -> float:
    predicted = np.asarray(logits).argmax(axis=1)
    return float((predicted == labels.numpy()).mean())


class Evaluator(AutoCalibrationEvaluatorBase):
    """Calibrates on one batch of training digits; accuracy on 500 test digits."""

    def __init__(self, calibration_batch, test, tolerance=TOLERANCE):
        self.calibration_batch = calibration_batch
        self.x_test, self.y_test = test
        self.tolerance = tolerance
        self.evaluated = 0

    def calibration(self, model):
        with torch.no_grad():
            model(self.calibration_batch)

    def evaluate(self, model):
        self.evaluated += 1
        with torch.no_grad():
            return _accuracy(model(self.x_test), self.y_test)

    def metric_eval(self, original_metric, new_metric):
        loss = original_metric - new_metric
        return loss < self.tolerance, loss


class NeverPasses(Evaluator):
    def metric_eval(self, original_metric, new_metric):
        return False, original_metric - new_metric


@pytest.fixture()
def setup(tmp_path, monkeypatch, trained, mnist):
    monkeypatch.chdir(tmp_path)
    (x, _), (x_test, y_test) = mnist
    model = _fragile(trained)
    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), model, x[:8], batch_num=1)
    return model, config, x[:64], (x_test[:500], y_test[:500])


def _search(tmp_path, model, config, evaluator, x, **kwargs):
    amct.accuracy_based_auto_calibration(
        model, evaluator, str(config), str(tmp_path / "record.txt"),
        str(tmp_path / "result" / "model"), x[:8], input_names=["image"],
        output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        **kwargs)


def test_the_fragile_layer_and_no_other_is_rolled_back(tmp_path, setup, trained, caplog):
    model, config, x, test = setup
    # the fragile model computes what the trained one does, in float
    with torch.no_grad():
        assert torch.allclose(model(test[0]), trained(test[0]), rtol=1e-3, atol=1e-3)
    evaluator = Evaluator(x, test)
    caplog.set_level("INFO", logger="amct_pytorch")
    _search(tmp_path, model, config, evaluator, x)

    final = load_quant_config(config)
    assert [name for name, layer in final.layers.items() if not layer.quant_enable] == ["fc"]
    assert set(read_record(tmp_path / "record.txt")) >= {"conv1", "conv2", "pool", "up"}
    assert "fc" not in read_record(tmp_path / "record.txt")

    ranking = json.loads((tmp_path / "result" /
                          "accuracy_based_auto_calibration_ranking_information.json").read_text())
    assert next(iter(ranking)) == "fc"
    assert ranking["fc"] < 0.9 < min(v for k, v in ranking.items() if k != "fc")

    history = json.loads((tmp_path / "amct_log" /
                          "accuracy_based_auto_calibration_record.json").read_text())
    assert history["initial"]["passed"] is False
    assert history["result"] == ["fc"]
    # binary search over 5 ranked layers: k = 3, then k = 1 (both pass)
    assert [trial["rolled_back"] for trial in history["trials"]] == [list(ranking)[:3], ["fc"]]
    assert evaluator.evaluated == 2 + len(history["trials"])

    # the saved fake-quant model meets the check on its own
    original = _accuracy(trained(test[0]).detach(), test[1])
    session = ort.InferenceSession(str(tmp_path / "result" / "model_fake_quant_model.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": test[0].numpy()})[0]
    assert original - _accuracy(logits, test[1]) < TOLERANCE
    for kind in ("fake_quant", "deploy", "qdq"):
        assert (tmp_path / "result" / f"model_{kind}_model.onnx").is_file()
    text = caplog.text
    assert "FAIL" in text and "PASS" in text and "rolled back" in text


def test_a_check_that_never_passes_writes_no_model(tmp_path, setup, caplog):
    model, config, x, test = setup
    before = config.read_bytes()
    caplog.set_level("INFO", logger="amct_pytorch")
    _search(tmp_path, model, config, NeverPasses(x, test), x)
    assert config.read_bytes() == before
    assert not list((tmp_path / "result").glob("*.onnx"))
    assert not (tmp_path / "record.txt").exists()
    assert "no configuration tried passes the accuracy check" in caplog.text
    history = json.loads((tmp_path / "amct_log" /
                          "accuracy_based_auto_calibration_record.json").read_text())
    assert history["result"] is None
    # every layer was rolled back in the last trial, and that failed too
    assert len(history["trials"][-1]["rolled_back"]) == 5


class RecordingStrategy(StrategyBase):
    """Rolls back the two worst layers, once; records every call."""

    name = "Recording"

    def __init__(self):
        super().__init__()
        self.calls = []
        self.done = False

    def initialize(self, ranking):
        super().initialize(ranking)
        self.calls.append(("initialize", list(ranking)))

    def next_trial(self):
        self.calls.append(("next_trial",))
        return None if self.done else self.ranking[:2]

    def _update(self, trial):
        self.calls.append(("record", list(trial.rolled_back), trial.passed))
        self.done = True

    def best(self):
        self.calls.append(("best",))
        return self.ranking[:2] if self.history[-1].passed else None


def test_a_user_strategy_object_is_driven(tmp_path, setup):
    model, config, x, test = setup
    strategy = RecordingStrategy()
    _search(tmp_path, model, config, Evaluator(x, test), x, strategy=strategy)
    ranking = strategy.calls[0][1]
    assert ranking[0] == "fc" and len(ranking) == 5
    assert strategy.calls[1:] == [("next_trial",), ("record", ranking[:2], True),
                                  ("next_trial",), ("best",)]
    final = load_quant_config(config)
    assert sorted(name for name, layer in final.layers.items()
                  if not layer.quant_enable) == sorted(ranking[:2])
    assert (tmp_path / "result" / "model_deploy_model.onnx").is_file()


def test_the_evaluator_must_subclass_the_base(tmp_path, setup):
    model, config, x, _ = setup
    with pytest.raises(TypeError, match="AutoCalibrationEvaluatorBase"):
        _search(tmp_path, model, config, object(), x)


def test_a_model_that_passes_at_once_is_saved_without_a_search(tmp_path, monkeypatch, trained,
                                                                mnist):
    monkeypatch.chdir(tmp_path)
    (x, _), (x_test, y_test) = mnist
    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), trained, x[:8], batch_num=1)
    before = config.read_bytes()
    evaluator = Evaluator(x[:64], (x_test[:500], y_test[:500]))
    _search(tmp_path, trained, config, evaluator, x)
    assert evaluator.evaluated == 2
    assert config.read_bytes() == before
    assert set(read_record(tmp_path / "record.txt")) >= {"conv1", "conv2", "pool", "up", "fc"}
    assert (tmp_path / "result" / "model_fake_quant_model.onnx").is_file()
    assert not (tmp_path / "result" /
                "accuracy_based_auto_calibration_ranking_information.json").exists()
