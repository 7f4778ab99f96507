"""The graph-change file of TensorFlow decomposition: ``<save_path>.pkl`` (reference §2.5).

``auto_decomposition`` writes it next to the decomposed checkpoint and ``decompose_graph`` reads
it to rewrite a freshly built training graph the same way. The reference keeps the seed's
``.pkl`` name but does not publish its schema; this one is plain data only::

    {"format": "amct-tensorflow-decompose", "version": 1,
     "convs": [{"conv": "conv2d_1/Conv2D", "kernel": "conv2d_1/kernel",
                "kernel_shape": [KH, KW, Cin, Cout], "dtype": "float32",
                "data_format": "NHWC", "strides": [...], "padding": "SAME",
                "explicit_paddings": [...], "dilations": [...],
                "mode": 4, "rank": r,
                "first": {"op": ".../decom_first/decom_first", "variable": "...",
                          "shape": [kh, kw, cin, cout], "strides": [...],
                          "explicit_paddings": [...], "dilations": [...]},
                "last": {...}}, ...]}

Loading never executes code: the file is read by an unpickler that refuses every global
(class or function) reference, so only dicts, lists, tuples, strings, numbers, booleans and
``None`` can come out of it; a crafted pickle fails with :class:`InfoFileError`.
"""
from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass

from amct_core.atomic_file import write_atomically
from amct_core.errors import AmctFileNotFoundError, InfoFileError

FORMAT = "amct-tensorflow-decompose"
VERSION = 1
_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class SplitConv:
    """One of the two convs that replace a decomposed conv."""

    op: str
    variable: str
    shape: tuple[int, int, int, int]
    strides: tuple[int, ...]
    explicit_paddings: tuple[int, ...]
    dilations: tuple[int, ...]

    def to_data(self) -> dict:
        return {"op": self.op, "variable": self.variable, "shape": list(self.shape),
                "strides": list(self.strides),
                "explicit_paddings": list(self.explicit_paddings),
                "dilations": list(self.dilations)}


