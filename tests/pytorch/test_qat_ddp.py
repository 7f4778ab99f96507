"""QAT layers under DistributedDataParallel (2 processes, gloo, CPU): the IFMR-initialised ULQ
clips are averaged over the ranks (reference §3.4), so after initialisation and a few steps on
different data every rank holds the same clips and the same quant_factors()."""
from __future__ import annotations

import gc
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from amct_core.quant.ulq import ifmr_initial_clips

pytestmark = pytest.mark.slow


def _destroy_process_group() -> None:
    """Destroy the process group after the caller dropped its DDP wrapper: the wrapper's
    reducer holds the group, and left to interpreter shutdown gloo's teardown can abort the
    process ("terminate called without an active exception")."""
    gc.collect()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from amct_pytorch.nn.module.quantization.conv2d import Conv2dQAT
    from amct_pytorch.nn.module.quantization.linear import LinearQAT

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = None
    try:
        torch.manual_seed(0)  # same initial weights; DDP broadcasts them anyway
        net = nn.Sequential(
            Conv2dQAT(1, 4, 3, stride=2, config={"retrain_data_config": {"batch_num": 2}}),
            nn.ReLU(), nn.Flatten(),
            LinearQAT(4 * 7 * 7, 3, config={"retrain_weight_config": {"channel_wise": False}}))
        model = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        first_batches = []
        after_init = None
        for step in range(5):
            x = torch.rand(8, 1, 16, 16, generator=gen) * (1.0 + rank)
            y = torch.randint(0, 3, (8,), generator=gen)
            if len(first_batches) < 2:
                first_batches.append(x.numpy().copy())
            loss = nn.functional.cross_entropy(model(x), y)
            if step == 1:  # the forward that completed the IFMR initialisation
                quantizer = net[0].act_quantizer
                after_init = [float(quantizer.clip_max.detach()),
                              float(quantizer.clip_min.detach())]
            opt.zero_grad()
            loss.backward()
            opt.step()
        factors = [layer.quant_factors() for layer in (net[0], net[3])]
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"),
                 clips=np.array([float(p.detach()) for name, p in net.named_parameters()
                                 if "clip" in name]),
                 scale_d=np.array([f.scale_d for f in factors]),
                 offset_d=np.array([f.offset_d for f in factors]),
                 scale_w0=factors[0].scale_w, scale_w1=factors[1].scale_w,
                 local_init=np.array(ifmr_initial_clips(first_batches, 8)),
                 after_init=np.array(after_init))
        dist.barrier()  # no rank leaves while another still runs
    finally:
        model = None
        _destroy_process_group()


def test_ddp_ranks_hold_the_same_clips_and_factors(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for key in ("clips", "scale_d", "offset_d", "scale_w0", "scale_w1"):
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    # each rank's own IFMR clips differ (its data is scaled differently), so equality above
    # comes from the averaging
    local = [r["local_init"] for r in ranks]
    assert abs(local[0][0] - local[1][0]) > 0.1
    np.testing.assert_allclose(ranks[0]["after_init"], (local[0] + local[1]) / 2, rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_array_equal(ranks[0]["after_init"], ranks[1]["after_init"])
    assert np.all(np.isfinite(ranks[0]["clips"]))


def _graph_worker(rank: int, world: int, port: int, out_dir: str, images: np.ndarray,
                  labels: np.ndarray) -> None:
    import amct_pytorch as amct

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = None
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                            nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
        x = torch.from_numpy(images)
        y = torch.from_numpy(labels)
        config_file = os.path.join(out_dir, f"config{rank}.json")
        record_file = os.path.join(out_dir, f"record{rank}.txt")
        amct.create_quant_retrain_config(config_file, net, x[:2])
        retrain = amct.create_quant_retrain_model(config_file, net, record_file, x[:2])
        model = nn.parallel.DistributedDataParallel(retrain)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for step in range(6):  # each rank trains on its own half of the digits
            index = torch.arange(step * 32, (step + 1) * 32) + rank * 1000
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            model(x[:16])  # the first eval-mode forward writes the record
        dist.barrier()
    finally:
        model = None
        _destroy_process_group()


def test_ddp_graph_based_qat_writes_the_same_record_on_every_rank(tmp_path, mnist):
    (x, y), _ = mnist
    mp.spawn(_graph_worker, args=(2, _free_port(), str(tmp_path), x[:2000].numpy(),
                                  y[:2000].numpy()), nprocs=2, join=True)
    records = [(tmp_path / f"record{rank}.txt").read_text() for rank in range(2)]
    assert records[0] == records[1]
    assert records[0].count("key:") == 3  # two convs and the linear layer
    assert "scale_d" in records[0] and "scale_w" in records[0]
