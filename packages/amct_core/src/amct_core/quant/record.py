"""The quantization record file (reference §3.3): protobuf text format of ``ScaleOffsetRecord``.

Example::

    record { key: "conv1" value { scale_d: 0.0798 offset_d: 1 scale_w: 0.0029 offset_w: 0
                                  dst_type: "INT8" } }

One ``record`` entry per layer, keyed by the layer name (the record key the configs and the
modified ONNX model share). Keys of the form ``tensor:<name>`` hold the extra activation factors
(``scale_d``/``offset_d`` only) of an intermediate tensor, used by the QDQ writer. The schema is
``amct_core/proto/scale_offset_record.proto``.

Like AMCT, the reader keeps the last value of an optional field written twice (reference §3.3:
protobuf overwrites repeated optional fields); a layer key written twice is an error.

Files in the simple form this module writes are read by a small tokenizer
(:mod:`amct_core.quant.record_parser`) that gives what protobuf's text-format parser gives;
any other text goes to protobuf's parser, whose messages (with line and column) the errors
quote.
"""
from __future__ import annotations

import os
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import text_format

from amct_core.atomic_file import write_atomically
from amct_core.errors import AmctFileNotFoundError, RecordFileError
from amct_core.proto import scale_offset_record_pb2 as record_pb2
from amct_core.quant.layers import QuantLayer
from amct_core.quant.record_parser import FIELD_KINDS, SimpleEntry, parse_simple_record

#: Prefix of the record keys that hold the activation factors of an intermediate tensor.
TENSOR_KEY_PREFIX = "tensor:"

_INT32 = (-(2 ** 31), 2 ** 31 - 1)


@dataclass
class LayerRecord:
    """The quantization factors of one layer, as the record file holds them.

    ``scale_d``/``offset_d``: the activation (data) scale and integer offset of the layer's
    input. ``scale_w``/``offset_w``: the weight scales and offsets, one per output channel when
    channel-wise, else one (float32 / int arrays). ``tensor_balance_factor``: DMQ factors per
    input channel (empty when DMQ is off). The type fields keep the reference's defaults.

    ``None`` / an empty array means "not in the record". The file stores scales as float32, so a
    value read back equals ``float(np.float32(value))``.
    """

    scale_d: float | None = None
    offset_d: int | None = None
    scale_w: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    offset_w: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    shift_bit: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tensor_balance_factor: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    skip_fusion: bool = False
    dst_type: str = "INT8"
    act_type: str = "INT8"
    wts_type: str = "INT8"
    fakequant_precision_mode: str = "DEFAULT"

    @property
    def num_bits_d(self) -> int:
        return _BITS[self.act_type]

    @property
    def num_bits_w(self) -> int:
        return _BITS[self.wts_type]

    @property
    def has_data_factors(self) -> bool:
        """Both ``scale_d`` and ``offset_d`` are present."""
        return self.scale_d is not None and self.offset_d is not None

    @property
    def has_weight_factors(self) -> bool:
        """``scale_w`` is present (``offset_w`` is then as long, or absent and taken as 0)."""
        return np.asarray(self.scale_w).size > 0


_BITS = {"INT4": 4, "INT8": 8, "INT16": 16}
_TYPE_FIELDS = ("dst_type", "act_type", "wts_type")
_DEFAULTS = LayerRecord()
#: The proto's defaults of the fields a record file may leave out.
_PROTO_DEFAULTS = record_pb2.SingleLayerRecord()


def tensor_key(tensor_name: str) -> str:
    """The record key of the extra activation factors of tensor ``tensor_name``."""
    return TENSOR_KEY_PREFIX + tensor_name


# --------------------------------------------------------------------------------------------
# Reading


