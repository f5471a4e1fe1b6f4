"""The paper's ImageNet experiment (Section 4.2): BN-Inception and its variants, at any scale.

Five networks trained on an image folder (``train/<class>/*``, ``val/<class>/*``): Inception
(no BN), BN-Baseline (BN before every nonlinearity, otherwise the same), BN-x5 and BN-x30 (the
"accelerating BN networks" recipe at 5x and 30x the learning rate) and BN-x5-Sigmoid; then,
with ``ensemble > 0``, that many BN-x30 members varied as the paper describes, evaluated by
averaging their class probabilities. The same command runs on a laptop (a tiny folder, CPU) and
on a GPU cluster::

    torchrun --nproc_per_node 8 -m batchnorm reproduce imagenet --data-dir /data/imagenet

Steps are counted as the paper counts them: mini-batches of 32 examples (``batch_size``, per
process). With P processes one optimizer step takes P of them, so P paper steps.

Choices the paper leaves open, with the reason for each (all are options):

- learning-rate schedule: exponential decay by ``lr_decay`` (0.96) every ``decay_epochs``
  (8) epochs, the GoogLeNet schedule the Inception baseline comes from; the recipe's "decay
  6x faster" divides ``decay_epochs`` by 6;
- L2 weight decay ``weight_decay`` (4e-5, as Inception-v3 uses; the paper gives only the
  recipe's division by 5), on convolution and linear weights only;
- photometric distortion: brightness, contrast and saturation jitter of up to 40% (torchvision's
  ColorJitter(0.4, 0.4, 0.4) strengths) for Inception and BN-Baseline, half of it for the
  recipe ("reduce the photometric distortions");
- "shuffle training examples more thoroughly": every variant here reshuffles the whole
  training set each epoch (the sampler has no shards to shuffle within), so the recipe item
  is met by all of them;
- ensemble members (BN-x30 based): dropout 0, 5% or 10%, conv weights initialized 1x or 1.5x,
  and every other member with per-activation BN on the last hidden layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.config import DeviceConfig, RunConfig
from ..engine.launch import experiment_runner
from ..engine.loop import Arm, every
from ..engine.plots import pyplot, save_figure
from ..engine.report import Claim, Figure, ReportSections, Table, pct
from ..engine.runner import option

NAME = "imagenet"
VARIANTS = ("Inception", "BN-Baseline", "BN-x5", "BN-x30", "BN-x5-Sigmoid")
PAPER = {  # Section 4.2: paper steps to Inception's best (72.2%), max validation accuracy
    "Inception": (31.0e6, 0.722),
    "BN-Baseline": (13.3e6, 0.727),
    "BN-x5": (2.1e6, 0.730),
    "BN-x30": (2.7e6, 0.748),
    "BN-x5-Sigmoid": (None, 0.698),
}
PAPER_ENSEMBLE = {"top1_error": 0.201, "top5_error": 0.049}
PAPER_BATCH = 32  # the paper's mini-batch: the unit of its step counts

_h = option


@dataclass
class Config(DeviceConfig, RunConfig):
    """Settings of the ImageNet experiment (defaults: the paper's, on ImageNet)."""

    data_dir: str | None = field(
        default=None,
        metadata=_h(
            "image folder with train/<class>/* and val/<class>/* (required)", metavar="DIR"
        ),
    )
    variants: str = field(
        default=",".join(VARIANTS), metadata=_h("comma-separated subset of the five variants")
    )
    steps: int = field(
        default=6_000_000,
        metadata=_h("training budget per network, in paper steps (mini-batches of 32 examples)"),
    )
    batch_size: int = field(
        default=32, metadata=_h("examples per process and step (the paper's 32)")
    )
    lr: float = field(
        default=0.0015, metadata=_h("Inception's learning rate (BN-x5: x5, BN-x30: x30)")
    )
    momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
    weight_decay: float = field(default=4e-5, metadata=_h("L2 of Inception (the recipe: /5)"))
    lr_decay: float = field(default=0.96, metadata=_h("learning-rate factor every decay_epochs"))
    decay_epochs: float = field(default=8.0, metadata=_h("epochs per decay (the recipe: /6)"))
    dropout: float = field(
        default=0.4, metadata=_h("dropout before the classifier (the recipe: 0)")
    )
    distortion: float = field(
        default=1.0, metadata=_h("photometric distortion strength (the recipe: half)")
    )
    image_size: int = field(default=224, metadata=_h("training and evaluation crop size"))
    width: float = field(
        default=1.0, metadata=_h("channel multiplier of BN-Inception (1: the paper's)")
    )
    eval_every: int = field(default=100_000, metadata=_h("paper steps between validation runs"))
    ensemble: int = field(
        default=0, metadata=_h("BN-x30-based members to train and average (0: none)")
    )
    multi_crop: bool = field(
        default=False, metadata=_h("also evaluate each network on 10 crops per image at the end")
    )
    loader_workers: int = field(
        default=8, metadata=_h("DataLoader worker processes decoding images, per process")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [v for v in self.variant_list() if v not in VARIANTS]
        if bad or not self.variant_list():
            raise ValueError(f"variants must be a subset of {','.join(VARIANTS)}, got {bad}")
        for name in ("steps", "batch_size", "image_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (BN needs 2 values per channel)")
        if not (self.lr > 0 and 0 < self.lr_decay <= 1 and self.decay_epochs > 0):
            raise ValueError("need lr > 0, 0 < lr_decay <= 1 and decay_epochs > 0")
        if not 0 <= self.dropout < 1 or self.distortion < 0 or self.width <= 0:
            raise ValueError("need 0 <= dropout < 1, distortion >= 0 and width > 0")
        if self.ensemble < 0 or self.loader_workers < 0:
            raise ValueError("ensemble and loader_workers must be >= 0")

    def variant_list(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]

    @classmethod
    def quick(cls) -> Config:
        """CI size: width 1/4 at 32x32, 8 paper steps (256 examples) per network, 2 members."""
        return cls(
            steps=8, batch_size=8, image_size=32, width=0.25, eval_every=4, ensemble=2,
            loader_workers=0, device="cpu",
        )  # fmt: skip


def load(cfg: Config):
    from ..data.images import ImageFolderData

    if not cfg.data_dir:
        raise ValueError(
            "imagenet needs --data-dir DIR: a folder with train/<class>/* and val/<class>/* "
            "(ImageNet's layout; Imagenette or any such folder works)"
        )
    return ImageFolderData(cfg.data_dir, image_size=cfg.image_size, workers=cfg.loader_workers)


def _lr(base: float, cfg: Config, steps_per_epoch: float, faster: float):
    """Exponential decay: lr(s) = base * lr_decay^(s / (decay_epochs/faster * steps_per_epoch))."""
    period = cfg.decay_epochs / faster * steps_per_epoch
    return lambda s: base * cfg.lr_decay ** (s / period)


def arms(cfg: Config, data: Any) -> list[Arm]:
    """The chosen variants, then the ensemble members; budgets in paper steps of 32 examples."""
    from .bn_inception import bn_inception

    classes = data.num_classes if data is not None else 1000
    per_step = cfg.batch_size  # one process; the engine scales batch and budget for P processes
    steps = max(1, cfg.steps * PAPER_BATCH // per_step)
    ev = max(1, cfg.eval_every * PAPER_BATCH // per_step)
    spe = (data.n_train if data is not None else 1_281_167) / per_step

    def arm(name: str, *, bn: bool, act: str = "relu", recipe: bool, mult: float, **net: Any):
        dropout = net.pop("dropout", 0.0 if recipe else cfg.dropout)

        def build() -> nn.Module:
            return bn_inception(
                classes, bn=bn, activation=act, lrn=not recipe, dropout=dropout, width=cfg.width,
                **net,
            )  # fmt: skip

        return Arm(
            name, build, steps, per_step, _lr(cfg.lr * mult, cfg, spe, 6.0 if recipe else 1.0),
            cfg.momentum, cfg.weight_decay / (5 if recipe else 1),
            augment=cfg.distortion * (0.5 if recipe else 1.0), evals=every(ev, steps),
            finish=(lambda model: _finish(model, data, cfg, name)), order="imagenet",
            meta={"variant": name, "dropout": dropout, **net},
        )  # fmt: skip

    recipes = {
        "Inception": dict(bn=False, recipe=False, mult=1.0),
        "BN-Baseline": dict(bn=True, recipe=False, mult=1.0),
        "BN-x5": dict(bn=True, recipe=True, mult=5.0),
        "BN-x30": dict(bn=True, recipe=True, mult=30.0),
        "BN-x5-Sigmoid": dict(bn=True, act="sigmoid", recipe=True, mult=5.0),
    }
    out = [arm(v, **recipes[v]) for v in cfg.variant_list()]
    for i in range(cfg.ensemble):  # the paper's variations of BN-x30
        out.append(arm(
            f"ensemble-{i}", bn=True, recipe=True, mult=30.0, dropout=(0.0, 0.05, 0.1)[i % 3],
            conv_init_scale=(1.0, 1.5)[(i // 3) % 2], final_bn=i % 2 == 1,
        ))  # fmt: skip
    return out


@torch.no_grad()
def _finish(model: nn.Module, data: Any, cfg: Config, name: str) -> dict[str, Any]:
    """Ensemble members keep their validation probabilities; with ``multi_crop`` every network
    is also scored on 10 crops per image (rank 0, the whole validation set)."""
    out: dict[str, Any] = {}
    model.eval()
    device = next(model.parameters()).device
    if name.startswith("ensemble-"):
        probs = [
            model(x.to(device)).float().softmax(1).half().cpu() for x, _ in data.test_batches(256)
        ]
        out["probs"] = torch.cat(probs)
    if cfg.multi_crop:
        from ..data.images import multi_crop

        hit1 = hit5 = 0
        for i in range(data.n_test):
            img, label = data.val.load(i)
            p = model(multi_crop(img, cfg.image_size).to(device)).float().softmax(1).mean(0)
            top = p.topk(min(5, p.numel())).indices.tolist()
            hit1 += top[0] == label
            hit5 += label in top
        out["multi_crop"] = {"top1": hit1 / data.n_test, "top5": hit5 / data.n_test}
    model.train()
    return out


def _topk(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    top = probs.float().topk(min(5, probs.shape[1]), dim=1).indices
    return {
        "top1": (top[:, 0] == labels).float().mean().item(),
        "top5": (top == labels[:, None]).any(1).float().mean().item(),
    }


def summarize(cfg: Config, data: Any, results: dict[str, dict]) -> dict:
    """The paper's table: per variant the curve (paper steps, top-1), max top-1, paper steps to
    Inception's best; the ensemble's top-1/top-5 from averaged probabilities."""
    variants: dict[str, dict] = {}
    for name in cfg.variant_list():
        r = results[name]
        curve = [[e["examples"] // PAPER_BATCH, e["test_acc"]] for e in r["records"]]
        variants[name] = {
            "curve": curve,
            "max_top1": max((a for _, a in curve), default=None),
            "final_top5": r["final"]["test_top5"] if r["final"] else None,
            "images_per_s": r["images_per_s"],
            "diverged": r["diverged"],
            "wall_seconds": r["wall_seconds"],
            **({"multi_crop": r["multi_crop"]} if "multi_crop" in r else {}),
        }
    target = variants.get("Inception", {}).get("max_top1")
    for v in variants.values():
        reach = [s for s, a in v["curve"] if target is not None and s > 0 and a >= target]
        v["steps_to_baseline_best"] = reach[0] if reach else None
    ensemble = None
    members = [k for k in results if k.startswith("ensemble-")]
    if members:
        labels = torch.tensor(data.val.targets)
        mean = torch.stack([results[k]["probs"].float() for k in members]).mean(0)
        ensemble = {
            **_topk(mean, labels),
            "members": [{"name": k, **_topk(results[k]["probs"], labels)} for k in members],
        }
    return {
        "classes": data.num_classes,
        "train_examples": data.n_train,
        "val_examples": data.n_test,
        "parameters": _parameters(cfg, data.num_classes),
        "variants": variants,
        "ensemble": ensemble,
        "paper": {k: {"steps": s, "max_top1": a} for k, (s, a) in PAPER.items()},
        "wall_seconds": sum(r["wall_seconds"] for r in results.values()),
    }


def _parameters(cfg: Config, classes: int) -> dict[str, int]:
    from .bn_inception import bn_inception, count_parameters

    return {
        "this_run": count_parameters(bn_inception(classes, width=cfg.width)),
        "full_width_1000_classes": count_parameters(bn_inception(1000)),
    }


run = experiment_runner(__name__)


# ---------------------------------------------------------------- figures and report
STYLES = {
    "Inception": ("k", "-"), "BN-Baseline": ("tab:blue", "-"), "BN-x5": ("tab:orange", "-"),
    "BN-x30": ("tab:green", "-"), "BN-x5-Sigmoid": ("tab:red", "--"),
}  # fmt: skip


def plot(summary: dict, out: Path) -> None:
    """Figure 2 of the paper: validation top-1 against paper steps, one curve per network."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for name, v in summary["variants"].items():
        color, ls = STYLES.get(name, ("gray", ":"))
        ax.plot([s for s, _ in v["curve"]], [a for _, a in v["curve"]], ls, color=color, label=name)
    ax.set_xlabel("training steps (mini-batches of 32 examples)")
    ax.set_ylabel("validation top-1 accuracy (single crop)")
    scale = summary.get("scale", {})
    note = "" if scale.get("kind") == "full" else f" — {scale.get('kind', '?')} run"
    ax.set_title(f"BN-Inception variants on {summary['dataset']} (cf. Figure 2){note}")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    save_figure(fig, out / "imagenet_accuracy.png")


def _steps(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}" if x < 1e5 else f"{x / 1e6:.1f}·10⁶"


def rows(summary: dict) -> list[list[str]]:
    out = []
    for name, v in summary["variants"].items():
        paper_steps, paper_acc = PAPER[name]
        out.append([
            name, _steps(v["steps_to_baseline_best"]), pct(v["max_top1"], 1),
            _steps(paper_steps), pct(paper_acc, 1),
            "—" if v["images_per_s"] is None else f"{v['images_per_s']:,.1f}",
        ])  # fmt: skip
    return out


def describe(summary: dict) -> str:
    head = f"{'network':14s} {'steps to Inc.':>13s} {'max top-1':>9s} {'paper':>17s} {'img/s':>8s}"
    lines = [f"BN-Inception on {summary['dataset']}, {summary['world_size']} process(es):", head]
    for r in rows(summary):
        lines.append(f"{r[0]:14s} {r[1]:>13s} {r[2]:>9s} {r[3] + ' / ' + r[4]:>17s} {r[5]:>8s}")
    if summary["ensemble"]:
        e = summary["ensemble"]
        lines.append(
            f"ensemble of {len(e['members'])}: top-1 {pct(e['top1'])}, top-5 {pct(e['top5'])}"
        )
    return "\n".join(lines)


def report(summary: dict, run_dir: Path) -> ReportSections:
    v = summary["variants"]
    claims = []
    if "BN-x5" in v and "Inception" in v:
        s5 = v["BN-x5"]["steps_to_baseline_best"]
        base = v["Inception"]["curve"][-1][0] if v["Inception"]["curve"] else None
        claims.append(Claim(
            "BN-x5 reaches Inception's best accuracy in far fewer steps",
            "14x fewer (2.1·10⁶ vs 31.0·10⁶)",
            "never reached it" if s5 is None else f"at {_steps(s5)} (Inception's budget {_steps(base)})",
            "consistent" if s5 is not None and base and s5 < base else "not reproduced",
        ))  # fmt: skip
    if "BN-x30" in v and "Inception" in v:
        hi = max(v, key=lambda k: v[k]["max_top1"] or 0)
        claims.append(Claim(
            "BN-x30 reaches the highest accuracy", "74.8% vs 72.2%",
            f"best: {hi} ({pct(v[hi]['max_top1'], 1)})",
            "consistent" if hi == "BN-x30" else "not reproduced",
        ))  # fmt: skip
    if "BN-x5-Sigmoid" in v and "Inception" in v:
        claims.append(Claim(
            "with BN a sigmoid network trains", "69.8% (sigmoid without BN: <0.1%)",
            f"{pct(v['BN-x5-Sigmoid']['max_top1'], 1)}",
            "consistent" if (v["BN-x5-Sigmoid"]["max_top1"] or 0) > 1.5 / summary["classes"]
            else "not reproduced",
        ))  # fmt: skip
    tables = [Table(
        "Steps to Inception's best validation accuracy, and the best accuracy",
        ["network", "steps", "max top-1", "paper: steps", "paper: max", "images/s"], rows(summary),
    )]  # fmt: skip
    if summary["ensemble"]:
        e = summary["ensemble"]
        tables.append(Table(
            "Ensemble (class probabilities averaged)", ["", "top-1 error", "top-5 error"],
            [["ours", pct(1 - e["top1"]), pct(1 - e["top5"])],
             ["paper (6 networks, multi-crop)", pct(PAPER_ENSEMBLE["top1_error"]),
              pct(PAPER_ENSEMBLE["top5_error"])]]
            + [[m["name"], pct(1 - m["top1"]), pct(1 - m["top5"])] for m in e["members"]],
        ))  # fmt: skip
    p = summary["parameters"]
    return ReportSections(
        title=f"BN-Inception on {summary['dataset']}: the Section 4.2 experiment",
        intro=(
            f"Five networks on {summary['train_examples']:,} training and "
            f"{summary['val_examples']:,} validation images of {summary['classes']} classes, "
            f"{summary['world_size']} process(es) on {summary['device']}. Steps are the paper's: "
            f"mini-batches of 32. BN-Inception has {p['full_width_1000_classes']:,} parameters "
            f"at full width with 1000 classes ({p['this_run']:,} in this run)."
        ),
        claims=claims,
        figures=[Figure("imagenet_accuracy.png", "validation top-1 vs training steps (Figure 2)")],
        tables=tables,
        notes=[
            "images/s: the median step's examples over all processes per second (training only).",
            "The paper trained with asynchronous distributed SGD; here each step is synchronous "
            "over the processes, each with its own BN statistics unless --sync-bn.",
        ],
    )
