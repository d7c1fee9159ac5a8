"""The map never throws away a run (issue 21, items 1, 5 and 7): no evidence is said on the page, a failing stage is
recorded and the report still renders, too few prompts fail before anything is written, and an interrupted or
killed map resumes from its finished stages with nothing half-written."""

from __future__ import annotations

import html
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safetyscope.cli.main import app
from safetyscope.methods.circuit import pipeline
from safetyscope.methods.circuit.evidence import readable_layers
from safetyscope.methods.circuit.results import ModelInfo, ProbeLayer, ProbeSummary
from safetyscope.methods.circuit.stages import Evidence, assign_stages, missing_stages

WORDS = {"harmful": ["red", "big", "old", "new", "hot", "wet", "dry", "fat", "raw", "odd"],
         "harmless": ["tan", "shy", "sad", "low", "far", "dim", "icy", "coy", "sly", "apt"]}


def _files(folder: Path, n: int = 10) -> tuple[Path, Path]:
    """Two groups of ``n`` prompts that differ in one three-letter word: on the tiny random model no probe layer
    beats its shuffled-label control (the case that crashed the detection stage)."""
    harmful, harmless = folder / "h.jsonl", folder / "s.jsonl"
    for path, label in ((harmful, "harmful"), (harmless, "harmless")):
        path.write_text("".join(json.dumps({"prompt": f"Tell me about the {w} box.", "label": label}) + "\n"
                                for w in WORDS[label][:n]))
    return harmful, harmless


def _json_files_are_whole(out: Path) -> list[Path]:
    """Every JSON file under ``out`` parses (atomic writes leave only hidden temporary files behind)."""
    files = [p for p in out.rglob("*.json") if not p.name.startswith(".")]
    for p in files:
        json.loads(p.read_text())  # raises on a half-written file
    return files


def test_no_probe_evidence_is_said_not_crashed():
    probe = ProbeSummary(ModelInfo("m", 3), tuple(ProbeLayer(i, 0.5, 0.6) for i in range(3)), ProbeLayer(0, 0.5, 0.6))
    assert readable_layers(probe, 3) == "*"  # no layer beats the control: every layer is searched
    ev = Evidence(n_layers=3, probe_acc=[0.5, 0.45, 0.5], probe_control=[0.6, 0.6, 0.6])
    assert assign_stages(ev) == []  # detection_stage used to raise StopIteration here
    assert missing_stages(ev)["detection"] == "no evidence: no layer's probe accuracy beats the shuffled-label control"


def test_a_report_without_any_result_says_so_for_every_stage(tmp_path):
    from safetyscope.methods.circuit.results import StageRun
    from safetyscope.report.circuit import render_map

    rep = render_map(tmp_path, {}, [StageRun("probe", "failed", 1.0, "ValueError: boom"), StageRun("dla", "skipped")], "m")
    page = rep.path.read_text()
    assert rep.stages == [] and set(rep.missing) == {"detection", "evaluation", "decision", "production"}
    assert "No circuit stage has evidence" in page and "no evidence: no probe results" in page
    assert "ValueError: boom" in page and "not run" in page and rep.headline == "m: no stage produced a result."


