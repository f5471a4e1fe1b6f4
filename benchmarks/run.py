"""CPU benchmark: this package's BN kernels vs torch.nn, ratios measured in one process.

    python benchmarks/run.py            # full table (what `make bench` runs), ~10 min on 2 cores
    python benchmarks/run.py --quick    # fewer repeats, a smoke run

Prints, per shape: torch.nn time, ours, speed-up, achieved GB/s (passes × bytes / time) and that
rate as a fraction of the measured copy bandwidth, for BN forward, BN forward+backward, and
BN+ReLU forward+backward (fused ``BatchNormAct``) vs ``nn.BatchNorm2d`` + ``nn.ReLU``; bytes kept
for backward per activation (``saved_tensors_hooks``); page faults per step; and a LeNet-style
training step at batch 128 with and without BN; and a whole training step of ResNet-18 and
MobileNetV3-Small (``nets.py``) at batch 32, 112×112, with torch.nn's BN, ours, and none, with
BN's own op time in that step (``torch.profiler``). Times are medians of ``--repeats`` runs.
Unless ``--no-warm`` is given, the table is repeated in a child process with glibc's
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import batchnorm as B
from batchnorm.ops import buffers

SHAPES = [
    (64, 64, 56, 56),
    (256, 256, 14, 14),
    (128, 32, 28, 28),
    (60, 100),
    (1024, 4096),
    (32, 72, 28, 28),  # MobileNetV3-Small's largest BN map at 112x112: one sweep per channel
]
WARM_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}
# Memory passes over one activation (reads + writes) of the minimal algorithm:
PASSES = {"fwd": 3, "fwd+bwd": 8, "fwd+bwd, no cache": 8, "bn+relu fwd+bwd": 8}


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def copy_bandwidth(repeats: int) -> float:
    """GB/s of ``dst.copy_(src)`` on a 51 MB float32 tensor into an existing buffer (read + write)."""
    src = torch.randn(64, 64, 56, 56)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), repeats)
    return 2 * src.nbytes / t / 1e9


def make_layers(c: int, rank: int):
    tbn = (nn.BatchNorm1d if rank == 2 else nn.BatchNorm2d)(c)
    obn = (B.BatchNorm1d if rank == 2 else B.BatchNorm2d)(c)
    oact = (B.BatchNormAct1d if rank == 2 else B.BatchNormAct2d)(c, "relu")
    return tbn, obn, oact


def saved_bytes(fn, x: torch.Tensor) -> float:
    """Bytes autograd keeps for backward (unique storages), per byte of x."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.detach().requires_grad_())
    return sum(seen.values()) / x.nbytes


def faults(fn) -> float:
    fn()
    a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a) / 3


def bench_shape(shape, repeats: int, bw: float) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(shape)
    g = torch.randn(shape)
    tbn, obn, oact = make_layers(shape[1], len(shape))
    relu = nn.ReLU()
    xg = x.clone().requires_grad_()

    def step(f):
        def run():
            xg.grad = None
            f(xg).backward(g)

        return run

    def uncached(f):  # ours with the output-buffer cache off (ops/buffers.py): fresh memory
        def run():
            old = buffers.set_limit(0)
            try:
                f()
            finally:
                buffers.set_limit(old)

        return run

    cases = {
        "fwd": (lambda: _nograd(tbn, x), lambda: _nograd(obn, x)),
        "fwd+bwd": (step(tbn), step(obn)),
        "fwd+bwd, no cache": (step(tbn), uncached(step(obn))),
        "bn+relu fwd+bwd": (step(lambda t: relu(tbn(t))), step(oact)),
    }
    rows = []
    for name, (ft, fo) in cases.items():
        tt, to = median_time(ft, repeats), median_time(fo, repeats)
        gbs = PASSES[name] * x.nbytes / to / 1e9
        row = dict(
            shape=shape,
            case=name,
            torch_ms=tt * 1e3,
            ours_ms=to * 1e3,
            speedup=tt / to,
            gbs=gbs,
            of_copy=gbs / bw,
            faults=faults(fo),
        )
        if name in ("fwd+bwd", "bn+relu fwd+bwd"):
            fn_t = (lambda t: relu(tbn(t))) if "relu" in name else tbn
            fn_o = oact if "relu" in name else obn
            row["saved_torch"], row["saved_ours"] = saved_bytes(fn_t, x), saved_bytes(fn_o, x)
        rows.append(row)
    return rows