def read_record(path: str | os.PathLike) -> dict[str, LayerRecord]:
    """Read a record file (reference §3.3) into ``{key: LayerRecord}``, in file order.

    Entries that hold only KV-cache factors (``kv_cache_value``) are not layer records and are
    left out; :func:`merge_record` keeps them in the file.

    Raises :class:`AmctFileNotFoundError` when ``path`` does not exist, and
    :class:`RecordFileError` when the text does not parse (with the parser's line and column),
    a key is missing or written twice, or a factor is out of range.
    """
    path = os.fspath(path)
    text = _read_text(path)
    entries = parse_simple_record(text)
    if entries is None:
        return _records_of(_merge_text(text, path), path)
    seen: set[str] = set()
    for entry in entries:
        _check_key(entry.key, seen, path)
        seen.add(entry.key)
    return {entry.key: _from_fields(entry.fields, entry.key, path) for entry in entries}


def _records_of(message: record_pb2.ScaleOffsetRecord, path: str) -> dict[str, LayerRecord]:
    """The layer records of a parsed record file (``read_record``)."""
    records: dict[str, LayerRecord] = {}
    for key, entry in _entries(message, path).items():
        if entry.HasField("value") or not entry.HasField("kv_cache_value"):
            records[key] = _from_proto(entry.value, key, path)
    return records


def _entries(message: record_pb2.ScaleOffsetRecord,
             path: str) -> dict[str, record_pb2.MapFiledEntry]:
    """The entries of ``message`` by key; a missing or repeated key is an error."""
    entries: dict[str, record_pb2.MapFiledEntry] = {}
    for entry in message.record:
        _check_key(entry.key, entries, path)
        entries[entry.key] = entry
    return entries


def _check_key(key: str | None, seen: Container[str], path: str) -> None:
    """Raise when an entry has no key, or a key already in ``seen``."""
    if not key:
        raise RecordFileError(
            f"Record file '{path}': a record entry has no key (the layer name). Add "
            f"'key: \"<layer>\"' to it or remove it.")
    if key in seen:
        raise RecordFileError(
            f"Record file '{path}': layer '{key}' has two record entries. Keep one "
            f"of them, or delete the file and calibrate again.")


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise AmctFileNotFoundError(
            f"Record file '{path}' does not exist. Run the calibration model for batch_num "
            f"batches first (it writes the record), or pass the right record_file.")
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except UnicodeDecodeError as error:
        raise RecordFileError(f"Record file '{path}' is not UTF-8 text ({error}).") from None


def _parse(path: str) -> record_pb2.ScaleOffsetRecord:
    """The record file at ``path`` as a message."""
    text = _read_text(path)
    entries = parse_simple_record(text)
    if entries is None:
        return _merge_text(text, path)
    return _to_message(entries)


def _merge_text(text: str, path: str) -> record_pb2.ScaleOffsetRecord:
    """Protobuf's text-format parser; a syntax error names the line and column."""
    message = record_pb2.ScaleOffsetRecord()
    try:
        text_format.Merge(text, message)
    except text_format.ParseError as error:
        raise RecordFileError(
            f"Record file '{path}' is not a valid record (protobuf text format of "
            f"ScaleOffsetRecord): line {error.GetLine()}, column {error.GetColumn()}: "
            f"{_parse_reason(error)}. Fix the file, or delete it and calibrate again."
        ) from None
    return message


def _to_message(entries: list[SimpleEntry]) -> record_pb2.ScaleOffsetRecord:
    """The message ``text_format.Merge`` builds from the text of ``entries``: fields set the
    same way (a float field stores the parsed float as float32)."""
    message = record_pb2.ScaleOffsetRecord()
    for entry in entries:
        item = message.record.add()
        if entry.key is not None:
            item.key = entry.key
        if entry.has_value:
            value = item.value
            value.SetInParent()
            for name, given in entry.fields.items():
                if FIELD_KINDS[name][1]:
                    getattr(value, name).extend(given)
                else:
                    setattr(value, name, given)
    return message


def _parse_reason(error: text_format.ParseError) -> str:
    """The parser's message without its leading ``line:column :``."""
    text = str(error)
    head, separator, tail = text.partition(" : ")
    return tail if separator and head.replace(":", "").isdigit() else text


