"""Train one network of the quantization sample on MNIST and save its weights.

    python src/train.py --model cnn       # writes model/cnn.pth
    python src/train.py --model resnet    # writes model/resnet.pth

The weights are a ``state_dict`` saved with ``torch.save``; ``src/ptq_sample.py`` loads them.
"""
from __future__ import annotations

import argparse

from data_utils import load_data, log, test_split
from model import MODELS, build_model
from train_utils import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_STEPS,
    default_weights_path,
    predict,
    save_weights,
    train,
)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_training_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--steps, --batch-size, --lr, --seed, --log-steps (with ``prefix``, e.g. ``train-``)."""
    parser.add_argument(f"--{prefix}steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"training steps (default: {DEFAULT_STEPS})")
    parser.add_argument(f"--{prefix}batch-size", type=positive_int,
                        default=DEFAULT_BATCH_SIZE,
                        help=f"training batch size (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument(f"--{prefix}lr", type=positive_float, default=DEFAULT_LR,
                        help=f"initial learning rate, cosine schedule (default: {DEFAULT_LR})")
    parser.add_argument(f"--{prefix}seed", type=int, default=1,
                        help="random seed (default: 1)")
    parser.add_argument("--log-steps", type=positive_int, default=50,
                        help="print the training loss every this many steps (default: 50)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet",
                        help="network to train (default: resnet)")
    parser.add_argument("--data-path", default="data",
                        help="MNIST folder (default: data); the embedded 5,000-digit subset is "
                             "used when no MNIST is there")
    add_training_arguments(parser)
    parser.add_argument("--save-path", default=None,
                        help="where to save the weights (default: model/<model>.pth)")
    args = parser.parse_args(argv)
    if args.save_path is None:
        args.save_path = default_weights_path(args.model)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_data(args.data_path)
    log(f"[Train] Training '{args.model}': {args.steps} steps of {args.batch_size} images, "
        f"lr {args.lr}")
    model = train(build_model(args.model), data, args.steps, args.batch_size, args.lr,
                  args.seed, args.log_steps)
    images, labels = test_split(data)
    correct = int((predict(model, images).argmax(axis=1) == labels).sum())
    log(f"[Test] Accuracy: {100.0 * correct / len(labels):.2f}% ({correct}/{len(labels)})")
    save_weights(model, args.save_path)
    log(f"[Train] Weights saved to {args.save_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

