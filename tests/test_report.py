"""report.html: self-contained, shows claims/settings/versions, renders in headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from batchnorm.research.engine.report import render_report
from batchnorm.research.engine.runner import read_json
from batchnorm.research.experiments import fig1

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if shutil.os.path.exists("/usr/bin/chromium") else None
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep")
    cfg = fig1.Config(dataset="digits", steps=100, eval_every=50, workers=1)
    fig1.run(cfg, out, quiet=True)
    render_report(out)
    return out


def test_report_is_self_contained_with_claims_settings_versions(run_dir):
    page = (run_dir / "report.html").read_text()
    assert (
        re.search(r"<(img|script|link)[^>]+(src|href)=['\"](?!data:)", page) is None
    )  # no external refs
    imgs = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(imgs) == 1
    png = base64.b64decode(imgs[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == (run_dir / "fig1.png").read_bytes()
    assert "Paper vs our measurement" in page
    s = read_json(run_dir / "summary.json")
    assert f"{100 * s['runs']['bn']['final_test_accuracy']:.2f}%" in page
    cfg = read_json(run_dir / "config.json")
    assert f"<td>{cfg['env']['torch']}</td>" in page  # library versions
    assert "<td>lr</td><td>0.5</td>" in page  # run settings
    assert "Wall time" in page


def test_report_escapes_html(run_dir, tmp_path):
    import shutil as sh

    d = tmp_path / "r"
    sh.copytree(run_dir, d)
    s = read_json(d / "summary.json")
    s["data_source"] = "<script>alert(1)</script>"
    (d / "summary.json").write_text(__import__("json").dumps(s))
    page = render_report(d).read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian package chromium)"
)
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    """Load the page; a small script marks the title once every image has decoded."""
    page = (run_dir / "report.html").read_text()
    probe = (
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.title=(i.length>0&&i.every(x=>x.complete&&x.naturalWidth>0))"
        "?'IMAGES_OK_'+i.length+'_'+i[0].naturalWidth:'IMAGES_BROKEN';});</script>"
    )
    probed = tmp_path / "probe.html"
    probed.write_text(page.replace("</body>", probe + "</body>"))
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probed.as_uri(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"<title>(.*?)</title>", r.stdout)
    assert m and m.group(1).startswith("IMAGES_OK_1_"), (m and m.group(1), r.stderr[-1000:])
    assert int(m.group(1).rsplit("_", 1)[1]) > 500  # the figure decoded at full width
    assert "Paper vs our measurement" in r.stdout
