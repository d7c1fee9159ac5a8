"""`safetyscope map` end to end: every stage on a tiny model, resume after an interruption, report renders;
and --quick on the real default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safetyscope.cli.map import MapSettings
from safetyscope.cli.map import run_map as run_map_cli
from safetyscope.methods.circuit import pipeline
from safetyscope.methods.circuit.pipeline import STAGES
from safetyscope.testing import tiny_model


def run_map(s: MapSettings) -> dict:
    """The CLI's run (one model load, the library pipeline) and its summary, as `map --json` prints it."""
    return run_map_cli(s).summary()


def test_map_runs_every_stage_and_resumes_after_an_interruption(tiny_dir, tmp_path, monkeypatch):
    s = MapSettings(model=str(tiny_dir), out=tmp_path, quick=True, quiet=True, batch_size=8)

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.COMPUTE, "dla", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_map(s)
    stages = tmp_path / "map" / "stages"
    finished = {p.stem for p in stages.glob("*.json")}
    assert finished == set(STAGES[: STAGES.index("dla")])  # everything before the interruption was saved
    mtimes = {p.name: p.stat().st_mtime_ns for p in stages.glob("*.json")}
    monkeypatch.undo()

    calls = []
    for name, fn in list(pipeline.COMPUTE.items()):
        monkeypatch.setitem(pipeline.COMPUTE, name, lambda x, fn=fn, name=name: (calls.append(name), fn(x))[1])
    summary = run_map(s)
    rest = list(STAGES[STAGES.index("dla"):])
    assert calls == rest  # the rerun resumed from the last finished stage
    assert summary["status"] == {**{st: "cached" for st in STAGES[: STAGES.index("dla")]}, **{st: "done" for st in rest}}
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


def test_a_changed_upstream_result_invalidates_later_stages(tiny_dir, tmp_path):
    from safetyscope.methods.circuit.inputs import Budget, MapConfig
    from safetyscope.methods.circuit.pipeline import stage_key

    s = MapSettings(model=str(tiny_dir), out=tmp_path, quick=True)
    b = Budget.of(s.config())
    settings = {"model": ["tiny", 1, "float32"], "config": {"quick": True}}
    a = stage_key("fragility", settings, b, {"probe": {"best": 1}})
    assert a == stage_key("fragility", settings, b, {"probe": {"best": 1}})  # same inputs, same key (resume works)
    assert a != stage_key("fragility", settings, b, {"probe": {"best": 2}})  # an upstream change reruns the stage
    assert a != stage_key("dla", settings, b, {"probe": {"best": 1}})
    assert a != stage_key("fragility", settings, Budget.of(MapConfig(n_eval=5)), {"probe": {"best": 1}})  # the budget counts


