"""amct_tensorflow.tensor_decompose: auto_decomposition and decompose_graph on tf.compat.v1 graphs.

Kernels here are random (seeded): every numeric assertion is an identity (the decomposed graph
computes the original graph with the kernel replaced by its best rank-r approximation), which
holds for any weights. Trained weights are exercised by the sample tests.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tf1 = tf.compat.v1

from amct_core.decompose.change_file import read_change_file  # noqa: E402
from amct_core.errors import (  # noqa: E402
    AmctFileNotFoundError,
    AmctTypeError,
    AmctValueError,
    InfoFileError,
    ModelMismatchError,
)
from amct_tensorflow.tensor_decompose import auto_decomposition, decompose_graph  # noqa: E402

AMCT = "[AMCT]:[AMCT]: "
Builder = Callable[[], tuple]


def _conv(x, filters: int, kernel: tuple[int, int], name: str, strides=(1, 1),
          padding="SAME", data_format="NHWC", dilations=(1, 1)):
    """A conv + bias built from tf.compat.v1.get_variable and tf.nn (names as tf.layers)."""
    channels = x.shape[3] if data_format == "NHWC" else x.shape[1]
    with tf1.variable_scope(name):
        kernel_var = tf1.get_variable("kernel", [*kernel, channels, filters])
        bias = tf1.get_variable("bias", [filters], initializer=tf1.zeros_initializer())
        y = tf.nn.conv2d(x, kernel_var, strides=[1, *strides, 1] if data_format == "NHWC"
                         else [1, 1, *strides], padding=padding, data_format=data_format,
                         dilations=[1, *dilations, 1] if data_format == "NHWC"
                         else [1, 1, *dilations], name="Conv2D")
        return tf.nn.bias_add(y, bias, data_format=data_format, name="BiasAdd")


def _nhwc_net(padding="SAME", strides=(1, 1), kernel=(3, 3)) -> Builder:
    def build():
        x = tf1.placeholder(tf.float32, [None, 12, 12, 64], name="x")
        y = _conv(x, 64, kernel, "conv2d", strides=strides, padding=padding)
        y = tf.nn.relu(y)
        y = _conv(y, 16, (1, 1), "conv2d_1")  # 1x1: never decomposed
        return x, tf.identity(y, name="out")
    return build


def _save_model(build: Builder, folder: Path, seed: int = 0) -> tuple[str, str, np.ndarray]:
    """Build, initialise with seeded values, save; return (meta, ckpt prefix, test input)."""
    folder.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(seed)
        x, _ = build()
        saver = tf1.train.Saver()
        with tf1.Session() as session:
            session.run(tf1.global_variables_initializer())
            prefix = saver.save(session, str(folder / "model"), global_step=7)
    rng = np.random.default_rng(seed)
    shape = [2 if d is None else int(d) for d in x.shape]
    return prefix + ".meta", prefix, rng.standard_normal(shape).astype(np.float32)


def _run(build: Builder, ckpt: str, data: np.ndarray, decompose_from: str | None = None,
         kernels: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Output of a freshly built graph restored from ``ckpt`` (optionally decomposed first,
    optionally with some kernels overwritten)."""
    graph = tf.Graph()
    with graph.as_default():
        x, out = build()
        if decompose_from is not None:
            decompose_graph(decompose_from)
        saver = tf1.train.Saver(tf1.global_variables())
        with tf1.Session() as session:
            saver.restore(session, ckpt)
            for name, value in (kernels or {}).items():
                variable = next(v for v in tf1.global_variables() if v.op.name == name)
                variable.load(value, session)
            return session.run(out, {x: data})


def _tensor(ckpt: str, name: str) -> np.ndarray:
    return tf.train.load_checkpoint(ckpt).get_tensor(name)


def _reconstruct(first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, bool]:
    """The (KH, KW, Cin, Cout) kernel two HWIO split convs compute; and whether the first
    conv spans H."""
    if first.shape[1] == 1:  # first (KH,1,Cin,r), last (1,KW,r,Cout)
        return np.einsum("hir,wro->hwio", first[:, 0], last[0]), True
    return np.einsum("wir,hro->hwio", first[0], last[:, 0]), False  # first (1,KW,..)