def _nograd(m, x):
    with torch.no_grad():
        return m(x)


class LeNet(nn.Module):
    """Seed 003's LeNet-BN: conv6-BN-ReLU-pool-conv16-BN-ReLU-pool-FC120-BN-ReLU-FC84-BN-ReLU-FC10.

    A conv or linear layer that BN follows has no bias (β subsumes it, paper Section 3.2; as in
    ``experiments/models.py``), for torch.nn's BN as for ours; ``bn="none"`` keeps the biases.
    """

    def __init__(self, bn: str) -> None:
        super().__init__()
        b = bn == "none"

        def norm_act(c, rank):
            if bn == "none":
                return nn.ReLU()
            if bn == "torch":
                return nn.Sequential(
                    (nn.BatchNorm1d if rank == 2 else nn.BatchNorm2d)(c), nn.ReLU()
                )
            if bn == "ours":
                return nn.Sequential((B.BatchNorm1d if rank == 2 else B.BatchNorm2d)(c), nn.ReLU())
            return (B.BatchNormAct1d if rank == 2 else B.BatchNormAct2d)(c, "relu")

        self.net = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2, bias=b),
            norm_act(6, 4),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, bias=b),
            norm_act(16, 4),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, 120, bias=b),
            norm_act(120, 2),
            nn.Linear(120, 84, bias=b),
            norm_act(84, 2),
            nn.Linear(84, 10),
        )

    def forward(self, x):
        return self.net(x)


def bench_lenet(repeats: int) -> dict[str, tuple[float, float, float, float, float]]:
    """Per variant: (median step time, then the 25th, 50th and 75th percentile of its overhead
    over "none", then page faults per step). The variants take turns, five steps each, in a
    rotating order, for ``8·repeats`` rounds; the overhead is taken per round (this round's time
    over this round's "none"), so a slow spell of the shared machine, which moves every variant
    alike, cancels out of the ratio instead of landing on whichever variant it hit. The faults
    show what the allocator costs each net: under glibc's default thresholds the no-BN net's
    ReLU outputs come back as fresh pages every step, while this package's outputs come from its
    buffer cache."""
    torch.manual_seed(0)
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    steps = {}
    for bn in ("none", "torch", "ours", "ours fused"):
        model = LeNet(bn)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        for _ in range(5):
            step()
        steps[bn] = step
    names = list(steps)
    times: dict[str, list[float]] = {bn: [] for bn in steps}
    flt = dict.fromkeys(steps, 0)
    for r in range(8 * repeats):
        for bn in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for _ in range(5):
                steps[bn]()
            times[bn].append((time.perf_counter() - t0) / 5)
            flt[bn] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    def q(v: list[float], f: float) -> float:
        v = sorted(v)
        return v[min(len(v) - 1, int(f * len(v)))]

    out = {}
    for bn, ts in times.items():
        ratios = [t / n - 1 for t, n in zip(ts, times["none"], strict=True)]
        out[bn] = (
            q(ts, 0.5),
            q(ratios, 0.25),
            q(ratios, 0.5),
            q(ratios, 0.75),
            flt[bn] / (5 * len(ts)),
        )  # page faults per timed step
    return out


# The profiler events (self CPU time) that BN and the activations after it account for: torch.nn's
# batch-norm ops, this package's op and its backward node (TrainFn), and the activations a fused
# layer takes in, with their autograd nodes.
BN_EVENTS = ("batch_norm", "BatchNorm", "TrainFn")
ACT_EVENTS = ("relu", "Relu", "threshold_backward", "clamp_min", "hardswish", "Hardswish")


