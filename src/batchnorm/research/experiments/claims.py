"""The benefits the paper claims for BN, each measured with and without it.

1. Higher learning rates (Sections 3.3, 4.2): a learning-rate sweep of a deep plain ReLU net.
2. Less careful initialization (Section 1): a sweep of the weight-init scale (×0.1 … ×10 of He).
3. Regularization (Section 3.4): train/test gap with and without dropout, with and without BN.
4. Saturating nonlinearities (Sections 1, 4.2): a 10-layer sigmoid net; per-layer gradient norms.
5. Ensembles (Section 4.2.2): k BN nets averaged vs the best member, top-1 and top-5 error.

Every claim gets a plot and a verdict (reproduced / partly / not) with the numbers behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.config import DataConfig, load_tensor_data
from ..engine.data import TensorData
from ..engine.launch import experiment_runner
from ..engine.loop import Arm, build, evaluate, every
from ..engine.plots import figure_legend, pyplot, save_figure, scale_note, style_handle
from ..engine.report import Claim, Figure, ReportSections, Table
from ..engine.runner import option
from .models import DeepMLP, LeNet

NAME = "claims"
GOOD_MARGIN = 0.05  # a setting "trains" if its test accuracy is within 5 points of the best one


_h = option


def _floats(text: str, name: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise ValueError(f"{name} must hold positive numbers, got {text!r}")
    return sorted(vals)


@dataclass
class Config(DataConfig):
    """Settings of the claims study (defaults: 32 nets; estimated 5-10 min on 2 idle cores)."""

    train_examples: int = field(default=10000, metadata=_h("training subset size (0: all)"))
    test_examples: int = field(default=2000, metadata=_h("test subset size (0: all)"))
    steps: int = field(default=600, metadata=_h("SGD steps per trained net"))
    batch_size: int = field(default=64, metadata=_h("mini-batch size"))
    depth: int = field(default=10, metadata=_h("hidden layers of the deep nets (claims 1, 2, 4)"))
    width: int = field(default=100, metadata=_h("units per hidden layer"))
    lr: float = field(default=0.02, metadata=_h("learning rate where a claim does not sweep it"))
    momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
    lrs: str = field(default="0.003,0.01,0.03,0.1,0.3,1.0", metadata=_h("claim 1: learning rates"))
    init_scales: str = field(default="0.1,0.3,1,3,10", metadata=_h("claim 2: multiples of He init"))
    reg_examples: int = field(
        default=1000, metadata=_h("claim 3: training examples (small, to overfit)")
    )
    reg_steps: int = field(default=1500, metadata=_h("claim 3: steps per net"))
    reg_width: int = field(default=256, metadata=_h("claim 3: units per hidden layer (3 layers)"))
    dropout: float = field(default=0.3, metadata=_h("claim 3: dropout rate of the dropout nets"))
    sigmoid_lr: float = field(
        default=0.1, metadata=_h("claim 4: learning rate of the sigmoid nets")
    )
    ensemble: int = field(default=4, metadata=_h("claim 5: BN LeNets in the ensemble"))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "steps",
            "batch_size",
            "depth",
            "width",
            "reg_steps",
            "reg_width",
            "reg_examples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ensemble < 2:
            raise ValueError(f"ensemble needs at least 2 members, got {self.ensemble}")
        if not 0 < self.dropout < 1:
            raise ValueError(f"dropout must be in (0, 1), got {self.dropout}")
        _floats(self.lrs, "lrs")
        _floats(self.init_scales, "init_scales")

    @classmethod
    def quick(cls) -> Config:
        """CI size: digits, small nets, 3-point sweeps, 2-member ensemble."""
        return cls(
            dataset="digits",
            train_examples=0,
            test_examples=0,
            steps=25,
            depth=4,
            width=32,
            lrs="0.01,0.1,1",
            init_scales="0.1,1,10",
            reg_examples=200,
            reg_steps=25,
            reg_width=32,
            ensemble=2,
        )


def _constant(lr: float):
    return lambda s: lr


@torch.no_grad()
def _probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [model(x[i : i + 1000]).double().softmax(1).float() for i in range(0, len(x), 1000)]
    )


def layer_grad_norms(model: DeepMLP, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """‖∂L/∂W‖ of each hidden layer (input side first) on one batch, in training mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    norms = [m.weight.grad.norm().item() for m in model.hidden_linears()]
    model.zero_grad(set_to_none=True)
    return norms


