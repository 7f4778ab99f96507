"""Checkpoint tensors mapped from the data file (amct_tensorflow.tensor_decompose.bundle)."""
from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tf1 = tf.compat.v1

from test_tf_tensor_decompose import (  # noqa: E402
    _nhwc_net,
    _save_model,
    _tensor,
)

from amct_core.errors import AmctValueError  # noqa: E402
from amct_tensorflow.tensor_decompose import auto_decomposition, bundle  # noqa: E402


def _save_variables(folder, values: dict[str, np.ndarray]) -> str:
    graph = tf.Graph()
    with graph.as_default():
        variables = [tf1.Variable(value, name=name) for name, value in values.items()]
        with tf1.Session() as session:
            session.run(tf1.variables_initializer(variables))
            return tf1.train.Saver().save(session, str(folder / "vars"))


def test_mapped_tensors_equal_what_tensorflow_reads(tmp_path):
    rng = np.random.default_rng(0)
    values = {"a/kernel": rng.standard_normal((3, 3, 8, 16)).astype(np.float32),
              "b": rng.standard_normal((5, 7)),
              "half": rng.standard_normal((4, 4)).astype(np.float16),
              "count": np.arange(6, dtype=np.int32),
              "scalar": np.float32(2.5)}
    prefix = _save_variables(tmp_path, values)
    index = bundle.read_index(prefix)
    reader = tf.train.load_checkpoint(prefix)
    for name in ("a/kernel", "b", "half", "scalar"):
        mapped = bundle.map_tensor(prefix, index, name)
        assert isinstance(mapped, np.memmap), name
        assert mapped.dtype == values[name].dtype and mapped.shape == np.shape(values[name])
        np.testing.assert_array_equal(mapped, reader.get_tensor(name))
        with pytest.raises(ValueError, match="read-only"):
            mapped[...] = 0
    # Not a float tensor, or not there: TensorFlow reads it.
    assert bundle.map_tensor(prefix, index, "count") is None
    assert bundle.map_tensor(prefix, index, "nope") is None
    assert bundle.map_tensor(prefix, None, "b") is None


def test_an_index_it_cannot_read_gives_none(tmp_path):
    prefix = _save_variables(tmp_path, {"w": np.ones((4, 4), np.float32)})
    table = bytearray((tmp_path / "vars.index").read_bytes())
    (tmp_path / "bad.index").write_bytes(b"\x00garbage")
    assert bundle.read_index(str(tmp_path / "bad")) is None
    (tmp_path / "short.index").write_bytes(bytes(table[:-3]))
    assert bundle.read_index(str(tmp_path / "short")) is None
    assert bundle.read_index(str(tmp_path / "missing")) is None
    # A block marked as compressed (TensorFlow writes none): not handled here.
    index = bundle.read_index(prefix)
    assert index is not None and "w" in index
    data_block_end = table.index(b"\x00\x00\x00\x00\x01\x00\x00\x00") + 8
    table[data_block_end] = 1
    (tmp_path / "packed.index").write_bytes(bytes(table))
    assert bundle.read_index(str(tmp_path / "packed")) is None


def test_auto_decomposition_maps_the_kernel_and_gets_the_same_factors(tmp_path, monkeypatch):
    meta, ckpt, _ = _save_model(_nhwc_net(), tmp_path / "base")
    mapped = []
    original = bundle.map_tensor

    def spy(prefix, index, name):
        result = original(prefix, index, name)
        mapped.append((name, isinstance(result, np.memmap)))
        return result

    monkeypatch.setattr(bundle, "map_tensor", spy)
    auto_decomposition(meta, ckpt, str(tmp_path / "mapped" / "model"))
    assert ("conv2d/kernel", True) in mapped
    monkeypatch.setattr(bundle, "map_tensor", lambda prefix, index, name: None)
    auto_decomposition(meta, ckpt, str(tmp_path / "read" / "model"))
    for name in ("conv2d/Conv2D/decom_first/kernel", "conv2d/Conv2D/decom_last/kernel"):
        np.testing.assert_array_equal(_tensor(str(tmp_path / "mapped" / "model"), name),
                                      _tensor(str(tmp_path / "read" / "model"), name))


def test_a_damaged_kernel_is_caught_before_anything_is_written(tmp_path):
    meta, ckpt, _ = _save_model(_nhwc_net(), tmp_path / "base")
    entry = bundle.read_index(ckpt)["conv2d/kernel"]
    data = tmp_path / "base" / (ckpt.rsplit("/", 1)[-1] + ".data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 100] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(AmctValueError, match="cannot restore the variables of checkpoint "
                                             "'.*model-7' \\(.*Checksum does not match"):
        auto_decomposition(meta, ckpt, str(tmp_path / "out" / "model"))
    assert not (tmp_path / "out").exists()


def test_many_tensors_over_two_shards(tmp_path):
    # Enough entries for several blocks in the index table, on two devices: a sharded save.
    rng = np.random.default_rng(1)
    values = {f"layer_{i:03d}/a_long_scope_name/kernel": rng.standard_normal((3, 5)).astype(
        np.float32) for i in range(300)}
    graph = tf.Graph()
    with graph.as_default():
        for i, (name, value) in enumerate(values.items()):
            with tf.device(f"/cpu:{i % 2}"):
                tf1.Variable(value, name=name)
        saver = tf1.train.Saver(sharded=True)
        with tf1.Session(config=tf1.ConfigProto(device_count={"CPU": 2})) as session:
            session.run(tf1.global_variables_initializer())
            prefix = saver.save(session, str(tmp_path / "sharded"))
    index = bundle.read_index(prefix)
    assert index[""].num_shards == 2
    assert {entry.shard_id for name, entry in index.items() if name} == {0, 1}
    for name, value in values.items():
        np.testing.assert_array_equal(bundle.map_tensor(prefix, index, name), value)