@dataclass(frozen=True)
class ConvChange:
    """How one Conv2D op of a TensorFlow graph is replaced by two convs."""

    conv: str
    kernel: str
    kernel_shape: tuple[int, int, int, int]
    dtype: str
    data_format: str
    strides: tuple[int, ...]
    padding: str
    explicit_paddings: tuple[int, ...]
    dilations: tuple[int, ...]
    mode: int
    rank: int
    first: SplitConv
    last: SplitConv

    @property
    def new_ops(self) -> list[str]:
        return [self.first.op, self.last.op]

    def to_data(self) -> dict:
        return {"conv": self.conv, "kernel": self.kernel,
                "kernel_shape": list(self.kernel_shape), "dtype": self.dtype,
                "data_format": self.data_format, "strides": list(self.strides),
                "padding": self.padding, "explicit_paddings": list(self.explicit_paddings),
                "dilations": list(self.dilations), "mode": self.mode, "rank": self.rank,
                "first": self.first.to_data(), "last": self.last.to_data()}


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler for plain data: any reference to a class or function is refused."""

    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str):
        raise InfoFileError(
            f"refusing to load '{self._path}': it references the Python object "
            f"'{module}.{name}', and a graph-change file holds plain data only (a crafted or "
            f"foreign pickle can run code when loaded). Re-create it with "
            f"auto_decomposition.")

    def persistent_load(self, pid: object):
        raise InfoFileError(f"refusing to load '{self._path}': it holds a persistent "
                            f"reference, which a graph-change file never contains.")


def write_change_file(path: str | os.PathLike, changes: Iterable[ConvChange]) -> str:
    """Write the change file atomically (temporary file + rename), mode 0640; return its path."""
    path = os.fspath(path)
    data = {"format": FORMAT, "version": VERSION,
            "convs": [change.to_data() for change in changes]}
    return write_atomically(path, pickle.dumps(data, protocol=4))


def _fail(path: str, where: str, message: str) -> InfoFileError:
    return InfoFileError(f"graph-change file '{path}', {where}: {message}")


def _ints(value: object, path: str, where: str, key: str, length: int | None = None
          ) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _fail(path, where, f"'{key}' must be a list of integers, got {value!r}")
    if length is not None and len(value) != length:
        raise _fail(path, where, f"'{key}' must hold {length} integers, got {len(value)}")
    return tuple(int(v) for v in value)


def _str(entry: dict, key: str, path: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise _fail(path, where, f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _int(entry: dict, key: str, path: str, where: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _fail(path, where, f"'{key}' must be a non-negative integer, got {value!r}")
    return value


def _split(entry: object, path: str, where: str) -> SplitConv:
    if not isinstance(entry, dict):
        raise _fail(path, where, f"must be a mapping, got {type(entry).__name__}")
    for key in ("op", "variable", "shape", "strides", "explicit_paddings", "dilations"):
        if key not in entry:
            raise _fail(path, where, f"missing key '{key}'")
    shape = _ints(entry["shape"], path, where, "shape", 4)
    if min(shape) < 1:
        raise _fail(path, where, f"'shape' must be positive, got {list(shape)}")
    return SplitConv(op=_str(entry, "op", path, where),
                     variable=_str(entry, "variable", path, where), shape=shape,
                     strides=_ints(entry["strides"], path, where, "strides", 4),
                     explicit_paddings=_ints(entry["explicit_paddings"], path, where,
                                             "explicit_paddings"),
                     dilations=_ints(entry["dilations"], path, where, "dilations", 4))


_KEYS = ("conv", "kernel", "kernel_shape", "dtype", "data_format", "strides", "padding",
         "explicit_paddings", "dilations", "mode", "rank", "first", "last")


def _change(entry: object, path: str, index: int) -> ConvChange:
    where = f"entry {index}"
    if not isinstance(entry, dict):
        raise _fail(path, where, f"must be a mapping, got {type(entry).__name__}")
    if isinstance(entry.get("conv"), str):
        where = f"entry {index} ('{entry['conv']}')"
    for key in _KEYS:
        if key not in entry:
            raise _fail(path, where, f"missing key '{key}'")
    data_format = _str(entry, "data_format", path, where)
    if data_format not in ("NHWC", "NCHW"):
        raise _fail(path, where, f"'data_format' must be NHWC or NCHW, got {data_format!r}")
    padding = _str(entry, "padding", path, where)
    if padding not in ("SAME", "VALID", "EXPLICIT"):
        raise _fail(path, where, f"'padding' must be SAME, VALID or EXPLICIT, got {padding!r}")
    kernel_shape = _ints(entry["kernel_shape"], path, where, "kernel_shape", 4)
    mode, rank = _int(entry, "mode", path, where), _int(entry, "rank", path, where)
    if not 1 <= mode <= 4:
        raise _fail(path, where, f"'mode' must be 1..4, got {mode}")
    if rank < 1:
        raise _fail(path, where, f"'rank' must be at least 1, got {rank}")
    first = _split(entry["first"], path, f"{where}, 'first'")
    last = _split(entry["last"], path, f"{where}, 'last'")
    return ConvChange(conv=_str(entry, "conv", path, where),
                      kernel=_str(entry, "kernel", path, where), kernel_shape=kernel_shape,
                      dtype=_str(entry, "dtype", path, where), data_format=data_format,
                      strides=_ints(entry["strides"], path, where, "strides", 4),
                      padding=padding,
                      explicit_paddings=_ints(entry["explicit_paddings"], path, where,
                                              "explicit_paddings"),
                      dilations=_ints(entry["dilations"], path, where, "dilations", 4),
                      mode=mode, rank=rank, first=first, last=last)


def read_change_file(path: str | os.PathLike) -> list[ConvChange]:
    """Read and validate a graph-change file; errors name the file, entry and key at fault."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AmctFileNotFoundError(
            f"graph-change file '{path}' does not exist: give decompose_graph the save_path "
            f"that auto_decomposition wrote (it reads '<save_path>.pkl')")
    if os.path.isdir(path):
        raise InfoFileError(f"graph-change file '{path}' is a directory, not a file")
    size = os.path.getsize(path)
    if size > _MAX_BYTES:
        raise InfoFileError(f"graph-change file '{path}' is {size} bytes, too large for a "
                            f"change file (at most {_MAX_BYTES}); is it the right file?")
    with open(path, "rb") as handle:
        payload = handle.read()
    try:
        data = _PlainDataUnpickler(payload, path).load()
    except InfoFileError:
        raise
    except Exception as error:  # truncated, not a pickle, unsupported opcode...
        raise InfoFileError(f"graph-change file '{path}' cannot be read ({type(error).__name__}: "
                            f"{error}); it is not a file written by auto_decomposition, or it "
                            f"is damaged. Run auto_decomposition again.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InfoFileError(f"graph-change file '{path}' is not an AMCT TensorFlow "
                            f"decomposition file (no 'format': '{FORMAT}' header)")
    if data.get("version") != VERSION:
        raise InfoFileError(f"graph-change file '{path}' has version {data.get('version')!r}; "
                            f"this amct_tensorflow reads version {VERSION}")
    convs = data.get("convs")
    if not isinstance(convs, list):
        raise _fail(path, "top level", f"'convs' must be a list, got {type(convs).__name__}")
    changes = [_change(entry, path, index) for index, entry in enumerate(convs)]
    seen: set[str] = set()
    for change in changes:
        if change.conv in seen:
            raise _fail(path, f"conv '{change.conv}'", "listed more than once")
        seen.add(change.conv)
    return changes
