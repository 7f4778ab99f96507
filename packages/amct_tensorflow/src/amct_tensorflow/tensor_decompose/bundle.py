"""A float tensor of a TensorFlow checkpoint, mapped from its data file instead of read.

``tf.train.CheckpointReader.get_tensor`` copies a tensor into a new array (for the 150 MB
kernel of a (2048, 2048, 3, 3) conv, 0.3-0.6 s on a VM whose fresh memory is slow); the
decomposition only reads the kernel, so it can use the bytes where they lie, in the page
cache, through ``numpy.memmap``.

A checkpoint ``prefix`` (a TF2 "tensor bundle") is ``prefix.index``, a sorted string table in
LevelDB's format as TensorFlow writes it (blocks of prefix-compressed keys, each with a
one-byte compression type and a CRC, then an index block and a 48-byte footer ending in a
magic number), mapping each tensor name to a ``BundleEntryProto`` (dtype, shape, shard,
offset, size, CRC32C) and the empty key to a ``BundleHeaderProto``; and the data files
``prefix.data-SSSSS-of-NNNNN``. :func:`map_tensor` returns None for anything it does not
handle in full (compressed blocks, sliced or partitioned tensors, big-endian bundles, dtypes
other than float16/32/64, a size that does not match), and the caller reads the tensor
through TensorFlow then. TensorFlow checks a tensor's CRC32C when it reads it; a mapped
kernel is not checked here, but ``auto_decomposition`` restores every variable of the
checkpoint through TensorFlow before it saves, so a damaged kernel still fails there, before
anything is written.
"""
from __future__ import annotations

import os
import struct

import numpy as np
from tensorflow.core.protobuf import tensor_bundle_pb2

_MAGIC = 0xDB4775248B80FB57
_FOOTER_BYTES = 48
_TRAILER_BYTES = 5  # compression type (1 byte) and masked CRC (4 bytes) after each block
_NO_COMPRESSION = 0
#: TensorFlow DataType enum values of the float types a kernel may have.
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 19: np.dtype("<f2")}


class _UnsupportedError(Exception):
    """A table this reader does not handle; the caller falls back to TensorFlow."""


def _varint(buffer: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buffer) or shift > 63:
            raise _UnsupportedError("truncated varint")
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _block(table: bytes, handle: bytes) -> bytes:
    """The contents of the block whose handle (varint offset, varint size) is ``handle``."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + _TRAILER_BYTES > len(table):
        raise _UnsupportedError("block beyond the end of the index")
    if table[end] != _NO_COMPRESSION:
        raise _UnsupportedError("compressed block")
    return table[offset:end]


def _entries(block: bytes):
    """(key, value) of every entry of a block (keys stored as shared prefix + suffix)."""
    if len(block) < 4:
        raise _UnsupportedError("block too short")
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * restarts
    if limit < 0:
        raise _UnsupportedError("bad restart array")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + length > limit:
            raise _UnsupportedError("bad block entry")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + length]
        pos += length


def read_index(prefix: str) -> dict[str, tensor_bundle_pb2.BundleEntryProto] | None:
    """{tensor name: entry} of checkpoint ``prefix``, the header under "", or None when the
    index is not a table this reader handles."""
    try:
        with open(prefix + ".index", "rb") as stream:
            table = stream.read()
        if len(table) < _FOOTER_BYTES or \
                struct.unpack_from("<Q", table, len(table) - 8)[0] != _MAGIC:
            return None
        footer = table[len(table) - _FOOTER_BYTES:]
        _, pos = _varint(footer, 0)
        _, pos = _varint(footer, pos)  # skip the metaindex handle
        index_handle = footer[pos:]
        entries: dict[str, tensor_bundle_pb2.BundleEntryProto] = {}
        for _, handle in _entries(_block(table, index_handle)):
            for key, value in _entries(_block(table, handle)):
                entry = tensor_bundle_pb2.BundleEntryProto()
                if key:
                    entry.ParseFromString(value)
                    entries[key.decode("utf-8")] = entry
                else:
                    header = tensor_bundle_pb2.BundleHeaderProto()
                    header.ParseFromString(value)
                    entries[""] = header
        return entries
    except Exception:
        # Any surprise (OSError, a protobuf DecodeError, _UnsupportedError...) means: let
        # TensorFlow read the checkpoint.
        return None


def map_tensor(prefix: str, index: dict | None, name: str) -> np.ndarray | None:
    """Tensor ``name`` of checkpoint ``prefix`` as a read-only memory map of its data file,
    or None where TensorFlow has to read it (see the module docstring)."""
    if not index or name not in index or "" not in index:
        return None
    header, entry = index[""], index[name]
    dtype = _DTYPES.get(int(entry.dtype))
    if dtype is None or entry.slices or \
            header.endianness != tensor_bundle_pb2.BundleHeaderProto.LITTLE:
        return None
    shape = tuple(int(dim.size) for dim in entry.shape.dim)
    if any(size < 0 for size in shape):
        return None
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count == 0 or count * dtype.itemsize != entry.size:
        return None
    path = f"{prefix}.data-{entry.shard_id:05d}-of-{max(header.num_shards, 1):05d}"
    try:
        if os.path.getsize(path) < entry.offset + entry.size:
            return None
        return np.memmap(path, dtype=dtype, mode="r", offset=entry.offset, shape=shape)
    except (OSError, ValueError):
        return None
