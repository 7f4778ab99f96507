"""The decomposition information file (reference §2.4).

A JSON list, one entry per decomposed conv, written with tab indentation and mode 0640::

    [{"ori_layer_info": {"name": "conv2", "in_channels": 128, "out_channels": 128,
                         "kernel_size": [3, 3], "stride": [1, 1], "dilation": [1, 1],
                         "groups": 1},
      "mode": "SCFK",
      "decom_nodes": {"first": {"weight_shape": [64, 128, 3, 1]},
                      "last": {"weight_shape": [128, 64, 1, 3]}}}]

Files move between this toolkit and AMCT. Reading validates every field and names the file,
the entry and the key at fault.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from amct_core.atomic_file import write_atomically
from amct_core.decompose.applicability import DecomposeMode
from amct_core.decompose.spatial_svd import factor_shapes
from amct_core.errors import AmctFileNotFoundError, InfoFileError

_LAYER_KEYS = ("name", "in_channels", "out_channels", "kernel_size", "stride", "dilation",
               "groups")


@dataclass(frozen=True)
class ConvLayerInfo:
    """The attributes of the original conv that the decomposed structure depends on."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def to_json(self) -> dict:
        return {"name": self.name, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "dilation": list(self.dilation),
                "groups": self.groups}


@dataclass(frozen=True)
class DecomposeRecord:
    """One entry of the information file: a conv, its mode and the two new kernel shapes."""

    layer: ConvLayerInfo
    mode: DecomposeMode
    first_shape: tuple[int, int, int, int]
    last_shape: tuple[int, int, int, int]

    @property
    def rank(self) -> int:
        return self.first_shape[0]

    def to_json(self) -> dict:
        return {"ori_layer_info": self.layer.to_json(), "mode": self.mode.name,
                "decom_nodes": {"first": {"weight_shape": list(self.first_shape)},
                                "last": {"weight_shape": list(self.last_shape)}}}


def write_decompose_info(path: str | os.PathLike, records: Iterable[DecomposeRecord]) -> str:
    """Write ``records`` to ``path`` atomically (temporary file, then rename); return the
    absolute path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise InfoFileError(f"Cannot save the decomposition information file to '{path}': it "
                            f"is a directory. Give a file path such as "
                            f"'{os.path.join(path, 'decompose_info.json')}'.")
    payload = [record.to_json() for record in records]
    write_atomically(path, json.dumps(payload, indent="\t").encode("utf-8"))
    return path


def _fail(path: str, where: str, message: str) -> InfoFileError:
    return InfoFileError(f"Decomposition information file '{path}' is invalid: {where}{message}. "
                         f"Regenerate it with auto_decomposition or fix the entry.")


def _int(value: object, path: str, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, where, f"'{key}' must be an integer, got {value!r}")
    return value


def _pair(value: object, path: str, where: str, key: str) -> tuple[int, int]:
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
        raise _fail(path, where, f"'{key}' must be a list of 2 integers, got {value!r}")
    return int(value[0]), int(value[1])


def _shape(value: object, path: str, where: str, key: str) -> tuple[int, int, int, int]:
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 4
            or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)):
        raise _fail(path, where, f"'{key}' must be a list of 4 positive integers, got {value!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _parse_record(entry: object, path: str, index: int) -> DecomposeRecord:
    where = f"entry {index}: "
    if not isinstance(entry, dict):
        raise _fail(path, where, f"expected an object, got {type(entry).__name__}")
    for key in ("ori_layer_info", "mode", "decom_nodes"):
        if key not in entry:
            raise _fail(path, where, f"missing key '{key}'")
    info = entry["ori_layer_info"]
    if not isinstance(info, dict):
        raise _fail(path, where, "'ori_layer_info' must be an object")
    for key in _LAYER_KEYS:
        if key not in info:
            raise _fail(path, where, f"missing key 'ori_layer_info.{key}'")
    name = info["name"]
    if not isinstance(name, str) or not name:
        raise _fail(path, where, f"'ori_layer_info.name' must be a non-empty string, got {name!r}")
    where = f"entry {index} (layer '{name}'): "
    layer = ConvLayerInfo(
        name=name,
        in_channels=_int(info["in_channels"], path, where, "in_channels"),
        out_channels=_int(info["out_channels"], path, where, "out_channels"),
        kernel_size=_pair(info["kernel_size"], path, where, "kernel_size"),
        stride=_pair(info["stride"], path, where, "stride"),
        dilation=_pair(info["dilation"], path, where, "dilation"),
        groups=_int(info["groups"], path, where, "groups"))
    mode_name = entry["mode"]
    try:
        mode = DecomposeMode[mode_name] if isinstance(mode_name, str) else None
    except KeyError:
        mode = None
    if mode is None or mode == DecomposeMode.UNCHANGE:
        raise _fail(path, where, f"'mode' must be one of FCFK, FCSK, SCFK, SCSK, got {mode_name!r}")
    nodes = entry["decom_nodes"]
    shapes = []
    for part in ("first", "last"):
        node = nodes.get(part) if isinstance(nodes, dict) else None
        if not isinstance(node, dict) or "weight_shape" not in node:
            raise _fail(path, where, f"missing key 'decom_nodes.{part}.weight_shape'")
        shapes.append(_shape(node["weight_shape"], path, where, f"decom_nodes.{part}.weight_shape"))
    rank = shapes[0][0]
    max_rank = min(layer.kernel_size) * min(layer.in_channels, layer.out_channels)
    expected = factor_shapes((layer.out_channels, layer.in_channels // max(layer.groups, 1),
                              *layer.kernel_size), mode, rank)
    if tuple(shapes) != expected:
        raise _fail(path, where, f"'decom_nodes' weight shapes {shapes[0]} and {shapes[1]} do "
                                 f"not match mode {mode.name} of a {layer.out_channels}x"
                                 f"{layer.in_channels}x{layer.kernel_size} conv (expected "
                                 f"{expected[0]} and {expected[1]})")
    if rank > max_rank:
        raise _fail(path, where, f"rank {rank} is larger than the largest possible rank {max_rank}")
    return DecomposeRecord(layer=layer, mode=mode, first_shape=shapes[0], last_shape=shapes[1])


def read_decompose_info(path: str | os.PathLike) -> list[DecomposeRecord]:
    """Read and validate a decomposition information file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AmctFileNotFoundError(f"Decomposition information file '{path}' does not exist. "
                                    f"Give the path written by auto_decomposition.")
    if os.path.isdir(path):
        raise InfoFileError(f"Decomposition information file '{path}' is a directory, not a file.")
    try:
        with open(path, encoding="utf-8") as stream:
            payload = json.load(stream)
    except json.JSONDecodeError as error:
        raise InfoFileError(f"Decomposition information file '{path}' is not valid JSON "
                            f"(line {error.lineno}, column {error.colno}: {error.msg}).") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InfoFileError(f"Decomposition information file '{path}' cannot be read: "
                            f"{error}.") from error
    if not isinstance(payload, list):
        raise InfoFileError(f"Decomposition information file '{path}' is invalid: the top level "
                            f"must be a list of entries, got {type(payload).__name__}.")
    records = [_parse_record(entry, path, index) for index, entry in enumerate(payload)]
    seen: set[str] = set()
    for record in records:
        if record.layer.name in seen:
            raise InfoFileError(f"Decomposition information file '{path}' is invalid: layer "
                                f"'{record.layer.name}' appears more than once.")
        seen.add(record.layer.name)
    return records
