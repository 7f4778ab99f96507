"""The TensorFlow graph-change file (<save_path>.pkl): plain data, refused when crafted."""
from __future__ import annotations

import os
import pickle
import stat

import pytest

from amct_core.decompose.change_file import (
    FORMAT,
    VERSION,
    ConvChange,
    SplitConv,
    read_change_file,
    write_change_file,
)
from amct_core.errors import AmctFileNotFoundError, InfoFileError


def _change(conv: str = "conv2d_1/Conv2D") -> ConvChange:
    first = SplitConv(op=f"{conv}/decom_first/decom_first", variable=f"{conv}/decom_first/kernel",
                      shape=(3, 1, 128, 64), strides=(1, 2, 1, 1), explicit_paddings=(),
                      dilations=(1, 1, 1, 1))
    last = SplitConv(op=f"{conv}/decom_last/decom_last", variable=f"{conv}/decom_last/kernel",
                     shape=(1, 3, 64, 128), strides=(1, 1, 2, 1), explicit_paddings=(),
                     dilations=(1, 1, 1, 1))
    return ConvChange(conv=conv, kernel="conv2d_1/kernel", kernel_shape=(3, 3, 128, 128),
                      dtype="float32", data_format="NHWC", strides=(1, 2, 2, 1),
                      padding="SAME", explicit_paddings=(), dilations=(1, 1, 1, 1), mode=4,
                      rank=64, first=first, last=last)


def test_round_trip_atomic_and_private(tmp_path):
    path = tmp_path / "sub" / "model.pkl"
    changes = [_change(), _change("block/conv/Conv2D")]
    assert write_change_file(path, changes) == str(path)
    assert read_change_file(path) == changes
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert os.listdir(path.parent) == ["model.pkl"]  # no temporary file left behind
    assert changes[0].new_ops == ["conv2d_1/Conv2D/decom_first/decom_first",
                                  "conv2d_1/Conv2D/decom_last/decom_last"]


def test_file_holds_plain_data_only(tmp_path):
    path = tmp_path / "model.pkl"
    write_change_file(path, [_change()])
    data = pickle.loads(path.read_bytes())  # the test's own trusted file
    assert data["format"] == FORMAT and data["version"] == VERSION
    assert data["convs"][0]["first"]["shape"] == [3, 1, 128, 64]

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))
    assert plain(data)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_crafted_pickle_never_runs(tmp_path, protocol):
    marker = tmp_path / "created-by-pickle"
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"format": FORMAT, "version": VERSION,
                                   "convs": [_RunsCode(str(marker))]}, protocol=protocol))
    with pytest.raises(InfoFileError, match="refusing to load .*model.pkl.*'io.open'"):
        read_change_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("format"), "not an AMCT TensorFlow decomposition file"),
    (lambda d: d.update(version=99), "has version 99"),
    (lambda d: d.update(convs={}), "'convs' must be a list"),
    (lambda d: d["convs"][0].pop("rank"), "entry 0 \\('conv2d_1/Conv2D'\\): missing key 'rank'"),
    (lambda d: d["convs"][0].update(padding="FULL"), "'padding' must be SAME, VALID or EXPLICIT"),
    (lambda d: d["convs"][0].update(kernel_shape=[3, 3, 128]), "'kernel_shape' must hold 4"),
    (lambda d: d["convs"][0]["first"].update(shape=[3, 0, 1, 1]),
     "'first'.*'shape' must be positive"),
    (lambda d: d["convs"][0]["last"].pop("variable"), "'last'.*missing key 'variable'"),
    (lambda d: d["convs"].append(dict(d["convs"][0])), "listed more than once"),
])
def test_schema_errors_name_entry_and_key(tmp_path, mutate, message):
    path = tmp_path / "model.pkl"
    write_change_file(path, [_change()])
    data = pickle.loads(path.read_bytes())
    mutate(data)
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(InfoFileError, match=message):
        read_change_file(path)


def test_damaged_and_missing_files(tmp_path):
    path = tmp_path / "model.pkl"
    write_change_file(path, [_change()])
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(InfoFileError, match="'.*model.pkl' cannot be read"):
        read_change_file(path)
    with pytest.raises(AmctFileNotFoundError, match="'.*absent.pkl' does not exist"):
        read_change_file(tmp_path / "absent.pkl")
    with pytest.raises(InfoFileError, match="is a directory"):
        read_change_file(tmp_path)
