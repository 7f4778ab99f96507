"""Single-op QAT layers (reference §4) and the QAT autograd Functions (reference §3.4).

The Functions are compared with the amct_core definitions (numpy); the layers are trained on
real MNIST digits, exported to a QDQ ONNX model and run in onnxruntime."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from amct_core.errors import AmctValueError, ConfigError, QuantizationError, UnsupportedLayerError
from amct_core.quant import arq_retrain as core_wts
from amct_core.quant import ulq as core_ulq
from amct_pytorch.nn.module.quantization import QatFactors, normalize_qat_config
from amct_pytorch.nn.module.quantization.conv2d import Conv2dQAT
from amct_pytorch.nn.module.quantization.conv3d import Conv3dQAT
from amct_pytorch.nn.module.quantization.conv_transpose_2d import ConvTranspose2dQAT
from amct_pytorch.nn.module.quantization.linear import LinearQAT
from amct_pytorch.qat import functional
from amct_pytorch.qat.functional import (
    ArqRetrainFunction,
    UlqActivationFunction,
    UlqWeightFunction,
    arq_retrain_scale,
    ulq_host_factors,
)

ULQ_W = {"retrain_weight_config": {"weights_retrain_algo": "ulq_retrain"}}


def _clips(clip_max, clip_min, fixed_min=False):
    return (nn.Parameter(torch.tensor([clip_max])),
            nn.Parameter(torch.tensor([clip_min]), requires_grad=not fixed_min))


@pytest.fixture(params=["fused", "composite"])
def kernels(request, monkeypatch):
    """Runs a test on both paths of the QAT Functions: the fused C kernels of
    ``amct_pytorch.qat._fused_quant`` and the composite torch operations."""
    if request.param == "fused":
        if functional._FUSED is None:
            pytest.skip("amct_pytorch.qat._fused_quant is not built (no C compiler at install)")
    else:
        monkeypatch.setattr(functional, "_FUSED", None)
    return request.param


# --- autograd Functions against the core ------------------------------------------------------

@pytest.mark.parametrize(("clip_max", "clip_min", "bits", "fixed_min"),
                         [(2.5, -1.2, 8, False), (1.0, 0.0, 8, True), (3.0, -3.0, 4, False),
                          (0.7, -2.0, 16, False), (1.5, 0.4, 8, False)])
def test_ulq_function_equals_core_forward_and_backward(clip_max, clip_min, bits, fixed_min,
                                                       kernels):
    rng = np.random.default_rng(0)
    x_np = (rng.standard_normal((4, 3, 20, 20)) * 2).astype(np.float32)
    g_np = rng.standard_normal(x_np.shape).astype(np.float32)
    x = torch.from_numpy(x_np).requires_grad_()
    cmax, cmin = _clips(clip_max, clip_min, fixed_min)
    out = UlqActivationFunction.apply(x, cmax, cmin, bits, fixed_min)
    np.testing.assert_array_equal(
        out.detach().numpy(), core_ulq.ulq_forward(x_np, clip_max, clip_min, bits, fixed_min))
    out.backward(torch.from_numpy(g_np))
    ref = core_ulq.ulq_backward(x_np, g_np, clip_max, clip_min, bits, fixed_min)
    np.testing.assert_array_equal(x.grad.numpy(), ref.grad_x)
    scale_g = float(np.abs(g_np).sum())
    assert float(cmax.grad) == pytest.approx(ref.grad_clip_max, abs=1e-6 * scale_g)
    if fixed_min:
        assert cmin.grad is None
    else:
        assert float(cmin.grad) == pytest.approx(ref.grad_clip_min, abs=1e-6 * scale_g)


def test_ulq_backward_scratch_buffers_serve_layers_of_any_size(kernels):
    # The backward's temporaries are shared buffers (functional._scratch): a large layer, a
    # small one and a large one again, the gradients of each stay those of the core.
    rng = np.random.default_rng(1)
    for shape in [(2, 4, 9, 9), (3, 8, 16, 16), (1, 2, 5, 5), (3, 8, 16, 16), (7, 30)]:
        x_np = (rng.standard_normal(shape) * 2).astype(np.float32)
        g_np = rng.standard_normal(shape).astype(np.float32)
        x = torch.from_numpy(x_np).requires_grad_()
        cmax, cmin = _clips(2.0, -1.5, False)
        UlqActivationFunction.apply(x, cmax, cmin, 8, False).backward(torch.from_numpy(g_np))
        ref = core_ulq.ulq_backward(x_np, g_np, 2.0, -1.5, 8, False)
        np.testing.assert_array_equal(x.grad.numpy(), ref.grad_x)
        scale_g = float(np.abs(g_np).sum())
        assert float(cmax.grad) == pytest.approx(ref.grad_clip_max, abs=1e-6 * scale_g)
        assert float(cmin.grad) == pytest.approx(ref.grad_clip_min, abs=1e-6 * scale_g)


@pytest.mark.parametrize(("shape", "axis", "channel_wise", "bits"),
                         [((8, 3, 3, 3), 0, True, 8), ((8, 3, 3, 3), 0, False, 8),
                          ((4, 6, 2, 2), 1, True, 8), ((10, 20), 0, False, 4),
                          ((5, 2, 2, 3, 3), 0, True, 16)])
def test_arq_retrain_function_equals_core(shape, axis, channel_wise, bits, kernels):
    rng = np.random.default_rng(1)
    w_np = rng.standard_normal(shape).astype(np.float32)
    w = torch.from_numpy(w_np).requires_grad_()
    out = ArqRetrainFunction.apply(w, bits, channel_wise, axis)
    np.testing.assert_array_equal(out.detach().numpy(),
                                  core_wts.arq_retrain_forward(w_np, bits, channel_wise, axis))
    g = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    out.backward(g)
    np.testing.assert_array_equal(w.grad.numpy(), core_wts.arq_retrain_backward(g.numpy()))


def _ulq_both_paths(x_np, g_np, clip_max, clip_min, bits, fixed_min, monkeypatch):
    """Forward output, grad_x and clip grads of UlqActivationFunction on the fused and the
    composite path."""
    results = []
    for fused in (functional._FUSED, None):
        monkeypatch.setattr(functional, "_FUSED", fused)
        x = torch.from_numpy(x_np.copy()).requires_grad_()
        cmax, cmin = _clips(clip_max, clip_min, fixed_min)
        out = UlqActivationFunction.apply(x, cmax, cmin, bits, fixed_min)
        out.backward(torch.from_numpy(g_np))
        results.append((out.detach().numpy(), x.grad.numpy(), float(cmax.grad),
                        None if cmin.grad is None else float(cmin.grad)))
    return results


@pytest.mark.skipif(functional._FUSED is None,
                    reason="amct_pytorch.qat._fused_quant is not built (no C compiler)")
def test_fused_ulq_kernels_equal_the_composite_path_at_the_edges(monkeypatch):
    # Ties (x·(1/s) at half-integers, rounded to even), both clamp bounds and the values just
    # beyond them, values far outside the range (where rounding is done after clamping in the
    # kernel) and infinities: the same output and grad_x bit for bit, sums within rounding.
    bits, clip_max, clip_min = 8, 2.0, -1.0
    scale, offset = ulq_host_factors(torch.tensor([clip_max]), torch.tensor([clip_min]), bits,
                                     False)
    inverse = np.float32(1.0) / np.float32(scale)
    k_lo, k_hi = -128 - offset, 127 - offset
    ticks = np.arange(k_lo - 3, k_hi + 3.5, 0.5, dtype=np.float32)  # every half-integer
    edges = np.concatenate([ticks, ticks + np.float32(1e-3), ticks - np.float32(1e-3)])
    x_np = np.concatenate([(edges / inverse).astype(np.float32),
                           np.float32([1e30, -1e30, 3e38, -3e38, np.inf, -np.inf, 0.0, -0.0])])
    rng = np.random.default_rng(11)
    x_np = np.concatenate([x_np, (rng.standard_normal(5000) * 3).astype(np.float32)])
    g_np = rng.standard_normal(x_np.shape).astype(np.float32)
    fused, composite = _ulq_both_paths(x_np, g_np, clip_max, clip_min, bits, False,
                                       monkeypatch)
    np.testing.assert_array_equal(fused[0], composite[0])
    np.testing.assert_array_equal(fused[1], composite[1])
    with np.errstate(over="ignore", invalid="ignore"):  # the core's t - round(t) at ±inf
        ref = core_ulq.ulq_backward(x_np, g_np, clip_max, clip_min, bits, False)
    np.testing.assert_array_equal(fused[1], ref.grad_x)
    scale_g = float(np.abs(g_np).sum())
    for path in (fused, composite):  # infinite activations are clipped, not NaN gradients
        assert path[2] == pytest.approx(ref.grad_clip_max, abs=1e-6 * scale_g)
        assert path[3] == pytest.approx(ref.grad_clip_min, abs=1e-6 * scale_g)


@pytest.mark.skipif(functional._FUSED is None,
                    reason="amct_pytorch.qat._fused_quant is not built (no C compiler)")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_ulq_kernels_on_large_tensors_split_over_threads(threads, monkeypatch):
    # 2.5 M elements: the kernels split them over threads (and leave a tail that is not a
    # whole block); the result does not depend on the split.
    rng = np.random.default_rng(12)
    x_np = (rng.standard_normal((5, 8, 250, 250)) * 1.5).astype(np.float32)
    g_np = rng.standard_normal(x_np.shape).astype(np.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused, composite = _ulq_both_paths(x_np[:, :, :, :-1].copy(), g_np[:, :, :, :-1].copy(),
                                           1.7, -2.2, 8, False, monkeypatch)
    finally:
        torch.set_num_threads(previous)
    np.testing.assert_array_equal(fused[0], composite[0])
    np.testing.assert_array_equal(fused[1], composite[1])
    scale_g = float(np.abs(g_np).sum())
    assert fused[2] == pytest.approx(composite[2], abs=1e-6 * scale_g)
    assert fused[3] == pytest.approx(composite[3], abs=1e-6 * scale_g)


@pytest.mark.skipif(functional._FUSED is None,
                    reason="amct_pytorch.qat._fused_quant is not built (no C compiler)")
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_fused_arq_kernel_equals_the_composite_path(bits, monkeypatch):
    # Channels where the negative side dominates, all-zero channels (scale 1), tiny and large
    # magnitudes, per channel along axis 0 and 1 and per tensor.
    rng = np.random.default_rng(13)
    w_np = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    w_np[1] = -np.abs(w_np[1]) * 4
    w_np[2] = 0.0
    w_np[3] *= 1e-8
    w_np[4] *= 1e6
    w_np[:, 2] = np.abs(w_np[:, 2])
    for axis, channel_wise in ((0, True), (1, True), (0, False)):
        outputs = []
        for fused in (functional._FUSED, None):
            monkeypatch.setattr(functional, "_FUSED", fused)
            outputs.append(ArqRetrainFunction.apply(torch.from_numpy(w_np), bits, channel_wise,
                                                    axis).numpy())
        np.testing.assert_array_equal(outputs[0], outputs[1], err_msg=f"axis {axis}")
        np.testing.assert_array_equal(
            outputs[0], core_wts.arq_retrain_forward(w_np, bits, channel_wise, axis))
        scale = arq_retrain_scale(torch.from_numpy(w_np), bits, channel_wise, axis).numpy()
        assert np.all(scale > 0)


def test_non_contiguous_input_takes_the_composite_path(kernels):
    # A transposed (non-contiguous) activation gives the same values as its contiguous copy.
    rng = np.random.default_rng(14)
    x_np = (rng.standard_normal((3, 4, 6, 5)) * 2).astype(np.float32)
    x = torch.from_numpy(x_np).transpose(2, 3).requires_grad_()
    cmax, cmin = _clips(2.0, -1.0)
    out = UlqActivationFunction.apply(x, cmax, cmin, 8, False)
    expected = core_ulq.ulq_forward(np.ascontiguousarray(x_np.transpose(0, 1, 3, 2)), 2.0,
                                    -1.0, 8, False)
    np.testing.assert_array_equal(out.detach().numpy(), expected)


@pytest.mark.parametrize(("shape", "axis", "clip"),
                         [((3, 4, 3, 3), 0, [0.8, 1.5, 1.0]), ((4, 3, 2, 2), 1, [0.8, 1.5, 1.0]),
                          ((10, 20), 0, [1.2])])
def test_ulq_weight_function_equals_core(shape, axis, clip):
    rng = np.random.default_rng(2)
    w_np = rng.standard_normal(shape).astype(np.float32)
    g_np = rng.standard_normal(shape).astype(np.float32)
    w = torch.from_numpy(w_np).requires_grad_()
    c = nn.Parameter(torch.tensor(clip))
    out = UlqWeightFunction.apply(w, c, 8, axis)
    np.testing.assert_array_equal(out.detach().numpy(),
                                  core_wts.ulq_weight_forward(w_np, np.array(clip), 8, axis))
    out.backward(torch.from_numpy(g_np))
    ref = core_wts.ulq_weight_backward(w_np, g_np, np.array(clip), 8, axis)
    np.testing.assert_array_equal(w.grad.numpy(), ref.grad_weight)
    np.testing.assert_allclose(c.grad.numpy(), ref.grad_clip, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_host_factors_equal_the_core_factors(bits):
    rng = np.random.default_rng(5)
    values = [(2.5, -1.2), (1.0, 0.0), (0.0, 0.0), (-1.0, -3.0), (2.0, 0.5), (1e-9, -1e-9),
              (3.0, -1.0), (127.5, -128.0)]
    values += [tuple(v) for v in rng.normal(0, 3, (200, 2)).astype(np.float32).tolist()]
    for clip_max, clip_min in values:
        for fixed_min in (False, True):
            cmax, cmin = torch.tensor([clip_max]), torch.tensor([clip_min])
            assert ulq_host_factors(cmax, cmin, bits, fixed_min) == core_ulq.ulq_scale_offset(
                float(cmax), float(cmin), bits, fixed_min), (clip_max, clip_min, fixed_min)
    with pytest.raises(AmctValueError, match="finite"):
        ulq_host_factors(torch.tensor([float("nan")]), torch.tensor([0.0]), 8, False)


def test_symbolic_without_module_factors_is_refused():
    class Bare(nn.Module):
        def forward(self, x):
            return UlqActivationFunction.apply(x, torch.tensor([1.0]), torch.tensor([0.0]), 8,
                                               False)
    with pytest.raises(Exception, match="export the model that holds the QAT module"):
        torch.onnx.export(Bare(), (torch.ones(1, 3),), io.BytesIO(), dynamo=False,
                          opset_version=13)


# --- layers ---------------------------------------------------------------------------------

CLIPPED = {"retrain_data_config": {"clip_max": 1.0, "clip_min": 0.0}}


def test_layers_subclass_torch_and_keep_state_dict_keys():
    conv = Conv2dQAT(1, 4, 3, config=CLIPPED)
    assert isinstance(conv, nn.Conv2d)
    assert set(conv.state_dict()) == {"weight", "bias", "act_quantizer.clip_max",
                                      "act_quantizer.clip_min", "act_quantizer.initialized"}
    assert isinstance(ConvTranspose2dQAT(2, 3, 2), nn.ConvTranspose2d)
    assert isinstance(Conv3dQAT(2, 3, 2), nn.Conv3d)
    lin = LinearQAT(5, 2, bias=False, config=ULQ_W)
    assert isinstance(lin, nn.Linear)
    assert set(lin.state_dict()) == {"weight", "act_quantizer.clip_max", "act_quantizer.clip_min",
                                     "act_quantizer.initialized", "wts_quantizer.clip",
                                     "wts_quantizer.initialized"}


@pytest.mark.parametrize(("float_layer", "qat_cls", "shape"), [
    (nn.Conv2d(3, 5, 3, padding=1, stride=2, groups=1), Conv2dQAT, (2, 3, 9, 9)),
    (nn.Conv2d(4, 4, 3, groups=2, dilation=2, bias=False), Conv2dQAT, (2, 4, 9, 9)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
     ConvTranspose2dQAT, (2, 4, 5, 5)),
    (nn.Conv3d(2, 3, 3, padding=1, dilation=(1, 2, 2)), Conv3dQAT, (1, 2, 4, 6, 6)),
    (nn.Linear(12, 7), LinearQAT, (3, 12)),
])
def test_from_float_copies_the_layer_and_stays_close_to_float(float_layer, qat_cls, shape):
    torch.manual_seed(0)
    x = torch.rand(shape) * 2 - 1
    config = {"retrain_data_config": {"clip_max": 1.0, "clip_min": -1.0}}
    if qat_cls is LinearQAT:
        config["retrain_weight_config"] = {"channel_wise": False}
    qat = qat_cls.from_float(float_layer, config=config)
    assert type(qat) is qat_cls
    assert torch.equal(qat.weight, float_layer.weight)
    assert qat.weight.data_ptr() != float_layer.weight.data_ptr()
    assert (qat.bias is None) == (float_layer.bias is None)
    if qat.bias is not None:
        assert torch.equal(qat.bias, float_layer.bias)
    for attr in ("stride", "padding", "dilation", "groups", "output_padding"):
        assert getattr(qat, attr, None) == getattr(float_layer, attr, None)
    with torch.no_grad():
        ref, out = float_layer(x), qat(x)
    assert out.shape == ref.shape
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.03


def test_quant_factors_follow_the_core_definitions():
    torch.manual_seed(1)
    conv = ConvTranspose2dQAT(3, 4, 2, stride=2,
                              config={"retrain_data_config": {"clip_max": 2.0,
                                                              "clip_min": -0.5}})
    factors = conv.quant_factors()
    assert isinstance(factors, QatFactors)
    assert (factors.scale_d, factors.offset_d) == core_ulq.ulq_scale_offset(2.0, -0.5, 8)
    scale_w, offset_w = core_wts.arq_retrain_factors(conv.weight.detach().numpy(), 8, True, 1)
    np.testing.assert_array_equal(factors.scale_w, scale_w)
    np.testing.assert_array_equal(factors.offset_w, offset_w)
    assert factors.scale_w.shape == (4,)  # per output channel, axis 1 of (Cin, Cout, kH, kW)
    assert (factors.act_bits, factors.wts_bits) == (8, 8)
    lin = LinearQAT(6, 3, config={**ULQ_W, **CLIPPED,
                                  "retrain_weight_config": {"dst_type": "INT4",
                                                            "weights_retrain_algo":
                                                                "ulq_retrain"}})
    factors = lin.quant_factors()
    clip = np.abs(lin.weight.detach().numpy()).max()
    np.testing.assert_allclose(factors.scale_w, [clip / 7], rtol=1e-6)
    assert factors.wts_bits == 4


def test_ifmr_initialises_the_clips_over_batch_num_training_forwards():
    torch.manual_seed(2)
    conv = Conv2dQAT(2, 3, 3, config={"retrain_data_config": {"batch_num": 2}})
    batches = [torch.randn(2, 2, 6, 6) + 0.3 for _ in range(2)]
    with pytest.raises(QuantizationError, match="Conv2dQAT: the activation clips are not"):
        conv.quant_factors()
    for x in batches:  # float pass-through while calibrating
        torch.testing.assert_close(conv(x), nn.functional.conv2d(
            x, ArqRetrainFunction.apply(conv.weight, 8, True, 0), conv.bias), rtol=0, atol=0)
    clip_max, clip_min = core_ulq.ifmr_initial_clips([b.numpy() for b in batches], 8)
    assert float(conv.act_quantizer.clip_max.detach()) == pytest.approx(clip_max, rel=1e-6)
    assert float(conv.act_quantizer.clip_min.detach()) == pytest.approx(clip_min, rel=1e-6)
    assert conv.quant_factors().offset_d == core_ulq.ulq_scale_offset(clip_max, clip_min)[1]
    # the third forward quantizes
    x = batches[0]
    xq = core_ulq.ulq_forward(x.numpy(), clip_max, clip_min, 8)
    expected = nn.functional.conv2d(torch.from_numpy(xq),
                                    ArqRetrainFunction.apply(conv.weight, 8, True, 0), conv.bias)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_eval_before_initialisation_passes_through_with_one_warning():
    lin = LinearQAT(4, 2, config={"retrain_weight_config": {"channel_wise": False}}).eval()
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="not initialised yet"):
        out = lin(x)
    expected = nn.functional.linear(x, ArqRetrainFunction.apply(lin.weight, 8, False, 0),
                                    lin.bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin(x)
    assert not bool(lin.act_quantizer.initialized)


def _lenet(config):
    torch.manual_seed(0)
    return nn.Sequential(
        Conv2dQAT(1, 8, 3, stride=2, padding=1, config=config), nn.ReLU(),
        Conv2dQAT(8, 16, 3, stride=2, padding=1, config=config), nn.ReLU(),
        ConvTranspose2dQAT(16, 8, 2, stride=2, config=config), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(),
        LinearQAT(8 * 7 * 7, 10, config={**config, "retrain_weight_config": {
            **config.get("retrain_weight_config", {}), "channel_wise": False}}))


@pytest.fixture(scope="module")
def trained_qat(mnist):
    (x, y), _ = mnist
    net = _lenet({"retrain_data_config": {"batch_num": 1}})
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    losses = []
    for step in range(40):
        index = torch.arange(step * 64, (step + 1) * 64) % len(x)
        loss = nn.functional.cross_entropy(net(x[index]), y[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return net.eval(), losses


def test_training_on_mnist_reduces_the_loss_and_moves_the_clips(trained_qat, mnist):
    net, losses = trained_qat
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    _, (xt, yt) = mnist
    with torch.no_grad():
        accuracy = float((net(xt[:500]).argmax(1) == yt[:500]).float().mean())
    assert accuracy > 0.5
    first = net[0].act_quantizer
    # the clips were learned after the IFMR step (the first conv sees [0, 1] pixels)
    clip_max, _ = core_ulq.ifmr_initial_clips([mnist[0][0][:64].numpy()], 8)
    assert float(first.clip_max.detach()) != pytest.approx(clip_max, rel=1e-7)
    assert float(first.clip_min.detach()) <= 0


def _session(model: bytes) -> ort.InferenceSession:
    """onnxruntime without graph optimisations: its QDQ fusions (QLinearConv ...) compute in
    integers with requantization, not the float QDQ semantics the model states."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def test_qdq_onnx_export_runs_in_onnxruntime_like_pytorch(trained_qat, mnist):
    net, _ = trained_qat
    _, (xt, _) = mnist
    x = xt[:32]
    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, dynamo=False, opset_version=13,
                      input_names=["x"], output_names=["y"])
    model = onnx.load_from_string(buffer.getvalue())
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") == 8 and ops.count("DequantizeLinear") == 8
    assert "PythonOp" not in ops
    axes = [next((a.i for a in node.attribute if a.name == "axis"), None)
            for node in model.graph.node if node.op_type == "QuantizeLinear"]
    assert axes == [None, 0, None, 0, None, 1, None, None]
    # the factors in the graph are the layers' quant_factors()
    consts = {node.output[0]: onnx.numpy_helper.to_array(node.attribute[0].t)
              for node in model.graph.node if node.op_type == "Constant"}
    qnodes = [node for node in model.graph.node if node.op_type == "QuantizeLinear"]
    factors = net[0].quant_factors()
    assert float(consts[qnodes[0].input[1]]) == factors.scale_d
    assert int(consts[qnodes[0].input[2]]) == factors.offset_d
    assert consts[qnodes[0].input[2]].dtype == np.int8
    np.testing.assert_array_equal(consts[qnodes[1].input[1]], factors.scale_w)
    session = _session(buffer.getvalue())
    (onnx_out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch_out = net(x).numpy()
    np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-5, atol=1e-5)