def _best_rank_error(kernel: np.ndarray, rank: int, first_spans_h: bool) -> float:
    """Squared Frobenius error of the best rank-r approximation of the kernel unfolding whose
    rows pair the input channel with the first conv's kernel axis."""
    kh, kw, cin, cout = kernel.shape
    if first_spans_h:
        matrix = kernel.transpose(2, 0, 3, 1).reshape(cin * kh, cout * kw)
    else:
        matrix = kernel.transpose(2, 1, 3, 0).reshape(cin * kw, cout * kh)
    singular = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    return float(np.sum(singular[rank:] ** 2))


def _check_rank_r_identity(build: Builder, tmp_path: Path, conv: str | None = "conv2d/Conv2D",
                           kernel_var: str | None = "conv2d/kernel") -> None:
    """``conv``/``kernel_var`` None: whatever names the framework gave the one conv."""
    meta, ckpt, data = _save_model(build, tmp_path / "base")
    save = str(tmp_path / "dec" / "model")
    new_ops = auto_decomposition(meta, ckpt, save)
    (change,) = read_change_file(save + ".pkl")
    conv = conv or change.conv
    kernel_var = kernel_var or change.kernel
    assert (change.conv, change.kernel) == (conv, kernel_var)
    assert new_ops == [f"{conv}/decom_first/decom_first", f"{conv}/decom_last/decom_last"]
    first = _tensor(save, f"{conv}/decom_first/kernel")
    last = _tensor(save, f"{conv}/decom_last/kernel")
    original = _tensor(ckpt, kernel_var)
    approx, first_spans_h = _reconstruct(first, last)
    assert first.shape[3] == last.shape[2] == change.rank
    error = float(np.sum((original.astype(np.float64) - approx) ** 2))
    assert error == pytest.approx(_best_rank_error(original, change.rank, first_spans_h),
                                  rel=1e-3, abs=1e-6)
    expected = _run(build, ckpt, data, kernels={kernel_var: approx.astype(np.float32)})
    for restored in (_run(build, save, data, decompose_from=save),
                     _run_meta(save, data)):
        np.testing.assert_allclose(restored, expected, rtol=1e-4, atol=1e-4)


def _run_meta(save: str, data: np.ndarray) -> np.ndarray:
    """Output of the decomposed .meta graph itself, restored from the decomposed checkpoint."""
    graph = tf.Graph()
    with graph.as_default():
        saver = tf1.train.import_meta_graph(save + ".meta")
        with tf1.Session() as session:
            saver.restore(session, save)
            return session.run("out:0", {"x:0": data})


@pytest.mark.parametrize("padding, strides, kernel", [
    ("SAME", (1, 1), (3, 3)),
    ("VALID", (1, 1), (3, 3)),
    ("SAME", (2, 2), (3, 3)),
    ("VALID", (2, 1), (3, 5)),
    ("SAME", (1, 2), (5, 3)),
    ([[0, 0], [1, 2], [0, 1], [0, 0]], (1, 1), (3, 3)),
])
def test_decomposed_graph_computes_the_rank_r_kernel(tmp_path, padding, strides, kernel):
    _check_rank_r_identity(_nhwc_net(padding, strides, kernel), tmp_path)


def test_nchw_conv(tmp_path):
    def build():
        x = tf1.placeholder(tf.float32, [None, 64, 10, 10], name="x")
        y = _conv(x, 80, (3, 3), "conv2d", strides=(2, 2), data_format="NCHW")
        return x, tf.identity(y, name="out")
    _check_rank_r_identity(build, tmp_path)
    (change,) = read_change_file(tmp_path / "dec" / "model.pkl")
    assert change.data_format == "NCHW"
    strides = {change.first.strides, change.last.strides}
    assert strides == {(1, 1, 2, 1), (1, 1, 1, 2)}


def test_tf_layers_conv2d(tmp_path):
    layers = getattr(tf1, "layers", None)
    try:
        layers.conv2d  # noqa: B018 - raises where tf.compat.v1.layers needs Keras 2
    except Exception:
        pytest.skip("tf.compat.v1.layers is not available with this TensorFlow/Keras")

    def build():
        x = tf1.placeholder(tf.float32, [None, 10, 10, 64], name="x")
        y = layers.conv2d(x, 64, 3, padding="same", activation=tf.nn.relu)
        return x, tf.identity(y, name="out")
    _check_rank_r_identity(build, tmp_path)


