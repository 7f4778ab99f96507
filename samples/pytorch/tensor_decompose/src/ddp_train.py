"""Distributed (DDP) training of the sample Net, with online or offline tensor decomposition.

Run from samples/pytorch/tensor_decompose with torchrun or torch.distributed.launch::

    torchrun --nproc_per_node=2 src/ddp_train.py --save-path model/ddp/baseline.pth
    python -m torch.distributed.launch --nproc_per_node=2 src/ddp_train.py \\
        --lr 0.001 --save-path model/ddp/online/decomposed_finetuned.pth \\
        --pretrained-path model/ddp/baseline.pth --tensor-decompose \\
        --decompose-info-path model/ddp/online/decompose_info.json \\
        --decomposed-weights-path model/ddp/online/decomposed_weights.pth --run-mode online

Online mode: rank 0 loads the pretrained weights, runs ``auto_decomposition`` and saves the
decomposition information file and the decomposed weights; after a barrier the other ranks
rebuild the structure with ``decompose_network`` and load those weights. Offline mode: every
rank runs ``decompose_network`` and loads the decomposed weights. The model is then wrapped
in DistributedDataParallel and fine-tuned; rank 0 tests and saves it, and every rank prints a
checksum of its final weights (the lines agree: DDP keeps the replicas identical).
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import sys

import torch
import torch.distributed as dist
from model import Net
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from train_utils import (
    add_common_arguments,
    batch_loader,
    check_common_arguments,
    evaluate,
    import_tensor_decompose,
    load_data,
    load_pretrained,
    load_weights,
    log,
    make_parent_dir,
    rebuild_decomposed,
    save_weights,
    test_line,
    train,
    weights_checksum,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(
        description="Distributed training of the MNIST sample Net, optionally with AMCT "
                    "tensor decomposition. Start it with torchrun or "
                    "python -m torch.distributed.launch.")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                        help="distributed backend: gloo for CPU, nccl for GPU (default: gloo)")
    parser.add_argument("--init_method", default="env://",
                        help="distributed init method (default: env://)")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                        default=None,
                        help="local rank, passed by torch.distributed.launch; otherwise read "
                             "from the LOCAL_RANK environment variable set by torchrun "
                             "(default: 0)")
    add_common_arguments(
        parser, train_batch_size=32,
        train_batch_help="training batch size of each device",
        test_batch_help="test batch size (the test runs on rank 0)",
        info_help="decomposition information file; only with --tensor-decompose. Online "
                  "mode writes it (rank 0), offline mode reads it (default: None)",
        weights_help="decomposed weights; only with --tensor-decompose. Online mode writes "
                     "them (rank 0), offline mode reads them (default: None)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args, online_needs_files=True)
    if args.local_rank is None:
        try:
            args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            parser.error(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} is not an integer")
    if args.backend == "nccl" and not args.use_gpu:
        parser.error("--backend nccl needs --use-gpu (use gloo to train on the CPU)")
    if args.use_gpu and args.local_rank >= torch.cuda.device_count():
        parser.error(f"local rank {args.local_rank} has no GPU: only "
                     f"{torch.cuda.device_count()} visible (lower --nproc_per_node)")
    return args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    """Join the process group; return (rank, world size).

    Started without a launcher (no RANK/WORLD_SIZE in the environment) with env://, the
    script runs as a group of one process.
    """
    if args.init_method == "env://" and "RANK" not in os.environ:
        log("No launcher environment found (RANK, WORLD_SIZE); running as a single process. "
            "Use torchrun --nproc_per_node=N to start N processes.")
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=args.backend, init_method=args.init_method, **kwargs)
    return dist.get_rank(), dist.get_world_size()


def build_model(args: argparse.Namespace, rank: int, device: torch.device) -> Net:
    """Create Net with the weights and decomposition the arguments ask for, on every rank."""
    model = Net()
    if not args.tensor_decompose:
        if args.pretrained_path is not None:
            load_pretrained(model, args.pretrained_path, f"[Rank {rank}] ")
        return model
    auto_decomposition, decompose_network = import_tensor_decompose()
    if args.run_mode == "offline":
        return rebuild_decomposed(model, args.decompose_info_path,
                                  args.decomposed_weights_path, decompose_network,
                                  f"[Rank {rank}] ")

    # Online: rank 0 decomposes and writes the files; broadcast_object_list doubles as the
    # barrier and tells the other ranks whether it worked (and what was decomposed).
    status: list[object] = [None]
    failure: BaseException | None = None
    if rank == 0:
        try:
            load_pretrained(model, args.pretrained_path, "[Rank 0] ")
            make_parent_dir(args.decompose_info_path)
            model, changes = auto_decomposition(model, args.decompose_info_path)
            # Written to a temporary file and renamed, so no rank can see half a file.
            save_weights(model, args.decomposed_weights_path)
            log(f"[Rank 0] Decomposed weights are saved to: {args.decomposed_weights_path}")
            status = [{"changes": changes}]
        except BaseException as error:  # reported to the other ranks, then re-raised
            failure = error
            status = [{"error": f"{type(error).__name__}: {error}"}]
    dist.broadcast_object_list(status, src=0, device=device if device.type == "cuda" else None)
    if failure is not None:
        raise failure
    result = status[0]
    if not isinstance(result, dict) or "error" in result:
        message = result.get("error") if isinstance(result, dict) else result
        raise SystemExit(f"[Rank {rank}] rank 0 failed to decompose the model: {message}")
    if rank != 0:
        if result["changes"]:
            model = rebuild_decomposed(model, args.decompose_info_path,
                                       args.decomposed_weights_path, decompose_network,
                                       f"[Rank {rank}] ")
        else:  # nothing decomposed: the saved weights fit the original structure
            load_weights(model, args.decomposed_weights_path, "Decomposed weights")
            log(f"[Rank {rank}] Loaded decomposed weights from {args.decomposed_weights_path}")
    elif not result["changes"]:
        log("[Rank 0] No layer was decomposed; fine-tuning the original structure.")
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.use_gpu:
        torch.cuda.set_device(args.local_rank)
        device = torch.device("cuda", args.local_rank)
    else:
        device = torch.device("cpu")
    rank, world_size = init_distributed(args, device)
    ddp_model = None
    try:
        torch.manual_seed(args.seed)
        train_set, test_set, _ = load_data(args.data_path, announce=rank == 0)
        if rank == 0:
            log(f"[DDP] backend {args.backend}, {world_size} process(es), per-device batch "
                f"size {args.train_batch_size}, device {device.type}")
        model = build_model(args, rank, device).to(device)
        ddp_model = DistributedDataParallel(
            model, device_ids=[args.local_rank] if device.type == "cuda" else None)

        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank,
                                     shuffle=True, seed=args.seed)
        train_loader = batch_loader(train_set, args.train_batch_size, sampler=sampler)
        optimizer = torch.optim.SGD(ddp_model.parameters(), lr=args.lr, momentum=0.9)
        train(ddp_model, train_loader, optimizer, device, args.steps, args.log_steps,
              set_epoch=sampler.set_epoch, verbose=rank == 0)

        if rank == 0:
            test_loader = batch_loader(test_set, args.test_batch_size)
            log(test_line(*evaluate(model, test_loader, device)))
            if args.save_path is not None:
                make_parent_dir(args.save_path)
                save_weights(model, args.save_path)
                log(f"Trained weights are saved to: {args.save_path}")

        # Every rank prints the SHA-256 of its final weights; DDP keeps them identical, so
        # the lines agree. They are not compared here with a collective such as
        # all_gather_object: its tensors are released by a gloo worker thread after the call
        # returns, and if that happens while the interpreter is shutting down the process
        # aborts ("terminate called without an active exception").
        log(f"[Rank {rank}] Final weights checksum: {weights_checksum(model)}")
        # No rank leaves while another still runs (rank 0 tests and saves meanwhile).
        dist.barrier()
    finally:
        # The DDP wrapper's reducer holds the process group: destroy_process_group alone
        # would leave the group and its gloo threads alive until interpreter shutdown, where
        # tearing them down can abort the process. Drop the wrapper first, while Python runs.
        del ddp_model
        gc.collect()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
