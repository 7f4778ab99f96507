"""Checkpoints read and written without TensorFlow's ops
(amct_tensorflow.tensor_decompose.bundle): tensors mapped from the data file, and the
decomposed checkpoint written by copying the original one."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tf1 = tf.compat.v1

from test_tf_tensor_decompose import (  # noqa: E402
    _nhwc_net,
    _save_model,
    _tensor,
)

from amct_core import crc32c  # noqa: E402
from amct_core.errors import AmctValueError  # noqa: E402
from amct_tensorflow.tensor_decompose import auto_decomposition, bundle  # noqa: E402


def _save_variables(folder, values: dict[str, np.ndarray]) -> str:
    graph = tf.Graph()
    with graph.as_default():
        variables = [tf1.Variable(value, name=name) for name, value in values.items()]
        with tf1.Session() as session:
            session.run(tf1.variables_initializer(variables))
            return tf1.train.Saver().save(session, str(folder / "vars"))


def _save_sharded(folder, values: dict[str, np.ndarray]) -> str:
    """A sharded save over two CPU devices (variables alternately on each): two data files."""
    graph = tf.Graph()
    with graph.as_default():
        for i, (name, value) in enumerate(values.items()):
            with tf.device(f"/cpu:{i % 2}"):
                tf1.Variable(value, name=name)
        saver = tf1.train.Saver(sharded=True)
        with tf1.Session(config=tf1.ConfigProto(device_count={"CPU": 2})) as session:
            session.run(tf1.global_variables_initializer())
            return saver.save(session, str(folder / "sharded"))


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
    prefix = _save_sharded(tmp_path, values)
    index = bundle.read_index(prefix)
    assert index[""].num_shards == 2
    assert {entry.shard_id for name, entry in index.items() if name} == {0, 1}
    for name, value in values.items():
        np.testing.assert_array_equal(bundle.map_tensor(prefix, index, name), value)


needs_fast_crc = pytest.mark.skipif(
    not crc32c.fast(), reason="the C extension amct_core._crc32c was not built (no C compiler)")


@needs_fast_crc
def test_written_checkpoint_holds_the_original_tensors_and_the_new_ones(tmp_path):
    rng = np.random.default_rng(2)
    values = {"a/kernel": rng.standard_normal((3, 3, 8, 16)).astype(np.float32),
              "b": rng.standard_normal((5, 7)),
              "count": np.arange(6, dtype=np.int32),
              "step": np.int64(41)}
    prefix = _save_variables(tmp_path, values)
    index = bundle.read_index(prefix)
    assert bundle.supports_writing(index)
    new = {"a/first": rng.standard_normal((4, 3)).astype(np.float32).T,  # not C-ordered
           "a/half": rng.standard_normal((2, 5)).astype(np.float16),
           "a/scalar": np.float64(-2.5)}
    target = str(tmp_path / "out" / "model")
    (tmp_path / "out").mkdir()
    bundle.write_with_tensors(prefix, index, target, new)
    reader = tf.train.load_checkpoint(target)  # TensorFlow checks every CRC as it reads
    assert reader.get_variable_to_shape_map() == {
        **{name: list(np.shape(value)) for name, value in values.items()},
        **{name: list(np.shape(value)) for name, value in new.items()}}
    for name, value in {**values, **new}.items():
        read = reader.get_tensor(name)
        assert read.dtype == np.asarray(value).dtype, name
        np.testing.assert_array_equal(read, value)
    # A TF1 Saver restores from it as from any checkpoint.
    graph = tf.Graph()
    with graph.as_default():
        variable = tf1.Variable(np.zeros((3, 4), np.float32), name="a/first")
        with tf1.Session() as session:
            tf1.train.Saver([variable]).restore(session, target)
            np.testing.assert_array_equal(session.run(variable), new["a/first"])
    # The index reads back with this module's reader too; its header is the original's.
    written = bundle.read_index(target)
    assert written[""] == index[""] and sorted(written) == sorted(["", *values, *new])
    with pytest.raises(ValueError, match="cannot add tensor 'count'"):
        bundle.write_with_tensors(prefix, index, str(tmp_path / "out" / "again"),
                                  {"count": np.ones(2, np.float32)})


@needs_fast_crc
def test_only_checkpoints_of_numbers_are_copied(tmp_path):
    # Strings are stored with lengths and checksums of their own: TensorFlow saves those.
    (tmp_path / "numbers").mkdir()
    (tmp_path / "words").mkdir()
    numbers = _save_variables(tmp_path / "numbers", {"w": np.ones(3, np.float32),
                                                    "step": np.int64(3), "flag": np.bool_(True)})
    assert bundle.supports_writing(bundle.read_index(numbers))
    words = _save_variables(tmp_path / "words", {"w": np.ones(3, np.float32),
                                                "vocab": np.array([b"a", b"bc"])})
    assert not bundle.supports_writing(bundle.read_index(words))
    assert not bundle.supports_writing(None)


@needs_fast_crc
def test_writing_copies_every_shard_and_a_many_block_index(tmp_path):
    rng = np.random.default_rng(3)
    values = {f"layer_{i:03d}/scope/kernel": rng.standard_normal((2, 3)).astype(np.float32)
              for i in range(200)}
    prefix = _save_sharded(tmp_path, values)
    index = bundle.read_index(prefix)
    target = str(tmp_path / "copy")
    new = {"zz/new": np.full((4,), 7.0, np.float32), "aa/new": np.ones((1, 2), np.float64)}
    bundle.write_with_tensors(prefix, index, target, new)
    assert (tmp_path / "copy.data-00000-of-00002").is_file()
    assert (tmp_path / "copy.data-00001-of-00002").is_file()
    reader = tf.train.load_checkpoint(target)
    for name, value in {**values, **new}.items():
        np.testing.assert_array_equal(reader.get_tensor(name), value)


@needs_fast_crc
def test_writing_refuses_a_damaged_or_short_data_file(tmp_path):
    values = {"w": np.arange(40, dtype=np.float32), "v": np.ones((3, 3))}
    prefix = _save_variables(tmp_path, values)
    index = bundle.read_index(prefix)
    data = tmp_path / "vars.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    damaged = bytearray(raw)
    damaged[index["v"].offset + 3] ^= 0x01
    data.write_bytes(bytes(damaged))
    with pytest.raises(bundle.DamagedTensorError,
                       match="tensor 'v': Checksum does not match") as caught:
        bundle.write_with_tensors(prefix, index, str(tmp_path / "out1"), {})
    assert caught.value.name == "v"
    assert not list(tmp_path.glob("out1*"))  # checked before anything is written
    data.write_bytes(bytes(raw[:-5]))
    last = max(("w", "v"), key=lambda name: index[name].offset)
    with pytest.raises(bundle.DamagedTensorError, match=f"tensor '{last}': the data file .* "
                                                        f"ends at byte"):
        bundle.write_with_tensors(prefix, index, str(tmp_path / "out2"), {})


@pytest.mark.parametrize("kernel_copies", ["none", "part", "missing"])
def test_a_copy_the_kernel_cannot_make_goes_through_a_buffer(tmp_path, monkeypatch,
                                                             kernel_copies):
    source = tmp_path / "source.data"
    payload = np.random.default_rng(4).integers(0, 256, 3 * bundle.COPY_CHUNK // 2 + 7,
                                                dtype=np.uint8).tobytes()
    source.write_bytes(payload + b"tail not copied")
    original = getattr(os, "copy_file_range", None)
    calls = []

    def refusing(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if kernel_copies == "part" and len(calls) == 1:  # one short copy, then a refusal
            return original(src, dst, 1000, offset_src, offset_dst)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    if kernel_copies == "missing":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        if original is None:
            pytest.skip("os.copy_file_range is not available here")
        monkeypatch.setattr(os, "copy_file_range", refusing)
    bundle._copy_file(str(source), str(tmp_path / "target.data"), len(payload))
    assert (tmp_path / "target.data").read_bytes() == payload
    assert len(calls) == {"none": 1, "part": 2, "missing": 0}[kernel_copies]


def _spy_writer(monkeypatch) -> list[str]:
    calls = []
    original = bundle.write_with_tensors

    def spy(source, index, target, tensors):
        calls.append(source)
        return original(source, index, target, tensors)

    monkeypatch.setattr(bundle, "write_with_tensors", spy)
    return calls


@needs_fast_crc
def test_auto_decomposition_copies_the_checkpoint_and_saves_what_tensorflow_would(
        tmp_path, monkeypatch):
    meta, ckpt, _ = _save_model(_nhwc_net(), tmp_path / "base")
    calls = _spy_writer(monkeypatch)
    auto_decomposition(meta, ckpt, str(tmp_path / "copied" / "model"))
    assert calls == [ckpt]
    monkeypatch.setattr(bundle, "supports_writing", lambda index: False)
    auto_decomposition(meta, ckpt, str(tmp_path / "saved" / "model"))
    assert calls == [ckpt]  # restored and saved through TensorFlow this time
    copied = tf.train.load_checkpoint(str(tmp_path / "copied" / "model"))
    saved = tf.train.load_checkpoint(str(tmp_path / "saved" / "model"))
    shapes = copied.get_variable_to_shape_map()
    assert shapes == saved.get_variable_to_shape_map()
    assert "conv2d/Conv2D/decom_first/kernel" in shapes and "conv2d/kernel" in shapes
    for name in shapes:
        np.testing.assert_array_equal(copied.get_tensor(name), saved.get_tensor(name))
    # The meta graphs carry the same saver: every variable, under the same names.
    for folder in ("copied", "saved"):
        graph = tf.Graph()
        with graph.as_default():
            saver = tf1.train.import_meta_graph(str(tmp_path / folder / "model.meta"))
            with tf1.Session() as session:
                saver.restore(session, str(tmp_path / "copied" / "model"))
                names = sorted(v.op.name for v in tf1.global_variables())
        assert names == sorted(shapes)


@needs_fast_crc
def test_a_checkpoint_with_tensors_the_graph_lacks_is_saved_through_tensorflow(
        tmp_path, monkeypatch):
    meta, ckpt, _ = _save_model(_nhwc_net(), tmp_path / "base")
    # The same checkpoint with one more tensor, which no variable of the graph restores.
    reader = tf.train.load_checkpoint(ckpt)
    values = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    values["stray/tensor"] = np.ones(3, np.float32)
    extra = _save_variables(tmp_path, values)
    calls = _spy_writer(monkeypatch)
    auto_decomposition(meta, extra, str(tmp_path / "out" / "model"))
    assert calls == []
    saved = tf.train.load_checkpoint(str(tmp_path / "out" / "model"))
    assert "stray/tensor" not in saved.get_variable_to_shape_map()
    np.testing.assert_array_equal(saved.get_tensor("conv2d/kernel"),
                                  values["conv2d/kernel"])
