"""The paper's Section 4.2 Inception ablation, scaled to a small Inception-style net on 28×28 images.

Six variants share one step budget: Baseline (no BN; dropout, L2, LRN), Baseline-Sigmoid,
BN-Baseline (BN added, all else equal), BN-x5 and BN-x30 (learning rate ×5 / ×30 plus the
"accelerating BN networks" recipe: no dropout, L2 ÷5, learning-rate decay 6× faster, no LRN,
lighter augmentation) and BN-x5-Sigmoid. Reported like the paper's table: steps to reach the
Baseline's best test accuracy, max test accuracy, and the speed-up over the Baseline (Figure 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.augment import Augment
from ..engine.config import DataConfig, load_tensor_data
from ..engine.data import TensorData
from ..engine.launch import experiment_runner
from ..engine.loop import Arm, every
from ..engine.plots import figure_legend, pyplot, save_figure, scale_note
from ..engine.report import Claim, Figure, ReportSections, Table, pct
from ..engine.runner import option
from .models import BN_IMPLS, InceptionNet, with_bn_impl

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
class Config(DataConfig):
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
        metadata=_h("BN layers: this package's or torch.nn's", choices=list(BN_IMPLS)),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bn_impl not in BN_IMPLS:
            raise ValueError(f"bn_impl must be one of {BN_IMPLS}, got {self.bn_impl!r}")
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


def load(cfg: Config) -> TensorData:
    return load_tensor_data(cfg).subset(test=cfg.eval_examples, seed=cfg.seed)


def arms(cfg: Config, data: TensorData) -> list[Arm]:
    """The six variants of Section 4.2 (Inception → Baseline), scaled."""
    aug = Augment(cfg.rotation, cfg.shear, cfg.zoom)
    light = aug.scaled(0.5)
    n = cfg.steps

    def base_lr(s: int) -> float:
        return cfg.lr * cfg.lr_decay ** (s / n)

    def fast_lr(mult: float):
        return lambda s: mult * cfg.lr * cfg.lr_decay ** (6 * s / n)  # decay 6x faster

    def arm(name: str, bn: bool, act: str, recipe: bool, lr, wd: float, augment: Augment) -> Arm:
        dropout = 0.0 if recipe else cfg.dropout

        def build():
            return InceptionNet(
                bn=bn, activation=act, lrn=not recipe, dropout=dropout, width=cfg.width
            )

        return Arm(
            name, with_bn_impl(build, cfg.bn_impl), n, cfg.batch_size, lr, cfg.momentum, wd,
            augment, evals=every(cfg.eval_every, n),
        )  # fmt: skip

    wd = cfg.weight_decay
    return [
        arm("Baseline", False, "relu", False, base_lr, wd, aug),
        arm("Baseline-Sigmoid", False, "sigmoid", False, base_lr, wd, aug),
        arm("BN-Baseline", True, "relu", False, base_lr, wd, aug),
        arm("BN-x5", True, "relu", True, fast_lr(5), wd / 5, light),
        arm("BN-x30", True, "relu", True, fast_lr(30), wd / 5, light),
        arm("BN-x5-Sigmoid", True, "sigmoid", True, fast_lr(5), wd / 5, light),
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
        s = steps_to(r["records"], target)
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


def summarize(cfg: Config, data: TensorData, results: dict[str, dict]) -> dict:
    curves = {
        k: {
            "step": [e["step"] for e in r["records"]],
            "test_acc": [e["test_acc"] for e in r["records"]],
        }
        for k, r in results.items()
    }
    return {
        "train_examples": data.n_train,
        "test_examples": len(data.test_x),
        "baseline_best_acc": results["Baseline"]["best_acc"],
        "baseline_best_step": results["Baseline"]["best_step"],
        "table": table(results),
        "curves": curves,
        "paper": PAPER,
        "wall_seconds": sum(r["wall_seconds"] for r in results.values()),
    }


run = experiment_runner(__name__)


STYLES = {  # in the figure: no BN black, BN colours; sigmoid nets dotted / dashed
    "Baseline": {"color": "k", "ls": "-", "marker": "o"},
    "Baseline-Sigmoid": {"color": "k", "ls": ":", "marker": "v"},
    "BN-Baseline": {"color": "tab:blue", "ls": "-", "marker": "s"},
    "BN-x5": {"color": "tab:orange", "ls": "-", "marker": "^"},
    "BN-x30": {"color": "tab:green", "ls": "-", "marker": "D"},
    "BN-x5-Sigmoid": {"color": "tab:red", "ls": "--", "marker": "P"},
}


def plot(summary: dict, out: Path) -> None:
    """ablation_accuracy.png: test accuracy of the six variants over training (cf. Figure 2)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    for name, c in summary["curves"].items():
        ax.plot(c["step"], c["test_acc"], label=name, lw=1.5, ms=3.5, **STYLES.get(name, {}))
    ax.axhline(
        summary["baseline_best_acc"], color="0.5", lw=0.9, ls=(0, (6, 3)),
        label=f"Baseline's best ({100 * summary['baseline_best_acc']:.1f}%)",
    )  # fmt: skip
    cfg = summary.get("config", {})
    batch = f" (mini-batches of {cfg['batch_size']})" if "batch_size" in cfg else ""
    ax.set_xlabel(f"training step{batch}")
    ax.set_ylabel(f"test accuracy ({summary.get('test_examples', '?')} test images)")
    ax.set_title("Test accuracy of the six variants (cf. the paper's Figure 2)", fontsize=10)
    ax.grid(alpha=0.3)
    figure_legend(fig, ax.get_lines(), ncols=4)
    fig.suptitle(f"Section 4.2 ablation: small Inception-style net on {summary['dataset']}")
    scale_note(fig, summary)
    save_figure(fig, out / "ablation_accuracy.png")


def _rows(summary: dict) -> list[list[str]]:
    return [
        [
            r["variant"],
            str(r["steps_to_baseline_best"] or "—"),
            pct(r["max_test_acc"]),
            "—" if r["speedup"] is None else f"{r['speedup']:.1f}x",
            f"{r['ms_per_step']:.0f}",
        ]
        for r in summary["table"]
    ]


def describe(summary: dict) -> str:
    head = (
        f"Baseline best {pct(summary['baseline_best_acc'])} at step {summary['baseline_best_step']}"
    )
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
            f"best: {best} ({pct(t[best]['max_test_acc'])}); BN-x30 {pct(x30['max_test_acc'])}",
            "consistent" if best == "BN-x30" else "not reproduced",
        ),
        Claim(
            "without BN, the sigmoid net does not train; with BN it does",
            "<0.1% vs 69.8%",
            f"{pct(t['Baseline-Sigmoid']['max_test_acc'])} vs {pct(t['BN-x5-Sigmoid']['max_test_acc'])}",
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