def test_conv3d_and_ulq_retrain_export_and_old_opset_errors():
    torch.manual_seed(3)
    net = nn.Sequential(Conv3dQAT(2, 3, 3, padding=1, config={**CLIPPED, **ULQ_W}))
    x = torch.rand(1, 2, 4, 5, 5)
    buffer = io.BytesIO()
    net.eval()
    torch.onnx.export(net, (x,), buffer, dynamo=False, opset_version=13)
    session = _session(buffer.getvalue())
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, net(x).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="opset_version >= 13"):
        torch.onnx.export(net, (x,), io.BytesIO(), dynamo=False, opset_version=12)
    # per-tensor weights export with opset 10
    lin = nn.Sequential(LinearQAT(4, 2, config={**CLIPPED, "retrain_weight_config": {
        "channel_wise": False}})).eval()
    buffer = io.BytesIO()
    torch.onnx.export(lin, (torch.rand(2, 4),), buffer, dynamo=False, opset_version=10)
    assert [n.op_type for n in onnx.load_from_string(buffer.getvalue()).graph.node].count(
        "QuantizeLinear") == 2
    for dst_type, match in (("INT4", "INT4 QAT layers cannot be exported"),
                            ("INT16", "INT16 QuantizeLinear needs opset_version >= 21")):
        layer = nn.Sequential(LinearQAT(4, 2, config={
            "retrain_data_config": {"clip_max": 1.0, "clip_min": 0.0, "dst_type": dst_type},
            "retrain_weight_config": {"channel_wise": False}})).eval()
        with pytest.raises(Exception, match=match):
            torch.onnx.export(layer, (torch.rand(2, 4),), io.BytesIO(), dynamo=False,
                              opset_version=17)


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "kind", "match"), [
    ({"retrain_data": {}}, "Conv2d", r"unknown key\(s\) \['retrain_data'\]"),
    ({"retrain_data_config": {"dst": "INT8"}}, "Conv2d", r"retrain_data_config has unknown"),
    ({"retrain_weight_config": {"algo2": 1}}, "Conv2d", r"retrain_weight_config has unknown"),
    ({"retrain_data_config": {"dst_type": "INT2"}}, "Conv2d", "retrain_data_config.dst_type"),
    ({"retrain_weight_config": {"dst_type": 8}}, "Conv2d", "retrain_weight_config.dst_type"),
    ({"retrain_data_config": {"batch_num": 0}}, "Conv2d", "batch_num must be an integer"),
    ({"retrain_data_config": {"batch_num": True}}, "Conv2d", "batch_num must be an integer"),
    ({"retrain_data_config": {"fixed_min": "yes"}}, "Conv2d", "fixed_min must be true"),
    ({"retrain_data_config": {"clip_max": "1", "clip_min": 0}}, "Conv2d", "clip_max must be"),
    ({"retrain_data_config": {"clip_max": 1.0}}, "Conv2d", "must be given together"),
    ({"retrain_data_config": {"clip_max": 1.0, "clip_min": 1.0}}, "Conv2d",
     "clip_min < clip_max"),
    ({"retrain_data_config": {"clip_max": 1.0, "clip_min": 2.0}}, "Conv2d",
     "clip_min < clip_max"),
    ({"retrain_data_config": {"clip_max": -1.0, "clip_min": -2.0}}, "Conv2d", "include 0"),
    ({"retrain_data_config": {"clip_max": 1.0, "clip_min": -1.0, "fixed_min": True}}, "Conv2d",
     "fixed_min=true"),
    ({"retrain_weight_config": {"weights_retrain_algo": "ada"}}, "Conv2d",
     "weights_retrain_algo must be one of"),
    ({"retrain_weight_config": {"channel_wise": 1}}, "Conv2d", "channel_wise must be true"),
    ({"retrain_weight_config": {"channel_wise": True}}, "Linear", "false for LinearQAT"),
    ({"retrain_enable": "on"}, "Conv2d", "retrain_enable must be"),
    ({"retrain_data_config": {"algo": "ifmr"}}, "Conv2d", "ulq_quantize"),
    ([1], "Conv2d", "must be a dict"),
])
def test_bad_configs_name_the_key(config, kind, match):
    with pytest.raises(ConfigError, match=match):
        normalize_qat_config(config, kind)