def bn_op_ms(step, steps: int) -> float:
    """Self CPU time per step (ms) of the BN and activation ops of ``step()`` (``BN_EVENTS``,
    ``ACT_EVENTS``), from ``torch.profiler``. Taken against the same count for the net without
    BN, it is BN's cost in the step without the rest of the step's noise."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    keys = BN_EVENTS + ACT_EVENTS
    total = sum(e.self_cpu_time_total for e in prof.key_averages() if any(k in e.key for k in keys))
    return total / steps / 1e3


def bench_nets(repeats: int, batch: int, size: int) -> list[dict]:
    """A whole training step (forward, backward, SGD) of ResNet-18 and MobileNetV3-Small
    (``benchmarks/nets.py``) with torch.nn's BN, with ours (``convert_model`` + ``fuse_bn_act``),
    and with every BN replaced by ``nn.Identity`` (the limit). Steps are timed round by round in
    rotating order; BN's share is taken per round against that round's no-BN step (a slow spell
    of the shared machine moves all three alike), and reported as the median and the middle half
    of the rounds, as for LeNet. Then BN's own op time: the profiler's count of the BN and
    activation ops per step (:func:`bn_op_ms`), less the no-BN net's."""
    from batchnorm.layers.base import replace_modules

    spec = importlib.util.spec_from_file_location("bench_nets", Path(__file__).with_name("nets.py"))
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    NETS = nets.NETS  # noqa: N806

    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    rows = []
    for name, build in NETS.items():
        variants = {}
        for v in ("none", "torch", "ours"):
            torch.manual_seed(0)
            model = build()
            if v == "ours":
                model = B.fuse_bn_act(B.convert_model(model))
            elif v == "none":
                model = replace_modules(
                    model, lambda m: nn.Identity() if isinstance(m, nn.BatchNorm2d) else None
                )
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            step()
            variants[v] = step
        times: dict[str, list[float]] = {v: [] for v in variants}
        names = list(variants)
        for r in range(repeats):
            for v in names[r % 3 :] + names[: r % 3]:
                t0 = time.perf_counter()
                variants[v]()
                times[v].append(time.perf_counter() - t0)
        med = {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}
        share = {
            v: sorted(a / b - 1 for a, b in zip(times[v], times["none"], strict=True))
            for v in ("torch", "ours")
        }
        ratio = sorted(
            (o / b - 1) / (t / b - 1)
            for t, o, b in zip(times["torch"], times["ours"], times["none"], strict=True)
            if t > b
        )
        prof_steps = max(1, repeats // 4)
        ops = {v: bn_op_ms(variants[v], prof_steps) for v in names}
        fused = sum(
            isinstance(m, (B.BatchNormAct1d, B.BatchNormAct2d))
            for m in B.fuse_bn_act(B.convert_model(build())).modules()
        )
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in build().modules())
        rows.append(
            dict(
                net=name,
                fused=f"{fused} of {n_bn}",
                **{f"{v}_ms": t * 1e3 for v, t in med.items()},
                torch_share=share["torch"][repeats // 2],
                ours_share=share["ours"][repeats // 2],
                ratio=ratio[len(ratio) // 2] if ratio else float("nan"),
                ratio_lo=ratio[len(ratio) // 4] if ratio else float("nan"),
                ratio_hi=ratio[(3 * len(ratio)) // 4] if ratio else float("nan"),
                torch_ops_ms=ops["torch"] - ops["none"],
                ours_ops_ms=ops["ours"] - ops["none"],
            )
        )
    return rows


def print_nets(rows, batch: int, size: int) -> None:
    print(
        f"\nWhole-model CPU training step, batch {batch} at {size}x{size}: median ms; BN's share "
        f"= step with BN / step with BN removed - 1, per round (median; the ratio also with the "
        f"middle half of the rounds); BN ops ms = the profiler's self time of the BN and "
        f"activation ops per step, less the no-BN net's"
    )
    print(
        "| net | no BN ms | torch.nn ms | ours ms | BN share torch.nn | BN share ours | ours / "
        "torch share | middle half | BN ops ms torch.nn → ours | ours / torch ops | "
        "BN layers fused |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        t_ops, o_ops = r["torch_ops_ms"], r["ours_ops_ms"]
        ops_ratio = f"{o_ops / t_ops:.2f}" if t_ops > 0 else "n/a"
        print(
            f"| {r['net']} | {r['none_ms']:.1f} | {r['torch_ms']:.1f} | {r['ours_ms']:.1f} | "
            f"{r['torch_share'] * 100:+.1f}% | {r['ours_share'] * 100:+.1f}% | "
            f"{r['ratio']:.2f} | {r['ratio_lo']:.2f} to {r['ratio_hi']:.2f} | "
            f"{t_ops:.1f} → {o_ops:.1f} | {ops_ratio} | {r['fused']} |"
        )


def print_table(rows, bw, lenet, title) -> None:
    print(f"\n## {title}")
    print(
        f"copy bandwidth (dst.copy_(src), 51 MB, read+write): {bw:.1f} GB/s; "
        f"threads: torch {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        "| shape | case | torch.nn ms | ours ms | speed-up | ours GB/s | of copy bw | faults/step "
        "| saved torch | saved ours |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        st = f"{r['saved_torch']:.2f}x" if "saved_torch" in r else ""
        so = f"{r['saved_ours']:.2f}x" if "saved_ours" in r else ""
        print(
            f"| {tuple(r['shape'])} | {r['case']} | {r['torch_ms']:.3f} | {r['ours_ms']:.3f} | "
            f"{r['speedup']:.2f}x | {r['gbs']:.1f} | {r['of_copy']:.2f} | {r['faults']:.0f} | {st} | {so} |"
        )
    print(
        "\nLeNet-style training step, batch 128: median step time; BN overhead over no BN taken "
        "round by round (median, and the middle half of the rounds)"
    )
    print("| BN | step ms | BN overhead | middle half | faults/step |")
    print("|---|---:|---:|---:|---:|")
    for k, (t, lo, med, hi, f) in lenet.items():
        if k == "none":
            print(f"| {k} | {t * 1e3:.3f} |  |  | {f:.0f} |")
        else:
            print(
                f"| {k} | {t * 1e3:.3f} | {med * 100:+.1f}% | {lo * 100:+.1f}% to {hi * 100:+.1f}% "
                f"| {f:.0f} |"
            )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (median)")
    ap.add_argument("--no-warm", action="store_true", help="skip the raised-malloc-threshold run")
    ap.add_argument("--shapes", default=None, help="indices into SHAPES, e.g. 0,3")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 9)
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    warm = all(os.environ.get(k) == v for k, v in WARM_ENV.items())
    bw = copy_bandwidth(repeats * 2)
    rows = [r for s in shapes for r in bench_shape(s, repeats, bw)]
    lenet = bench_lenet(repeats)
    title = "raised malloc thresholds (warm allocator)" if warm else "default allocator"
    print_table(rows, bw, lenet, title)
    if not warm:  # the whole-model table once, under the default allocator
        batch, size = (4, 56) if args.quick else (32, 112)
        print_nets(bench_nets(max(3, 4 * repeats + 1), batch, size), batch, size)
    if warm:
        fb = [r for r in rows if r["case"] == "fwd+bwd"]
        for r in fb:
            bound = 8 * torch.Size(r["shape"]).numel() * 4 / bw / 1e9 * 1e3
            print(
                f"eight-pass bound {tuple(r['shape'])}: {bound:.2f} ms; ours fwd+bwd "
                f"{r['ours_ms']:.2f} ms = {r['ours_ms'] / bound:.2f}x the bound"
            )
    elif not args.no_warm:
        sys.stdout.flush()
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
        subprocess.run(child, env={**os.environ, **WARM_ENV}, check=True)


if __name__ == "__main__":
    main()
