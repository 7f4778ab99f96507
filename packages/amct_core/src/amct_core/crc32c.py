"""CRC-32C (Castagnoli), the checksum of LevelDB tables and of TensorFlow checkpoints.

``value(data)`` is the CRC-32C of a buffer (polynomial 0x1EDC6F41, reflected, initial value
and final XOR 0xFFFFFFFF: ``value(b"123456789") == 0xE3069283``); ``value(more, crc)`` extends
the CRC of earlier bytes. ``mask`` is the rotation LevelDB and TensorFlow store instead of the
plain CRC (``crc32c::Mask``): ((crc >> 15) | (crc << 17)) + 0xA282EAD8, modulo 2³².

The optional C extension ``amct_core._crc32c`` sums at memory speed (the CPU's CRC32
instruction where it has one); without it the sums are done here in Python, fine for the few
hundred bytes of a checkpoint index but not for its tensors: :func:`fast` says which.
"""
from __future__ import annotations

try:
    from amct_core import _crc32c
except ImportError:  # built without a C compiler
    _crc32c = None

_POLYNOMIAL = 0x82F63B78  # 0x1EDC6F41, bit-reversed
_MASK_DELTA = 0xA282EAD8
_TABLE: list[int] = []


def _table() -> list[int]:
    if not _TABLE:
        for byte in range(256):
            crc = byte
            for _ in range(8):
                crc = (crc >> 1) ^ (_POLYNOMIAL if crc & 1 else 0)
            _TABLE.append(crc)
    return _TABLE


def fast() -> bool:
    """Whether :func:`value` runs in the C extension (at memory speed) rather than Python."""
    return _crc32c is not None


def value(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC-32C of the bytes of ``data`` (any C-contiguous buffer, e.g. a numpy array)
    appended to bytes whose CRC-32C is ``crc``."""
    if _crc32c is not None:
        return _crc32c.extend(data, crc)
    table = _table()
    running = crc ^ 0xFFFFFFFF
    for byte in memoryview(data).cast("B"):
        running = (running >> 8) ^ table[(running ^ byte) & 0xFF]
    return running ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """The masked form of ``crc`` that LevelDB and TensorFlow store."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF
