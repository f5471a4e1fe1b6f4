"""The paper's Section 4.2 Inception ablation, scaled to a small Inception-style net on 28×28 images.

Six variants share one step budget: Baseline (no BN; dropout, L2, LRN), Baseline-Sigmoid,
BN-Baseline (BN added, all else equal), BN-x5 and BN-x30 (learning rate ×5 / ×30 plus the
"accelerating BN networks" recipe: no dropout, L2 ÷5, learning-rate decay 6× faster, no LRN,
lighter augmentation) and BN-x5-Sigmoid. Reported like the paper's table: steps to reach the
Baseline's best test accuracy, max test accuracy, and the speed-up over the Baseline (Figure 2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from . import conv_training as T
from .models import InceptionNet
from .report import Claim, Figure, ReportSections, Table, pyplot, save_figure
from .runner import Stopwatch, atomic_write_json, option, prepare_run_dir, save_checkpoint

NAME = "ablation"
VARIANTS = ("Baseline", "Baseline-Sigmoid", "BN-Baseline", "BN-x5", "BN-x30", "BN-x5-Sigmoid")
PAPER = {  # Section 4.2: steps to 72.2% (Inception's best) and max accuracy, ImageNet
    "Baseline": (31.0e6, 0.722),
    "BN-Baseline": (13.3e6, 0.727),
    "BN-x5": (2.1e6, 0.730),
    "BN-x30": (2.7e6, 0.748),
    "BN-x5-Sigmoid": (None, 0.698),
    "Baseline-Sigmoid": (None, 0.001),
}


_h = option


@dataclass
class Config(T.DataConfig):
    """Settings of the ablation; the default budget fits ~25 min on 2 shared cores (see docs)."""

    steps: int = field(default=2000, metadata=_h("training steps per variant (the shared budget)"))
    batch_size: int = field(default=32, metadata=_h("mini-batch size (the paper's 32)"))
    width: int = field(default=4, metadata=_h("channel multiplier of the Inception-style net"))
    eval_every: int = field(default=100, metadata=_h("steps between test evaluations"))
    eval_examples: int = field(default=5000, metadata=_h("test examples per evaluation (0: all)"))
    lr: float = field(default=0.01, metadata=_h("Baseline learning rate (BN-x5: x5, BN-x30: x30)"))
    momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
    weight_decay: float = field(
        default=5e-4, metadata=_h("Baseline L2 (the recipe divides it by 5)")
    )
    dropout: float = field(
        default=0.4, metadata=_h("Baseline dropout before the classifier (recipe: 0)")
    )
    lr_decay: float = field(
        default=0.5, metadata=_h("Baseline lr factor over the budget (recipe: this^6)")
    )
    rotation: float = field(
        default=10.0, metadata=_h("augmentation: max rotation, degrees (recipe: half)")
    )
    shear: float = field(default=0.1, metadata=_h("augmentation: max shear factor (recipe: half)"))
    zoom: float = field(default=0.1, metadata=_h("augmentation: max relative zoom (recipe: half)"))
    bn_impl: str = field(
        default="batchnorm",
        metadata=_h(
            "BN code: this package's layers (compiled kernels), the same on the reference equations, "
            "or torch.nn",
            choices=list(T.BN_IMPLS),
        ),
    )
    seed: int = field(default=0, metadata=_h("random seed"))

    def __post_init__(self) -> None:
        if self.bn_impl not in T.BN_IMPLS:
            raise ValueError(f"bn_impl must be one of {T.BN_IMPLS}, got {self.bn_impl!r}")
        for name in ("steps", "batch_size", "width", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got {self.lr}, {self.lr_decay}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def quick(cls) -> Config:
        """CI size: digits, width 2, 20 steps per variant."""
        return cls(dataset="digits", steps=20, eval_every=10, width=2, eval_examples=0)


def variants(cfg: Config) -> list[T.Variant]:
    """The six variants of Section 4.2 (Inception → Baseline), scaled."""
    aug, light = (
        T.Augment(cfg.rotation, cfg.shear, cfg.zoom),
        T.Augment(cfg.rotation, cfg.shear, cfg.zoom).scaled(0.5),
    )
    n = cfg.steps

    def base_lr(s: int) -> float:
        return cfg.lr * cfg.lr_decay ** (s / n)

    def fast_lr(mult: float):
        return lambda s: mult * cfg.lr * cfg.lr_decay ** (6 * s / n)  # decay 6x faster

    def net(bn: bool, act: str, recipe: bool):
        return T.with_bn_impl(
            lambda: InceptionNet(
                bn=bn,
                activation=act,
                lrn=not recipe,
                dropout=0.0 if recipe else cfg.dropout,
                width=cfg.width,
            ),
            cfg.bn_impl,
        )

    wd, m = cfg.weight_decay, cfg.momentum
    return [
        T.Variant("Baseline", net(False, "relu", False), base_lr, m, wd, aug),
        T.Variant("Baseline-Sigmoid", net(False, "sigmoid", False), base_lr, m, wd, aug),
        T.Variant("BN-Baseline", net(True, "relu", False), base_lr, m, wd, aug),
        T.Variant("BN-x5", net(True, "relu", True), fast_lr(5), m, wd / 5, light),
        T.Variant("BN-x30", net(True, "relu", True), fast_lr(30), m, wd / 5, light),
        T.Variant("BN-x5-Sigmoid", net(True, "sigmoid", True), fast_lr(5), m, wd / 5, light),
    ]


def steps_to(evals: list[dict], target: float) -> int | None:
    """First evaluated step whose test accuracy reaches ``target`` (None if never)."""
    return next((e["step"] for e in evals if e["test_acc"] >= target), None)


def table(results: dict[str, dict]) -> list[dict]:
    """The paper's table: steps to the Baseline's best accuracy, max accuracy, speed-up."""
    base = results["Baseline"]
    target, base_steps = base["best_acc"], base["best_step"]
    rows = []
    for name, r in results.items():
        s = steps_to(r["evals"], target)
        rows.append(
            {
                "variant": name,
                "steps_to_baseline_best": s,
                "max_test_acc": r["best_acc"],
                "step_of_max": r["best_step"],
                "final_test_acc": r["final"]["test_acc"] if r["final"] else None,
                "speedup": (base_steps / s) if s else None,
                "diverged": r["diverged"],
                "ms_per_step": r["ms_per_step"],
                "wall_seconds": r["wall_seconds"],
            }
        )
    return rows


def run(
    cfg: Config, out: Path, *, resume: bool = False, overwrite: bool = False, quiet: bool = False
) -> dict:
    """Train the six variants for ``cfg.steps`` each; table, Figure-2 plot, summary."""
    clock = Stopwatch()
    out = prepare_run_dir(out, NAME, cfg, resume=resume, overwrite=overwrite)
    ds, tx, ty, vx, vy = T.load_data(
        cfg.dataset, cfg.data_dir, test_subset=cfg.eval_examples, seed=cfg.seed
    )
    with T.bn_impl(cfg.bn_impl):
        results = T.train_variants(
            out,
            variants(cfg),
            (tx, ty, vx, vy),
            steps=cfg.steps,
            eval_every=cfg.eval_every,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            resume=resume,
            quiet=quiet,
            save_checkpoint=save_checkpoint,
        )
    curves = {
        k: {
            "step": [e["step"] for e in r["evals"]],
            "test_acc": [e["test_acc"] for e in r["evals"]],
        }
        for k, r in results.items()
    }
    summary = {
        "experiment": NAME,
        "dataset": ds.name,
        "data_source": ds.source,
        "train_examples": len(tx),
        "test_examples": len(vx),
        "baseline_best_acc": results["Baseline"]["best_acc"],
        "baseline_best_step": results["Baseline"]["best_step"],
        "table": table(results),
        "curves": curves,
        "paper": PAPER,
        "wall_seconds": sum(r["wall_seconds"] for r in results.values()),
        "session_seconds": clock.elapsed,
        "config": dataclasses.asdict(cfg),
    }
    plot(summary, out / "ablation_accuracy.png")
    atomic_write_json(out / "summary.json", T.jsonable(summary))
    return summary


def plot(summary: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {
        "Baseline": "k-",
        "Baseline-Sigmoid": "k:",
        "BN-Baseline": "C0-",
        "BN-x5": "C1-",
        "BN-x30": "C2-",
        "BN-x5-Sigmoid": "C3--",
    }
    for name, c in summary["curves"].items():
        ax.plot(c["step"], c["test_acc"], styles.get(name, "-"), label=name)
    ax.axhline(summary["baseline_best_acc"], color="gray", lw=0.8, ls="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Small Inception net on {summary['dataset']} (cf. the paper's Figure 2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _rows(summary: dict) -> list[list[str]]:
    return [
        [
            r["variant"],
            str(r["steps_to_baseline_best"] or "—"),
            _pct(r["max_test_acc"]),
            "—" if r["speedup"] is None else f"{r['speedup']:.1f}x",
            f"{r['ms_per_step']:.0f}",
        ]
        for r in summary["table"]
    ]


def describe(summary: dict) -> str:
    head = f"Baseline best {_pct(summary['baseline_best_acc'])} at step {summary['baseline_best_step']}"
    lines = [
        head,
        f"{'variant':17s} {'steps to it':>11s} {'max acc':>8s} {'speed-up':>8s} {'ms/step':>7s}",
    ]
    lines += [f"{a:17s} {b:>11s} {c:>8s} {d:>8s} {e:>7s}" for a, b, c, d, e in _rows(summary)]
    return "\n".join(lines)


def report(summary: dict, run_dir: Path) -> ReportSections:
    t = {r["variant"]: r for r in summary["table"]}
    x5, x30 = t["BN-x5"], t["BN-x30"]
    best = max(summary["table"], key=lambda r: r["max_test_acc"])["variant"]
    claims = [
        Claim(
            "BN-x5 reaches the Baseline's best accuracy in far fewer steps",
            "14x fewer (2.1M vs 31.0M)",
            "—" if x5["speedup"] is None else f"{x5['speedup']:.1f}x fewer",
            "consistent" if (x5["speedup"] or 0) > 1 else "not reproduced",
        ),
        Claim(
            "BN-Baseline matches the Baseline in under half the steps",
            "2.3x (13.3M vs 31.0M)",
            "—" if t["BN-Baseline"]["speedup"] is None else f"{t['BN-Baseline']['speedup']:.1f}x",
            "consistent"
            if (t["BN-Baseline"]["speedup"] or 0) >= 2
            else "partly"
            if (t["BN-Baseline"]["speedup"] or 0) > 1
            else "not reproduced",
        ),
        Claim(
            "BN-x30 reaches the highest accuracy",
            "74.8% vs 72.2%",
            f"best: {best} ({_pct(t[best]['max_test_acc'])}); BN-x30 {_pct(x30['max_test_acc'])}",
            "consistent" if best == "BN-x30" else "not reproduced",
        ),
        Claim(
            "without BN, the sigmoid net does not train; with BN it does",
            "<0.1% vs 69.8%",
            f"{_pct(t['Baseline-Sigmoid']['max_test_acc'])} vs {_pct(t['BN-x5-Sigmoid']['max_test_acc'])}",
            "consistent"
            if t["BN-x5-Sigmoid"]["max_test_acc"] > t["Baseline-Sigmoid"]["max_test_acc"] + 0.1
            else "not reproduced",
        ),
    ]
    c = summary["config"]
    return ReportSections(
        title=f"Accelerating BN networks: the Section 4.2 ablation on {summary['dataset']}",
        intro=(
            f"A small Inception-style net (width {c['width']}) trained {c['steps']} steps at batch "
            f"{c['batch_size']} per variant with momentum SGD; test accuracy on "
            f"{summary['test_examples']} test images every {c['eval_every']} steps. Baseline lr "
            f"{c['lr']}, L2 {c['weight_decay']}, dropout {c['dropout']}, LRN; the recipe (BN-x5, "
            "BN-x30, BN-x5-Sigmoid) removes dropout and LRN, divides L2 by 5, decays the lr 6x "
            "faster and halves the augmentation."
        ),
        claims=claims,
        figures=[
            Figure(
                "ablation_accuracy.png",
                "test accuracy vs training step; dashed: the Baseline's best",
            )
        ],
        tables=[
            Table(
                "Steps to the Baseline's best test accuracy",
                ["variant", "steps", "max test acc", "speed-up", "ms/step"],
                _rows(summary),
            )
        ],
        notes=[
            "'More thorough shuffling' is not modelled: every variant reshuffles each epoch.",
            "Speed-up = Baseline's step of its best accuracy / the variant's first step reaching it "
            "(evaluated every eval_every steps).",
        ],
    )
