"""Single-op QAT end to end (seed 单算子模式的量化感知训练): a network of QAT modules trained on
real digits, exported by torch.onnx.export, converted by convert_qat_model; the fake-quant ONNX
model computes what the QAT model computes in PyTorch."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from amct_core.quant.record import read_record
from amct_onnx.convert_model import convert_qat_model
from amct_pytorch.nn.module.quantization.conv2d import Conv2dQAT
from amct_pytorch.nn.module.quantization.conv_transpose_2d import ConvTranspose2dQAT
from amct_pytorch.nn.module.quantization.linear import LinearQAT

CONFIG = {"retrain_data_config": {"dst_type": "INT8", "batch_num": 2, "fixed_min": False,
                                  "clip_min": None, "clip_max": None},
          "retrain_weight_config": {"dst_type": "INT8", "weights_retrain_algo": "arq_retrain",
                                    "channel_wise": True}}
LINEAR_CONFIG = {**CONFIG, "retrain_weight_config": {**CONFIG["retrain_weight_config"],
                                                     "channel_wise": False}}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        Conv2dQAT(1, 8, 3, padding=1, config=CONFIG), nn.ReLU(),
        Conv2dQAT(8, 16, 3, stride=2, padding=1, config=CONFIG), nn.ReLU(),
        ConvTranspose2dQAT(16, 8, 2, stride=2, config=CONFIG), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        LinearQAT(8 * 14 * 14, 10, config=LINEAR_CONFIG))


def test_converted_fake_quant_model_matches_the_qat_model(tmp_path, mnist):
    (x, y), (tx, _) = mnist
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(25):
        index = torch.arange(step * 32, (step + 1) * 32)
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(tx[:200]).numpy()

    qdq_file = tmp_path / "inter_model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (tx[:2],), str(qdq_file), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "n"}, "output": {0: "n"}})
    ops = [node.op_type for node in onnx.load(str(qdq_file)).graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8

    paths = convert_qat_model(str(qdq_file), str(tmp_path / "out" / "net"))
    records = read_record(paths["record"])
    layers = {key: rec for key, rec in records.items() if rec.has_weight_factors}
    assert len(layers) == 4
    # the record holds the QAT modules' own factors, layer by layer in graph order
    qat_layers = [m for m in model if hasattr(m, "quant_factors")]
    by_scale = sorted(float(rec.scale_d) for rec in layers.values())
    assert by_scale == sorted(float(np.float32(m.quant_factors().scale_d)) for m in qat_layers)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(paths["fake_quant"], options,
                                   providers=["CPUExecutionProvider"])
    fake = session.run(None, {"input": tx[:200].numpy()})[0]
    # The QAT model adds its float bias; the fake-quant model the bias rounded to the int32
    # grid of scale_w * scale_d (half a step at most), and sums in another order.
    scale = np.abs(expected).max()
    assert np.abs(fake - expected).max() < 2e-3 * scale
    assert (fake.argmax(1) == expected.argmax(1)).mean() >= 0.99
    deploy = [node.op_type for node in onnx.load(paths["deploy"]).graph.node]
    assert deploy.count("AscendQuant") >= 4 and deploy.count("AscendDequant") == 4
