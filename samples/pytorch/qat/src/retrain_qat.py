"""Graph-based quantization-aware training of the residual CNN (manual, 量化感知训练), in one
process or under DistributedDataParallel, with an interruption and a restore.

The flow of the manual:

1. the trained FP32 ``MnistResNet`` (``--pretrained-path``, or ``../ptq/model/resnet.pth``, or
   ``model/resnet.pth`` of this folder, trained first when absent); its accuracy is printed;
2. ``amct.create_quant_retrain_config(config_file, model, input_data, config_defination=cfg)``
   writes the JSON config (``tmp/config.json``) from the simple config ``retrain.cfg``;
3. ``amct.create_quant_retrain_model(config_file, model, record_file, input_data)`` puts the
   QAT layers into the model (in place); the optimizer is built afterwards;
4. training; the ULQ clips are initialised by IFMR over the first ``batch_num`` steps, then
   learned;
5. one eval-mode forward (a batch of training digits): it writes the quantization factors to
   the record file;
6. ``amct.save_quant_retrain_model(...)`` writes ``result/resnet_fake_quant_model.onnx``,
   ``result/resnet_deploy_model.onnx`` and ``result/resnet_qdq_model.onnx``, whose fake-quant
   model is evaluated in ONNX Runtime.

Interruption (the manual's "如果训练过程中断" flow): ``--interrupt-after N`` stops after step
``N`` and saves the checkpoint ``--checkpoint`` (``{"model": retrain model state_dict,
"optimizer": ..., "step": N}`` and the run's steps, batch size, seed and number of processes,
which a resumed run must share); ``--resume CKPT`` rebuilds the retrain model from a fresh
FP32 model with ``amct.restore_quant_retrain_model(config_file, model, record_file,
input_data, pth_file=CKPT, state_dict_name="model")``, builds the optimizer, loads its state
and continues from step ``N + 1``. The batches and the learning rate depend only on the step
number, so the resumed run prints the same losses as an uninterrupted one.

Distributed: start it with ``torchrun --nproc_per_node=2 src/retrain_qat.py`` (or ``python
-m torch.distributed.run``): gloo on the CPU (``--backend nccl --use-gpu`` on GPUs), the
retrain model wrapped in DistributedDataParallel, ``--batch-size`` digits per process and
step. Rank 0 trains the FP32 weights if needed and writes the config; **every rank writes its
own record** (rank 0 ``tmp/record.txt``, rank ``r`` ``tmp/record_rank<r>.txt``) and rank 0
checks that they are identical (the clips are averaged at initialisation and the gradients
all-reduced, so every rank holds the same factors); rank 0 alone saves the checkpoint and the
models and evaluates them. Without a launcher it runs as one process, without
DistributedDataParallel.

    python src/retrain_qat.py
    torchrun --nproc_per_node=2 src/retrain_qat.py --interrupt-after 50
    torchrun --nproc_per_node=2 src/retrain_qat.py --resume ckpt/resnet_retrain.pth
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import qat_utils  # noqa: F401  (puts the PTQ sample's src folder on sys.path)
import torch
import torch.distributed as dist
from qat_utils import (
    DYNAMIC_AXES,
    INPUT_NAME,
    MODEL_NAME,
    OUTPUT_NAME,
    accuracy_line,
    add_data_arguments,
    add_fp32_arguments,
    load_data,
    log,
    normalize,
    onnx_accuracy,
    positive_float,
    positive_int,
    step_batch,
    test_split,
    torch_accuracy,
    train_fp32_weights,
    train_steps,
    training_tensors,
    weights_file,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from train_utils import load_weights

import amct_pytorch as amct


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    add_fp32_arguments(parser)
    parser.add_argument("--steps", type=positive_int, default=100,
                        help="QAT steps of the whole run (default: 100)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="training digits per process and step (default: 32)")
    parser.add_argument("--lr", type=positive_float, default=0.005,
                        help="initial learning rate of SGD with momentum 0.9, cosine schedule "
                             "over --steps (default: 0.005)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--log-steps", type=positive_int, default=20,
                        help="print the training loss every this many steps (default: 20)")
    parser.add_argument("--config-defination", default="retrain.cfg",
                        help="simple QAT config (default: retrain.cfg)")
    parser.add_argument("--config-file", default=os.path.join("tmp", "config.json"),
                        help="JSON QAT config written by create_quant_retrain_config "
                             "(default: tmp/config.json)")
    parser.add_argument("--record-file", default=os.path.join("tmp", "record.txt"),
                        help="record file of rank 0 (rank r adds _rank<r> to the name; "
                             "default: tmp/record.txt)")
    parser.add_argument("--save-path", default=os.path.join("result", MODEL_NAME),
                        help="prefix of the saved models (default: result/resnet)")
    parser.add_argument("--interrupt-after", type=positive_int, default=None,
                        help="stop after this many steps and save --checkpoint (the "
                             "interruption of the manual)")
    parser.add_argument("--checkpoint", default=os.path.join("ckpt", "resnet_retrain.pth"),
                        help="checkpoint written by --interrupt-after "
                             "(default: ckpt/resnet_retrain.pth)")
    parser.add_argument("--resume", default=None, metavar="CKPT",
                        help="continue an interrupted run from this checkpoint with "
                             "restore_quant_retrain_model")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                        help="distributed backend under torchrun: gloo for CPU, nccl for GPU "
                             "(default: gloo)")
    parser.add_argument("--use-gpu", action="store_true",
                        help="train on the GPU of the local rank (with --backend nccl)")
    args = parser.parse_args(argv)
    if args.interrupt_after is not None and args.interrupt_after >= args.steps:
        parser.error(f"--interrupt-after {args.interrupt_after} must be less than --steps "
                     f"{args.steps}")
    if args.interrupt_after is not None and args.resume is not None:
        parser.error("give --interrupt-after or --resume, not both")
    if args.backend == "nccl" and not args.use_gpu:
        parser.error("--backend nccl needs --use-gpu (use gloo to train on the CPU)")
    return args


def rank_record_file(record_file: str, rank: int) -> str:
    """``tmp/record.txt`` on rank 0, ``tmp/record_rank<r>.txt`` on rank ``r``."""
    if rank == 0:
        return record_file
    path = Path(record_file)
    return str(path.with_name(f"{path.stem}_rank{rank}{path.suffix}"))


class Processes:
    """The process group: one process without a launcher, else torch.distributed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = torch.device("cpu")
        if self.distributed:
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if args.use_gpu:
            if self.local_rank >= torch.cuda.device_count():
                raise SystemExit(f"--use-gpu: local rank {self.local_rank} has no GPU "
                                 f"({torch.cuda.device_count()} visible)")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        if not self.distributed:
            return
        dist.init_process_group(backend=args.backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> float:
        """The mean of ``value`` over the processes."""
        if not self.distributed:
            return float(value.item())
        total = value.detach().clone().reshape(1)
        dist.all_reduce(total)
        return float(total.item()) / self.world_size

    def close(self) -> None:
        """Destroy the process group. The DDP wrapper of :func:`run` (its reducer holds the
        group) is collected first: left to interpreter shutdown, gloo's teardown can abort the
        process ("terminate called without an active exception")."""
        if self.distributed:
            gc.collect()
            dist.destroy_process_group()


def fp32_weights(args: argparse.Namespace, data, procs: Processes) -> str:
    """The path of the FP32 weights; rank 0 trains them first when there are none."""
    path, needs_training = weights_file(args.pretrained_path)
    if needs_training and procs.rank == 0:
        train_fp32_weights(args, data, path, "FP32")
    procs.barrier()
    return path


def batch_num_of(config_file: str) -> int:
    """``batch_num`` of the JSON QAT config."""
    with open(config_file, encoding="utf-8") as handle:
        return int(json.load(handle).get("batch_num", 1))


#: The settings a resumed run must share with the interrupted one (same batches, same lr).
RUN_SETTINGS = ("steps", "batch_size", "seed", "world_size")


def run_settings(args: argparse.Namespace, world_size: int) -> dict[str, int]:
    """The :data:`RUN_SETTINGS` of this run, stored in the checkpoint."""
    return {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
            "world_size": world_size}


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, settings: dict[str, int]) -> None:
    """``{"model": state_dict, "optimizer": state_dict, "step": step, **settings}`` (written
    to a temporary file, then renamed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, **settings}, tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs = Processes(args)
    try:
        status = run(args, procs)
        procs.barrier()  # no rank leaves while another still runs
        return status
    finally:
        procs.close()


def run(args: argparse.Namespace, procs: Processes) -> int:
    rank, world_size, device = procs.rank, procs.world_size, procs.device
    lead = rank == 0
    data = load_data(args.data_path) if lead else _quiet_load(args.data_path)
    images, labels = training_tensors(data)
    images, labels = images.to(device), labels.to(device)
    test_images, test_labels = test_split(data, args.eval_size)
    if lead:
        mode = (f"DistributedDataParallel, backend {args.backend}, {world_size} processes"
                if procs.distributed else "single process")
        log(f"[QAT] Graph-based QAT of '{MODEL_NAME}': {mode}, {args.batch_size} digits per "
            f"process and step")

    # 1. The original FP32 model.
    weights = fp32_weights(args, data, procs)
    model = load_weights(MODEL_NAME, weights)
    if lead:
        log(f"[FP32] FP32 model '{MODEL_NAME}' with the weights of {os.path.relpath(weights)}")
        log(accuracy_line("FP32 model", "PyTorch",
                          torch_accuracy(model, test_images, test_labels)))
    model = model.to(device)
    input_data = torch.from_numpy(normalize(data.train_images[:1])).to(device)
    record_file = rank_record_file(args.record_file, rank)
    Path(record_file).parent.mkdir(parents=True, exist_ok=True)

    start = 0
    checkpoint = None
    if args.resume is None:
        # 2. The QAT config (rank 0 writes it, every rank reads it).
        if lead:
            Path(args.config_file).parent.mkdir(parents=True, exist_ok=True)
            amct.create_quant_retrain_config(config_file=args.config_file, model=model,
                                             input_data=input_data,
                                             config_defination=args.config_defination)
        procs.barrier()
        # 3. The retrain model.
        model = amct.create_quant_retrain_model(config_file=args.config_file, model=model,
                                                record_file=record_file,
                                                input_data=input_data)
    else:
        # Interrupted before: a fresh FP32 model, the QAT layers and the checkpoint.
        if not os.path.isfile(args.config_file):
            raise SystemExit(f"--resume needs the config file of the interrupted run; "
                             f"{args.config_file!r} does not exist (pass --config-file)")
        model = amct.restore_quant_retrain_model(config_file=args.config_file, model=model,
                                                 record_file=record_file,
                                                 input_data=input_data,
                                                 pth_file=args.resume, state_dict_name="model")
        checkpoint = torch.load(args.resume, map_location=device, weights_only=True)
        start = int(checkpoint["step"])
        wanted = run_settings(args, world_size)
        differ = [f"{key} {checkpoint.get(key)} (now {wanted[key]})" for key in RUN_SETTINGS
                  if checkpoint.get(key) != wanted[key]]
        if differ:
            raise SystemExit(f"{args.resume} was saved by a run with other settings: "
                             f"{', '.join(differ)}. Resume with the --steps, --batch-size, "
                             f"--seed and number of processes of the interrupted run")
        if start >= args.steps:
            raise SystemExit(f"{args.resume} was saved after step {start}; --steps "
                             f"{args.steps} leaves nothing to train")
        if lead:
            log(f"[QAT] Restored the retrain model from {args.resume} (step {start}); "
                f"continuing to step {args.steps}")
    batch_num = batch_num_of(args.config_file)
    if args.interrupt_after is not None and args.interrupt_after < batch_num:
        raise SystemExit(f"--interrupt-after {args.interrupt_after} is less than batch_num "
                         f"{batch_num} of {args.config_file}: the checkpoint must hold "
                         f"initialised clips, so train at least batch_num steps first")
    if args.steps < batch_num:
        raise SystemExit(f"--steps {args.steps} is less than batch_num {batch_num} of "
                         f"{args.config_file}")

    # 4. Train (the optimizer is built from the retrain model).
    train_model: nn.Module = model
    if procs.distributed:
        ids = [procs.local_rank] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.SGD(train_model.parameters(), lr=args.lr, momentum=0.9)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    stop = args.interrupt_after or args.steps
    torch.manual_seed(args.seed)
    train_steps(train_model, optimizer, images, labels, start=start, stop=stop,
                total=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                log_steps=args.log_steps, rank=rank, world_size=world_size,
                mean_loss=procs.mean, verbose=lead)

    if args.interrupt_after is not None:
        if lead:
            save_checkpoint(args.checkpoint, model, optimizer, stop,
                            run_settings(args, world_size))
            log(f"[QAT] Interrupted after step {stop}: checkpoint saved to {args.checkpoint}. "
                f"Continue with --resume {args.checkpoint}")
        procs.barrier()
        return 0

    # 5. One eval-mode forward: the quantization factors go to the record file.
    index, _ = step_batch(len(labels), args.batch_size, 0, args.seed, rank, world_size)
    model.eval()
    with torch.no_grad():
        model(images[torch.from_numpy(index).to(device)])
    procs.barrier()
    if not lead:
        return 0
    log(f"[QAT] Quantization factors written to {record_file}")
    if procs.distributed:
        own = Path(record_file).read_bytes()
        others = [rank_record_file(args.record_file, r) for r in range(1, world_size)]
        same = all(Path(other).read_bytes() == own for other in others)
        log(f"[DDP] Records of all {world_size} ranks identical: {same}")
    model = model.cpu()
    log(accuracy_line("QAT model", "PyTorch", torch_accuracy(model, test_images, test_labels)))

    # 6. Save the quantized models and evaluate the fake-quant one.
    Path(args.save_path).parent.mkdir(parents=True, exist_ok=True)
    amct.save_quant_retrain_model(config_file=args.config_file, model=model,
                                  record_file=record_file, save_path=args.save_path,
                                  input_data=input_data.cpu(), input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES)
    fake_quant = f"{args.save_path}_fake_quant_model.onnx"
    for suffix in ("fake_quant", "deploy", "qdq"):
        log(f"[Save] Written: {args.save_path}_{suffix}_model.onnx")
    log(accuracy_line("Fake-quant model", "ONNX Runtime",
                      onnx_accuracy(fake_quant, test_images, test_labels)))
    return 0


def _quiet_load(data_path: str):
    """Load the data without printing (ranks other than 0)."""
    import data_utils

    return data_utils.mnist_data.load_mnist(data_path)


if __name__ == "__main__":
    sys.exit(main())
