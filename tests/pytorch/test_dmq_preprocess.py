"""DMQ balancing of a torch model (quantize_preprocess → one forward → quantize_model →
save_model; reference §3.1, §3.4).

The model is conftest.PtqNet trained on real MNIST digits, made to have outlier activation
channels: output channels 0, 5 and 9 of ``bn1`` are scaled ×50 (its weight and bias; the ReLU
after it commutes with a positive scale) and the input channels 0, 5 and 9 of ``conv2``'s weight
are divided by 50, so the float output is unchanged (up to rounding) while ``conv2``'s input has
three channels 50× larger than the others.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import amct_pytorch as amct
from amct_core.errors import AmctValueError, ConfigError, RecordFileError
from amct_core.quant.dmq import (
    activation_channel_abs_max,
    dmq_balance_factors,
    weight_in_channel_abs_max,
)
from amct_core.quant.record import read_record

OUTLIERS = [0, 5, 9]
CFG = """
batch_num : 1
activation_offset : true
common_config : {
    ifmr_quantize : {
        search_range_start : 0.7
        search_range_end : 1.3
        search_step : 0.01
        max_percentile : 0.999999
        min_percentile : 0.999999
        asymmetric : true
    }
    %s
}
"""
DMQ = "dmq_balancer : { migration_strength : 0.5 }"


@pytest.fixture(scope="module")
def outlier_model(trained, mnist):
    model = copy.deepcopy(trained)
    with torch.no_grad():
        model.bn1.weight[OUTLIERS] *= 50
        model.bn1.bias[OUTLIERS] *= 50
        model.conv2.weight[:, OUTLIERS] /= 50
    (x, _), _ = mnist
    with torch.no_grad():
        np.testing.assert_allclose(model(x[:64]).numpy(), trained(x[:64]).numpy(), rtol=1e-4,
                                   atol=1e-4)
    return model


def _config(tmp_path: Path, model, x: torch.Tensor, dmq: bool) -> Path:
    cfg = tmp_path / ("dmq.cfg" if dmq else "plain.cfg")
    cfg.write_text(CFG % (DMQ if dmq else ""))
    config = tmp_path / ("dmq.json" if dmq else "plain.json")
    amct.create_quant_config(str(config), model, x, config_defination=str(cfg))
    return config


def _quantize(tmp_path: Path, model, config: Path, record: Path, batch: torch.Tensor):
    onnx_file = tmp_path / f"{config.stem}_modified.onnx"
    calibration = amct.quantize_model(str(config), str(onnx_file), str(record), model, batch,
                                      input_names=["image"], output_names=["logits"],
                                      dynamic_axes={"image": {0: "batch"},
                                                    "logits": {0: "batch"}})
    with torch.no_grad():
        calibration(batch)
    return onnx_file, calibration


def _conv2_error(calibration, conv2_input: torch.Tensor) -> float:
    """Relative L2 error of the quantized conv2 against the float conv2, same float input."""
    wrapper = calibration.conv2
    with torch.no_grad():
        quant = wrapper(conv2_input)
        ref = wrapper.module(conv2_input)
    return float(torch.linalg.norm(quant - ref) / torch.linalg.norm(ref))


def test_dmq_lowers_the_outlier_layer_error_and_matches_the_fake_quant_model(
        tmp_path, outlier_model, mnist):
    (x, _), (x_test, _) = mnist
    batch = x[:64]
    plain_config = _config(tmp_path, outlier_model, batch, dmq=False)
    dmq_config = _config(tmp_path, outlier_model, batch, dmq=True)
    record = tmp_path / "dmq_record.txt"

    balanced = amct.quantize_preprocess(str(dmq_config), str(record), outlier_model, batch)
    seen = []
    hook = balanced.conv2.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        balanced(batch)
    hook.remove()
    # the factors: s_j = max|X_j|^0.5 / max|W_j|^0.5 of conv2's input and weight
    records = read_record(record)
    expected = dmq_balance_factors(activation_channel_abs_max(seen[0].numpy(), 1),
                                   weight_in_channel_abs_max(
                                       outlier_model.conv2.weight.detach().numpy(), "conv"),
                                   0.5)
    np.testing.assert_allclose(records["conv2"].tensor_balance_factor, expected, rtol=1e-6)
    assert records["fc"].tensor_balance_factor.size == 16 * 12 * 12
    assert records["conv1"].tensor_balance_factor.size == 1
    assert "pool" not in records  # avgpool has no weight to balance

    # exactly one forward
    with pytest.raises(AmctValueError, match="exactly one forward"):
        with torch.no_grad():
            balanced(batch)

    plain_onnx, plain = _quantize(tmp_path, outlier_model, plain_config,
                                  tmp_path / "plain_record.txt", batch)
    dmq_onnx, dmq = _quantize(tmp_path, outlier_model, dmq_config, record, batch)
    # the factors survive quantize_model's rewrite of the record
    np.testing.assert_array_equal(read_record(record)["conv2"].tensor_balance_factor, expected)
    assert not read_record(tmp_path / "plain_record.txt")["conv2"].tensor_balance_factor.size

    # conv2's quantized output error against float, on the float input of held-out digits
    probe = x_test[:128]
    inputs = []
    hook = outlier_model.conv2.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        outlier_model(probe)
    hook.remove()
    plain_error = _conv2_error(plain, inputs[0])
    dmq_error = _conv2_error(dmq, inputs[0])
    assert dmq_error < 0.5 * plain_error, (dmq_error, plain_error)

    # the calibration model computes what the fake-quant ONNX computes
    save_path = tmp_path / "out" / "dmq"
    amct.save_model(str(dmq_onnx), str(record), str(save_path))
    session = ort.InferenceSession(f"{save_path}_fake_quant_model.onnx",
                                   providers=["CPUExecutionProvider"])
    fake = session.run(None, {"image": probe.numpy()})[0]
    with torch.no_grad():
        quantized = dmq(probe).numpy()
    np.testing.assert_allclose(fake, quantized, rtol=1e-5, atol=1e-5)
    assert plain_onnx.exists()


def test_quantize_model_without_balance_factors_fails(tmp_path, outlier_model, mnist):
    (x, _), _ = mnist
    batch = x[:16]
    config = _config(tmp_path, outlier_model, batch, dmq=True)
    kwargs = dict(config_file=str(config), modified_onnx_file=str(tmp_path / "m.onnx"),
                  model=outlier_model, input_data=batch)
    with pytest.raises(RecordFileError, match="does not exist.*quantize_preprocess"):
        amct.quantize_model(record_file=str(tmp_path / "missing.txt"), **kwargs)
    # a record made without DMQ (a plain calibration) has no tensor_balance_factor
    plain = _config(tmp_path, outlier_model, batch, dmq=False)
    _quantize(tmp_path, outlier_model, plain, tmp_path / "plain.txt", batch)
    with pytest.raises(RecordFileError, match="conv1.*no tensor_balance_factor.*"
                                              "quantize_preprocess"):
        amct.quantize_model(record_file=str(tmp_path / "plain.txt"), **kwargs)


def test_quantize_preprocess_needs_a_dmq_config_and_keeps_the_model(tmp_path, outlier_model,
                                                                      mnist):
    (x, _), _ = mnist
    batch = x[:16]
    state = copy.deepcopy(outlier_model.state_dict())
    plain = _config(tmp_path, outlier_model, batch, dmq=False)
    with pytest.raises(ConfigError, match="dmq_balancer_param"):
        amct.quantize_preprocess(str(plain), str(tmp_path / "r.txt"), outlier_model, batch)
    config = _config(tmp_path, outlier_model, batch, dmq=True)
    model = amct.quantize_preprocess(str(config), str(tmp_path / "r.txt"), outlier_model, batch)
    with torch.no_grad():
        np.testing.assert_allclose(model(batch).numpy(), outlier_model(batch).numpy(),
                                   rtol=1e-5, atol=1e-5)
    for key, value in outlier_model.state_dict().items():
        assert torch.equal(value, state[key])

