"""A fast reader for the simple record files (reference §3.3) that this toolkit writes.

Protobuf's text-format parser is pure Python and handles every token on its own, which for
a record with per-channel ``scale_w`` (one line per value) costs far more than the rest of a
quantization step. Record files written by :func:`amct_core.quant.record.write_record` (and
the reference's examples) use a small part of the text format::

    record {
      key: "conv1"
      value {
        scale_d: 0.0798481479
        offset_d: 1
        scale_w: 0.00297622895
        dst_type: "INT8"
      }
    }

:func:`parse_simple_record` reads exactly that part: ``record { ... }`` entries holding
``key: "<string>"`` and ``value { ... }`` with the scalar fields of ``SingleLayerRecord``, each
written ``name: value``; strings in double quotes without escapes; plain decimal numbers
(``-12``, ``0.5``, ``1e-05``, ``.5``); ``true`` / ``false``. It gives what protobuf's
``text_format.Merge`` gives for such a text (numbers go through the same ``float(token)`` /
``int(token)`` conversions, a field given twice keeps its last value, repeated values append,
two ``value`` blocks merge). For anything else (comments, escapes, other fields or
messages, ``kv_cache_value``, ``prune_record``, other number spellings, values out of their
field's range, a syntax error) it returns None, and the caller parses the text with protobuf,
which also produces the error messages with line and column.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["FIELD_KINDS", "SimpleEntry", "parse_simple_record"]

#: ``SingleLayerRecord`` fields the fast reader handles: name -> (kind, repeated). Kinds:
#: ``float`` (proto float), ``int32``, ``uint32``, ``bool``, ``string``.
FIELD_KINDS: dict[str, tuple[str, bool]] = {
    "scale_d": ("float", False),
    "offset_d": ("int32", False),
    "scale_w": ("float", True),
    "offset_w": ("int32", True),
    "shift_bit": ("uint32", True),
    "tensor_balance_factor": ("float", True),
    "skip_fusion": ("bool", False),
    "dst_type": ("string", False),
    "act_type": ("string", False),
    "wts_type": ("string", False),
    "fakequant_precision_mode": ("string", False),
    "scale_h": ("float", False),
    "offset_h": ("int32", False),
    "scale_r": ("float", True),
    "offset_r": ("int32", True),
}

_INT32 = (-(2 ** 31), 2 ** 31 - 1)
_UINT32_MAX = 2 ** 32 - 1

# One match per token. Groups: 1 field name; then its value, one of 2 string (with its
# quotes), 3 integer, 4 decimal number, 5 true/false, or 6 "{"; 7 "}"; 8 any other
# character, which sends the text to protobuf's parser. Whitespace is the only thing
# ``findall`` skips. A number must not run on into characters protobuf's tokenizer would
# take into the same token; integer and fraction parts have no leading zeros (protobuf reads
# ``012`` as octal, and newer releases refuse ``01.5``).
_END = r"(?![0-9A-Za-z_.+-])"
_TOKENS = re.compile(
    r'([A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*(?:("[^"\\\n]*")'
    r"|(-?(?:0|[1-9][0-9]*))" + _END
    + r"|(-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)" + _END
    + r"|(true|false)" + _END
    + r")|(\{))|(\})|(\S)")


@dataclass
class SimpleEntry:
    """One ``record`` entry: ``key`` (None when the entry has none), whether a ``value`` block
    was given, and its fields (a list for repeated fields, else the last value given)."""

    key: str | None = None
    has_value: bool = False
    fields: dict[str, object] = field(default_factory=dict)


def parse_simple_record(text: str) -> list[SimpleEntry] | None:
    """The entries of a record text in the simple form (module docstring), in file order;
    None when the text is not in that form."""
    entries: list[SimpleEntry] = []
    depth = 0                      # 0: top level, 1: in a record entry, 2: in its value
    entry = SimpleEntry()
    fields: dict[str, object] = entry.fields
    kinds = FIELD_KINDS
    for name, string, integer, decimal, boolean, opened, closed, other in \
            _TOKENS.findall(text):
        if other:
            return None
        if closed:
            if depth == 0:
                return None
            if depth == 1:
                entries.append(entry)
            depth -= 1
            continue
        if depth == 2:
            kind = kinds.get(name)
            if kind is None or opened:
                return None
            value = _value(kind[0], string, integer, decimal, boolean)
            if value is None:
                return None
            if kind[1]:
                fields.setdefault(name, []).append(value)  # type: ignore[union-attr]
            else:
                fields[name] = value
        elif depth == 1:
            if name == "key" and string:
                entry.key = string[1:-1]
            elif name == "value" and opened:
                entry.has_value = True
                depth = 2
            else:
                return None
        elif name == "record" and opened:
            entry = SimpleEntry()
            fields = entry.fields
            depth = 1
        else:
            return None
    return entries if depth == 0 else None


def _value(kind: str, string: str, integer: str, decimal: str,
           boolean: str) -> float | int | bool | str | None:
    """The value of one field token as protobuf's text format reads it, or None when the
    fast reader leaves the token to protobuf."""
    if kind == "float":
        if integer or decimal:
            return float(integer or decimal)
        return None
    if kind == "int32":
        if integer:
            number = int(integer)
            if _INT32[0] <= number <= _INT32[1]:
                return number
        return None
    if kind == "uint32":
        if integer and not integer.startswith("-"):
            number = int(integer)
            if number <= _UINT32_MAX:
                return number
        return None
    if kind == "bool":
        return (boolean == "true") if boolean else None
    return string[1:-1] if string else None
