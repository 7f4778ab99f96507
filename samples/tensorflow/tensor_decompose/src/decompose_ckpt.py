"""Decompose a trained checkpoint with AMCT (steps 2.1.2 and 2.2.2 of the README).

Run from samples/tensorflow/tensor_decompose, for example::

    python ./src/decompose_ckpt.py --meta_path=model/session/baseline/model-200.meta \\
        --ckpt_path=model/session/baseline/model-200 --save_path=model/session/decompose/model

calls ``auto_decomposition(meta_path, ckpt_path, save_path)``, which logs every decomposed
convolution and writes ``<save_path>.data-00000-of-00001``, ``<save_path>.index``,
``<save_path>.meta``, ``checkpoint`` and the graph-change file ``<save_path>.pkl`` that the
fine-tuning scripts give to ``decompose_graph``.
"""
from __future__ import annotations

import argparse
import os
import sys

from train_utils import amct_errors, fail, import_tensor_decompose, log, setup_tensorflow


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(
        description="Decompose the convolutions of a trained TensorFlow checkpoint with AMCT "
                    "auto_decomposition.")
    parser.add_argument("--meta_path", required=True,
                        help="graph definition (.meta) of the model to decompose, e.g. "
                             "model/session/baseline/model-200.meta")
    parser.add_argument("--ckpt_path", required=True,
                        help="weights of the model to decompose: the common prefix of its "
                             ".data-XXXXX-of-XXXXX and .index files, e.g. "
                             "model/session/baseline/model-200")
    parser.add_argument("--save_path", required=True,
                        help="where to save the decomposed model, as a folder and a file "
                             "prefix, e.g. model/session/decompose/model")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.meta_path):
        parser.error(f"--meta_path: file not found: {args.meta_path}")
    if not os.path.isfile(args.ckpt_path + ".index"):
        hint = ""
        for suffix in (".index", ".meta"):
            if args.ckpt_path.endswith(suffix):
                hint = f" (give the prefix without {suffix}: {args.ckpt_path[:-len(suffix)]})"
        parser.error(f"--ckpt_path: file not found: {args.ckpt_path}.index{hint}")
    if not os.path.basename(args.save_path) or os.path.isdir(args.save_path):
        parser.error(f"--save_path '{args.save_path}' is a folder; give a folder and a file "
                     f"prefix, e.g. '{os.path.join(args.save_path, 'model')}'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_tensorflow(seed=0)
    auto_decomposition, _ = import_tensor_decompose()
    try:
        new_ops = auto_decomposition(args.meta_path, args.ckpt_path, args.save_path)
    except amct_errors() as error:
        raise fail(f"auto_decomposition failed: {error}") from error
    if not new_ops:
        log("No convolution met the decomposition conditions; the saved model is the "
            "original one.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
