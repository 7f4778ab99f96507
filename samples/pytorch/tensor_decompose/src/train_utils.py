"""Helpers shared by the scripts of the PyTorch tensor-decomposition sample.

Data loading (through ``samples/common/mnist_data.py``), the command-line arguments common to
``simple_train.py`` and ``ddp_train.py`` and their checks, the training loop, the test loop
that prints the ``[Test]`` line, and small file helpers.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

_SAMPLES_COMMON = Path(__file__).resolve().parents[3] / "common"
if str(_SAMPLES_COMMON) not in sys.path:
    sys.path.insert(0, str(_SAMPLES_COMMON))

import mnist_data  # noqa: E402  (found through the path added just above)

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

DecomposeFn = Callable[..., tuple[nn.Module, dict[str, list[str]]]]


def log(message: str) -> None:
    """Print one line and flush, so it interleaves correctly with the AMCT log lines."""
    print(message, flush=True)


# --------------------------------------------------------------------------- data


class MnistTensors(Dataset):
    """MNIST held as tensors and indexed by whole batches (a list of indices at a time)."""

    def __init__(self, images: Any, labels: Any) -> None:
        self.images = torch.from_numpy(images)           # (N, 28, 28) uint8
        self.labels = torch.from_numpy(labels).long()    # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index_tensor = torch.as_tensor(index, dtype=torch.long)
        images = self.images[index_tensor].unsqueeze(1).float().div_(255.0)
        images = images.sub_(MNIST_MEAN).div_(MNIST_STD)
        return images, self.labels[index_tensor]


def load_data(data_path: str,
              announce: bool = True) -> tuple[MnistTensors, MnistTensors, str]:
    """Load MNIST (or the embedded subset), say which data is used, return it and its source."""
    data = mnist_data.load_mnist(data_path)
    if announce:
        if data.is_embedded_subset:
            log(f"[Data] WARNING: using the {data.source}. Accuracy is not comparable with "
                f"results on the full MNIST.")
        else:
            log(f"[Data] Using {data.source}.")
    return (MnistTensors(data.train_images, data.train_labels),
            MnistTensors(data.test_images, data.test_labels), data.source)


def batch_loader(dataset: MnistTensors, batch_size: int,
                 sampler: Sampler[int] | None = None,
                 generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader yielding whole batches; shuffled by ``sampler`` or a seeded RandomSampler.

    ``sampler=None`` with ``generator=None`` gives a sequential loader (for testing).
    """
    if sampler is None:
        sampler = (RandomSampler(dataset, generator=generator) if generator is not None
                   else SequentialSampler(dataset))
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                      batch_size=None)


# --------------------------------------------------------------------------- train / test


def train(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
          device: torch.device, steps: int, log_steps: int,
          set_epoch: Callable[[int], None] | None = None, verbose: bool = True) -> None:
    """Run ``steps`` SGD iterations over ``loader`` (several epochs if needed).

    Every ``log_steps`` steps a ``[Train]`` line is printed, unless ``verbose`` is false.
    """
    criterion = nn.CrossEntropyLoss()
    model.train()
    step, epoch = 0, 0
    while step < steps:
        if set_epoch is not None:
            set_epoch(epoch)
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            step += 1
            if verbose and step % log_steps == 0:
                log(f"[Train] Step: {step}/{steps}, Epoch: {epoch}, "
                    f"Loss: {loss.item():.6f}")
            if step >= steps:
                break
        epoch += 1


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, int, int]:
    """Return (mean cross-entropy loss, correct predictions, number of test samples)."""
    model.eval()
    total_loss, correct, total = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == labels).sum().item())
        total += labels.numel()
    return total_loss / max(total, 1), correct, total


def test_line(loss: float, correct: int, total: int) -> str:
    """The sample's result line, e.g. ``[Test] Loss: 0.062657, Accuracy: 98.05% (9805/10000)``."""
    return f"[Test] Loss: {loss:.6f}, Accuracy: {100.0 * correct / total:.2f}% ({correct}/{total})"