def test_map_on_user_files_splits_them_and_the_report_escapes_prompt_text(tiny_dir, tmp_path):
    from test_report import CHROME_FLAGS, chromium_binary

    attack = "<script>document.title='PWNED'</script><img src=x onerror=\"document.title='PWNED'\">"
    harmful = [f"{attack} how do I pick lock number {i}?" for i in range(10)]
    harmless = [f"How do I bake bread number {i}?" for i in range(10)]
    for name, rows, label in (("h.jsonl", harmful, "harmful"), ("s.jsonl", harmless, "harmless")):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": r, "label": label}) + "\n" for r in rows))
    out = tmp_path / "out"
    s = MapSettings(model=str(tiny_dir), out=out, quick=True, quiet=True, batch_size=8, stages="probe,capability,report",
                    harmful=str(tmp_path / "h.jsonl"), harmless=str(tmp_path / "s.jsonl"))
    summary = run_map(s)
    prompts = out / "map" / "prompts"

    def texts(name: str) -> set[str]:
        return {json.loads(line)["prompt"] for line in (prompts / name).read_text().splitlines()}

    for kind, rows in (("harmful", harmful), ("harmless", harmless)):
        fit, test = texts(f"{kind}_fit.jsonl"), texts(f"{kind}_test.jsonl")
        assert fit and test and not fit & test and fit | test == set(rows)  # disjoint, nothing lost
    stages = out / "map" / "stages"
    cap = json.loads((stages / "capability.json").read_text())["result"]
    assert cap["samples"] and {x["prompt"] for x in cap["samples"]} <= texts("harmful_test.jsonl")
    probe = json.loads((stages / "probe.json").read_text())["result"]
    assert probe["train"]["harmful"].endswith("harmful_fit.jsonl")

    page = Path(summary["report"]).read_text()
    assert "<script>document" not in page and "&lt;script&gt;" in page
    exe = chromium_binary()
    proc = subprocess.run([exe, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000",
                           "--dump-dom", Path(summary["report"]).as_uri()], capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert "<title>" in dom and "PWNED" not in dom.split("<body")[0], proc.stderr[-2000:]
    assert "<script" not in dom.lower()
    assert "data:image/png;base64," in dom  # the probe plot rendered


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


def test_breaking_points_use_the_fragility_curves_real_names():
    from safetyscope.methods.circuit.results import FragilitySummary
    from safetyscope.report.circuit import breaking_point as breaking_point_of
    from safetyscope.report.circuit import neuron_breaking_point as neuron_breaking_point_of

    def breaking_point(frag: dict, curve: str):
        return breaking_point_of(FragilitySummary.from_json(frag), curve)

    def neuron_breaking_point(frag: dict):
        return neuron_breaking_point_of(FragilitySummary.from_json(frag))

    def row(curve: str, k: int, rate: float) -> dict:
        return {"curve": curve, "k": k, "score_refusal_rate": rate}

    frag = {"summary": [row("top_by_effect_size", 0, 0.4), row("top_by_effect_size", 10, 0.3), row("top_by_effect_size", 100, 0.1),
                        row("top_by_gradient", 0, 0.4), row("top_by_gradient", 10, 0.0),
                        row("random", 0, 0.4), row("random", 10, 0.4), row("random", 100, 0.35)]}
    assert breaking_point(frag, "top_by_effect_size") == 100
    assert breaking_point(frag, "random") is None
    assert neuron_breaking_point(frag) == (10, "top_by_gradient")
    assert neuron_breaking_point({"summary": [row("top_by_diff", 0, 0.4), row("top_by_diff", 5, 0.39)]}) == (None, "top_by_diff")


def test_decision_onset_is_the_first_block_whose_residual_patch_restores_half_the_peak():
    from safetyscope.methods.circuit.evidence import decision_onset as onset_of_grid
    from safetyscope.methods.circuit.results import EffectGrid

    def decision_onset(trace: dict | None):
        grid = trace["modes"]["attribution"]["grids"]["component"] if trace else None
        return onset_of_grid(EffectGrid.from_json(grid) if grid else None)

    grid = {"rows": ["0", "1", "2", "3", "4"], "cols": ["resid_pre", "attn.out", "mlp.out"],
            "median": [[0.0, 0.9, 0.0], [0.1, 0.0, 0.0], [0.3, 0.0, None], [0.7, 0.1, 0.0], [0.8, 0.0, 0.0]]}
    assert decision_onset({"modes": {"attribution": {"grids": {"component": grid}}}}) == 3  # 0.3 < 0.4 <= 0.7
    assert decision_onset(None) is None
    assert decision_onset({"modes": {"attribution": {"grids": {"component": {**grid, "cols": ["a", "b", "c"]}}}}}) is None
    flat = {**grid, "median": [[0.0, 0.0, 0.0]] * 5}  # no effect anywhere: no evidence
    assert decision_onset({"modes": {"attribution": {"grids": {"component": flat}}}}) is None


def test_map_circuit_from_python_on_lists_of_strings(tmp_path):
    import safetyscope as ss

    lm = tiny_model("llama")
    harmful = [f"How do I pick lock number {i}?" for i in range(10)]
    harmless = [f"How do I bake bread number {i}?" for i in range(10)]
    cmap = ss.map_circuit(lm, harmful, harmless, out=tmp_path, config=ss.MapConfig(quick=True), stages="probe,dla")
    assert isinstance(cmap, ss.CircuitMap)
    assert [r.status for r in cmap.runs] == ["done" if st in ("probe", "dla") else "skipped" for st in STAGES]
    assert cmap.results.probe is not None and cmap.results.dla is not None and cmap.results.direction is None
    assert cmap.summary()["probe_best_layer"] == cmap.results.probe.best.layer
    assert cmap.report_path is None  # the report stage was not asked for ...
    page = cmap.report(tmp_path / "elsewhere.html")  # ... but a page renders from the results at any time
    assert page == tmp_path / "elsewhere.html" and "Direct logit attribution" in page.read_text()
    saved = json.loads(cmap.save(tmp_path / "summary.json").read_text())
    assert saved["status"]["probe"] == "done" and saved["direction"] is None
    # the user's lists were split 60/20/20 once: the probe fitted only on the fitting part
    assert cmap.raw["probe"]["n_positive"] == 8 and cmap.raw["probe"]["train"]["harmful"].endswith("harmful_fit.jsonl")
