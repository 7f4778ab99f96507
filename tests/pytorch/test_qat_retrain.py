"""Graph-based quantization-aware training (reference §3.1 QAT, seed 量化感知训练): config,
retrain model, record on the first eval forward, save, restore, and the errors."""
from __future__ import annotations

import json
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import amct_pytorch as amct
from amct_core.errors import AmctFileNotFoundError, AmctTypeError, AmctValueError, RecordFileError
from amct_core.quant.record import read_record
from amct_pytorch.nn.module.quantization.conv2d import Conv2dQAT
from amct_pytorch.nn.module.quantization.linear import LinearQAT


class QatNet(nn.Module):
    """Conv+BN+ReLU, a residual add, max-pooling and two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 14 * 14, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.conv2(x))
        x = self.pool(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _batches(x, y, steps, size=32, start=0):
    for step in range(start, start + steps):
        index = torch.arange(step * size, (step + 1) * size) % len(x)
        yield x[index], y[index]


def _train(model, x, y, steps, start=0, lr=0.02):
    torch.manual_seed(1234 + start)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    model.train()
    losses = []
    for bx, by in _batches(x, y, steps, start=start):
        loss = nn.functional.cross_entropy(model(bx), by)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def float_net(mnist):
    (x, y), _ = mnist
    torch.manual_seed(0)
    model = QatNet()
    _train(model, x, y, 40, lr=0.05)
    return model.eval()


def _fresh(float_net):
    model = QatNet()
    model.load_state_dict(float_net.state_dict())
    return model.eval()


def _config(tmp_path, model, sample, **kwargs):
    config_file = tmp_path / "config.json"
    amct.create_quant_retrain_config(str(config_file), model, sample, **kwargs)
    return config_file


def test_config_lists_the_layers_with_fixed_min_after_relu(tmp_path, float_net, mnist):
    (x, _), _ = mnist
    config = json.loads(_config(tmp_path, float_net, x[:2]).read_text())
    assert [key for key in config if key not in ("version", "batch_num")] == \
        ["conv1", "conv2", "fc1", "fc2"]
    fixed = {name: config[name]["retrain_data_config"].get("fixed_min", False)
             for name in ("conv1", "conv2", "fc1", "fc2")}
    # conv2 and fc1 read ReLU outputs (fc1 through max-pooling and flatten); conv1 reads the
    # image and fc2 the ReLU of fc1.
    assert fixed == {"conv1": False, "conv2": True, "fc1": True, "fc2": True}
    assert config["fc1"]["retrain_weight_config"]["channel_wise"] is False
    assert config["conv1"]["retrain_weight_config"] == {"algo": "arq_retrain",
                                                        "channel_wise": True, "dst_type": "INT8"}


def test_retrain_flow_record_and_saved_models(tmp_path, float_net, mnist):
    (x, y), (tx, ty) = mnist
    model = _fresh(float_net)
    config_file = _config(tmp_path, model, x[:2])
    data = json.loads(config_file.read_text())
    data["batch_num"] = 2
    config_file.write_text(json.dumps(data))
    record_file = tmp_path / "record.txt"
    retrain = amct.create_quant_retrain_model(str(config_file), model, str(record_file), x[:2])
    assert retrain is model
    assert isinstance(retrain.conv1, Conv2dQAT) and isinstance(retrain.fc2, LinearQAT)
    assert isinstance(retrain.bn1, nn.BatchNorm2d)

    losses = _train(retrain, x, y, 30)
    assert not record_file.exists()  # training alone writes nothing
    retrain.eval()
    with torch.no_grad():
        expected = retrain(tx[:256]).numpy()
    records = read_record(record_file)
    assert sorted(records) == ["conv1", "conv2", "fc1", "fc2"]
    for name in records:
        factors = retrain.get_submodule(name).quant_factors()
        assert records[name].scale_d == pytest.approx(float(np.float32(factors.scale_d)))
        assert records[name].offset_d == factors.offset_d
        np.testing.assert_allclose(records[name].scale_w, factors.scale_w, rtol=1e-6)
    # fixed_min: the input of conv2 is quantized from 0, so its offset is the lowest code.
    assert records["conv2"].offset_d == -128
    assert np.mean(losses[-5:]) < np.mean(losses[:5])

    save_path = tmp_path / "out" / "net"
    save_path.parent.mkdir()
    amct.save_quant_retrain_model(str(config_file), retrain, str(record_file), str(save_path),
                                  x[:2], input_names=["input"], output_names=["output"],
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    for suffix in ("_fake_quant_model.onnx", "_qdq_model.onnx"):  # deploy: custom ops
        onnx.checker.check_model(str(save_path) + suffix)
    deploy = onnx.load(str(save_path) + "_deploy_model.onnx")
    ops = [node.op_type for node in deploy.graph.node]
    assert ops.count("AscendQuant") == 4 and ops.count("AscendDequant") == 4
    assert "BatchNormalization" not in ops  # folded into conv1

    feeds = {"input": tx[:256].numpy()}
    fake = ort.InferenceSession(str(save_path) + "_fake_quant_model.onnx",
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    # The fake-quant model computes what the QAT model computes in eval mode, up to the int32
    # bias rounding and float summation order.
    scale = np.abs(expected).max()
    assert np.abs(fake - expected).max() < 2e-3 * scale
    assert (fake.argmax(1) == expected.argmax(1)).mean() > 0.99
    qdq = ort.InferenceSession(str(save_path) + "_qdq_model.onnx",
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    accuracy = (qdq.argmax(1) == ty[:256].numpy()).mean()
    float_accuracy = (float_net(tx[:256]).argmax(1) == ty[:256]).float().mean().item()
    assert accuracy >= float_accuracy - 0.03


def test_restore_continues_the_same_loss_curve(tmp_path, float_net, mnist):
    (x, y), _ = mnist
    config_file = _config(tmp_path, float_net, x[:2])
    straight = amct.create_quant_retrain_model(str(config_file), _fresh(float_net),
                                               str(tmp_path / "a.txt"), x[:2])
    curve = _train(straight, x, y, 12)

    first = amct.create_quant_retrain_model(str(config_file), _fresh(float_net),
                                            str(tmp_path / "b.txt"), x[:2])
    head = _train(first, x, y, 6)
    checkpoint = tmp_path / "ckpt.pth"
    torch.save({"epoch": 1, "model_state": first.state_dict()}, checkpoint)
    resumed = amct.restore_quant_retrain_model(str(config_file), _fresh(float_net),
                                               str(tmp_path / "b.txt"), x[:2], str(checkpoint),
                                               state_dict_name="model_state")
    tail = _train(resumed, x, y, 6, start=6)
    # The first run used one optimizer for 12 steps, the resumed one a new optimizer from
    # step 6; plain SGD without momentum keeps no state, so the curves agree.
    np.testing.assert_allclose(head + tail, curve, rtol=1e-5, atol=1e-6)


def test_restore_errors(tmp_path, float_net, mnist):
    (x, _), _ = mnist
    config_file = _config(tmp_path, float_net, x[:2])
    with pytest.raises(AmctFileNotFoundError, match="pth_file"):
        amct.restore_quant_retrain_model(str(config_file), _fresh(float_net),
                                         str(tmp_path / "r.txt"), x[:2],
                                         str(tmp_path / "none.pth"))
    plain = tmp_path / "plain.pth"
    torch.save(float_net.state_dict(), plain)  # a float checkpoint: no clips
    with pytest.raises(AmctValueError, match="missing keys"):
        amct.restore_quant_retrain_model(str(config_file), _fresh(float_net),
                                         str(tmp_path / "r.txt"), x[:2], str(plain))
    with pytest.raises(AmctValueError, match="'state'"):
        amct.restore_quant_retrain_model(str(config_file), _fresh(float_net),
                                         str(tmp_path / "r.txt"), x[:2], str(plain),
                                         state_dict_name="state")

    class Boom:
        def __reduce__(self):
            return (print, ("code ran",))

    crafted = tmp_path / "crafted.pth"
    with open(crafted, "wb") as stream:
        pickle.dump({"conv1.weight": Boom()}, stream)
    with pytest.raises(AmctValueError, match="weights-only"):
        amct.restore_quant_retrain_model(str(config_file), _fresh(float_net),
                                         str(tmp_path / "r.txt"), x[:2], str(crafted))


def test_model_errors(tmp_path, float_net, mnist):
    (x, _), _ = mnist
    config_file = _config(tmp_path, float_net, x[:2])
    with pytest.raises(AmctTypeError, match="DataParallel is not supported"):
        amct.create_quant_retrain_model(str(config_file), nn.DataParallel(_fresh(float_net)),
                                        str(tmp_path / "r.txt"), x[:2])
    retrain = amct.create_quant_retrain_model(str(config_file), _fresh(float_net),
                                              str(tmp_path / "r.txt"), x[:2])
    with pytest.raises(AmctValueError, match="already holds QAT modules"):
        amct.create_quant_retrain_model(str(config_file), retrain, str(tmp_path / "r.txt"),
                                        x[:2])
    with pytest.raises(AmctFileNotFoundError, match="eval-mode forward"):
        amct.save_quant_retrain_model(str(config_file), retrain, str(tmp_path / "r.txt"),
                                      str(tmp_path / "m"), x[:2])
    # An eval forward before any training writes nothing (no clips yet): saving still fails.
    retrain.eval()
    with torch.no_grad():
        retrain(x[:4])
    assert not (tmp_path / "r.txt").exists()
    (tmp_path / "r.txt").write_text("")
    with pytest.raises(RecordFileError, match="no activation factors"):
        amct.save_quant_retrain_model(str(config_file), retrain, str(tmp_path / "r.txt"),
                                      str(tmp_path / "m"), x[:2])
    assert not list(tmp_path.glob("m_*"))
