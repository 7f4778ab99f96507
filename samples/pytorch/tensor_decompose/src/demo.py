"""End-to-end demo of AMCT tensor decomposition on the sample Net.

Trains Net from scratch, decomposes it with ``auto_decomposition``, fine-tunes it with a tenth
of the learning rate, and prints a before/after table: test accuracy, parameters and MACs
(multiply-accumulates, computed from layer shapes) of the decomposed layers and of the whole
net, and the CPU latency of one batch (median of several timed runs).

    python src/demo.py                   # embedded MNIST subset unless data/ holds MNIST
    python src/demo.py --data-path data  # after scripts/download_mnist.py --data_path=data
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from model import Net
from torch import nn
from train_utils import (
    batch_loader,
    evaluate,
    import_tensor_decompose,
    load_data,
    log,
    make_parent_dir,
    train,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default="data",
                        help="MNIST folder (default: data); the embedded 5,000-digit subset "
                             "is used when no MNIST is there")
    parser.add_argument("--steps", type=int, default=150,
                        help="training steps from scratch (default: 150)")
    parser.add_argument("--finetune-steps", type=int, default=60,
                        help="fine-tuning steps after decomposition (default: 60)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="training batch size (default: 128)")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="training learning rate; fine-tuning uses 0.1x (default: 0.01)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--log-steps", type=int, default=50,
                        help="print the training loss every this many steps (default: 50)")
    parser.add_argument("--latency-batch", type=int, default=256,
                        help="batch size of the latency measurement (default: 256)")
    parser.add_argument("--latency-runs", type=int, default=20,
                        help="timed runs of the latency measurement (default: 20)")
    parser.add_argument("--decompose-info-path", default=None,
                        help="also save the decomposition information file here")
    args = parser.parse_args(argv)
    for flag in ("steps", "finetune_steps", "batch_size", "log_steps", "latency_batch",
                 "latency_runs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    return args


def count_macs(model: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """MACs per image of every Conv2d and Linear, from the shapes seen by forward hooks.

    Conv2d: output elements x (in_channels / groups) x kernel height x kernel width.
    Linear: output elements x in_features. Bias additions are not counted.
    """
    macs: dict[str, int] = {}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...],
                 output: torch.Tensor) -> None:
            per_image = output.numel() // output.shape[0]
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs[name] = per_image * (module.in_channels // module.groups) * kh * kw
            else:
                macs[name] = per_image * module.in_features
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook_for(name)))
    try:
        with torch.no_grad():
            model.eval()(sample[:1])
    finally:
        for handle in handles:
            handle.remove()
    return macs


def count_params(modules: Iterable[nn.Module]) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def median_latencies_ms(calls: list[Callable[[], object]], runs: int) -> list[float]:
    """Median wall time (ms) of each call, after a warm-up.

    The calls are timed in turn within each run, so that load on the machine affects them
    alike.
    """
    times: list[list[float]] = [[] for _ in calls]
    with torch.no_grad():
        for call in calls:
            for _ in range(3):
                call()
        for _ in range(runs):
            for call, call_times in zip(calls, times, strict=True):
                start = time.perf_counter()
                call()
                call_times.append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(call_times) for call_times in times]


def layer_inputs(model: nn.Module, names: list[str], batch: torch.Tensor) -> dict[str, Any]:
    """The input each named module receives when ``model`` runs on ``batch``."""
    inputs: dict[str, Any] = {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(
        lambda module, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name in names]
    try:
        with torch.no_grad():
            model.eval()(batch)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def layer_stats(model: nn.Module, names: list[str], sample: torch.Tensor) -> dict[str, int]:
    """Parameters and MACs per image of the named layers and of the whole model."""
    modules = dict(model.named_modules())
    macs = count_macs(model, sample)
    return {
        "layer_params": count_params(modules[name] for name in names),
        "layer_macs": sum(value for key, value in macs.items()
                          if any(key == name or key.startswith(f"{name}.") for name in names)),
        "net_params": count_params([model]),
        "net_macs": sum(macs.values()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    auto_decomposition, _ = import_tensor_decompose()
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    log(f"[Demo] torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    train_set, test_set, source = load_data(args.data_path)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = batch_loader(train_set, args.batch_size, generator=generator)
    test_loader = batch_loader(test_set, 1000)
    latency_batch = test_set[list(range(min(args.latency_batch, len(test_set))))][0]
    sample = latency_batch[:1]

    log(f"[Demo] 1/3 Training Net from scratch: {args.steps} steps, lr {args.lr}")
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    train(model, train_loader, optimizer, device, args.steps, args.log_steps)
    before = evaluate(model, test_loader, device)
    original = copy.deepcopy(model)
    conv_names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    before_macs = count_macs(model, sample)
    before_params = {name: count_params([m]) for name, m in model.named_modules()}
    before_net = (count_params([model]), sum(before_macs.values()))

    log("[Demo] 2/3 Decomposing with auto_decomposition")
    make_parent_dir(args.decompose_info_path)
    model, changes = auto_decomposition(model, args.decompose_info_path)
    if not changes:
        log("[Demo] No layer was decomposed; nothing to compare.")
        return 1
    decomposed = evaluate(model, test_loader, device)

    finetune_lr = args.lr * 0.1
    log(f"[Demo] 3/3 Fine-tuning: {args.finetune_steps} steps, lr {finetune_lr:g} (0.1x)")
    optimizer = torch.optim.SGD(model.parameters(), lr=finetune_lr, momentum=0.9)
    train(model, train_loader, optimizer, device, args.finetune_steps, args.log_steps)
    after = evaluate(model, test_loader, device)
    log(f"[Demo] Timing both models on a batch of {len(latency_batch)} test images "
        f"({args.latency_runs} runs each)")
    original.eval()
    model.eval()
    old_names = sorted(changes)
    old_modules, new_modules = dict(original.named_modules()), dict(model.named_modules())
    inputs = layer_inputs(original, old_names, latency_batch)
    before_latency, after_latency, before_layer_latency, after_layer_latency = \
        median_latencies_ms([
            lambda: original(latency_batch),
            lambda: model(latency_batch),
            lambda: [old_modules[name](inputs[name]) for name in old_names],
            lambda: [new_modules[name](inputs[name]) for name in old_names],
        ], args.latency_runs)

    new_names = [name for key in old_names for name in changes[key]]
    stats = layer_stats(model, new_names, sample)
    layer_label = ", ".join(old_names)
    old_layer_params = sum(before_params[name] for name in old_names)
    old_layer_macs = sum(before_macs[name] for name in old_names)
    print_table(
        data=source,
        rows=[
            ("Test accuracy", pct(before), pct(after), f"{pct(decomposed)} before fine-tune"),
            ("Test loss", f"{before[0]:.4f}", f"{after[0]:.4f}", ""),
            (f"Params of {layer_label}", f"{old_layer_params:,}", f"{stats['layer_params']:,}",
             ratio(old_layer_params, stats["layer_params"])),
            (f"MACs/image of {layer_label}", f"{old_layer_macs:,}", f"{stats['layer_macs']:,}",
             ratio(old_layer_macs, stats["layer_macs"])),
            ("Params of Net", f"{before_net[0]:,}", f"{stats['net_params']:,}",
             ratio(before_net[0], stats["net_params"])),
            ("MACs/image of Net", f"{before_net[1]:,}", f"{stats['net_macs']:,}",
             ratio(before_net[1], stats["net_macs"])),
            (f"CPU latency/batch of {layer_label} (ms)", f"{before_layer_latency:.2f}",
             f"{after_layer_latency:.2f}",
             ratio(before_layer_latency, after_layer_latency, "faster")),
            ("CPU latency/batch of Net (ms)", f"{before_latency:.2f}",
             f"{after_latency:.2f}", ratio(before_latency, after_latency, "faster")),
        ],
        changes=changes, conv_names=conv_names, latency_batch=len(latency_batch),
        latency_runs=args.latency_runs)
    return 0


def pct(result: tuple[float, int, int]) -> str:
    _, correct, total = result
    return f"{100.0 * correct / total:.2f}% ({correct}/{total})"


def ratio(before: float, after: float, word: str = "smaller") -> str:
    return f"{before / after:.2f}x {word}" if after else ""


def print_table(data: str, rows: list[tuple[str, str, str, str]],
                changes: dict[str, list[str]], conv_names: list[str], latency_batch: int,
                latency_runs: int) -> None:
    """Print the before/after table."""
    header = ("", "Original", "Decomposed + fine-tuned", "Change")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    line = "+".join("-" * (w + 2) for w in widths)
    log("")
    log(f"[Demo] Data: {data}")
    log(f"[Demo] Batch of the latency rows: {latency_batch} test images; median of "
        f"{latency_runs} runs, {torch.get_num_threads()} CPU thread(s)")
    log(f"[Demo] Conv layers: {', '.join(conv_names)}; decomposed: "
        + ", ".join(f"{key} -> {value}" for key, value in changes.items()))
    log(line)
    for i, row in enumerate([header, *rows]):
        log("|".join(f" {cell:<{w}} " for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            log(line)
    log(line)
    log("[Demo] MACs count multiply-accumulates of Conv2d and Linear layers per image. The "
        "latency of Net also includes conv1, pooling and ReLU, which decomposition leaves "
        "unchanged.")


if __name__ == "__main__":
    sys.exit(main())
