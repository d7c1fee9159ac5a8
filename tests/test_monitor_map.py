"""The map's "would we notice?" stage and report section, on a tiny random model (no other stage needed)."""

from __future__ import annotations

import html

import torch

from safetyscope.methods.circuit.inputs import Budget, MapConfig, MapPrompts, StageInputs
from safetyscope.methods.circuit.pipeline import COMPUTE, STAGES
from safetyscope.methods.circuit.steps_defence import monitor_stage
from safetyscope.methods.direction.artifact import Direction
from safetyscope.report.circuit_defence import defence_section
from safetyscope.testing import tiny_model


def _inputs(lm, out, done):
    config = MapConfig(quick=True)
    return StageInputs(lm, config, Budget.of(config), out, MapPrompts.of(None, None), {}, done)


def test_monitor_stage_measures_before_and_under_the_maps_direction(tmp_path):
    assert STAGES.index("monitor") == STAGES.index("report") - 1 and COMPUTE["monitor"] is monitor_stage
    lm = tiny_model("llama")
    r = torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(0))
    Direction(r, 1).save(tmp_path / "direction" / "artifact")
    res = monitor_stage(_inputs(lm, tmp_path, {"direction": {"find": {"layer": 1}}}))
    assert (tmp_path / "monitor" / "artifact" / "artifact.json").is_file()
    n_h, n_s = res["n_eval"]
    assert n_h == n_s == Budget.of(MapConfig(quick=True)).n_eval
    for cond in ("clean", "ablated"):
        c = res[cond]
        assert 0.0 <= c["monitor"]["tpr_at_threshold"] <= 1.0 and 0 <= c["harmful_answered_flagged"] <= c["harmful_answered"]
    assert res["tpr_drop"] == res["clean"]["monitor"]["tpr_at_threshold"] - res["ablated"]["monitor"]["tpr_at_threshold"]
    page = defence_section(res).html()
    assert "Would we notice?" in page and "refusal direction ablated (layer 1)" in page


def test_monitor_stage_without_a_direction_measures_clean_only_and_the_section_says_so(tmp_path):
    res = monitor_stage(_inputs(tiny_model("llama"), tmp_path, {}))
    assert res["ablated"] is None and res["clean"]["monitor"]["auroc"] >= 0.0
    assert "only the unmodified model was measured" in defence_section(res).html()
    failed = defence_section({"error": "ValueError: <boom>"}).html()
    assert "No evidence" in failed and html.escape("<boom>") in failed and "<boom>" not in failed