def _from_proto(value: record_pb2.SingleLayerRecord, key: str, path: str) -> LayerRecord:
    record = LayerRecord(
        scale_d=float(value.scale_d) if value.HasField("scale_d") else None,
        offset_d=int(value.offset_d) if value.HasField("offset_d") else None,
        scale_w=np.asarray(value.scale_w, dtype=np.float32).reshape(-1),
        offset_w=np.asarray(value.offset_w, dtype=np.int64).reshape(-1),
        shift_bit=np.asarray(value.shift_bit, dtype=np.int64).reshape(-1),
        tensor_balance_factor=np.asarray(value.tensor_balance_factor,
                                         dtype=np.float32).reshape(-1),
        skip_fusion=bool(value.skip_fusion),
        dst_type=value.dst_type,
        act_type=value.act_type,
        wts_type=value.wts_type,
        fakequant_precision_mode=value.fakequant_precision_mode,
    )
    problem = _problem(record)
    if problem:
        raise RecordFileError(f"Record file '{path}': layer '{key}': {problem}. Fix the entry, "
                              f"or delete the file and calibrate again.")
    return record


def _from_fields(fields: dict[str, object], key: str, path: str) -> LayerRecord:
    """:func:`_from_proto` of the message the fast reader's ``fields`` stand for: a float
    field holds the float32 rounding of the parsed number (over- and underflow as protobuf
    stores them: inf, 0), absent fields their proto defaults."""
    def text(name: str) -> str:
        return fields.get(name, getattr(_PROTO_DEFAULTS, name))  # type: ignore[return-value]

    with np.errstate(over="ignore", under="ignore"):
        scale_d = fields.get("scale_d")
        record = LayerRecord(
            scale_d=None if scale_d is None else float(np.float32(scale_d)),
            offset_d=fields.get("offset_d"),  # type: ignore[arg-type]
            scale_w=np.asarray(fields.get("scale_w", ()), dtype=np.float32).reshape(-1),
            offset_w=np.asarray(fields.get("offset_w", ()), dtype=np.int64).reshape(-1),
            shift_bit=np.asarray(fields.get("shift_bit", ()), dtype=np.int64).reshape(-1),
            tensor_balance_factor=np.asarray(fields.get("tensor_balance_factor", ()),
                                             dtype=np.float32).reshape(-1),
            skip_fusion=bool(fields.get("skip_fusion", _PROTO_DEFAULTS.skip_fusion)),
            dst_type=text("dst_type"),
            act_type=text("act_type"),
            wts_type=text("wts_type"),
            fakequant_precision_mode=text("fakequant_precision_mode"),
        )
    problem = _problem(record)
    if problem:
        raise RecordFileError(f"Record file '{path}': layer '{key}': {problem}. Fix the entry, "
                              f"or delete the file and calibrate again.")
    return record


# --------------------------------------------------------------------------------------------
# Checking


def _problem(record: LayerRecord) -> str | None:
    """What is wrong with ``record``, or None. Shared by the reader and the writers."""
    if record.scale_d is not None and not _positive_float32(record.scale_d):
        return f"scale_d must be a positive finite float32 number, got {record.scale_d}"
    if record.offset_d is not None and not _INT32[0] <= record.offset_d <= _INT32[1]:
        return f"offset_d {record.offset_d} is out of the int32 range"
    scale_w = np.asarray(record.scale_w, dtype=np.float64).reshape(-1)
    if scale_w.size and not _positive_float32(scale_w):
        return "scale_w must hold positive finite float32 numbers"
    offset_w = np.asarray(record.offset_w).reshape(-1)
    if offset_w.size and scale_w.size and offset_w.size != scale_w.size:
        return (f"offset_w has {offset_w.size} values but scale_w has {scale_w.size}; they "
                f"must have one value each per channel (or per tensor)")
    if offset_w.size and (offset_w.min() < _INT32[0] or offset_w.max() > _INT32[1]):
        return "offset_w is out of the int32 range"
    balance = np.asarray(record.tensor_balance_factor, dtype=np.float64).reshape(-1)
    if balance.size and not _positive_float32(balance):
        return "tensor_balance_factor must hold positive finite float32 numbers"
    for name in _TYPE_FIELDS:
        if getattr(record, name) not in _BITS:
            return f"{name} must be one of {', '.join(_BITS)}, got {getattr(record, name)!r}"
    if record.fakequant_precision_mode not in ("DEFAULT", "FORCE_FP16_QUANT"):
        return (f"fakequant_precision_mode must be DEFAULT or FORCE_FP16_QUANT, got "
                f"{record.fakequant_precision_mode!r}")
    return None


