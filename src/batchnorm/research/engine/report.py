"""``report.html``: one self-contained page per run directory (PNG plots embedded as base64).

An experiment module supplies its part through ``report(summary, run_dir) -> ReportSections``;
this module adds what every report has: run settings (config.json), wall time, library
versions. ``render_report(run_dir)`` re-renders the page from the files alone, so
``batchnorm report DIR`` works on any finished run.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .runner import atomic_write_bytes, read_json

__all__ = ["Claim", "Figure", "ReportSections", "Table", "pct", "render_report"]


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction as a percentage for tables and claims; "—" for a missing value."""
    return "—" if x is None else f"{100 * x:.{digits}f}%"


@dataclass
class Claim:
    """One row of the 'paper vs ours' table."""

    claim: str  # what the paper says, in our words
    paper: str  # the paper's number or observation
    ours: str  # what this run measured
    verdict: str = ""  # e.g. "consistent", "not reproduced", "n/a (digits data)"


@dataclass
class Figure:
    path: str  # PNG, relative to the run directory
    caption: str = ""


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class ReportSections:
    """An experiment's contribution to its report page."""

    title: str
    intro: str = ""  # a paragraph of plain text
    claims: list[Claim] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
.scale{background:#fff6d5;border-left:4px solid #e0b000;padding:.4em .8em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}.muted{color:#777;font-size:.9em}
"""


def _e(s: object) -> str:
    return html.escape(str(s))


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(run_dir: Path, fig: Figure) -> str:
    p = run_dir / fig.path
    if not p.exists():
        return f"<p class='muted'>(missing figure {_e(fig.path)})</p>"
    b64 = base64.b64encode(p.read_bytes()).decode("ascii")
    return (
        f"<figure><img alt='{_e(fig.caption or fig.path)}' src='data:image/png;base64,{b64}'>"
        f"<figcaption>{_e(fig.caption)}</figcaption></figure>"
    )


def _fmt_seconds(s: float) -> str:
    m, sec = divmod(float(s), 60.0)
    return f"{int(m)} min {sec:.1f} s" if m else f"{sec:.1f} s"


def render_html(sections: ReportSections, run_dir: Path, config: dict, summary: dict) -> str:
    """The page as a string (no file access except the PNGs named in ``sections``)."""
    parts = [f"<h1>{_e(sections.title)}</h1>"]
    scale = summary.get("scale") or {"kind": "unknown", "text": "scale not recorded"}
    parts.append(f"<p class='scale'><b>Scale:</b> {_e(scale['text'])}</p>")
    if sections.intro:
        parts.append(f"<p>{_e(sections.intro)}</p>")
    if sections.claims:
        parts.append("<h2>Paper vs our measurement</h2>")
        at = "" if scale["kind"] == "full" else f" ({scale['kind']} run)"
        parts.append(
            _table(
                ["claim", "paper", "ours", "verdict"],
                [[c.claim, c.paper, c.ours, c.verdict + at] for c in sections.claims],
            )
        )
    for fig in sections.figures:
        parts.append(_img(run_dir, fig))
    for t in sections.tables:
        parts.append(f"<h2>{_e(t.title)}</h2>" + _table(t.header, t.rows))
    if sections.notes:
        parts.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in sections.notes) + "</ul>"
        )
    parts.append("<h2>Run settings</h2>")
    cfg = config.get("config", {})
    parts.append(_table(["setting", "value"], [[k, v] for k, v in cfg.items()]))
    wall = summary.get("wall_seconds")
    if wall is not None:
        parts.append(f"<p>Wall time: <b>{_e(_fmt_seconds(wall))}</b></p>")
    env = config.get("env", {})
    if env:
        parts.append(
            "<h2>Environment</h2>"
            + _table(["library", "version"], [[k, v] for k, v in env.items()])
        )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<p class='muted'>Run directory: {_e(run_dir.resolve())} · rendered {stamp}</p>")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(sections.title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )


def render_report(run_dir: str | os.PathLike) -> Path:
    """Re-render ``run_dir/report.html`` from config.json and summary.json; returns its path."""
    from ..experiments import load_experiment

    run_dir = Path(run_dir)
    for need in ("config.json", "summary.json"):
        if not (run_dir / need).exists():
            raise FileNotFoundError(
                f"{run_dir} is not a finished run directory: {need} is missing "
                f"(run `batchnorm reproduce NAME --out {run_dir}` first, or --resume it)"
            )
    config = read_json(run_dir / "config.json")
    summary = read_json(run_dir / "summary.json")
    module = load_experiment(config["experiment"])
    sections = module.report(summary, run_dir)
    return atomic_write_bytes(
        run_dir / "report.html", render_html(sections, run_dir, config, summary).encode()
    )