def load(cfg: Config) -> TensorData:
    return load_tensor_data(cfg).subset(cfg.train_examples, cfg.test_examples, cfg.seed)


def arms(cfg: Config, data: TensorData) -> list[Arm]:
    d, w, m = cfg.depth, cfg.width, cfg.momentum
    tx, ty = data.train_x, data.train_y

    def arm(name: str, net, lr: float, steps: int | None = None, **kw) -> Arm:
        n = steps or cfg.steps
        ev = every(max(n // 3, 1), n)
        return Arm(name, net, n, cfg.batch_size, lambda s: lr, m, evals=ev, **kw)

    out = []
    for lr in _floats(cfg.lrs, "lrs"):  # claim 1
        for bn in (False, True):
            tag = f"lr/{'bn' if bn else 'plain'}/{lr:g}"
            out.append(arm(tag, lambda bn=bn: DeepMLP(width=w, depth=d, bn=bn), lr))
    for s in _floats(cfg.init_scales, "init_scales"):  # claim 2
        for bn in (False, True):
            tag = f"init/{'bn' if bn else 'plain'}/{s:g}"
            net = lambda bn=bn, s=s: DeepMLP(width=w, depth=d, bn=bn, init_scale=s)  # noqa: E731
            out.append(arm(tag, net, cfg.lr))
    seen = TensorData(
        data.name, data.source, tx, ty, tx[: cfg.reg_examples], ty[: cfg.reg_examples]
    )
    for bn in (False, True):  # claim 3: the train/test gap on a small training set
        for p in (0.0, cfg.dropout):
            tag = f"reg/{'bn' if bn else 'plain'}/{'dropout' if p else 'none'}"
            net = lambda bn=bn, p=p: DeepMLP(width=cfg.reg_width, depth=3, bn=bn, dropout=p)  # noqa: E731
            out.append(arm(
                tag, net, cfg.lr, cfg.reg_steps, train_n=cfg.reg_examples,
                finish=lambda model: {"train_eval": evaluate(model, seen)},
            ))  # fmt: skip
    probe = (tx[:256], ty[:256])
    for bn in (False, True):  # claim 4
        out.append(arm(
            f"sigmoid/{'bn' if bn else 'plain'}",
            lambda bn=bn: DeepMLP(width=w, depth=10, activation="sigmoid", bn=bn),
            cfg.sigmoid_lr,
            finish=lambda model: {"grad_norms_end": layer_grad_norms(model, *probe)},
        ))  # fmt: skip
    for i in range(
        cfg.ensemble
    ):  # claim 5: members differ in seed, some in dropout (as the paper's)
        p = (0.0, 0.05, 0.1)[i % 3]
        out.append(arm(
            f"ensemble/{i}", lambda p=p: LeNet(bn=True, dropout=p), cfg.lr,
            finish=lambda model: {"probs": _probs(model, data.test_x)},
        ))  # fmt: skip
    return out


def _final_acc(r: dict) -> float:
    return 0.0 if r["diverged"] or r["final"] is None else r["final"]["test_acc"]


def _sweep(results: dict, prefix: str, values: list[float]) -> dict:
    arms = {}
    for arm in ("plain", "bn"):
        rs = [results[f"{prefix}/{arm}/{v:g}"] for v in values]
        arms[arm] = {
            "acc": [_final_acc(r) for r in rs],
            "diverged": [r["diverged"] for r in rs],
            "final_train_loss": [r["final"]["train_loss"] if r["final"] else None for r in rs],
        }
    best = max(max(a["acc"]) for a in arms.values())
    for a in arms.values():
        a["trains"] = [acc >= best - GOOD_MARGIN for acc in a["acc"]]
    return {"values": values, **arms, "best_acc": best}


def _fmt_sweep(s: dict, unit: str) -> str:
    parts = []
    for arm in ("plain", "bn"):
        a = s[arm]
        cells = [
            f"{unit}{v:g}: {100 * acc:.1f}%{' (div)' if dv else ''}"
            for v, acc, dv in zip(s["values"], a["acc"], a["diverged"], strict=True)
        ]
        parts.append(f"{'BN' if arm == 'bn' else 'no BN'}: " + ", ".join(cells))
    return "; ".join(parts)


def verdict_lr(s: dict) -> tuple[str, str]:
    ok = {
        arm: [v for v, t in zip(s["values"], s[arm]["trains"], strict=True) if t]
        for arm in ("plain", "bn")
    }
    top = {arm: max(ok[arm], default=0.0) for arm in ok}
    n = {arm: len(ok[arm]) for arm in ok}
    if top["bn"] > top["plain"] and n["bn"] >= n["plain"]:
        v = "reproduced"
    elif n["bn"] > n["plain"] or top["bn"] > top["plain"]:
        v = "partly"
    else:
        v = "not reproduced"
    return v, (
        f"highest lr within {100 * GOOD_MARGIN:.0f} pts of the best: BN {top['bn']:g} vs no BN "
        f"{top['plain']:g}; lrs that train: BN {n['bn']}/{len(s['values'])}, no BN {n['plain']}/{len(s['values'])}"
    )


def verdict_init(s: dict) -> tuple[str, str]:
    n = {arm: sum(s[arm]["trains"]) for arm in ("plain", "bn")}
    k = len(s["values"])
    v = (
        "reproduced"
        if n["bn"] == k and n["plain"] < k
        else "partly"
        if n["bn"] > n["plain"]
        else "not reproduced"
    )
    return v, f"init scales that train: BN {n['bn']}/{k}, no BN {n['plain']}/{k}"


def regularization(results: dict) -> dict:
    rows = {}
    for arm in ("plain", "bn"):
        for p in ("none", "dropout"):
            r = results[f"reg/{arm}/{p}"]
            tr = r["train_eval"]["test_acc"]  # evaluated on its own training examples
            te = _final_acc(r)
            rows[f"{arm}/{p}"] = {"train_acc": tr, "test_acc": te, "gap": tr - te}
    return rows


def verdict_reg(g: dict) -> tuple[str, str]:
    smaller_gap = g["bn/none"]["gap"] < g["plain/none"]["gap"]
    replaces_dropout = g["bn/none"]["test_acc"] >= g["plain/dropout"]["test_acc"]
    v = (
        "reproduced"
        if smaller_gap and replaces_dropout
        else "partly"
        if smaller_gap or replaces_dropout
        else "not reproduced"
    )
    txt = "; ".join(
        f"{k}: train {100 * r['train_acc']:.1f}% test {100 * r['test_acc']:.1f}% gap "
        f"{100 * r['gap']:.1f} pts"
        for k, r in g.items()
    )
    return v, txt


def verdict_sigmoid(sg: dict) -> tuple[str, str]:
    p, b = sg["plain"]["test_acc"], sg["bn"]["test_acc"]
    v = "reproduced" if p < 0.3 and b >= p + 0.3 else "partly" if b > p + 0.05 else "not reproduced"
    ratio = {
        a: sg[a]["grad_norms_init"][0] / max(sg[a]["grad_norms_init"][-1], 1e-30)
        for a in ("plain", "bn")
    }
    return v, (
        f"10-layer sigmoid net: test acc BN {100 * b:.1f}% vs no BN {100 * p:.1f}%; at init "
        f"first/last-layer gradient norm ratio BN {ratio['bn']:.2g}, no BN {ratio['plain']:.2g}"
    )


def verdict_ensemble(e: dict) -> tuple[str, str]:
    better1 = e["ensemble_top1_err"] < e["best_member_top1_err"]
    better5 = e["ensemble_top5_err"] <= e["best_member_top5_err"]
    v = (
        "reproduced"
        if better1 and better5
        else "partly"
        if better1 or better5
        else "not reproduced"
    )
    return v, (
        f"{e['k']} BN LeNets: ensemble top-1 error {100 * e['ensemble_top1_err']:.2f}% vs best member "
        f"{100 * e['best_member_top1_err']:.2f}%; top-5 {100 * e['ensemble_top5_err']:.2f}% vs "
        f"{100 * e['best_member_top5_err']:.2f}%"
    )


def ensemble_errors(member_probs: list[torch.Tensor], y: torch.Tensor) -> dict:
    """Top-1/top-5 error of each member and of the average of their class probabilities."""

    def errs(p: torch.Tensor) -> tuple[float, float]:
        top = p.topk(min(5, p.shape[1]), dim=1).indices
        return (
            1 - (top[:, 0] == y).float().mean().item(),
            1 - (top == y[:, None]).any(1).float().mean().item(),
        )

    members = [errs(p) for p in member_probs]
    ens = errs(torch.stack(member_probs).mean(0))
    best = min(range(len(members)), key=lambda i: members[i])
    return {
        "k": len(members),
        "member_top1_err": [m[0] for m in members],
        "member_top5_err": [m[1] for m in members],
        "best_member": best,
        "best_member_top1_err": members[best][0],
        "best_member_top5_err": members[best][1],
        "ensemble_top1_err": ens[0],
        "ensemble_top5_err": ens[1],
    }


def summarize(cfg: Config, data: TensorData, results: dict[str, dict]) -> dict:
    by_name = {a.name: a for a in arms(cfg, data)}
    sig = {}
    for arm in ("plain", "bn"):
        name = f"sigmoid/{arm}"
        at_init = build(by_name[name], cfg.seed)  # the weights this arm started from
        sig[arm] = {
            "test_acc": _final_acc(results[name]),
            "grad_norms_init": layer_grad_norms(at_init, data.train_x[:256], data.train_y[:256]),
            "grad_norms_end": results[name]["grad_norms_end"],
            "curve": [e["test_acc"] for e in results[name]["records"]],
            "steps": [e["step"] for e in results[name]["records"]],
        }
    members = [results[f"ensemble/{i}"]["probs"] for i in range(cfg.ensemble)]
    ens = ensemble_errors(members, data.test_y)
    lr_s = _sweep(results, "lr", _floats(cfg.lrs, "lrs"))
    init_s = _sweep(results, "init", _floats(cfg.init_scales, "init_scales"))
    reg = regularization(results)
    verdicts = {}
    for key, (v, txt) in {
        "learning_rate": verdict_lr(lr_s),
        "initialization": verdict_init(init_s),
        "regularization": verdict_reg(reg),
        "sigmoid": verdict_sigmoid(sig),
        "ensemble": verdict_ensemble(ens),
    }.items():
        verdicts[key] = {"verdict": v, "numbers": txt}
    return {
        "train_examples": data.n_train,
        "test_examples": len(data.test_x),
        "verdicts": verdicts,
        "learning_rate": lr_s,
        "initialization": init_s,
        "regularization": reg,
        "sigmoid": sig,
        "ensemble": ens,
        "runs": len(results),
        "wall_seconds": sum(r["wall_seconds"] for r in results.values()),
    }


run = experiment_runner(__name__)


PLOTS = (
    "claims_lr.png",
    "claims_init.png",
    "claims_regularization.png",
    "claims_sigmoid.png",
    "claims_ensemble.png",
)


COLORS = {"plain": "tab:gray", "bn": "tab:blue"}  # in the figures: without BN gray, with BN blue
NAMES = {"plain": "no BN", "bn": "BN"}


def plot(summary: dict, out: Path) -> None:
    """One figure per claim (PLOTS)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    c = summary["config"]

    for key, fname, xlabel, title in (
        ("learning_rate", PLOTS[0], "learning rate (log scale)", "Learning-rate sweep"),
        ("initialization", PLOTS[1], "init scale: multiple of He init (log scale)",
         "Init-scale sweep"),
    ):  # fmt: skip
        s = summary[key]
        fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
        for arm, m in (("plain", "o"), ("bn", "s")):
            ax.plot(s["values"], s[arm]["acc"], marker=m, color=COLORS[arm], label=NAMES[arm])
            bad = [(v, a) for v, a, d in zip(s["values"], s[arm]["acc"], s[arm]["diverged"],
                                             strict=True) if d]  # fmt: skip
            if bad:
                ax.plot(*zip(*bad, strict=True), "x", color=COLORS[arm], ms=11, mew=2)
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)  # accuracy's whole range: a diverged net sits at 0
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"final test accuracy (after {c['steps']} steps)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        handles = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        handles.append(style_handle("diverged (counted as 0)", ls="", marker="x", ms=9, mew=2))
        figure_legend(fig, handles, ncols=3)
        fig.suptitle(
            f"{c['depth']}-hidden-layer ReLU net, {c['width']} units, {summary['dataset']}"
        )
        scale_note(fig, summary)
        save_figure(fig, out / fname)

    g = summary["regularization"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
    keys = list(g)
    xs = list(range(len(keys)))
    for dx, what, color in ((-0.2, "train", "tab:green"), (0.2, "test", "tab:purple")):
        bars = ax.bar(
            [x + dx for x in xs], [g[k][f"{what}_acc"] for k in keys], 0.4, color=color,
            label=f"{what} accuracy" + (" (on its own training examples)" if what == "train" else ""),
        )  # fmt: skip
        ax.bar_label(bars, fmt="{:.0%}", fontsize=8, padding=2)

    def tick(k: str) -> str:
        arm, p = k.split("/")
        return f"{NAMES.get(arm, arm)}\n" + (
            f"dropout {c['dropout']:g}" if p == "dropout" else "no dropout"
        )

    ax.set_xticks(xs, [tick(k) for k in keys])
    ax.set_ylim(0, 1.12)  # bars from 0, room for their labels
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("network (3 hidden layers)")
    ax.set_ylabel("accuracy")
    ax.set_title(
        f"Train vs test accuracy after {c['reg_steps']} steps on {c['reg_examples']} examples",
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y")
    figure_legend(fig, ax.containers, ncols=2)
    fig.suptitle("Regularization: the train/test gap with and without BN and dropout")
    scale_note(fig, summary)
    save_figure(fig, out / PLOTS[2])

    sg = summary["sigmoid"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    for arm, m in (("plain", "o"), ("bn", "s")):
        layers = range(1, len(sg[arm]["grad_norms_init"]) + 1)
        kw = {"color": COLORS[arm], "marker": m, "ms": 4}
        axes[0].semilogy(layers, sg[arm]["grad_norms_init"], "-", **kw)
        axes[0].semilogy(layers, sg[arm]["grad_norms_end"], "--", **kw)
        axes[1].plot(sg[arm]["steps"], sg[arm]["curve"], "-", **kw)
    axes[0].set(
        title="(a) Gradient norm per hidden layer, one batch of 256",
        xlabel="hidden layer (1 = input side)", ylabel="‖∂L/∂W‖ (log scale)",
    )  # fmt: skip
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_ylim(0, 1)  # from 0: a net that does not train stays near chance level
    axes[1].set(
        title="(b) Test accuracy during training", xlabel="training step",
        ylabel="test accuracy",
    )  # fmt: skip
    for ax in axes:
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
    figure_legend(
        fig,
        [
            style_handle(NAMES[a], COLORS[a], marker=m, ms=4)
            for a, m in (("plain", "o"), ("bn", "s"))
        ]
        + [
            style_handle("(a) at initialization", ls="-"),
            style_handle("(a) after training", ls="--"),
        ],
        ncols=4,
    )
    fig.suptitle(
        f"10-layer sigmoid net ({c['width']} units), lr {c['sigmoid_lr']:g}, with and without BN"
    )
    scale_note(fig, summary)
    save_figure(fig, out / PLOTS[3])

    e = summary["ensemble"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    names = [f"member {i + 1}" for i in range(e["k"])] + ["ensemble"]
    bars = ax.bar(
        names, [*e["member_top1_err"], e["ensemble_top1_err"]],
        color=["tab:blue"] * e["k"] + ["tab:orange"],
    )  # fmt: skip
    ax.bar_label(bars, fmt="{:.1%}", fontsize=8, padding=2)
    ax.margins(y=0.15)
    ax.set_xlabel("BN LeNet (members differ in seed and dropout)")
    ax.set_ylabel("top-1 test error")
    ax.set_title(f"Ensemble of {e['k']} BN LeNets: mean of class probabilities", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Ensembles of BN networks")
    scale_note(fig, summary)
    save_figure(fig, out / PLOTS[4])


PAPER = {
    "learning_rate": (
        "BN allows much higher learning rates",
        "x5 and x30 lr train (BN-x5, BN-x30); x5 made Inception overflow",
    ),
    "initialization": (
        "BN makes training less sensitive to the init scale",
        "'be less careful about initialization'",
    ),
    "regularization": (
        "BN regularizes; dropout can be removed",
        "BN-x5 trains without dropout, no loss in accuracy",
    ),
    "sigmoid": ("BN lets saturating nets train", "BN-x5-Sigmoid 69.8%; Inception-Sigmoid < 0.1%"),
    "ensemble": (
        "an ensemble of BN nets beats its members",
        "6 nets: 4.9% top-5 vs 7.82% single (validation)",
    ),
}


def describe(summary: dict) -> str:
    return "\n".join(
        f"{k:15s} {v['verdict']:15s} {v['numbers']}" for k, v in summary["verdicts"].items()
    )


def report(summary: dict, run_dir: Path) -> ReportSections:
    v = summary["verdicts"]
    c = summary["config"]
    claims = [Claim(PAPER[k][0], PAPER[k][1], v[k]["numbers"], v[k]["verdict"]) for k in PAPER]
    caps = [
        "final test accuracy per learning rate",
        "final test accuracy per init scale",
        "train and test accuracy: the gap is the overfitting",
        "per-layer gradient norms; test accuracy",
        "top-1 error of each member and of the ensemble",
    ]
    lr, init = summary["learning_rate"], summary["initialization"]
    tables = [
        Table(
            "Learning-rate sweep",
            ["lr", "no BN acc", "BN acc", "no BN diverged", "BN diverged"],
            [
                [f"{x:g}", f"{100 * a:.1f}%", f"{100 * b:.1f}%", str(da), str(db)]
                for x, a, b, da, db in zip(
                    lr["values"],
                    lr["plain"]["acc"],
                    lr["bn"]["acc"],
                    lr["plain"]["diverged"],
                    lr["bn"]["diverged"],
                    strict=True,
                )
            ],
        ),
        Table(
            "Init-scale sweep",
            ["scale", "no BN acc", "BN acc"],
            [
                [f"{x:g}", f"{100 * a:.1f}%", f"{100 * b:.1f}%"]
                for x, a, b in zip(
                    init["values"], init["plain"]["acc"], init["bn"]["acc"], strict=True
                )
            ],
        ),
    ]
    return ReportSections(
        title=f"The paper's claims for BN, measured ({summary['dataset']})",
        intro=(
            f"Plain fully-connected nets ({c['depth']} hidden layers of {c['width']} units, momentum SGD, "
            f"{c['steps']} steps at batch {c['batch_size']}) on {summary['train_examples']} training and "
            f"{summary['test_examples']} test images, with and without BN before each nonlinearity. A "
            f"setting 'trains' if its final test accuracy is within {100 * GOOD_MARGIN:.0f} points of the "
            "best setting of that sweep."
        ),
        claims=claims,
        figures=[Figure(p, cap) for p, cap in zip(PLOTS, caps, strict=True)],
        tables=tables,
        notes=[
            f"{summary['runs']} nets trained; one seed each, so differences of a point or two are noise."
        ],
    )