def test_keras_conv2d_layer(tmp_path):
    """A tf.keras Conv2D in a TF1 graph: Keras 2 (TF 2.15) names the op conv2d/Conv2D, Keras 3
    (TF >= 2.16) conv2d/convolution; both are decomposed."""
    import keras as keras_package

    keras = tf.keras

    def build():
        x = tf1.placeholder(tf.float32, [None, 10, 10, 64], name="x")
        y = keras.layers.Conv2D(64, 3, padding="same", name="conv2d")(x)
        return x, tf.identity(y, name="out")
    keras_2 = keras_package.__version__.startswith("2.")
    _check_rank_r_identity(build, tmp_path, conv="conv2d/Conv2D" if keras_2 else None,
                           kernel_var="conv2d/kernel")


def test_ref_variables(tmp_path):
    def build():
        x = tf1.placeholder(tf.float32, [None, 10, 10, 64], name="x")
        with tf1.variable_scope("", use_resource=False):
            y = _conv(x, 64, (3, 3), "conv2d")
        return x, tf.identity(y, name="out")
    _check_rank_r_identity(build, tmp_path)
    graph = tf.Graph()
    with graph.as_default():
        build()
        decompose_graph(str(tmp_path / "dec" / "model"))
        kinds = {graph.get_operation_by_name(f"conv2d/Conv2D/{part}/kernel").type
                 for part in ("decom_first", "decom_last")}
    assert kinds == {"VariableV2"}


def test_shared_kernel_gets_shared_factors(tmp_path):
    def build():
        x = tf1.placeholder(tf.float32, [None, 10, 10, 64], name="x")
        with tf1.variable_scope("conv2d"):
            kernel = tf1.get_variable("kernel", [3, 3, 64, 64])
        a = tf.nn.conv2d(x, kernel, 1, "SAME", name="branch_a")
        b = tf.nn.conv2d(tf.nn.relu(x), kernel, 1, "SAME", name="branch_b")
        return x, tf.identity(a + b, name="out")
    meta, ckpt, data = _save_model(build, tmp_path / "base")
    save = str(tmp_path / "dec" / "model")
    new_ops = auto_decomposition(meta, ckpt, save)
    assert len(new_ops) == 4
    changes = read_change_file(save + ".pkl")
    assert {c.first.variable for c in changes} == {"branch_a/decom_first/kernel"}
    decomposed = _run(build, save, data, decompose_from=save)
    np.testing.assert_allclose(decomposed, _run_meta(save, data), rtol=1e-5, atol=1e-5)


def test_ineligible_convs_are_left_alone(tmp_path, caplog):
    def build():
        x = tf1.placeholder(tf.float32, [None, 12, 12, 64], name="x")
        y = _conv(x, 64, (3, 3), "dilated", dilations=(2, 2))
        y = _conv(y, 64, (3, 3), "strided", strides=(3, 3))
        y = _conv(y, 32, (3, 3), "narrow")  # min channels 32 < 64 with a 3x3 kernel
        return x, tf.identity(y, name="out")
    meta, ckpt, data = _save_model(build, tmp_path / "base")
    save = str(tmp_path / "dec" / "model")
    assert auto_decomposition(meta, ckpt, save) == []
    assert read_change_file(save + ".pkl") == []
    np.testing.assert_allclose(_run(build, save, data, decompose_from=save),
                               _run(build, ckpt, data), rtol=1e-6)


