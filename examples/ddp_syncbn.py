"""Data-parallel training with DDP + SyncBatchNorm, launched by torchrun.

One node, 2 processes on CPU (gloo) or one per GPU (NCCL):

    torchrun --standalone --nproc_per_node=2 examples/ddp_syncbn.py --epochs 1

Several nodes (run on every node; node 0's address as the rendezvous endpoint):

    torchrun --nnodes=2 --nproc_per_node=4 --node_rank=$NODE_RANK \\
        --rdzv_backend=c10d --rdzv_endpoint=$NODE0_HOST:29500 examples/ddp_syncbn.py

Without torchrun it runs as one process (SyncBatchNorm falls back to the local BN).
Every rank trains on its own shard of each epoch (DistributedSampler); SyncBatchNorm normalizes
with the statistics of the global batch; rank 0 recomputes the population statistics over the
global batches (Algorithm 2, one collective per batch per layer) and prints test accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import batchnorm
from batchnorm.research.data import best_available, load_dataset


def make_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        batchnorm.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        batchnorm.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="examples per process and step")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--train-subset", type=int, default=4000, help="0: all training examples")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds before a stuck collective fails"
    )
    p.add_argument(
        "--dataset", default="", help="mnist, fashion-mnist or digits (default: best available)"
    )
    args = p.parse_args()

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    device = torch.device("cpu")
    if distributed:
        cuda = torch.cuda.is_available()
        if cuda:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout)
        )
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    ds = load_dataset(args.dataset or best_available())
    tx, ty = ds.train_x, ds.train_y
    if 0 < args.train_subset < len(tx):
        tx, ty = tx[: args.train_subset], ty[: args.train_subset]
    train = TensorDataset(tx, ty)
    sampler = (
        DistributedSampler(train, world, rank, shuffle=True, seed=0, drop_last=True)
        if distributed
        else None
    )
    loader = DataLoader(
        train, args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True
    )

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = batchnorm.convert_sync_batchnorm(make_net(), timeout=args.timeout).to(device)
    if distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr * world, momentum=0.9)

    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        for step, (x, y) in enumerate(loader):
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rank == 0 and step % 100 == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)

    net = model.module if distributed else model
    # Algorithm 2 over global batches: every rank passes its shard, SyncBatchNorm merges them.
    batches = ((x.to(device), y) for x, y in loader)
    report = batchnorm.recompute_population_stats(net, batches, num_batches=50)
    if rank == 0:
        net.eval()
        with torch.no_grad():
            pred = net(ds.test_x.to(device)).argmax(1).cpu()
        acc = (pred == ds.test_y).float().mean().item()
        shift = max(r.max_mean_shift_std for r in report.values())
        print(
            f"{world} process(es), global batch {world * args.batch_size}: test accuracy {acc:.4f} "
            f"(EMA mean was off by up to {shift:.3f} std before recomputing)"
        )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
