"""LeNet with and without BN, with data augmentation: accuracy, speed, and the paper's recipe.

Replays the LeNet-BN study of seed 003 (a Keras run on MNIST: 20 epochs at batch 128 with
rotation/shear/zoom augmentation; no-BN 99.08% test accuracy in 15 min 43 s, BN 98.75% in
20 min 57 s) with this package's layers, and adds a third net: the BN LeNet trained with the
paper's Section 4.2 recipe (learning rate ×5, no dropout).
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
from .models import BN_IMPLS, LeNet, count_bn_layers, with_bn_impl

NAME = "lenet"
VARIANTS = ("no-BN", "BN", "BN-recipe")
PUBLISHED = {  # seed 003, Keras, MNIST, 20 epochs, batch 128
    "no-BN": {"test_acc": 0.9908, "test_loss": 0.0307, "wall_seconds": 15 * 60 + 43},
    "BN": {"test_acc": 0.9875, "test_loss": 0.0365, "wall_seconds": 20 * 60 + 57},
}


_h = option


@dataclass
class Config(DataConfig):
    """Settings of the LeNet study (defaults: the published run's 20 epochs at batch 128)."""

    epochs: int = field(default=20, metadata=_h("training epochs per net"))
    batch_size: int = field(default=128, metadata=_h("mini-batch size"))
    lr: float = field(
        default=0.01, metadata=_h("momentum-SGD learning rate of the no-BN and BN nets")
    )
    momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
    dropout: float = field(
        default=0.25, metadata=_h("dropout after the FC 120 and FC 84 blocks (no-BN, BN)")
    )
    recipe_lr_mult: float = field(
        default=5.0, metadata=_h("learning-rate factor of BN-recipe (no dropout)")
    )
    rotation: float = field(default=10.0, metadata=_h("augmentation: max rotation, degrees"))
    shear: float = field(default=0.1, metadata=_h("augmentation: max shear factor"))
    zoom: float = field(default=0.1, metadata=_h("augmentation: max relative zoom"))
    train_subset: int = field(default=0, metadata=_h("train on this many examples (0: all)"))
    bn_impl: str = field(
        default="batchnorm",
        metadata=_h("BN layers: this package's or torch.nn's", choices=list(BN_IMPLS)),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bn_impl not in BN_IMPLS:
            raise ValueError(f"bn_impl must be one of {BN_IMPLS}, got {self.bn_impl!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.recipe_lr_mult <= 0:
            raise ValueError(
                f"lr and recipe_lr_mult must be > 0, got {self.lr}, {self.recipe_lr_mult}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def quick(cls) -> Config:
        """CI size: digits, 2 epochs at batch 64 (a few seconds)."""
        return cls(dataset="digits", epochs=2, batch_size=64)


def load(cfg: Config) -> TensorData:
    return load_tensor_data(cfg).subset(cfg.train_subset, seed=cfg.seed)


def arms(cfg: Config, data: TensorData) -> list[Arm]:
    """The three nets: no-BN, BN (same settings), BN-recipe (lr x recipe_lr_mult, no dropout)."""
    spe = data.n_train // cfg.batch_size
    if spe < 1:
        raise ValueError(
            f"batch_size {cfg.batch_size} exceeds the {data.n_train} training examples"
        )
    steps = cfg.epochs * spe
    aug = Augment(cfg.rotation, cfg.shear, cfg.zoom)
    lr, fast = cfg.lr, cfg.lr * cfg.recipe_lr_mult

    def arm(name: str, bn: bool, dropout: float, rate: float) -> Arm:
        build = with_bn_impl(lambda: LeNet(bn=bn, dropout=dropout), cfg.bn_impl)
        return Arm(
            name, build, steps, cfg.batch_size, lambda s: rate, cfg.momentum,
            augment=aug, evals=every(spe, steps),
        )  # fmt: skip

    return [
        arm("no-BN", False, cfg.dropout, lr),
        arm("BN", True, cfg.dropout, lr),
        arm("BN-recipe", True, 0.0, fast),
    ]


def summarize(cfg: Config, data: TensorData, results: dict[str, dict]) -> dict:
    nets = {}
    for name, r in results.items():
        nets[name] = {
            "test_acc": r["final"]["test_acc"],
            "test_loss": r["final"]["test_loss"],
            "best_test_acc": r["best_acc"],
            "wall_seconds": r["wall_seconds"],
            "ms_per_step": r["ms_per_step"],
            "steps": r["steps"],
            "diverged": r["diverged"],
            "epochs": [e["epoch"] for e in r["records"]],
            "train_acc": [e["train_acc"] for e in r["records"]],
            "test_acc_curve": [e["test_acc"] for e in r["records"]],
        }
    return {
        "train_examples": data.n_train,
        "test_examples": len(data.test_x),
        "steps_per_epoch": data.n_train // cfg.batch_size,
        "bn_layers": count_bn_layers(LeNet(bn=True)),
        "nets": nets,
        "bn_step_overhead": nets["BN"]["ms_per_step"] / nets["no-BN"]["ms_per_step"],
        "published": PUBLISHED,
        "wall_seconds": sum(r["wall_seconds"] for r in results.values()),
    }


run = experiment_runner(__name__)


COLORS = {"no-BN": "tab:gray", "BN": "tab:blue", "BN-recipe": "tab:orange"}  # in the figure
MARKERS = {"no-BN": "o", "BN": "s", "BN-recipe": "^"}


def plot(summary: dict, out: Path) -> None:
    """lenet_curves.png: train and test accuracy per epoch of the three nets, on one y-axis."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    mult = summary.get("config", {}).get("recipe_lr_mult")
    what = {
        "no-BN": "no-BN",
        "BN": "BN (same settings)",
        "BN-recipe": f"BN-recipe (lr x{mult:g}, no dropout)" if mult else "BN-recipe",
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True, layout="constrained")
    for name, r in summary["nets"].items():
        kw = {
            "color": COLORS.get(name), "marker": MARKERS.get(name, "o"), "ms": 4, "lw": 1.6,
            "label": what.get(name, name) + (" (diverged)" if r.get("diverged") else ""),
        }  # fmt: skip
        axes[0].plot(r["epochs"], r["train_acc"], **kw)
        axes[1].plot(r["epochs"], r["test_acc_curve"], **kw)
    for ax, title, ylabel in zip(
        axes,
        ("(a) Train accuracy (augmented batches)", "(b) Test accuracy"),
        ("train accuracy (epoch mean)", "test accuracy (end of epoch)"),
        strict=True,
    ):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelleft=True)
        ax.grid(alpha=0.3)
    figure_legend(fig, axes[0].get_lines(), ncols=3)
    fig.suptitle(f"LeNet on {summary['dataset']}: with and without BN")
    scale_note(fig, summary)
    save_figure(fig, out / "lenet_curves.png")


def _mmss(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:.0f} s"


def describe(summary: dict) -> str:
    lines = [f"LeNet on {summary['dataset']} ({summary['train_examples']} train examples):"]
    for name, r in summary["nets"].items():
        lines.append(
            f"  {name:9s} test acc {pct(r['test_acc'])}  loss {r['test_loss']:.4f}  "
            f"{r['ms_per_step']:.1f} ms/step  wall {_mmss(r['wall_seconds'])}"
        )
    lines.append(f"  BN time per step / no-BN: {summary['bn_step_overhead']:.2f}x")
    return "\n".join(lines)


def report(summary: dict, run_dir: Path) -> ReportSections:
    n, p = summary["nets"], summary["published"]
    rows = [
        [
            k,
            pct(r["test_acc"]),
            f"{r['test_loss']:.4f}",
            pct(r["best_test_acc"]),
            f"{r['ms_per_step']:.1f}",
            _mmss(r["wall_seconds"]),
        ]
        for k, r in n.items()
    ]
    mnist = summary["dataset"] == "mnist"
    where = "" if mnist else f" (ours on {summary['dataset']}, not MNIST: compare directions only)"
    bn_better = n["BN"]["test_acc"] > n["no-BN"]["test_acc"]
    claims = [
        Claim(
            "BN does not beat no-BN on test accuracy at 20 epochs (seed 003)",
            f"BN {pct(p['BN']['test_acc'])} vs no-BN {pct(p['no-BN']['test_acc'])}",
            f"BN {pct(n['BN']['test_acc'])} vs no-BN {pct(n['no-BN']['test_acc'])}{where}",
            "differs: BN ahead here" if bn_better else "same direction",
        ),
        Claim(
            "BN makes each step slower (seed 003: 21 vs 16 min)",
            f"{p['BN']['wall_seconds'] / p['no-BN']['wall_seconds']:.2f}x wall time",
            f"{summary['bn_step_overhead']:.2f}x time per step",
            "same direction" if summary["bn_step_overhead"] > 1 else "differs",
        ),
        Claim(
            "the paper's recipe (higher lr, no dropout) helps a BN net",
            "Section 4.2: BN-x5 beats BN-Baseline",
            f"BN-recipe {pct(n['BN-recipe']['test_acc'])} vs BN {pct(n['BN']['test_acc'])}",
            "consistent" if n["BN-recipe"]["test_acc"] >= n["BN"]["test_acc"] else "not here",
        ),
    ]
    return ReportSections(
        title=f"LeNet with and without Batch Normalization ({summary['dataset']})",
        intro=(
            "Three LeNets (conv 6, conv 16, FC 120, FC 84, FC 10) trained with random rotation, "
            "shear and zoom: without BN, with BN before each ReLU (biases dropped), and the BN net "
            f"with the paper's recipe (learning rate x{summary['config']['recipe_lr_mult']:g}, no "
            "dropout). Time per step includes the augmentation of the batch."
        ),
        claims=claims,
        figures=[
            Figure(
                "lenet_curves.png",
                "train (augmented, running mean over each epoch) and test accuracy per epoch",
            )
        ],
        tables=[
            Table(
                "Results",
                ["net", "final test acc", "test loss", "best test acc", "ms/step", "wall"],
                rows,
            )
        ],
        notes=[
            f"data: {summary['data_source']}; {summary['steps_per_epoch']} steps per epoch",
            "the published run used Keras on MNIST with an unstated optimizer; ours uses momentum SGD",
        ],
    )
