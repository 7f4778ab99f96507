"""The quantization record file (reference §3.3): reading, writing, merging, checking."""
import numpy as np
import pytest
from google.protobuf import text_format

from amct_core.errors import AmctFileNotFoundError, RecordFileError
from amct_core.proto import scale_offset_record_pb2
from amct_core.quant.layers import QuantLayer
from amct_core.quant.record import (
    LayerRecord,
    merge_record,
    read_record,
    require_factors,
    tensor_key,
    write_record,
)

#: The example of reference §3.3, as one line.
REFERENCE_ONE_LINE = ('record { key: "conv1" value { scale_d: 0.0798 offset_d: 1 scale_w: 0.0029 '
                      'offset_w: 0 dst_type: "INT8" } }\n')

#: AMCT's documented record examples (quantization, DMQ, channel and 4:2 pruning) in one file.
REFERENCE_FULL = """\
record {
  key: "conv1"
  value {
    scale_d: 0.0798481479
    offset_d: 1
    scale_w: 0.00297622895
    offset_w: 0
    skip_fusion: true
    dst_type: "INT8"
  }
}
record {
  key: "layer1.0.conv1"
  value {
    scale_d: 0.00392156886
    offset_d: -128
    scale_w: 0.00106807391
    scale_w: 0.00104224426
    offset_w: 0
    offset_w: 0
    dst_type: "INT8"
  }
}
record {
  key: "linear_1"
  value {
    scale_d: 0.00784554612
    offset_d: -1
    scale_w: 0.00778095098
    offset_w: 0
    tensor_balance_factor: 0.948409557
    tensor_balance_factor: 0.984379828
  }
}
prune_record {
  producer {
    name: "conv1"
    attr { name: "type" type: STRING s: "Conv2d" }
    attr { name: "begin" type: INT i: 0 }
    attr { name: "end" type: INT i: 64 }
  }
  consumer {
    name: "BN_1"
    attr { name: "type" type: STRING s: "FusedBatchNormV3" }
  }
}
prune_record {
  selective_prune {
    name: "conv1"
    attr { name: "mask_shape" type: INTS ints: 3 ints: 3 ints: 3 ints: 32 }
  }
}
"""


def f32(value):
    return float(np.float32(value))


def layer_record(scale_d=0.5, offset_d=-3, scale_w=(0.25, 0.125), **kwargs):
    return LayerRecord(scale_d=scale_d, offset_d=offset_d,
                       scale_w=np.asarray(scale_w, np.float32),
                       offset_w=np.zeros(len(scale_w), np.int64), **kwargs)


def assert_same(actual: LayerRecord, expected: LayerRecord):
    assert actual.scale_d == (None if expected.scale_d is None else f32(expected.scale_d))
    assert actual.offset_d == expected.offset_d
    for name in ("scale_w", "offset_w", "shift_bit", "tensor_balance_factor"):
        np.testing.assert_array_equal(getattr(actual, name),
                                      np.asarray(getattr(expected, name)).reshape(-1))
    for name in ("skip_fusion", "dst_type", "act_type", "wts_type", "fakequant_precision_mode"):
        assert getattr(actual, name) == getattr(expected, name)


# --- reading the reference's files ----------------------------------------------------------

