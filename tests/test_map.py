"""`safetyscope map` end to end: every stage on a tiny model, resume after an interruption, report renders;
and --quick on the real default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safetyscope.cli import map as map_cli
from safetyscope.cli.map import STAGES, MapSettings, run_map
from safetyscope.testing import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def test_map_runs_every_stage_and_resumes_after_an_interruption(tiny_dir, tmp_path, monkeypatch):
    s = MapSettings(model=str(tiny_dir), out=tmp_path, quick=True, quiet=True, batch_size=8)

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setitem(map_cli.RUNNERS, "dla", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_map(s)
    stages = tmp_path / "map" / "stages"
    finished = {p.stem for p in stages.glob("*.json")}
    assert finished == set(STAGES[: STAGES.index("dla")])  # everything before the interruption was saved
    mtimes = {p.name: p.stat().st_mtime_ns for p in stages.glob("*.json")}
    monkeypatch.undo()

    calls = []
    for name, fn in list(map_cli.RUNNERS.items()):
        monkeypatch.setitem(map_cli.RUNNERS, name, lambda s_, b, d, fn=fn, name=name: (calls.append(name), fn(s_, b, d))[1])
    summary = run_map(s)
    assert calls == ["dla", "report"]  # the rerun resumed from the last finished stage
    assert {p.name: p.stat().st_mtime_ns for p in stages.glob("*.json") if p.name in mtimes} == mtimes
    report = Path(summary["report"]).read_text()
    assert "Refusal circuit of" in report and "Implications" in report and "<svg" in report
    assert report.count("data:image/png;base64,") >= 3  # probe, neurons and patching plots at least
    saved = json.loads((stages / "report.json").read_text())["result"]
    assert {st["name"] for st in saved["stages"]} >= {"detection", "evaluation", "production"}
    assert all(st["evidence"] for st in saved["stages"])

    monkeypatch.undo()
    calls.clear()
    run_map(MapSettings(model=str(tiny_dir), out=tmp_path, quick=True, quiet=True, stages="report", force=True))
    with pytest.raises(ValueError, match="unknown stage"):
        run_map(MapSettings(model=str(tiny_dir), out=tmp_path, quick=True, quiet=True, stages="probe,nope"))


@pytest.mark.slow
def test_map_quick_on_the_default_model(tmp_path):
    env = {**os.environ, "SAFETYSCOPE_QUIET": "1"}
    proc = subprocess.run([sys.executable, "-m", "safetyscope", "map", "default", "--quick", "--out", str(tmp_path), "--json"],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert set(summary["stages"]) == set(STAGES)
    html = Path(summary["report"]).read_text()
    assert "Qwen" in html or "default" in html
    assert summary["implications"]