def test_fine_tuning_trains_the_factors_not_the_old_kernel(tmp_path):
    build = _nhwc_net()
    meta, ckpt, data = _save_model(build, tmp_path / "base")
    save = str(tmp_path / "dec" / "model")
    auto_decomposition(meta, ckpt, save)
    graph = tf.Graph()
    with graph.as_default():
        x, out = build()
        decompose_graph(save)
        restorer = tf1.train.Saver(tf1.global_variables())
        loss = tf.reduce_mean(tf.square(out))
        variables = {v.op.name: v for v in tf1.global_variables()}
        grads = tf.gradients(loss, [variables["conv2d/kernel"],
                                    variables["conv2d/Conv2D/decom_first/kernel"],
                                    variables["conv2d/Conv2D/decom_last/kernel"]])
        assert grads[0] is None and grads[1] is not None and grads[2] is not None
        trainable = {v.op.name for v in tf1.trainable_variables()}
        assert "conv2d/kernel" not in trainable
        assert {"conv2d/Conv2D/decom_first/kernel", "conv2d/Conv2D/decom_last/kernel"} <= trainable
        train = tf1.train.AdamOptimizer(1e-3).minimize(loss)
        rest = [v for v in tf1.global_variables() if v not in restorer._var_list]
        with tf1.Session() as session:
            session.run(tf1.variables_initializer(rest))
            restorer.restore(session, save)
            before = session.run(loss, {x: data})
            old_kernel = session.run(variables["conv2d/kernel"])
            for _ in range(5):
                session.run(train, {x: data})
            assert session.run(loss, {x: data}) < before
            np.testing.assert_array_equal(session.run(variables["conv2d/kernel"]), old_kernel)


def test_estimator_warm_start(tmp_path):
    estimator = getattr(tf, "estimator", None)
    if estimator is None or not hasattr(estimator, "Estimator"):
        pytest.skip("tf.estimator no longer exists in TensorFlow >= 2.16")
    build = _nhwc_net()
    meta, ckpt, data = _save_model(build, tmp_path / "base")
    save = str(tmp_path / "dec" / "model")
    auto_decomposition(meta, ckpt, save)

    def model_fn(features, labels, mode, params):
        graph = tf1.get_default_graph()
        with tf1.variable_scope("", reuse=False):
            x = features
            y = _conv(x, 64, (3, 3), "conv2d")
            y = _conv(tf.nn.relu(y), 16, (1, 1), "conv2d_1")
        decompose_graph(params["save_path"], graph)
        return estimator.EstimatorSpec(mode, predictions=y)

    runner = estimator.Estimator(model_fn, model_dir=str(tmp_path / "est"),
                                 params={"save_path": save}, warm_start_from=save)
    predictions = np.stack(list(runner.predict(
        lambda: tf.data.Dataset.from_tensor_slices(data).batch(2), yield_single_examples=True)))
    np.testing.assert_allclose(predictions, _run_meta(save, data), rtol=1e-4, atol=1e-4)


def test_log_lines(tmp_path, caplog):
    meta, ckpt, _ = _save_model(_nhwc_net(), tmp_path / "base")
    with caplog.at_level("INFO", logger="amct"):
        auto_decomposition(meta, ckpt, str(tmp_path / "dec" / "model"))
    messages = [r.getMessage() for r in caplog.records]
    assert "Decompose conv2d/Conv2D -> ['conv2d/Conv2D/decom_first/decom_first', " \
           "'conv2d/Conv2D/decom_last/decom_last']" in messages
    assert messages[-1] == "auto_decomposition complete."


def test_outputs_and_inputs_on_disk(tmp_path):
    meta, ckpt, _ = _save_model(_nhwc_net(), tmp_path / "base")
    before = {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()}
    auto_decomposition(meta, ckpt, str(tmp_path / "dec" / "model"))
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == [
        "checkpoint", "model.data-00000-of-00001", "model.index", "model.meta", "model.pkl"]
    assert tf.train.latest_checkpoint(str(tmp_path / "dec")) == str(tmp_path / "dec" / "model")
    assert {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()} == before
    assert oct(os.stat(tmp_path / "dec" / "model.pkl").st_mode & 0o777) == "0o640"


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    meta, ckpt, _data = _save_model(_nhwc_net(), root / "base")
    save = str(root / "dec" / "model")
    auto_decomposition(meta, ckpt, save)
    return meta, ckpt, save


def test_missing_meta(saved, tmp_path):
    _, ckpt, _ = saved
    with pytest.raises(AmctFileNotFoundError, match="meta_path '.*nope.meta' does not exist"):
        auto_decomposition(str(tmp_path / "nope.meta"), ckpt, str(tmp_path / "out" / "m"))
    assert not (tmp_path / "out").exists()