def test_reference_one_line_example_is_read(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text(REFERENCE_ONE_LINE)
    records = read_record(path)
    assert list(records) == ["conv1"]
    conv1 = records["conv1"]
    assert conv1.scale_d == f32(0.0798) and conv1.offset_d == 1
    assert conv1.scale_w.dtype == np.float32 and conv1.scale_w.tolist() == [f32(0.0029)]
    assert conv1.offset_w.tolist() == [0]
    assert conv1.num_bits_d == 8 and conv1.num_bits_w == 8
    assert conv1.skip_fusion is False and conv1.fakequant_precision_mode == "DEFAULT"


def test_reference_full_examples_are_read_in_file_order(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text(REFERENCE_FULL)
    records = read_record(path)
    assert list(records) == ["conv1", "layer1.0.conv1", "linear_1"]
    assert records["conv1"].skip_fusion is True
    assert records["layer1.0.conv1"].offset_d == -128
    assert records["layer1.0.conv1"].scale_w.tolist() == [f32(0.00106807391),
                                                          f32(0.00104224426)]
    assert records["linear_1"].tensor_balance_factor.tolist() == [f32(0.948409557),
                                                                 f32(0.984379828)]
    assert records["linear_1"].tensor_balance_factor.dtype == np.float32


def test_tensor_keys_hold_data_factors_only(tmp_path):
    path = tmp_path / "record.txt"
    key = tensor_key("/features/Relu_output_0")
    assert key == "tensor:/features/Relu_output_0"
    write_record(path, {key: LayerRecord(scale_d=0.02, offset_d=-128)})
    record = read_record(path)[key]
    assert record.scale_d == f32(0.02) and record.offset_d == -128
    assert record.scale_w.size == 0 and not record.has_weight_factors
    assert record.has_data_factors


def test_kv_cache_only_entries_are_not_layer_records(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text('record { key: "k_proj" kv_cache_value { scale: 0.1 offset: 0 } }\n'
                    + REFERENCE_ONE_LINE)
    assert list(read_record(path)) == ["conv1"]


def test_rnn_fields_are_accepted(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text('record { key: "lstm" value { scale_d: 0.1 offset_d: 0 scale_h: 0.2 '
                    'offset_h: 1 scale_r: 0.3 offset_r: 0 } }\n')
    assert read_record(path)["lstm"].scale_d == f32(0.1)


def test_repeated_optional_field_keeps_the_last_value(tmp_path):
    # reference §3.3: protobuf overwrites an optional field given twice
    path = tmp_path / "record.txt"
    path.write_text('record { key: "conv1" value { scale_d: 0.1 scale_d: 0.2 offset_d: 0 } }\n')
    assert read_record(path)["conv1"].scale_d == f32(0.2)


# --- read errors ----------------------------------------------------------------------------

def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere" / "record.txt"
    with pytest.raises(AmctFileNotFoundError) as caught:
        read_record(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)


def test_unparsable_text_names_file_line_and_column(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text('record {\n  key: "conv1"\n  value { scale_d: 0.1 bogus: 3 }\n}\n')
    with pytest.raises(RecordFileError) as caught:
        read_record(path)
    text = str(caught.value)
    assert str(path) in text
    assert "line 3, column 24" in text
    assert "bogus" in text


def test_unterminated_message_is_reported(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text('record { key: "conv1" value { scale_d: 0.1 }\n')
    with pytest.raises(RecordFileError, match=r"line \d+, column \d+"):
        read_record(path)


def test_duplicate_key_is_an_error(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text(REFERENCE_ONE_LINE * 2)
    with pytest.raises(RecordFileError) as caught:
        read_record(path)
    assert "'conv1'" in str(caught.value) and "two record entries" in str(caught.value)
    assert str(path) in str(caught.value)


def test_entry_without_key_is_an_error(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text('record { value { scale_d: 0.1 } }\n')
    with pytest.raises(RecordFileError, match="no key"):
        read_record(path)


@pytest.mark.parametrize("value, expected", [
    ("scale_d: -0.1 offset_d: 0", "scale_d must be a positive finite float32 number"),
    ("scale_d: 0 offset_d: 0", "scale_d must be a positive finite float32 number"),
    ("scale_d: inf offset_d: 0", "scale_d must be a positive finite float32 number"),
    ("scale_w: 0.1 scale_w: 0.2 offset_w: 0", "offset_w has 1 values but scale_w has 2"),
    ("scale_w: -0.1 offset_w: 0", "scale_w must hold positive finite float32 numbers"),
    ("tensor_balance_factor: 0", "tensor_balance_factor must hold positive"),
    ('act_type: "INT3"', "act_type must be one of INT4, INT8, INT16"),
    ('fakequant_precision_mode: "FP8"', "fakequant_precision_mode must be DEFAULT or"),
])
def test_out_of_range_factors_name_file_and_layer(tmp_path, value, expected):
    path = tmp_path / "record.txt"
    path.write_text(f'record {{ key: "layer1.conv" value {{ {value} }} }}\n')
    with pytest.raises(RecordFileError) as caught:
        read_record(path)
    text = str(caught.value)
    assert expected in text and "'layer1.conv'" in text and str(path) in text


# --- writing --------------------------------------------------------------------------------

def test_written_text_is_the_reference_format(tmp_path):
    path = tmp_path / "sub" / "record.txt"
    records = {
        "conv1": LayerRecord(scale_d=0.5, offset_d=1, scale_w=np.array([0.25], np.float32),
                             offset_w=np.array([0])),
        "fc": LayerRecord(scale_d=0.125, offset_d=-128,
                          scale_w=np.array([0.5, 0.75], np.float32),
                          offset_w=np.array([0, 0]), act_type="INT16", skip_fusion=True,
                          tensor_balance_factor=np.array([1.5, 2.0], np.float32)),
    }
    assert write_record(path, records) == str(path)
    assert path.read_text() == (
        'record {\n'
        '  key: "conv1"\n'
        '  value {\n'
        '    scale_d: 0.5\n'
        '    offset_d: 1\n'
        '    scale_w: 0.25\n'
        '    offset_w: 0\n'
        '  }\n'
        '}\n'
        'record {\n'
        '  key: "fc"\n'
        '  value {\n'
        '    scale_d: 0.125\n'
        '    offset_d: -128\n'
        '    scale_w: 0.5\n'
        '    scale_w: 0.75\n'
        '    offset_w: 0\n'
        '    offset_w: 0\n'
        '    tensor_balance_factor: 1.5\n'
        '    tensor_balance_factor: 2.0\n'
        '    skip_fusion: true\n'
        '    act_type: "INT16"\n'
        '  }\n'
        '}\n')
    # an independent parser agrees
    parsed = text_format.Parse(path.read_text(), scale_offset_record_pb2.ScaleOffsetRecord())
    assert [entry.key for entry in parsed.record] == ["conv1", "fc"]
    assert parsed.record[1].value.act_type == "INT16"


def test_round_trip_keeps_values_and_order(tmp_path):
    path = tmp_path / "record.txt"
    rng = np.random.default_rng(0)
    records = {}
    for index in (3, 1, 2, 0):
        scale_w = rng.uniform(1e-4, 1e-1, size=index + 1).astype(np.float32)
        records[f"layer{index}"] = LayerRecord(
            scale_d=float(rng.uniform(1e-3, 1)), offset_d=int(rng.integers(-128, 128)),
            scale_w=scale_w, offset_w=np.zeros(scale_w.size, np.int64),
            fakequant_precision_mode="FORCE_FP16_QUANT" if index == 2 else "DEFAULT")
    write_record(path, records)
    read = read_record(path)
    assert list(read) == ["layer3", "layer1", "layer2", "layer0"]
    for key, expected in records.items():
        assert_same(read[key], expected)
    # writing what was read gives the same bytes
    first = path.read_bytes()
    write_record(path, read)
    assert path.read_bytes() == first


def test_non_ascii_layer_names_survive(tmp_path):
    path = tmp_path / "record.txt"
    write_record(path, {"层/conv 1": layer_record()})
    assert "层/conv 1" in path.read_text(encoding="utf-8")
    assert list(read_record(path)) == ["层/conv 1"]


@pytest.mark.parametrize("record, expected", [
    (LayerRecord(scale_d=float("nan"), offset_d=0), "scale_d must be a positive finite float32"),
    (LayerRecord(scale_d=1e-50, offset_d=0), "scale_d must be a positive finite float32"),
    (LayerRecord(scale_w=np.array([1e40]), offset_w=np.array([0])),
     "scale_w must hold positive finite float32"),
    (LayerRecord(scale_d=0.1, offset_d=2 ** 31), "offset_d 2147483648 is out of the int32"),
    (LayerRecord(scale_w=np.array([0.1, 0.2], np.float32), offset_w=np.array([0])),
     "offset_w has 1 values but scale_w has 2"),
    (LayerRecord(wts_type="int8"), "wts_type must be one of"),
])
def test_invalid_record_is_refused_and_the_file_kept(tmp_path, record, expected):
    path = tmp_path / "record.txt"
    path.write_text(REFERENCE_ONE_LINE)
    with pytest.raises(RecordFileError) as caught:
        write_record(path, {"conv1": layer_record(), "bad": record})
    assert expected in str(caught.value) and "'bad'" in str(caught.value)
    assert path.read_text() == REFERENCE_ONE_LINE
    assert [p.name for p in tmp_path.iterdir()] == ["record.txt"]


def test_empty_key_is_refused(tmp_path):
    with pytest.raises(RecordFileError, match="non-empty layer names"):
        write_record(tmp_path / "record.txt", {"": layer_record()})


# --- merging --------------------------------------------------------------------------------

def test_merge_creates_the_file(tmp_path):
    path = tmp_path / "record.txt"
    merge_record(path, {"conv1": layer_record()})
    assert_same(read_record(path)["conv1"], layer_record())


def test_merge_updates_only_the_fields_given(tmp_path):
    path = tmp_path / "record.txt"
    write_record(path, {
        "conv1": LayerRecord(tensor_balance_factor=np.array([1.5, 0.5], np.float32)),
        "fc": layer_record(act_type="INT16"),
    })
    # weights first (quantize_model), then activations after calibration
    merge_record(path, {"conv1": LayerRecord(scale_w=np.array([0.25, 0.5], np.float32),
                                             offset_w=np.array([0, 0]))})
    merge_record(path, {"conv1": LayerRecord(scale_d=0.125, offset_d=-7),
                        "fc": LayerRecord(scale_w=np.array([0.0625], np.float32),
                                          offset_w=np.array([0])),
                        "pool": LayerRecord(scale_d=0.5, offset_d=0)})
    records = read_record(path)
    assert list(records) == ["conv1", "fc", "pool"]
    conv1 = records["conv1"]
    assert conv1.scale_d == 0.125 and conv1.offset_d == -7
    assert conv1.scale_w.tolist() == [0.25, 0.5]
    assert conv1.tensor_balance_factor.tolist() == [1.5, 0.5]
    fc = records["fc"]
    assert fc.scale_w.tolist() == [0.0625] and fc.offset_w.tolist() == [0]
    assert fc.scale_d == 0.5 and fc.offset_d == -3
    assert fc.act_type == "INT16"  # not reset by a record that carries the default
    assert records["pool"].scale_d == 0.5


def test_merge_keeps_prune_and_kv_cache_entries(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text('record { key: "k_proj" kv_cache_value { scale: 0.1 offset: 0 } }\n'
                    + REFERENCE_FULL)
    merge_record(path, {"conv1": LayerRecord(scale_d=0.25, offset_d=2)})
    parsed = text_format.Parse(path.read_text(), scale_offset_record_pb2.ScaleOffsetRecord())
    assert [entry.key for entry in parsed.record] == ["k_proj", "conv1", "layer1.0.conv1",
                                                      "linear_1"]
    assert list(parsed.record[0].kv_cache_value.scale) == [f32(0.1)]
    assert parsed.record[1].value.scale_d == 0.25
    assert parsed.record[1].value.skip_fusion is True
    assert len(parsed.prune_record) == 2
    assert list(parsed.prune_record[1].selective_prune.attr[0].ints) == [3, 3, 3, 32]


def test_merge_refuses_a_corrupt_file_and_leaves_it(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text(REFERENCE_ONE_LINE * 2)
    with pytest.raises(RecordFileError, match="two record entries"):
        merge_record(path, {"fc": layer_record()})
    assert path.read_text() == REFERENCE_ONE_LINE * 2


def test_merge_refuses_an_update_that_breaks_the_entry(tmp_path):
    path = tmp_path / "record.txt"
    write_record(path, {"conv1": layer_record(scale_w=(0.1, 0.2))})
    before = path.read_text()
    with pytest.raises(RecordFileError, match="'conv1' after the update: offset_w has 2"):
        merge_record(path, {"conv1": LayerRecord(scale_w=np.array([0.5], np.float32))})
    assert path.read_text() == before


# --- require_factors ------------------------------------------------------------------------

LAYERS = [QuantLayer("conv1", "Conv2d", "conv"), QuantLayer("fc", "Linear", "linear"),
          QuantLayer("pool", "AvgPool2d", "avgpool")]


def test_complete_records_pass():
    records = {"conv1": layer_record(), "fc": layer_record(scale_w=(0.1,)),
               "pool": LayerRecord(scale_d=0.1, offset_d=0)}
    require_factors(records, LAYERS, "record.txt")


def test_missing_factors_name_every_layer_and_the_cause(tmp_path):
    records = {"conv1": LayerRecord(scale_w=np.array([0.1], np.float32),
                                    offset_w=np.array([0])),
               "pool": LayerRecord(scale_d=0.1, offset_d=0)}
    path = tmp_path / "record.txt"
    with pytest.raises(RecordFileError) as caught:
        require_factors(records, LAYERS, path)
    text = str(caught.value)
    assert str(path) in text
    assert "'conv1' (no scale_d, offset_d)" in text
    assert "'fc' (no record entry)" in text
    assert "'pool'" not in text
    assert "fewer than batch_num batches" in text and "stale" in text


def test_weight_layer_without_scale_w_fails():
    with pytest.raises(RecordFileError, match=r"'fc' \(no scale_w\)"):
        require_factors({"fc": LayerRecord(scale_d=0.1, offset_d=0)}, LAYERS[1:2], "r.txt")


def test_only_the_given_layers_are_checked():
    require_factors({}, [], "record.txt")
    require_factors({"conv1": layer_record()}, LAYERS[:1], "record.txt")
