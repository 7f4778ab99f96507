"""The quantization record file (reference §3.3): reading, writing, merging, checking."""
import numpy as np
import pytest
from google.protobuf import text_format

from amct_core.errors import AmctFileNotFoundError, RecordFileError
from amct_core.proto import scale_offset_record_pb2
from amct_core.quant.layers import QuantLayer
from amct_core.quant.record import (
    LayerRecord,
    merge_and_read_record,
    merge_record,
    read_record,
    require_factors,
    tensor_key,
    write_record,
)
from amct_core.quant.record_parser import FIELD_KINDS, parse_simple_record

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


#: Texts around the simple form the fast reader takes (``True``: it takes the text; ``False``:
#: protobuf's parser reads it). Either way ``read_record`` must give what protobuf gives.
VARIANTS = [
    ('record{key:"a"value{scale_d:0.5 offset_d:-3 scale_w:.5 scale_w:5. scale_w:2.5E-3}}',
     True),
    ('record {\n  value {\n    offset_w: 0\n    scale_w: 1\n  }\n  key: "k"\n}\n', True),
    ('record { key: "a" value { scale_d: 0.1 } value { scale_d: 0.2 offset_d: 0 } }', True),
    ('record { key: "a" key: "b" value { skip_fusion: false act_type: "INT16" } }', True),
    ('record { key: "a" value { scale_d: 3.4028235e38 offset_d: 0 } }', True),
    ('record { key: "a" value { scale_w: 1.5e-45 offset_w: 0 } }', True),    # subnormal
    ('record { key: "a" value { scale_d: 0.5 offset_d: -0 shift_bit: 4294967295 } }', True),
    ('record { key: "a" value { scale_h: 0.5 offset_r: 1 } }', True),
    ('record { key: "a" value { } } record { key: "b" }', True),
    ("", True),
    ('record { key: "a" value { scale_d: 0.5f offset_d: 0 } }', False),
    ('record { key: "a" value { scale_d: 1.5e+3 offset_d: 0 } }', True),
    ('record { key: "a" value { scale_d: 00.5 offset_d: 0 } }', False),
    ('record { key: "a" value { scale_d: 1e0x offset_d: 0 } }', False),
    ('record { key: "a" value { scale_d: 0.5 offset_d: 012 } }', False),     # octal
    ('record { key: "a" value { scale_d: 0.5 offset_d: 2147483648 } }', False),
    ('record { key: "a" value { shift_bit: -1 } }', False),
    ('record { key: "a" value { skip_fusion: 1 } }', False),
    ('record { key: "a\\"b" value { scale_d: 0.5 } }', False),             # escapes
    ("record { key: 'a' value { scale_d: 0.5 } }", False),
    ('record { key: "a" "b" value { scale_d: 0.5 } }', False),
    ('# comment\nrecord { key: "a" value { scale_d: 0.5 } }', False),
    ('record { key: "a", value { scale_d: 0.5; offset_d: 1 } }', False),
    ('record { key: "a" value: { scale_d: 0.5 } }', False),
    ('record < key: "a" value { scale_d: 0.5 } >', False),
    ('record { key: "a" value { scale_w: [0.5, 0.25] } }', False),
    ('record { key: "a" value { scale_d: 0.5 } ', False),                    # unterminated
    ('record { key: "a" value { scale_d: 0.5 } } }', False),
    ('record { key: "a" value { bogus: 1 } }', False),
]


