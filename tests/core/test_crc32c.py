"""CRC-32C (amct_core.crc32c): the C extension and the Python fallback against the standard
check values and an independent bitwise computation."""
import numpy as np
import pytest

from amct_core import crc32c


def bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time, straight from the definition (reflected 0x1EDC6F41)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.fixture(params=["extension", "python"])
def implementation(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(crc32c, "_crc32c", None)
    elif not crc32c.fast():
        pytest.skip("the C extension amct_core._crc32c was not built (no C compiler)")
    return request.param


def test_check_values(implementation):
    # The check value of the CRC catalogue and those of RFC 3720 (iSCSI), appendix B.4.
    assert crc32c.value(b"123456789") == 0xE3069283
    assert crc32c.value(bytes(32)) == 0x8A9136AA
    assert crc32c.value(b"\xff" * 32) == 0x62A8AB43
    assert crc32c.value(bytes(range(32))) == 0x46DD794E
    assert crc32c.value(b"") == 0


def test_buffers_of_any_length_and_extension(implementation):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    for length in (1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000):
        assert crc32c.value(data[:length]) == bitwise(data[:length]), length
    # Extending the CRC of a prefix gives the CRC of the whole, from any split point.
    for split in (0, 1, 5, 8, 333, 1000):
        assert crc32c.value(data[split:], crc32c.value(data[:split])) == bitwise(data)
    # Any contiguous buffer: a float32 array is summed as its bytes.
    array = rng.standard_normal(37).astype(np.float32)
    assert crc32c.value(array) == bitwise(array.tobytes())
    assert crc32c.value(memoryview(data)[3:40]) == bitwise(data[3:40])


def test_mask_rotates_and_adds_the_leveldb_delta():
    assert crc32c.mask(0) == 0xA282EAD8
    crc = 0x12345678
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    assert crc32c.mask(crc) == (rotated + 0xA282EAD8) & 0xFFFFFFFF
    assert crc32c.mask(crc) != crc32c.mask(crc32c.mask(crc))