def test_defaults_of_the_normalised_config():
    conv = normalize_qat_config(None, "Conv2d")
    assert conv == {
        "retrain_enable": True,
        "retrain_data_config": {"algo": "ulq_quantize", "dst_type": "INT8", "batch_num": 1,
                                "fixed_min": False, "clip_min": None, "clip_max": None},
        "retrain_weight_config": {"dst_type": "INT8", "weights_retrain_algo": "arq_retrain",
                                  "channel_wise": True}}
    assert normalize_qat_config({}, "Linear")["retrain_weight_config"]["channel_wise"] is False
    graph_json = {"retrain_enable": True,
                  "retrain_data_config": {"algo": "ulq_quantize", "dst_type": "INT8"},
                  "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": True,
                                            "dst_type": "INT8"}}
    assert normalize_qat_config(graph_json, "Conv2d")["retrain_weight_config"] == \
        conv["retrain_weight_config"]
    with pytest.raises(ConfigError, match="layer_kind"):
        normalize_qat_config({}, "AvgPool2d")


def test_layer_constraints_name_the_layer_and_argument():
    with pytest.raises(UnsupportedLayerError, match="Conv2dQAT: padding_mode='reflect'"):
        Conv2dQAT(1, 2, 3, padding_mode="reflect")
    with pytest.raises(UnsupportedLayerError, match="Conv2dQAT: padding_mode='circular'"):
        Conv2dQAT.from_float(nn.Conv2d(1, 2, 3, padding_mode="circular"))
    with pytest.raises(UnsupportedLayerError, match="Conv3dQAT: dilation_d=2"):
        Conv3dQAT(1, 2, 3, dilation=(2, 1, 1))
    with pytest.raises(ConfigError, match="false for LinearQAT"):
        LinearQAT(2, 3, config={"retrain_weight_config": {"channel_wise": True}})
    with pytest.raises(UnsupportedLayerError, match="needs a torch.nn.Conv2d"):
        Conv2dQAT.from_float(nn.Linear(2, 3))
    with pytest.raises(UnsupportedLayerError, match="float32"):
        Conv2dQAT(1, 2, 3, dtype=torch.float64)


