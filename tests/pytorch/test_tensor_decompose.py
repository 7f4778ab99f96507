"""auto_decomposition and decompose_network on real torch modules (reference §2.4)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sample_runs import amct_messages
from torch import nn

from amct_core.errors import AmctError, InfoFileError, ModelMismatchError
from amct_pytorch.tensor_decompose import auto_decomposition, decompose_network


class Net(nn.Module):
    """The sample's shape: a first conv not worth decomposing, a second one that is."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 128, 3)
        self.conv2 = nn.Conv2d(128, 128, 3)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(64, 96, (3, 5), padding=(1, 2)), nn.ReLU()),
            nn.ModuleDict({"down": nn.Conv2d(96, 64, (5, 3), stride=2, padding=(2, 1))}),
        )
        self.head = nn.Conv2d(64, 64, 3, dilation=2)

    def forward(self, x):
        x = self.blocks[0](self.stem(x))
        return self.head(self.blocks[1]["down"](x))


class MyConv(nn.Conv2d):
    pass


def trained_like(module, seed=0):
    """Give a module weights with a decaying spectrum, like a trained one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
            if p.dim() == 4:
                p.mul_(torch.linspace(2.0, 0.1, p.shape[1]).view(1, -1, 1, 1))
    return module


def truncated_kernel(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank-r reconstruction of a kernel by numpy SVD of the unfolding its mode uses
    (smaller channel axis and smaller kernel axis as rows), independently of the solver."""
    w = weight.detach().double().numpy()
    cout, cin, kh, kw = w.shape
    if cout >= cin:
        axes = (1, 2, 0, 3) if kh <= kw else (1, 3, 0, 2)
    else:
        axes = (0, 2, 1, 3) if kh <= kw else (0, 3, 1, 2)
    t = w.transpose(axes)
    y = t.reshape(t.shape[0] * t.shape[1], -1)
    u, s, vt = np.linalg.svd(y, full_matrices=False)
    yr = ((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(t.shape)
    return torch.from_numpy(yr.transpose(np.argsort(axes)).copy())


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_sample_net_log_lines_info_file_and_outputs(tmp_path, capsys):
    torch.manual_seed(0)
    model = trained_like(Net())
    original_conv2 = model.conv2
    info = tmp_path / "out" / "decompose_info.json"
    result, changes = auto_decomposition(model, str(info))
    assert result is model
    assert changes == {"conv2": ["conv2.0", "conv2.1"]}
    assert isinstance(model.conv2, nn.Sequential) and model.conv1.__class__ is nn.Conv2d
    first, last = model.conv2
    assert tuple(first.weight.shape) == (64, 128, 3, 1) and first.bias is None
    assert tuple(last.weight.shape) == (128, 64, 1, 3)
    torch.testing.assert_close(last.bias, original_conv2.bias)
    assert amct_messages(capsys.readouterr().out) == [
        "auto_decomposition start.",
        "Processing: 'conv1'",
        "Processing: 'conv2'",
        f"Decomposition information file is saved to: {info}",
        "Decompose: 'conv2' -> ['conv2.0', 'conv2.1']",
        "auto_decomposition complete.",
    ]
    assert json.loads(info.read_text()) == [{
        "ori_layer_info": {"name": "conv2", "in_channels": 128, "out_channels": 128,
                           "kernel_size": [3, 3], "stride": [1, 1], "dilation": [1, 1],
                           "groups": 1},
        "mode": "SCFK",
        "decom_nodes": {"first": {"weight_shape": [64, 128, 3, 1]},
                        "last": {"weight_shape": [128, 64, 1, 3]}}}]
    # The decomposed conv computes the conv of the rank-64 kernel.
    h = torch.randn(2, 128, 9, 9, dtype=torch.float64)
    expected = F.conv2d(h, truncated_kernel(original_conv2.weight, 64),
                        original_conv2.bias.double())
    torch.testing.assert_close(model.conv2.double()(h), expected, rtol=1e-5, atol=1e-6)


def test_online_and_offline_give_identical_outputs(tmp_path):
    torch.manual_seed(1)
    online = trained_like(Net(), seed=3)
    info = tmp_path / "info.json"
    online, _ = auto_decomposition(online, info)
    weights = tmp_path / "decomposed.pth"
    torch.save(online.state_dict(), weights)
    offline = Net()
    offline, changes = decompose_network(offline, info)
    assert changes == {"conv2": ["conv2.0", "conv2.1"]}
    offline.load_state_dict(torch.load(weights, weights_only=True))
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(offline(x), online(x), rtol=0, atol=0)


def test_decompose_network_log_lines(tmp_path, capsys):
    info = tmp_path / "info.json"
    auto_decomposition(trained_like(Net()), info)
    capsys.readouterr()
    decompose_network(Net(), info)
    assert amct_messages(capsys.readouterr().out) == [
        "decompose_network start.",
        "Decompose: 'conv2' -> ['conv2.0', 'conv2.1']",
        "decompose_network complete.",
    ]


def test_nested_modules_strides_and_paddings(tmp_path):
    torch.manual_seed(2)
    model = trained_like(Nested(), seed=5)
    reference = {name: m for name, m in model.named_modules()}
    x = torch.randn(2, 3, 20, 20)
    model, changes = auto_decomposition(model, tmp_path / "i.json")
    assert changes == {"blocks.0.0": ["blocks.0.0.0", "blocks.0.0.1"],
                       "blocks.1.down": ["blocks.1.down.0", "blocks.1.down.1"]}
    assert model.stem.__class__ is nn.Conv2d  # 3 input channels: not worth it
    assert model.head.__class__ is nn.Conv2d  # dilation 2: not supported
    for name in changes:
        conv, pair = reference[name], model.get_submodule(name)
        h = torch.randn(2, conv.in_channels, 11, 13)
        rank = pair[0].weight.shape[0]
        expected = F.conv2d(h.double(), truncated_kernel(conv.weight, rank),
                            conv.bias.double(), conv.stride, conv.padding)
        torch.testing.assert_close(pair(h).double(), expected, rtol=1e-4, atol=1e-5)
    rebuilt, _ = decompose_network(Nested(), tmp_path / "i.json")
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model(x))


def test_every_mode_computes_the_truncated_kernel():
    cases = [(128, 96, (3, 5)), (128, 96, (5, 3)), (64, 96, (3, 5)), (64, 96, (5, 3))]
    for cout, cin, kernel in cases:
        conv = trained_like(nn.Conv2d(cin, cout, kernel, stride=(2, 1), padding=(2, 1)))
        wrapper = nn.Sequential(conv)
        wrapper, changes = auto_decomposition(wrapper)
        pair = wrapper[0]
        assert changes == {"0": ["0.0", "0.1"]}
        rank = pair[0].weight.shape[0]
        h = torch.randn(1, cin, 12, 12, dtype=torch.float64)
        expected_kernel = truncated_kernel(conv.weight, rank)
        expected = F.conv2d(h, expected_kernel, conv.bias.double(), (2, 1), (2, 1))
        torch.testing.assert_close(pair.double()(h), expected, rtol=1e-5, atol=1e-6)


def test_model_that_is_a_conv_returns_a_new_sequential():
    conv = trained_like(nn.Conv2d(128, 128, 3, padding=1))
    result, changes = auto_decomposition(conv)
    assert isinstance(result, nn.Sequential) and result is not conv
    assert isinstance(conv, nn.Conv2d)  # the original object is left as it was
    assert changes == {"": ["0", "1"]}


def test_subclass_is_decomposed():
    model = nn.Sequential(trained_like(MyConv(128, 128, 3)))
    model, changes = auto_decomposition(model)
    assert changes == {"0": ["0.0", "0.1"]}


def test_shared_module_is_decomposed_once_and_stays_shared(tmp_path):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(64, 64, 3, padding=1)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    model = trained_like(Shared())
    x = torch.randn(1, 64, 8, 8)
    model, changes = auto_decomposition(model, tmp_path / "i.json")
    assert changes == {"a": ["a.0", "a.1"], "b": ["b.0", "b.1"]}
    assert model.a is model.b
    rebuilt, _ = decompose_network(Shared(), tmp_path / "i.json")
    assert rebuilt.a is rebuilt.b
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model(x))