def _positive_float32(values: float | np.ndarray) -> bool:
    """All ``values`` stay positive and finite once stored as float32 (the file's type)."""
    with np.errstate(over="ignore", under="ignore"):
        stored = np.asarray(values, dtype=np.float64).astype(np.float32)
    return bool(np.all(np.isfinite(stored)) and np.all(stored > 0))


def require_factors(records: Mapping[str, LayerRecord], layers: Iterable[QuantLayer],
                    record_path: str | os.PathLike) -> None:
    """Check that every layer in ``layers`` has its factors in ``records`` (reference §3.3).

    ``layers`` are the layers to quantize (the config's enabled layers). Each needs
    ``scale_d`` and ``offset_d``, and a layer with weights also ``scale_w``. Otherwise raises
    :class:`RecordFileError` naming the record file and every layer at fault: calibration ran
    fewer than ``batch_num`` batches (the calibration modules write the record only after the
    last one, seed "前向推理次数为batch_num"), or the record is stale.
    """
    missing: list[str] = []
    for layer in layers:
        record = records.get(layer.name)
        if record is None:
            missing.append(f"'{layer.name}' (no record entry)")
            continue
        absent = [name for name in ("scale_d", "offset_d") if getattr(record, name) is None]
        if layer.has_weight and not record.has_weight_factors:
            absent.append("scale_w")
        if absent:
            missing.append(f"'{layer.name}' (no {', '.join(absent)})")
    if missing:
        raise RecordFileError(
            f"Record file '{os.fspath(record_path)}' lacks the quantization factors of "
            f"{len(missing)} layer(s): {'; '.join(missing)}. Either calibration ran fewer than "
            f"batch_num batches (the factors are written after the last one), or the record "
            f"is stale (written for another model or config). Run the calibration model for "
            f"batch_num batches with this config, then save again.")


# --------------------------------------------------------------------------------------------
# Writing


def write_record(path: str | os.PathLike, records: Mapping[str, LayerRecord]) -> str:
    """Write ``records`` as a record file (reference §3.3), replacing ``path`` atomically.

    Entries are written in the order of ``records``; default-valued flag and type fields are
    left out, as protobuf text format does. Raises :class:`RecordFileError` (and leaves an
    existing file as it was) when a record is invalid. Returns ``path`` as a str.
    """
    path = os.fspath(path)
    message = record_pb2.ScaleOffsetRecord()
    for key, record in records.items():
        entry = message.record.add()
        entry.key = _checked_key(key, path)
        _fill_proto(entry.value, record, key, path, only_present=False)
    return _write(path, message)


def merge_record(path: str | os.PathLike, records: Mapping[str, LayerRecord]) -> str:
    """Update the layers in ``records`` in the record file at ``path`` (created if absent).

    For each given layer, the factors its :class:`LayerRecord` carries (``scale_d``/``offset_d``
    not None; ``scale_w``, ``offset_w``, ``shift_bit``, ``tensor_balance_factor`` not empty)
    replace the stored ones, and the flag and type fields replace the stored ones when they
    differ from the reference defaults (so adding weight factors does not reset an ``INT16``
    ``act_type`` written earlier). Everything else in the file is kept: other layers, other
    fields, KV-cache entries and prune records. New layers are appended. Atomic; on any error
    the file is left as it was. Returns ``path`` as a str.
    """
    path = os.fspath(path)
    return _write(path, _merged(path, records))


