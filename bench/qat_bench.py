"""Quantization-aware training, side by side: FP32, our graph-based QAT, our single-op QAT
modules and ``torch.ao.quantization`` QAT (``prepare_qat``), on the residual MNIST CNN of the
PTQ sample.

Each variant starts from the same trained FP32 weights (cached as ``bench/ptq_bench.py`` caches
them) and is fine-tuned for ``--steps`` SGD steps on the same batches. Measured:

* the training-step time (forward, backward, optimizer step; median over the steps after
  ``--warmup`` steps, so the ULQ/observer initialisation is not counted), as a multiple of the
  FP32 step; the four variants take turns step by step, so drifts of the machine's speed hit
  them alike;
* the accuracy on the test digits after fine-tuning: FP32 in PyTorch; ours from the models a
  user deploys (graph-based: the fake-quant ONNX model that ``save_quant_retrain_model``
  writes; single-op: ``torch.onnx.export`` then ``convert_qat_model``'s fake-quant model, both
  in ONNX Runtime); torch.ao's QAT model in PyTorch (its fake-quant simulation).

torch.ao gets its default x86 QAT qconfig on the Conv2d and Linear layers only, so each
quantized layer has one weight and one activation fake-quant, as ours has (its eager mode would
otherwise observe every BatchNorm and ReLU output too).

The issue's goals: our step at most 1.3× the FP32 step and faster than torch.ao's; final
accuracy within 0.3 point of FP32. Results go to ``bench/results/qat_bench.json``.

    python bench/qat_bench.py [--data-path DIR] [--steps 150] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import ptq_bench  # noqa: E402  (sets the sample paths and AMCT's log levels)
import torch  # noqa: E402
from data_utils import load_data, normalize, test_split  # noqa: E402
from ptq_bench import DYNAMIC_AXES, INPUT_NAME, OUTPUT_NAME, RESULTS, ROOT  # noqa: E402
from torch import nn  # noqa: E402

import amct_pytorch  # noqa: E402
from amct_onnx.convert_model import convert_qat_model  # noqa: E402
from amct_pytorch.module_tree import replace_submodule  # noqa: E402
from amct_pytorch.nn.module.quantization.conv2d import Conv2dQAT  # noqa: E402
from amct_pytorch.nn.module.quantization.linear import LinearQAT  # noqa: E402
from amct_pytorch.qat import functional as qat_functional  # noqa: E402

#: Which path our QAT layers run: the fused C kernels, or separate torch operations where the
#: optional extension was not built (no C compiler at install).
QAT_KERNELS = ("fused C kernels (amct_pytorch.qat._fused_quant)" if qat_functional._FUSED
               is not None else "composite torch operations (the C extension is not built)")
GOAL_STEP_RATIO = 1.3   # our QAT step / FP32 step, at most
GOAL_ACC_LOSS = 0.3     # points below FP32, at most
LR = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-path", default=str(ROOT / "samples" / "pytorch" / "ptq" / "data"),
                        help="MNIST folder; the embedded 5,000-digit subset when there is none")
    parser.add_argument("--train-steps", type=int, default=400,
                        help="training steps of the FP32 model (cached, as in ptq_bench.py)")
    parser.add_argument("--retrain", action="store_true", help="train even when cached")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 5:
        parser.error("--steps must exceed --warmup by more than 5")
    return args


def batches(data, steps: int, batch_size: int, seed: int = 7):
    """The same ``steps`` batches, in the same order, for every variant."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(normalize(data.train_images))
    labels = torch.from_numpy(data.train_labels.astype(np.int64))
    out = []
    for _ in range(steps):
        index = torch.from_numpy(rng.choice(len(labels), batch_size, replace=False))
        out.append((images[index], labels[index]))
    return out


def fine_tune(models: dict[str, nn.Module], train_batches, warmup: int) -> dict[str, dict]:
    """SGD fine-tuning of every model on the same batches. The variants take turns step by
    step (a step of each, then the next batch), so a change in the machine's speed during the
    run affects them alike. Returns, per model, the median step time after ``warmup`` (ms) and
    the losses."""
    torch.manual_seed(0)
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
                  for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    losses: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.train()
    for step, (x, y) in enumerate(train_batches):
        for name, model in models.items():
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            elapsed = time.perf_counter() - start
            if step >= warmup:
                times[name].append(elapsed)
            losses[name].append(loss.item())
    return {name: {"step_ms": 1000 * statistics.median(times[name]), "losses": losses[name]}
            for name in models}


def accuracy_torch(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(images[i:i + 500]))
                            for i in range(0, len(images), 500)]).numpy()
    return 100.0 * float((logits.argmax(1) == labels).mean())


def accuracy_onnx(path: str, images: np.ndarray, labels: np.ndarray) -> float:
    session = ptq_bench.make_session(path, threads=os.cpu_count() or 1)
    logits = np.concatenate([session.run(None, {INPUT_NAME: images[i:i + 500]})[0]
                             for i in range(0, len(images), 500)])
    return 100.0 * float((logits.argmax(1) == labels).mean())


def single_op_model(model: nn.Module) -> nn.Module:
    """The seed's fine-tune recipe: every Conv2d and Linear replaced by ``from_float``."""
    model = copy.deepcopy(model)
    config = {"retrain_data_config": {"dst_type": "INT8", "batch_num": 1, "fixed_min": False,
                                      "clip_min": None, "clip_max": None},
              "retrain_weight_config": {"dst_type": "INT8",
                                        "weights_retrain_algo": "arq_retrain",
                                        "channel_wise": True}}
    linear_config = copy.deepcopy(config)
    linear_config["retrain_weight_config"]["channel_wise"] = False
    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d:
            replace_submodule(model, name, Conv2dQAT.from_float(module, config=config))
        elif type(module) is nn.Linear:
            replace_submodule(model, name, LinearQAT.from_float(module, config=linear_config))
    return model


