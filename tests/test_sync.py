"""SyncBatchNorm on torch.distributed (gloo, loopback): equal to single-process BN over the
concatenated batch (forward, gradients, running stats), one collective per forward and one per
backward, unequal and empty per-rank batches, and a clear error instead of a hang."""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from batchnorm import BatchNorm2d, SyncBatchNorm, convert_sync_batchnorm

C = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port, timeout=30):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
    )


def _data(sizes, shape, step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn((sum(sizes), C) + shape, dtype=torch.float64, generator=gen) * 2 + step
    g = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    return x, g


def _slice(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def _equivalence_worker(rank, world, port, sizes, shape, out):
    _init(rank, world, port)
    calls = {"all_gather": 0, "all_reduce": 0}
    for name in calls:  # count the collectives the layer issues
        orig = getattr(dist, name)

        def counted(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        setattr(dist, name, counted)
    torch.manual_seed(0)
    net = convert_sync_batchnorm(
        nn.Sequential(
            BatchNorm2d(C, momentum=0.3) if len(shape) == 2 else nn.BatchNorm1d(C, momentum=0.3)
        )
    ).double()
    layer = net[0]
    assert isinstance(layer, SyncBatchNorm)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, C))
        layer.bias.copy_(torch.linspace(-1, 1, C))
    res = {}
    for step in range(2):
        x, g = _data(sizes, shape, step)
        xr = _slice(x, sizes, rank).clone().requires_grad_()
        layer.zero_grad()
        y = net(xr)
        (y * _slice(g, sizes, rank)).sum().backward()
        res[step] = {
            "y": y.detach(),
            "dx": xr.grad,
            "dw": layer.weight.grad.clone(),
            "db": layer.bias.grad.clone(),
        }
    res["running_mean"], res["running_var"] = layer.running_mean, layer.running_var
    res["nbt"] = int(layer.num_batches_tracked)
    res["calls"] = dict(calls)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(fn, world, args, deadline=60.0):
    """mp.spawn that fails the test instead of hanging if a worker never finishes."""
    ctx = mp.spawn(fn, args=(world, *args), nprocs=world, join=False)
    end = time.monotonic() + deadline
    while not ctx.join(timeout=1):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers still running after {deadline} s")


@pytest.mark.distributed
@pytest.mark.parametrize("sizes,shape", [((3, 5), (4, 4)), ((4, 0, 1), ())])
def test_sync_equals_single_process_bn_over_concatenated_batch(tmp_path, sizes, shape):
    world = len(sizes)
    _spawn(_equivalence_worker, world, (_free_port(), sizes, shape, str(tmp_path)))
    ref = nn.BatchNorm2d(C, momentum=0.3) if len(shape) == 2 else nn.BatchNorm1d(C, momentum=0.3)
    ref = ref.double()
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, C))
        ref.bias.copy_(torch.linspace(-1, 1, C))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for step in range(2):
        x, g = _data(sizes, shape, step)
        x = x.clone().requires_grad_()
        ref.zero_grad()
        y = ref(x)
        (y * g).sum().backward()
        for r, res in enumerate(results):
            torch.testing.assert_close(res[step]["y"], _slice(y.detach(), sizes, r))
            torch.testing.assert_close(res[step]["dx"], _slice(x.grad, sizes, r))
        # each rank returns its own dγ, dβ (DDP sums/averages them): their sum is the global one
        torch.testing.assert_close(sum(res[step]["dw"] for res in results), ref.weight.grad)
        torch.testing.assert_close(sum(res[step]["db"] for res in results), ref.bias.grad)
    for res in results:
        torch.testing.assert_close(res["running_mean"], ref.running_mean)
        torch.testing.assert_close(res["running_var"], ref.running_var)
        assert res["nbt"] == 2
        # one per forward and one per backward, plus the one-time check of the channel counts
        assert res["calls"] == {"all_gather": 3, "all_reduce": 2}


def _failure_worker(rank, world, port, mode, out):
    if mode == "never_joins":  # started alone in a world of 2: the other rank never joins
        t0 = time.monotonic()
        try:
            _init(rank, world, port, timeout=3)
            msg = "no error"
        except Exception as e:  # torch raises DistStoreError (a RuntimeError) naming the count
            msg = f"{type(e).__name__}: {e}"
        with open(os.path.join(out, f"{mode}.txt"), "w") as f:
            f.write(f"{time.monotonic() - t0}\n{msg}")
        os._exit(0)
    _init(rank, world, port, timeout=20)
    layer = SyncBatchNorm(C, timeout=3.0)
    if rank == 1:
        if mode == "dies":
            os._exit(1)  # a crashed rank
        time.sleep(5)  # a rank stuck elsewhere: never calls forward
        os._exit(0)
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        layer(torch.randn(4, C))
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    with open(os.path.join(out, f"{mode}.txt"), "w") as f:
        f.write(f"{time.monotonic() - t0}\n{msg}")
    os._exit(0)


@pytest.mark.distributed
def test_a_rank_that_dies_stalls_or_never_joins_gives_an_error_within_the_timeout(tmp_path):
    # the three scenarios run side by side (they mostly wait), each in its own world of 2
    modes = {"stalls": 2, "dies": 2, "never_joins": 1}  # never_joins: rank 1 is never started
    ctxs = [
        mp.spawn(_failure_worker, args=(2, _free_port(), mode, str(tmp_path)), nprocs=n, join=False)
        for mode, n in modes.items()
    ]
    end = time.monotonic() + 40
    for p in [p for ctx in ctxs for p in ctx.processes]:
        p.join(timeout=max(0.1, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            pytest.fail("a distributed worker hung")
    for mode in modes:
        elapsed, msg = (tmp_path / f"{mode}.txt").read_text().split("\n", 1)
        if mode == "never_joins":
            assert "1/2" in msg or "timed out" in msg.lower(), msg  # e.g. "1/2 clients joined"
        else:
            assert "SyncBatchNorm" in msg and "rank 0 of 2" in msg, msg
        assert float(elapsed) < 3.0 + 10.0, (mode, elapsed)  # time-out 3 s, slack for load


def test_without_process_group_sync_bn_is_local_bn():
    assert not dist.is_initialized()
    torch.manual_seed(1)
    layer, ref = SyncBatchNorm(C), nn.BatchNorm2d(C)
    x = torch.randn(4, C, 3, 3)
    torch.testing.assert_close(layer(x), ref(x))
    torch.testing.assert_close(layer.running_var, ref.running_var)
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), ref(x))
    with pytest.raises(ValueError, match="timeout"):
        SyncBatchNorm(C, timeout=0)


def _channels_worker(rank, world, port, out):
    _init(rank, world, port, timeout=20)
    layer = SyncBatchNorm(C + rank, timeout=5.0)  # rank 1 built a different model
    try:
        layer(torch.randn(4, C + rank))
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(msg)
    os._exit(0)


@pytest.mark.distributed
def test_ranks_with_different_channel_counts_get_a_clear_error_on_every_rank(tmp_path):
    _spawn(_channels_worker, 2, (_free_port(), str(tmp_path)), deadline=40.0)
    for rank in range(2):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert "disagree on this layer's channel count" in msg and "[3, 4]" in msg, msg