def test_map_on_barely_different_groups_ends_with_a_report(tiny_dir, tmp_path):
    harmful, harmless = _files(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["map", str(tiny_dir), "--quick", "--quiet", "--json", "--out", str(out),
                                   "--harmful", str(harmful), "--harmless", str(harmless)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    page = (out / "report.html").read_text()
    assert summary["report"] == str(out / "report.html") and "Refusal circuit of" in page
    assert set(summary["status"]) == set(pipeline.STAGES) and summary["status"]["report"] == "done"
    for stage, error in summary["failed"].items():  # whatever could not be computed is named on the page
        assert stage in page and error.split(":")[0] in page
    report = json.loads((out / "map" / "stages" / "report.json").read_text())["result"]
    assert "no better than its control" in summary["headline"]
    assert report["missing_stages"]["detection"] == "no evidence: no layer's probe accuracy beats the shuffled-label control"
    assert set(report["missing_stages"]) | {s["name"] for s in report["stages"]} == {
        "detection", "evaluation", "decision", "production"}
    assert all(why.startswith("no evidence: ") and html.escape(why) in page for why in report["missing_stages"].values())


def test_a_failing_stage_is_recorded_and_the_map_goes_on(tiny_dir, tmp_path, monkeypatch):
    def broken(_x):
        raise RuntimeError("simulated failure in the trace stage")

    monkeypatch.setitem(pipeline.COMPUTE, "trace", broken)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["map", str(tiny_dir), "--quick", "--quiet", "--json", "--out", str(out),
                                   "--stages", "probe,trace,dla,report"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    log = out / "map" / "errors" / "trace.txt"
    assert summary["failed"] == {"trace": f"RuntimeError: simulated failure in the trace stage (traceback: {log})"}
    assert "Traceback" in log.read_text() and "in broken" in log.read_text()
    assert summary["status"]["dla"] == "done" and summary["status"]["report"] == "done"
    stages = out / "map" / "stages"
    assert not (stages / "trace.json").exists()  # a failure is not cached: the next run tries again
    page = (out / "report.html").read_text()
    assert "simulated failure in the trace stage" in page and "Direct logit attribution" in page

    monkeypatch.undo()
    res = CliRunner().invoke(app, ["map", str(tiny_dir), "--quick", "--quiet", "--json", "--out", str(out),
                                   "--stages", "probe,trace,dla,report"])
    assert res.exit_code == 0, res.output
    status = json.loads(res.stdout)["status"]
    assert status["probe"] == "cached" and status["trace"] == "done" and not json.loads(res.stdout)["failed"]


def test_a_broken_report_builder_still_writes_a_page(tiny_dir, tmp_path, monkeypatch):
    from safetyscope.report import circuit

    def broken(*_a, **_k):
        raise KeyError("renamed_key")

    monkeypatch.setattr(circuit, "build_report", broken)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["map", str(tiny_dir), "--quick", "--quiet", "--out", str(out), "--stages", "dla,report"])
    assert res.exit_code == 0, res.output
    page = (out / "report.html").read_text()
    assert "renamed_key" in page and "dla" in page  # the error and every stage's status

    monkeypatch.undo()  # the bug fixed: the rerun builds the page again instead of keeping the failed one
    res = CliRunner().invoke(app, ["map", str(tiny_dir), "--quick", "--quiet", "--json", "--out", str(out),
                                   "--stages", "dla,report"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == {**json.loads(res.stdout)["status"], "dla": "cached", "report": "done"}
    assert "renamed_key" not in (out / "report.html").read_text()


def test_too_few_prompts_fail_before_anything_is_written(tiny_dir, tmp_path):
    harmful, harmless = _files(tmp_path, n=3)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["map", str(tiny_dir), "--quick", "--out", str(out),
                                   "--harmful", str(harmful), "--harmless", str(harmless)])
    assert res.exit_code == 2, res.output
    assert "too few to split" in res.output and "give at least 5" in res.output and "Traceback" not in res.output
    assert not out.exists()  # no stray map/prompts/harmful_fit.jsonl


def test_the_map_loads_the_model_once(tiny_dir, tmp_path, monkeypatch):
    import safetyscope.models as models

    calls = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    res = CliRunner().invoke(app, ["map", str(tiny_dir), "--quick", "--quiet", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert len(calls) == 1


def _start(tiny_dir: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "SAFETYSCOPE_QUIET": "1"}
    return subprocess.Popen([sys.executable, "-m", "safetyscope", "map", str(tiny_dir), "--quick", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # an ignored SIGINT is inherited


def _wait_for_stages(proc: subprocess.Popen, stages: Path, n: int, timeout: float = 600) -> set[str]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = {p.stem for p in stages.glob("*.json")} if stages.is_dir() else set()
        if len(done) >= n:
            return done
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no {n} finished stages after {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "kill-9"])
def test_an_interrupted_map_resumes_from_its_finished_stages(tiny_dir, tmp_path, sig):
    out = tmp_path / "out"
    stages = out / "map" / "stages"
    proc = _start(tiny_dir, out)
    _wait_for_stages(proc, stages, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    kept = {p.stem for p in stages.glob("*.json")}
    assert kept and "report" not in kept
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err[-3000:]
        assert "Traceback" not in err and "every finished stage is saved" in err and "rerun the same command" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert {p.stem for p in _json_files_are_whole(stages)} == kept  # every stage file is whole
    _json_files_are_whole(out)

    proc = subprocess.run([sys.executable, "-m", "safetyscope", "map", str(tiny_dir), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "SAFETYSCOPE_QUIET": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in kept:  # the finished stages are reused, not recomputed
        assert f"[map] {stage}: cached" in proc.stderr
    assert (out / "report.html").is_file() and {p.stem for p in stages.glob("*.json")} == set(pipeline.STAGES)
    _json_files_are_whole(out)