def torch_ao_model(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    model = copy.deepcopy(model).train()
    qconfig = get_default_qat_qconfig("x86")
    for module in model.modules():
        if type(module) in (nn.Conv2d, nn.Linear):
            module.qconfig = qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat(model, inplace=False)


def export_qdq(model: nn.Module, example: torch.Tensor, path: str) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=13,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=DYNAMIC_AXES)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(args.data_path)
    fp32, weights, _ = ptq_bench.trained_resnet(data, args.train_steps, args.retrain)
    images, labels = test_split(data)
    train_batches = batches(data, args.steps, args.batch_size)
    example = train_batches[0][0][:2]
    report: dict = {"machine": {"cpu": ptq_bench.cpu_name(), "cores": os.cpu_count(),
                                "torch_threads": args.threads},
                    "qat_kernels": QAT_KERNELS,
                    "model": "MnistResNet (samples/pytorch/ptq)", "weights": weights,
                    "data": data.source, "test_digits": len(labels),
                    "steps": args.steps, "batch_size": args.batch_size,
                    "accuracy_before_pct": accuracy_torch(fp32, images, labels)}
    work = tempfile.mkdtemp(prefix="qat_bench_")

    print("[Bench] preparing: FP32, graph-based QAT (create_quant_retrain_model), single-op QAT "
          "(from_float), torch.ao.quantization prepare_qat", flush=True)
    config_file, record_file = f"{work}/config.json", f"{work}/record.txt"
    graph = copy.deepcopy(fp32)
    amct_pytorch.create_quant_retrain_config(config_file, graph, example)
    graph = amct_pytorch.create_quant_retrain_model(config_file, graph, record_file, example)
    models = {"fp32": copy.deepcopy(fp32), "graph_qat": graph,
              "single_op_qat": single_op_model(fp32), "torch_ao_qat": torch_ao_model(fp32)}
    print(f"[Bench] fine-tuning the four variants in turns, {args.steps} steps", flush=True)
    results = fine_tune(models, train_batches, args.warmup)

    results["fp32"]["accuracy_pct"] = accuracy_torch(models["fp32"], images, labels)
    results["fp32"]["accuracy_of"] = "PyTorch"
    results["graph_qat"]["accuracy_torch_pct"] = accuracy_torch(graph, images, labels)
    amct_pytorch.save_quant_retrain_model(config_file, graph, record_file, f"{work}/graph",
                                          example, input_names=[INPUT_NAME],
                                          output_names=[OUTPUT_NAME],
                                          dynamic_axes=DYNAMIC_AXES)
    results["graph_qat"]["accuracy_pct"] = accuracy_onnx(f"{work}/graph_fake_quant_model.onnx",
                                                         images, labels)
    results["graph_qat"]["accuracy_of"] = "fake-quant ONNX (save_quant_retrain_model)"
    single = models["single_op_qat"]
    results["single_op_qat"]["accuracy_torch_pct"] = accuracy_torch(single, images, labels)
    export_qdq(single, example, f"{work}/single_op_qdq.onnx")
    convert_qat_model(f"{work}/single_op_qdq.onnx", f"{work}/single_op")
    results["single_op_qat"]["accuracy_pct"] = accuracy_onnx(
        f"{work}/single_op_fake_quant_model.onnx", images, labels)
    results["single_op_qat"]["accuracy_of"] = "fake-quant ONNX (convert_qat_model)"
    results["torch_ao_qat"]["accuracy_pct"] = accuracy_torch(models["torch_ao_qat"], images,
                                                             labels)
    results["torch_ao_qat"]["accuracy_of"] = "PyTorch fake-quant"

    base_ms = results["fp32"]["step_ms"]
    base_acc = results["fp32"]["accuracy_pct"]
    for result in results.values():
        result["step_vs_fp32"] = result["step_ms"] / base_ms
        result["accuracy_vs_fp32_pt"] = result["accuracy_pct"] - base_acc
        result["final_loss"] = float(np.mean(result.pop("losses")[-10:]))
    ao_ms = results["torch_ao_qat"]["step_ms"]
    report["results"] = results
    report["goals"] = {
        name: {"step_vs_fp32_at_most_1.3": results[name]["step_vs_fp32"] <= GOAL_STEP_RATIO,
               "faster_than_torch_ao": results[name]["step_ms"] < ao_ms,
               "accuracy_within_0.3_pt": results[name]["accuracy_vs_fp32_pt"] >= -GOAL_ACC_LOSS}
        for name in ("graph_qat", "single_op_qat")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "qat_bench.json"
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n[Bench] {report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"{args.threads} torch threads; "
          f"{'embedded MNIST subset' if data.is_embedded_subset else 'MNIST'}; "
          f"{len(labels)} test digits; "
          f"{args.steps} fine-tuning steps of {args.batch_size}")
    print(f"[Bench] our QAT layers run {QAT_KERNELS}")
    print(f"[Bench] FP32 accuracy before fine-tuning: {report['accuracy_before_pct']:.2f}%")
    header = (f"{'variant':<16}{'step ms':>9}{'x FP32':>8}{'accuracy':>10}{'vs FP32':>9}"
              f"  measured on")
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        print(f"{name:<16}{result['step_ms']:>9.2f}{result['step_vs_fp32']:>8.2f}"
              f"{result['accuracy_pct']:>9.2f}%{result['accuracy_vs_fp32_pt']:>+9.2f}  "
              f"{result['accuracy_of']}")
    for name, goals in report["goals"].items():
        print(f"[Bench] goals {name}: " + ", ".join(
            f"{goal} {'met' if met else 'NOT met'}" for goal, met in goals.items()))
    print(f"[Bench] results written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
