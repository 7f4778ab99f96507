"""The decomposition information file: the reference's JSON list, validated on read."""
import json
import os
import stat

import pytest

from amct_core.decompose import (
    ConvLayerInfo,
    DecomposeMode,
    DecomposeRecord,
    read_decompose_info,
    write_decompose_info,
)
from amct_core.errors import AmctFileNotFoundError, InfoFileError

REFERENCE_EXAMPLE = [{
    "ori_layer_info": {"name": "conv2", "in_channels": 128, "out_channels": 128,
                       "kernel_size": [3, 3], "stride": [1, 1], "dilation": [1, 1],
                       "groups": 1},
    "mode": "SCFK",
    "decom_nodes": {"first": {"weight_shape": [64, 128, 3, 1]},
                    "last": {"weight_shape": [128, 64, 1, 3]}}}]


def record(name="conv2"):
    layer = ConvLayerInfo(name, 128, 128, (3, 3), (1, 1), (1, 1), 1)
    return DecomposeRecord(layer, DecomposeMode.SCFK, (64, 128, 3, 1), (128, 64, 1, 3))


def write_json(path, payload):
    path.write_text(json.dumps(payload))
    return path


def test_written_file_is_the_reference_format(tmp_path):
    path = tmp_path / "sub" / "decompose_info.json"
    saved = write_decompose_info(path, [record()])
    assert saved == str(path.resolve())
    text = path.read_text()
    assert json.loads(text) == REFERENCE_EXAMPLE
    assert '\n\t{\n\t\t"ori_layer_info"' in text  # json.dump(..., indent='\t')
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(os.listdir(path.parent)) == ["decompose_info.json"]  # no temporary left


def test_reference_file_reads_back(tmp_path):
    records = read_decompose_info(write_json(tmp_path / "a.json", REFERENCE_EXAMPLE))
    assert records == [record()]
    assert records[0].rank == 64


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(AmctFileNotFoundError, match="nope.json' does not exist"):
        read_decompose_info(missing)
    with pytest.raises(FileNotFoundError):
        read_decompose_info(missing)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(InfoFileError, match="is a directory"):
        read_decompose_info(tmp_path)


def test_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"ori_layer_info": \n oops')
    with pytest.raises(InfoFileError, match=r"bad.json' is not valid JSON \(line 2"):
        read_decompose_info(path)


def test_unreadable_bytes(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InfoFileError, match="binary.json"):
        read_decompose_info(path)


def _broken(change):
    payload = json.loads(json.dumps(REFERENCE_EXAMPLE))
    change(payload[0])
    return payload


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("mode"), "missing key 'mode'"),
        (lambda e: e["ori_layer_info"].pop("stride"), "missing key 'ori_layer_info.stride'"),
        (lambda e: e["ori_layer_info"].update(groups="1"), "'groups' must be an integer"),
        (lambda e: e["ori_layer_info"].update(kernel_size=[3]), "'kernel_size' must be a list"),
        (lambda e: e.update(mode="TUCKER"), "'mode' must be one of"),
        (lambda e: e.update(mode="UNCHANGE"), "'mode' must be one of"),
        (lambda e: e["decom_nodes"].pop("last"), "decom_nodes.last.weight_shape"),
        (lambda e: e["decom_nodes"]["first"].update(weight_shape=[64, 128, 1, 3]),
         "do not match mode SCFK"),
        (lambda e: e["decom_nodes"]["first"].update(weight_shape=[64, 128, 3, 0]),
         "4 positive integers"),
    ],
)
def test_each_malformed_entry_names_the_key(tmp_path, change, message):
    path = write_json(tmp_path / "info.json", _broken(change))
    with pytest.raises(InfoFileError, match="info.json") as error:
        read_decompose_info(path)
    assert message in str(error.value)
    assert "entry 0" in str(error.value)


def test_rank_above_the_full_rank_is_refused(tmp_path):
    def grow(entry):
        entry["decom_nodes"]["first"]["weight_shape"] = [400, 128, 3, 1]
        entry["decom_nodes"]["last"]["weight_shape"] = [128, 400, 1, 3]
    with pytest.raises(InfoFileError, match="largest possible rank 384"):
        read_decompose_info(write_json(tmp_path / "i.json", _broken(grow)))


def test_top_level_must_be_a_list(tmp_path):
    with pytest.raises(InfoFileError, match="top level must be a list"):
        read_decompose_info(write_json(tmp_path / "i.json", REFERENCE_EXAMPLE[0]))


def test_duplicate_layer(tmp_path):
    with pytest.raises(InfoFileError, match="'conv2' appears more than once"):
        read_decompose_info(write_json(tmp_path / "i.json", REFERENCE_EXAMPLE * 2))


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "info.json"
    path.write_text("old")

    class Boom(DecomposeRecord):
        def to_json(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_decompose_info(path, [Boom(*record().__dict__.values())])
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["info.json"]
