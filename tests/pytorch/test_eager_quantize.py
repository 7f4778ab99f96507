"""The eager API of the seed's first example: amct_pytorch.quantize(model, cfg) and convert."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import amct_pytorch as amct
from amct_core.errors import ConfigError
from tests.pytorch.conftest import PtqNet

SEED_CFG = {
    "batch_num": 1,
    "quant_cfg": {"weights": {"type": "int8", "symmetric": True, "strategy": "tensor"}},
    "algorithm": {"minmax"},
}


def _layers(model: nn.Module, cls: str) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()
            if type(module).__name__ == cls}


def test_seed_example_per_tensor_weights(trained, mnist):
    (_, _), (x_test, y_test) = mnist
    model = copy.deepcopy(trained)
    amct.quantize(model, SEED_CFG)
    amct.convert(model)
    deployed = _layers(model, "QuantDeployModule")
    # Linear and Conv2d layers; the ConvTranspose2d, the pool and the reflect-padded conv
    # stay float
    assert set(deployed) == {"conv1", "conv2", "fc"}
    fc = deployed["fc"]
    weight = trained.fc.weight.detach().numpy()
    expected_scale = np.abs(weight).max() / 127 if np.abs(weight.max()) >= np.abs(
        weight.min()) else np.abs(weight.min()) / 128
    assert fc.weight_int.dtype == torch.int8
    np.testing.assert_allclose(fc.weight_scale.numpy(), [expected_scale], rtol=1e-6)
    expected_int = np.clip(np.round(weight * np.float32(1 / np.float32(expected_scale))),
                           -128, 127)
    np.testing.assert_array_equal(fc.weight_int.numpy(), expected_int.astype(np.int8))
    with torch.no_grad():
        fp32 = (trained(x_test).argmax(1) == y_test).float().mean().item()
        int8 = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert int8 >= fp32 - 0.02


def test_per_channel_weights_inputs_and_skip_layers(trained, mnist):
    (x, _), (x_test, _) = mnist
    model = copy.deepcopy(trained)
    cfg = {"batch_num": 2,
           "quant_cfg": {"weights": {"type": "int8", "symmetric": True, "strategy": "channel"},
                         "inputs": {"type": "int8", "symmetric": False}},
           "algorithm": ["minmax"], "skip_layers": ["conv1"]}
    amct.quantize(model, cfg)
    assert isinstance(model.conv1, nn.Conv2d)
    with pytest.raises(ConfigError, match="conv2.*0 of 2"):
        amct.convert(model)
    with torch.no_grad():
        model(x[:32])
        model(x[32:64])
        calibrated_out = model(x_test[:16])
    amct.convert(model)
    conv2 = model.conv2
    weight = trained.conv2.weight.detach().numpy().reshape(32, -1)
    bound = np.maximum(np.abs(weight.max(1)), np.abs(weight.min(1)))
    negative = np.abs(weight.min(1)) > np.abs(weight.max(1))
    expected = np.where(negative, bound / 128, bound / 127)
    np.testing.assert_allclose(conv2.weight_scale.numpy(), expected, rtol=1e-6)
    # input range: min/max of conv2's input over the two calibration batches
    seen = []
    hook = trained.conv2.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        trained(x[:32])
        trained(x[32:64])
    hook.remove()
    data = torch.cat(seen)
    low, high = min(float(data.min()), 0.0), max(float(data.max()), 0.0)
    assert conv2.input_scale.item() == pytest.approx((high - low) / 255, rel=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(model(x_test[:16]).numpy(), calibrated_out.numpy(),
                                   rtol=1e-6, atol=1e-6)
    assert "conv2.weight_int" in model.state_dict()


@pytest.mark.parametrize("cfg, message", [
    ({**SEED_CFG, "algorithm": {"awq"}}, "'awq' is not implemented"),
    ({**SEED_CFG, "algorithm": {"fastest"}}, "'fastest' is not an algorithm"),
    ({**SEED_CFG, "quant_cfg": {"weights": {"type": "int4"}}}, "quant_cfg.weights.type"),
    ({**SEED_CFG, "quant_cfg": {"weights": {"strategy": "group"}}}, "'group' is not supported"),
    ({**SEED_CFG, "batch_num": 0}, "batch_num"),
    ({**SEED_CFG, "quant_cfg": {}}, "quant_cfg.weights: is required"),
    ({**SEED_CFG, "bacth_num": 1}, r"unknown key\(s\) \['bacth_num'\]"),
])
def test_bad_configs_name_the_key(cfg, message):
    model = PtqNet()
    with pytest.raises(ConfigError, match=message):
        amct.quantize(model, cfg)
    assert not _layers(model, "MinMaxQuantModule")


def test_convert_needs_quantize_first():
    with pytest.raises(ConfigError, match="quantize"):
        amct.convert(PtqNet())
