"""Single-process training of the sample Net, with online or offline tensor decomposition.

Run from samples/pytorch/tensor_decompose, for example::

    python src/simple_train.py --save-path model/simple/baseline.pth
    python src/simple_train.py --lr 0.001 \\
        --save-path model/simple/online/decomposed_finetuned.pth \\
        --pretrained-path model/simple/baseline.pth --tensor-decompose \\
        --decompose-info-path model/simple/online/decompose_info.json --run-mode online
    python src/simple_train.py --lr 0.001 \\
        --save-path model/simple/offline/decomposed_finetuned.pth --tensor-decompose \\
        --decompose-info-path model/simple/offline/decompose_info.json \\
        --decomposed-weights-path model/simple/offline/decomposed_weights.pth --run-mode offline
"""
from __future__ import annotations

import argparse
import sys

import torch
from model import Net
from train_utils import (
    add_common_arguments,
    batch_loader,
    check_common_arguments,
    evaluate,
    import_tensor_decompose,
    load_data,
    load_pretrained,
    log,
    make_parent_dir,
    rebuild_decomposed,
    save_weights,
    test_line,
    train,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(
        description="Train the MNIST sample Net on one process, optionally with AMCT tensor "
                    "decomposition (online: decompose a pretrained model and fine-tune it; "
                    "offline: rebuild the structure from a decomposition information file, "
                    "load decomposed weights and fine-tune).")
    add_common_arguments(
        parser, train_batch_size=256,
        train_batch_help="training batch size", test_batch_help="test batch size",
        info_help="decomposition information file: read in offline mode (required there), "
                  "written in online mode when given; only with --tensor-decompose "
                  "(default: None, not saved)",
        weights_help="decomposed weights: read in offline mode (required there), written "
                     "in online mode right after decomposition when given; only with "
                     "--tensor-decompose (default: None, not saved)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    return args


def build_model(args: argparse.Namespace) -> Net:
    """Create Net and apply the weights and decomposition the arguments ask for."""
    model = Net()
    if not args.tensor_decompose:
        if args.pretrained_path is not None:
            load_pretrained(model, args.pretrained_path)
        return model
    auto_decomposition, decompose_network = import_tensor_decompose()
    if args.run_mode == "online":
        load_pretrained(model, args.pretrained_path)
        make_parent_dir(args.decompose_info_path)
        model, changes = auto_decomposition(model, args.decompose_info_path)
        if not changes:
            log("No layer was decomposed; fine-tuning the original structure.")
        if args.decomposed_weights_path is not None:
            save_weights(model, args.decomposed_weights_path)
            log(f"Decomposed weights are saved to: {args.decomposed_weights_path}")
    else:
        model = rebuild_decomposed(model, args.decompose_info_path,
                                   args.decomposed_weights_path, decompose_network)
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.use_gpu else "cpu")

    train_set, test_set, _ = load_data(args.data_path)
    model = build_model(args).to(device)

    generator = torch.Generator().manual_seed(args.seed)
    train_loader = batch_loader(train_set, args.train_batch_size, generator=generator)
    test_loader = batch_loader(test_set, args.test_batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    train(model, train_loader, optimizer, device, args.steps, args.log_steps)
    log(test_line(*evaluate(model, test_loader, device)))

    if args.save_path is not None:
        save_weights(model, args.save_path)
        log(f"Trained weights are saved to: {args.save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