def merge_and_read_record(path: str | os.PathLike,
                          records: Mapping[str, LayerRecord]) -> dict[str, LayerRecord]:
    """:func:`merge_record`, then return what :func:`read_record` would read back from the
    file written (taken from the merged message; the file is not read again)."""
    path = os.fspath(path)
    message = _merged(path, records)
    _write(path, message)
    return _records_of(message, path)


def _merged(path: str, records: Mapping[str, LayerRecord]) -> record_pb2.ScaleOffsetRecord:
    """The message :func:`merge_record` writes."""
    message = _parse(path) if os.path.exists(path) else record_pb2.ScaleOffsetRecord()
    entries = _entries(message, path)
    for key, record in records.items():
        entry = entries.get(key)
        if entry is None:
            entry = message.record.add()
            entry.key = _checked_key(key, path)
            entries[key] = entry
        _fill_proto(entry.value, record, key, path, only_present=True)
        problem = _problem(_from_proto_unchecked(entry.value))
        if problem:
            raise RecordFileError(f"Record file '{path}': layer '{key}' after the update: "
                                  f"{problem}.")
    return message


def _checked_key(key: str, path: str) -> str:
    if not isinstance(key, str) or not key:
        raise RecordFileError(f"Record file '{path}': record keys must be non-empty layer "
                              f"names, got {key!r}.")
    return key


def _fill_proto(value: record_pb2.SingleLayerRecord, record: LayerRecord, key: str, path: str,
                only_present: bool) -> None:
    """Copy ``record`` into ``value``; with ``only_present``, only what the record carries."""
    if not isinstance(record, LayerRecord):
        raise RecordFileError(f"Record file '{path}': layer '{key}': expected a LayerRecord, "
                              f"got {type(record).__name__}.")
    problem = _problem(record)
    if problem:
        raise RecordFileError(f"Record file '{path}': cannot write layer '{key}': {problem}.")
    if record.scale_d is not None:
        value.scale_d = float(record.scale_d)
    elif not only_present:
        value.ClearField("scale_d")
    if record.offset_d is not None:
        value.offset_d = int(record.offset_d)
    elif not only_present:
        value.ClearField("offset_d")
    arrays = (("scale_w", np.float32), ("offset_w", np.int64), ("shift_bit", np.int64),
              ("tensor_balance_factor", np.float32))
    for name, dtype in arrays:
        values = np.asarray(getattr(record, name), dtype=dtype).reshape(-1)
        if values.size or not only_present:
            repeated = getattr(value, name)
            del repeated[:]
            repeated.extend(values.tolist())  # Python floats / ints holding the same values
    for name in ("skip_fusion", *_TYPE_FIELDS, "fakequant_precision_mode"):
        given = getattr(record, name)
        default = getattr(_DEFAULTS, name)
        if given != default:
            setattr(value, name, given)
        elif not only_present:
            value.ClearField(name)


def _from_proto_unchecked(value: record_pb2.SingleLayerRecord) -> LayerRecord:
    return LayerRecord(
        scale_d=value.scale_d if value.HasField("scale_d") else None,
        offset_d=value.offset_d if value.HasField("offset_d") else None,
        scale_w=np.asarray(value.scale_w, dtype=np.float32),
        offset_w=np.asarray(value.offset_w, dtype=np.int64),
        tensor_balance_factor=np.asarray(value.tensor_balance_factor, dtype=np.float32),
        dst_type=value.dst_type, act_type=value.act_type, wts_type=value.wts_type,
        fakequant_precision_mode=value.fakequant_precision_mode)


def _write(path: str, message: record_pb2.ScaleOffsetRecord) -> str:
    text = text_format.MessageToString(message, as_utf8=True)
    return write_atomically(path, text.encode("utf-8"))