@pytest.mark.parametrize("text, simple", VARIANTS)
def test_fast_reader_reads_what_protobuf_reads(tmp_path, text, simple):
    assert (parse_simple_record(text) is not None) == simple
    path = tmp_path / "record.txt"
    path.write_text(text)
    message = scale_offset_record_pb2.ScaleOffsetRecord()
    try:
        text_format.Merge(text, message)
    except text_format.ParseError:
        with pytest.raises(RecordFileError, match=r"line \d+, column \d+"):
            read_record(path)
        return
    records = read_record(path)
    assert list(records) == [entry.key for entry in message.record]
    for entry in message.record:
        value, record = entry.value, records[entry.key]
        expected = LayerRecord(
            scale_d=value.scale_d if value.HasField("scale_d") else None,
            offset_d=value.offset_d if value.HasField("offset_d") else None,
            scale_w=np.array(value.scale_w, np.float32), offset_w=np.array(value.offset_w),
            shift_bit=np.array(value.shift_bit),
            tensor_balance_factor=np.array(value.tensor_balance_factor, np.float32),
            skip_fusion=value.skip_fusion, dst_type=value.dst_type, act_type=value.act_type,
            wts_type=value.wts_type, fakequant_precision_mode=value.fakequant_precision_mode)
        assert_same(record, expected)
        assert type(record.scale_d) is type(expected.scale_d)
        assert record.scale_w.dtype == np.float32 and record.offset_w.dtype == np.int64


@pytest.mark.parametrize("text", [
    'record { key: "a" value { scale_d: 0 offset_d: 0 } }',
    'record { key: "a" value { scale_d: 1e39 offset_d: 0 } }',              # float32: inf
    'record { key: "a" value { scale_d: inf offset_d: 0 } }',
    'record { key: "a" value { scale_w: 7e-46 offset_w: 0 } }',             # float32: 0
    'record { key: "a" value { scale_w: -0.5 offset_w: 0 } }',
    'record { key: "a" value { offset_w: 0 offset_w: 0 scale_w: 0.5 } }',
    'record { key: "a" value { act_type: "INT3" } }',
    'record { key: "a" } record { key: "a" }',
    'record { value { scale_d: 0.5 } }',
    'record { key: "" value { scale_d: 0.5 } }',
])
def test_fast_reader_raises_what_protobuf_path_raises(tmp_path, text, monkeypatch):
    path = tmp_path / "record.txt"
    path.write_text(text)
    with pytest.raises(RecordFileError) as fast:
        read_record(path)
    monkeypatch.setattr("amct_core.quant.record.parse_simple_record", lambda _text: None)
    with pytest.raises(RecordFileError) as slow:
        read_record(path)
    assert str(fast.value) == str(slow.value)


def test_fast_reader_field_kinds_follow_the_schema():
    fields = scale_offset_record_pb2.SingleLayerRecord.DESCRIPTOR.fields_by_name
    kinds = {"float": "TYPE_FLOAT", "int32": "TYPE_INT32", "uint32": "TYPE_UINT32",
             "bool": "TYPE_BOOL", "string": "TYPE_STRING"}
    message = scale_offset_record_pb2.SingleLayerRecord()
    for name, (kind, repeated) in FIELD_KINDS.items():
        assert fields[name].type == getattr(fields[name], kinds[kind]), name
        assert hasattr(getattr(message, name), "extend") == repeated, name


def test_merge_of_a_text_the_fast_reader_takes_keeps_its_other_entries(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text(REFERENCE_ONE_LINE + 'record { key: "b" value { scale_h: 0.5 } }\n')
    merge_record(path, {"conv1": LayerRecord(scale_d=0.25, offset_d=2)})
    parsed = text_format.Parse(path.read_text(), scale_offset_record_pb2.ScaleOffsetRecord())
    assert parsed.record[0].value.HasField("dst_type")      # written explicitly: kept
    assert parsed.record[0].value.scale_d == 0.25 and parsed.record[0].value.offset_d == 2
    assert parsed.record[1].value.scale_h == 0.5


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


def test_merge_and_read_returns_what_read_record_reads(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text('record { key: "k_proj" kv_cache_value { scale: 0.1 offset: 0 } }\n'
                    + REFERENCE_FULL)
    update = {"conv1": LayerRecord(scale_d=0.1, offset_d=2),
              "new": layer_record(scale_d=1 / 3, scale_w=(0.1, 0.7))}
    returned = merge_and_read_record(path, update)
    text = path.read_text()
    expected = read_record(path)
    assert list(returned) == list(expected) == ["conv1", "layer1.0.conv1", "linear_1", "new"]
    for key, record in expected.items():
        assert_same(returned[key], record)
    merge_record(path, update)                    # the same update writes the same text
    assert path.read_text() == text


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