def test_shared_weight_between_two_convs_is_factored_once():
    one = trained_like(nn.Conv2d(64, 64, 3))
    two = nn.Conv2d(64, 64, 3)
    two.weight = one.weight
    model = nn.Sequential(one, nn.ReLU(), two)
    model, changes = auto_decomposition(model)
    assert set(changes) == {"0", "2"}
    assert model[0][0].weight is model[2][0].weight
    assert model[0][1].weight is model[2][1].weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    model = trained_like(Net()).to(dtype)
    model, _ = auto_decomposition(model)
    assert {p.dtype for p in model.parameters()} == {dtype}
    out = model(torch.randn(2, 1, 12, 12, dtype=dtype))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


def test_float16_values_are_clamped_to_the_finite_range():
    conv = nn.Conv2d(64, 64, 3).half()
    with torch.no_grad():
        conv.weight.copy_(torch.full_like(conv.weight, 60000.0))
        conv.weight[0, 0, 0, 0] = -60000.0
    pair, _ = auto_decomposition(conv)
    assert bool(torch.isfinite(pair[0].weight).all()) and bool(torch.isfinite(pair[1].weight).all())


def test_channels_last_and_requires_grad_are_kept():
    model = trained_like(Net()).to(memory_format=torch.channels_last)
    model.conv2.weight.requires_grad_(False)
    model, _ = auto_decomposition(model)
    for conv in model.conv2:
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not conv.weight.requires_grad
    assert model.conv2[1].bias.requires_grad


