"""Offline tensor decomposition, step 1: decompose trained weights and save the results.

Run from samples/pytorch/tensor_decompose, for example::

    python src/decompose_model.py \\
        --pretrained-path model/simple/baseline.pth \\
        --decompose-info-path model/simple/offline/decompose_info.json \\
        --decomposed-weights-path model/simple/offline/decomposed_weights.pth

The information file and the weights are then used by ``simple_train.py`` or
``ddp_train.py`` with ``--tensor-decompose --run-mode offline``.
"""
from __future__ import annotations

import argparse
import os
import sys

from model import Net
from train_utils import import_tensor_decompose, load_weights, log, make_parent_dir, save_weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(
        description="Load trained weights of the sample Net, decompose it with AMCT "
                    "auto_decomposition, and save the decomposition information file and "
                    "the decomposed weights.")
    parser.add_argument("--pretrained-path", required=True,
                        help="weights of the trained (original) Net")
    parser.add_argument("--decompose-info-path", required=True,
                        help="where to save the decomposition information file")
    parser.add_argument("--decomposed-weights-path", required=True,
                        help="where to save the weights of the decomposed model")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.pretrained_path):
        parser.error(f"--pretrained-path: file not found: {args.pretrained_path}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    auto_decomposition, _ = import_tensor_decompose()
    model = Net()
    load_weights(model, args.pretrained_path, "Pretrained weights")
    log(f"Loaded pretrained weights from {args.pretrained_path}")

    make_parent_dir(args.decompose_info_path)
    model, changes = auto_decomposition(model, args.decompose_info_path)
    if not changes:
        log("No layer met the decomposition conditions; nothing else is saved.")
        return 0
    save_weights(model, args.decomposed_weights_path)
    log(f"Decomposed weights are saved to: {args.decomposed_weights_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