def test_input_checks():
    conv = Conv2dQAT(1, 2, 3, config=CLIPPED)
    with pytest.raises(QuantizationError, match="Conv2dQAT: only float32 input"):
        conv(torch.ones(1, 1, 5, 5, dtype=torch.float64))
    with pytest.raises(QuantizationError, match="Conv2dQAT: only 4-D input"):
        conv(torch.ones(1, 5, 5))
    with pytest.raises(QuantizationError, match="ConvTranspose2dQAT: only 4-D input"):
        ConvTranspose2dQAT(1, 2, 3)(torch.ones(1, 1, 1, 5, 5))
    with pytest.raises(QuantizationError, match="Conv3dQAT: only 5-D input"):
        Conv3dQAT(1, 2, 3)(torch.ones(1, 1, 5, 5))
    with pytest.raises(QuantizationError, match="LinearQAT: only float32 input"):
        LinearQAT(2, 2, config={"retrain_weight_config": {"channel_wise": False}})(
            torch.ones(2, 2, dtype=torch.float16))


def test_data_parallel_replicas_are_refused():
    """torch.nn.parallel.replicate (what DataParallel runs on GPUs) sets ``_is_replica`` on
    every module copy; it refuses CPU devices, so the flag is set here as it would set it."""
    net = nn.Sequential(Conv2dQAT(1, 2, 3, config=CLIPPED))
    with pytest.raises(ValueError, match="non cpu device"):
        torch.nn.parallel.replicate(net, [torch.device("cpu")])
    x = torch.ones(1, 1, 5, 5)
    net(x)  # the original module is fine
    net[0]._is_replica = True
    with pytest.raises(AmctValueError, match="Conv2dQAT: torch.nn.DataParallel is not "
                                             "supported.*DistributedDataParallel"):
        net(x)
    net[0]._is_replica = False
    net[0].act_quantizer._is_replica = True
    with pytest.raises(AmctValueError, match="activation quantizer: torch.nn.DataParallel"):
        net(x)


def test_retrain_enable_false_is_the_float_layer():
    torch.manual_seed(4)
    conv = Conv2dQAT(1, 2, 3, config={"retrain_enable": False})
    x = torch.randn(1, 1, 5, 5)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, conv.weight, conv.bias))
    with pytest.raises(QuantizationError, match="retrain_enable is false"):
        conv.quant_factors()


def test_torch_export_gets_a_clear_error_naming_the_torchscript_exporter():
    layer = LinearQAT(4, 3, config={"retrain_weight_config": {"channel_wise": False}})
    layer.train()
    layer(torch.rand(2, 4))  # initialises the clips
    layer.eval()
    with pytest.raises(Exception, match="dynamo=False"):
        torch.export.export(layer, (torch.rand(2, 4),))


def test_from_float_refuses_a_subclass_with_its_own_forward():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2.0

    class PlainSubclass(nn.Conv2d):
        pass

    with pytest.raises(UnsupportedLayerError, match="ScaledConv subclasses torch.nn.Conv2d"):
        Conv2dQAT.from_float(ScaledConv(3, 4, 3), config=None)
    assert isinstance(Conv2dQAT.from_float(PlainSubclass(3, 4, 3), config=None), Conv2dQAT)