def test_device_is_kept():
    model = trained_like(Net())
    model, _ = auto_decomposition(model)
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


def test_padding_mode_and_same_padding_compose_exactly():
    for padding_mode in ("zeros", "reflect", "circular", "replicate"):
        conv = trained_like(nn.Conv2d(64, 64, 3, padding=1, padding_mode=padding_mode))
        full_rank = nn.Sequential(conv)
        h = torch.randn(1, 64, 9, 9, dtype=torch.float64)
        expected = conv.double()(h)
        pair = auto_decomposition(full_rank)[0][0].double()
        assert pair[0].padding_mode == padding_mode
        # Compose the factors into one kernel and check it is what the pair computes.
        w = torch.einsum("kih,okw->oihw", pair[0].weight[..., 0], pair[1].weight[:, :, 0])
        composed = F.conv2d(F.pad(h, (1, 1, 1, 1), mode="constant" if padding_mode == "zeros"
                                  else padding_mode), w, pair[1].bias)
        torch.testing.assert_close(pair(h), composed, rtol=1e-6, atol=1e-8)
        assert expected.shape == composed.shape
    same = nn.Sequential(trained_like(nn.Conv2d(64, 64, 3, padding="same")))
    pair = auto_decomposition(same)[0][0]
    assert pair[0].padding == "same" and pair[1].padding == "same"
    assert pair(torch.randn(1, 64, 7, 7)).shape == (1, 64, 7, 7)


def test_nothing_eligible(tmp_path, capsys):
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Conv2d(16, 16, 1))
    info = tmp_path / "info.json"
    _, changes = auto_decomposition(model, info)
    assert changes == {} and not info.exists()
    messages = amct_messages(capsys.readouterr().out)
    assert ("No tensor meets decomposition conditions. Decomposition information file is not "
            "saved.") in messages
    auto_decomposition(model)
    assert "No tensor meets decomposition conditions." in amct_messages(capsys.readouterr().out)