def test_unreadable_meta(saved, tmp_path):
    _, ckpt, _ = saved
    garbage = tmp_path / "garbage.meta"
    garbage.write_bytes(b"this is not a MetaGraphDef")
    with pytest.raises(AmctValueError, match="cannot import the graph of meta_path "
                                             "'.*garbage.meta'"):
        auto_decomposition(str(garbage), ckpt, str(tmp_path / "out" / "m"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix, message", [
    (".index", "names a .index file; ckpt_path is the common prefix"),
    ("-wrong", "checkpoint '.*-wrong' not found: '.*-wrong.index' does not exist"),
])
def test_wrong_checkpoint_prefix(saved, tmp_path, suffix, message):
    meta, ckpt, _ = saved
    with pytest.raises(AmctValueError if suffix == ".index" else AmctFileNotFoundError,
                       match=message):
        auto_decomposition(meta, ckpt + suffix, str(tmp_path / "out" / "m"))


def test_checkpoint_directory_and_overwrite_refused(saved, tmp_path):
    meta, ckpt, _ = saved
    with pytest.raises(AmctValueError, match="is a directory"):
        auto_decomposition(meta, os.path.dirname(ckpt), str(tmp_path / "m"))
    with pytest.raises(AmctValueError, match="would overwrite the model being decomposed"):
        auto_decomposition(meta, ckpt, ckpt)
    with pytest.raises(AmctTypeError, match="'save_path' must be a path"):
        auto_decomposition(meta, ckpt, 3)


def test_corrupt_checkpoint(saved, tmp_path):
    meta, _ckpt, _ = saved
    broken = tmp_path / "broken"
    (tmp_path / "broken.index").write_bytes(b"\x00garbage")
    with pytest.raises(AmctValueError, match="cannot read checkpoint '.*broken'"):
        auto_decomposition(meta, str(broken), str(tmp_path / "out" / "m"))


def test_missing_change_file(tmp_path):
    with tf.Graph().as_default():
        _nhwc_net()()
        with pytest.raises(AmctFileNotFoundError, match="graph-change file '.*m.pkl' does not "
                                                        "exist"):
            decompose_graph(str(tmp_path / "m"))


def test_corrupt_change_file(saved, tmp_path):
    _, _, save = saved
    target = tmp_path / "model.pkl"
    target.write_bytes(Path(save + ".pkl").read_bytes()[:40])
    with tf.Graph().as_default():
        _nhwc_net()()
        with pytest.raises(InfoFileError, match="cannot be read"):
            decompose_graph(str(tmp_path / "model"))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_crafted_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.pkl").write_bytes(pickle.dumps({"format": _Exploit()}))
    with tf.Graph().as_default():
        _nhwc_net()()
        with pytest.raises(InfoFileError, match="refusing to load .*'posix.system'|"
                                                "refusing to load .*'os.system'"):
            decompose_graph(str(tmp_path / "model"))
    assert not (tmp_path / "pwned").exists()


def test_mismatching_graph_names_conv_and_field(saved):
    _, _, save = saved
    graph = tf.Graph()
    with graph.as_default():
        _nhwc_net(kernel=(3, 5))()
        count = len(graph.get_operations())
        with pytest.raises(ModelMismatchError, match="conv 'conv2d/Conv2D' does not match "
                                                     ".*its kernel_shape is \\(3, 5, 64, 64\\)"):
            decompose_graph(save)
        assert len(graph.get_operations()) == count  # nothing was added


def test_missing_conv_is_named(saved):
    _, _, save = saved
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, [None, 12, 12, 64])
        _conv(x, 64, (3, 3), "other")
        with pytest.raises(ModelMismatchError, match="no Conv2D op 'conv2d/Conv2D'"):
            decompose_graph(save)


def test_decompose_graph_twice(saved):
    _, _, save = saved
    with tf.Graph().as_default():
        _nhwc_net()()
        decompose_graph(save)
        with pytest.raises(ModelMismatchError, match="already been applied"):
            decompose_graph(save)


def test_eager_mode_without_graph(saved):
    _, _, save = saved
    if not tf.executing_eagerly():
        pytest.skip("eager execution is disabled in this process")
    with pytest.raises(AmctValueError, match="executing eagerly"):
        decompose_graph(save)
