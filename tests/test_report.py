"""The HTML report: self-contained, escaped, and rendered by a real headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from safetyscope.report.circuit_svg import circuit_svg
from safetyscope.report.html import Card, Figure, Replies, Report, Section, Table, Text, TrustedSVG
from safetyscope.report.plots import figure, save_figure

EVIL = '<script>document.title="PWNED"</script><img src=x onerror="document.title=\'PWNED\'">'


def build(tmp_path) -> Report:
    fig, ax = figure()
    ax.plot([0, 1, 2], [0.5, 0.9, 0.7])
    png = save_figure(fig, tmp_path / "plot.png")
    stages = [
        {"name": "detection", "layers": [2, 5], "components": ["blocks.3.resid_post"], "evidence": EVIL},
        {"name": "production", "layers": [20, 23], "components": ["blocks.22.attn.out"], "evidence": "DLA"},
    ]
    return Report(
        title="safetyscope report",
        subtitle="tiny",
        headline=f"Refusal in {EVIL}",
        summary=[Card("probe accuracy", "0.97", EVIL)],
        sections=[
            Section("Plots", [Figure("probe accuracy", png, EVIL), Figure("absent", None)], grid=True),
            Section("Tables", [Table(["component", "effect"], [[EVIL, 0.5], ["blocks.1.mlp.out", 3]]), Text(EVIL)]),
            Section("Replies", [Replies("samples", [{"prompt": EVIL, "before": EVIL, "after": "ok"}])]),
            Section("Circuit", [TrustedSVG(circuit_svg(stages, 24))]),
        ],
        footer=EVIL,
    )


def test_report_escapes_all_text_and_is_self_contained(tmp_path):
    page = build(tmp_path).write(tmp_path / "report.html").read_text()
    assert "<script" not in page.lower()
    assert "onerror=" not in page.replace("onerror=&quot;", "")  # only the escaped form appears
    assert "&lt;script&gt;" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert page.count("data:image/png;base64,") == 1
    assert "Content-Security-Policy" in page


def chromium_binary() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is required for this test: apt-get install chromium (.ci/run installs it)")
    return exe


CHROME_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def test_report_renders_in_headless_chromium_without_running_prompt_scripts(tmp_path, png):
    exe = chromium_binary()
    path = build(tmp_path).write(tmp_path / "report.html")
    proc = subprocess.run(
        [exe, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000", "--dump-dom",
         path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    dom = proc.stdout
    assert "<title>safetyscope report</title>" in dom, proc.stderr[-2000:]
    assert "PWNED" not in re.sub(r"&lt;.*?&gt;", "", dom.split("<body>")[0])  # the title was not rewritten
    assert "<script" not in dom.lower()  # no script element was created from prompt text
    assert len(re.findall(r"<img [^>]*src=\"data:image/png", dom)) == 1  # the plot is present
    assert dom.count("<svg") == 1 and "Detection" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [exe, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}", "--window-size=1200,900",
         path.as_uri()],
        capture_output=True, timeout=120,
    )
    png(shot, 1000, 700)  # the page was painted (decodes, full size, not blank)