def test_nan_and_unsupported_dtype_are_skipped_with_a_warning(capsys):
    model = trained_like(nn.Sequential(nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 3)))
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    model[1].to(torch.bfloat16)
    model, changes = auto_decomposition(model)
    assert changes == {}
    out = capsys.readouterr().out
    assert "WARNING - [AMCT]:[AMCT]: Weight of layer '0' contains NaN or Inf, ignored." in out
    assert "Unsupported data type torch.bfloat16 of layer '1', ignored." in out


def test_fine_tuning_updates_the_new_weights():
    model = trained_like(Net())
    model, _ = auto_decomposition(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.conv2[0].weight.detach().clone()
    loss = F.cross_entropy(model(torch.randn(8, 1, 12, 12)), torch.arange(8) % 10)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.conv2[0].weight)


def test_model_argument_is_checked(tmp_path):
    with pytest.raises(AmctError, match="'model' must be a torch.nn.Module"):
        auto_decomposition("model.pth")
    with pytest.raises(TypeError):
        decompose_network(None, "info.json")
    with pytest.raises(TypeError, match="wrapped in DataParallel; call auto_decomposition on the "
                                        "bare model"):
        auto_decomposition(nn.DataParallel(Net()))


def test_info_path_that_is_a_directory_leaves_the_model(tmp_path):
    model = trained_like(Net())
    with pytest.raises(InfoFileError, match="it is a directory"):
        auto_decomposition(model, tmp_path)
    assert isinstance(model.conv2, nn.Conv2d)


@pytest.fixture
def info_file(tmp_path):
    path = tmp_path / "info.json"
    auto_decomposition(trained_like(Net()), path)
    return path


def _snapshot(model):
    return [(name, type(m)) for name, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("field", "build"),
    [
        ("in_channels", lambda: nn.Conv2d(64, 128, 3)),
        ("out_channels", lambda: nn.Conv2d(128, 96, 3)),
        ("kernel_size", lambda: nn.Conv2d(128, 128, 5)),
        ("stride", lambda: nn.Conv2d(128, 128, 3, stride=2)),
        ("dilation", lambda: nn.Conv2d(128, 128, 3, dilation=2)),
        ("groups", lambda: nn.Conv2d(128, 128, 3, groups=2)),
    ],
)
def test_mismatch_names_layer_and_field_and_leaves_the_model(info_file, field, build):
    model = Net()
    model.conv2 = build()
    structure, state = _snapshot(model)
    with pytest.raises(ModelMismatchError) as error:
        decompose_network(model, info_file)
    assert str(error.value).startswith(
        f"{field} of layer 'conv2' does not match the original model, please check the model "
        f"definition and the decomposition information file.")
    after_structure, after_state = _snapshot(model)
    assert after_structure == structure
    assert all(torch.equal(state[k], after_state[k]) for k in state)


def test_missing_layer_and_wrong_type(info_file):
    class NoConv2(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 128, 3)

    with pytest.raises(ModelMismatchError, match=r"^Cannot find layer 'conv2' in model\.$"):
        decompose_network(NoConv2(), info_file)
    model = Net()
    model.conv2 = nn.Linear(3, 3)
    with pytest.raises(ModelMismatchError,
                       match=r"^Layer 'conv2' should be a torch.nn.Conv2d object"):
        decompose_network(model, info_file)


def test_decompose_network_twice_is_refused(info_file):
    model, _ = decompose_network(Net(), info_file)
    with pytest.raises(ModelMismatchError, match="'conv2' should be a torch.nn.Conv2d object, "
                                                 "got Sequential"):
        decompose_network(model, info_file)


def test_bad_info_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json' does not exist"):
        decompose_network(Net(), tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    model = Net()
    with pytest.raises(InfoFileError, match="bad.json' is not valid JSON"):
        decompose_network(model, bad)
    assert isinstance(model.conv2, nn.Conv2d)
    bad.write_text(json.dumps([{"mode": "SCFK"}]))
    with pytest.raises(InfoFileError, match="missing key 'ori_layer_info'"):
        decompose_network(model, bad)