# --------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, train_batch_size: int,
                         train_batch_help: str, test_batch_help: str,
                         info_help: str, weights_help: str) -> None:
    """The arguments shared by simple_train.py and ddp_train.py, with the seed's defaults."""
    parser.add_argument("--data-path", default="data",
                        help="MNIST folder (default: data). Without MNIST there, the "
                             "embedded 5,000-digit subset is used")
    parser.add_argument("--train-batch-size", type=_positive_int, default=train_batch_size,
                        help=f"{train_batch_help} (default: {train_batch_size})")
    parser.add_argument("--test-batch-size", type=_positive_int, default=1000,
                        help=f"{test_batch_help} (default: 1000)")
    parser.add_argument("--lr", type=_positive_float, default=0.01,
                        help="learning rate (default: 0.01)")
    parser.add_argument("--steps", type=_positive_int, default=200,
                        help="number of training iterations (default: 200)")
    parser.add_argument("--use-gpu", action="store_true",
                        help="train on the GPU (default: CPU)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--log-steps", type=_positive_int, default=20,
                        help="print the training loss every this many steps (default: 20)")
    parser.add_argument("--save-path", default=None,
                        help="where to save the trained weights (default: None, not saved)")
    parser.add_argument("--pretrained-path", default=None,
                        help="pretrained weights to load; required in online tensor "
                             "decomposition mode (default: None, not loaded)")
    parser.add_argument("--tensor-decompose", action="store_true",
                        help="decompose the model (default: no decomposition)")
    parser.add_argument("--decompose-info-path", default=None, help=info_help)
    parser.add_argument("--decomposed-weights-path", default=None, help=weights_help)
    parser.add_argument("--run-mode", choices=("online", "offline"), default=None,
                        help="tensor decomposition mode; only with --tensor-decompose "
                             "(default: online)")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           online_needs_files: bool = False) -> None:
    """Reject invalid combinations with a clear argparse error; fill in ``run_mode``.

    ``online_needs_files``: online mode must also name the info file and the decomposed
    weights (the distributed script passes them from rank 0 to the other ranks that way).
    """
    run_mode_given = args.run_mode is not None
    if args.run_mode is None:
        args.run_mode = "online"
    if not args.tensor_decompose:
        for flag, given in (("--decompose-info-path", args.decompose_info_path is not None),
                            ("--decomposed-weights-path",
                             args.decomposed_weights_path is not None),
                            ("--run-mode", run_mode_given)):
            if given:
                parser.error(f"{flag} is only valid together with --tensor-decompose")
    elif args.run_mode == "online":
        if args.pretrained_path is None:
            parser.error("--tensor-decompose with --run-mode online (the default) needs "
                         "--pretrained-path: online decomposition decomposes a trained model")
        if online_needs_files:
            missing = [flag for flag, value in
                       (("--decompose-info-path", args.decompose_info_path),
                        ("--decomposed-weights-path", args.decomposed_weights_path))
                       if value is None]
            if missing:
                parser.error(
                    f"--run-mode online in distributed training needs {' and '.join(missing)}"
                    f": rank 0 writes these files and the other ranks load them")
    else:
        missing = [flag for flag, value in
                   (("--decompose-info-path", args.decompose_info_path),
                    ("--decomposed-weights-path", args.decomposed_weights_path))
                   if value is None]
        if missing:
            parser.error(f"--run-mode offline needs {' and '.join(missing)} (written by "
                         f"src/decompose_model.py)")
        if args.pretrained_path is not None:
            parser.error("--pretrained-path is not used with --run-mode offline: the weights "
                         "come from --decomposed-weights-path")
        for flag, value in (("--decompose-info-path", args.decompose_info_path),
                            ("--decomposed-weights-path", args.decomposed_weights_path)):
            if not os.path.isfile(value):
                parser.error(f"{flag}: file not found: {value}")
    if args.pretrained_path is not None and not os.path.isfile(args.pretrained_path):
        parser.error(f"--pretrained-path: file not found: {args.pretrained_path}")
    if args.use_gpu and not torch.cuda.is_available():
        parser.error("--use-gpu was given but CUDA is not available in this torch build or "
                     "on this machine")


# --------------------------------------------------------------------------- amct / files


def import_tensor_decompose() -> tuple[DecomposeFn, DecomposeFn]:
    """Return (auto_decomposition, decompose_network), or exit with an install hint."""
    try:
        from amct_pytorch.tensor_decompose import auto_decomposition, decompose_network
    except ImportError as error:
        raise SystemExit(
            f"Tensor decomposition needs the amct_pytorch package, which cannot be imported "
            f"({error}). Install it from the repository root with: "
            f"pip install ./packages/amct_pytorch") from error
    return auto_decomposition, decompose_network


def make_parent_dir(path: str | os.PathLike[str] | None) -> None:
    """Create the parent folder of an output file."""
    if path is not None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)


def load_weights(model: nn.Module, path: str, what: str) -> None:
    """Load a state dict saved by the sample into ``model``, with a hint when it mismatches."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise SystemExit(
            f"{what} {path} does not fit the model: {error}\n(A decomposed checkpoint needs "
            f"the decomposed structure; weights of the original Net need the original "
            f"one.)") from error


def load_pretrained(model: nn.Module, path: str, prefix: str = "") -> None:
    """Load pretrained weights into ``model`` and say so."""
    load_weights(model, path, "Pretrained weights")
    log(f"{prefix}Loaded pretrained weights from {path}")


def rebuild_decomposed(model: nn.Module, info_path: str, weights_path: str,
                       decompose_network: DecomposeFn, prefix: str = "") -> nn.Module:
    """Offline step 2: rebuild the decomposed structure from the info file, load its weights."""
    model, _ = decompose_network(model, info_path)
    load_weights(model, weights_path, "Decomposed weights")
    log(f"{prefix}Loaded decomposed weights from {weights_path}")
    return model


def save_weights(model: nn.Module, path: str) -> None:
    """Save ``model.state_dict()`` to ``path`` atomically (temporary file, then rename)."""
    make_parent_dir(path)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    try:
        torch.save(state, tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 of every tensor of the state dict, in key order (names included)."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
