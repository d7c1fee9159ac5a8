"""`neurons ablate --judges` (both judges side by side on a tiny model) and the judge named beside the map
report's refusal figures."""

from __future__ import annotations

import json
import sys

from typer.testing import CliRunner

from safetyscope.methods.circuit.results import CurvePoint, DirectionSummary, FragilitySummary, Results


def test_neurons_ablate_compares_judges_on_its_replies(tiny_dir, tmp_path, monkeypatch):
    from safetyscope.cli.main import app
    from safetyscope.methods.neurons.artifact import NeuronSet

    NeuronSet([(0, 3), (1, 10), (2, 5)]).save(tmp_path / "set")
    (tmp_path / "h18n_never.py").write_text("def comply(prompt, reply):\n    return False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["neurons", "ablate", str(tiny_dir), "--set", str(tmp_path / "set"), "--n-eval", "2",
            "--max-new-tokens", "3", "--out", str(tmp_path / "run"), "--json"]
    res = CliRunner().invoke(app, [*args, "--judges", "phrase,h18n_never:comply"])
    assert res.exit_code == 0, res.output[-2000:]
    out = json.loads(res.stdout)
    assert out["judge"] == "phrase" and "replies" not in out["after"]
    cmp = out["judges"]
    assert cmp["judges"] == ["phrase", "h18n_never:comply"]
    assert set(cmp["groups"]) == {"harmful, before", "harmful, ablated"}
    never = cmp["groups"]["harmful, ablated"]["h18n_never:comply"]
    assert never["n"] == out["n_harmful"] == 2 and never["refused"] == 0
    phrase = cmp["groups"]["harmful, ablated"]["phrase"]
    # the same replies as refusal_rate: three-way, the detector can only move refusals to broken
    assert phrase["refused"] <= round(out["after"]["refusal_rate"] * 2)
    assert phrase["refused"] + phrase["complied"] + phrase["broken"] == 2
    pair = cmp["agreement"]["phrase vs h18n_never:comply"]
    assert sum(map(sum, pair["confusion"])) == 4 and 0.0 <= pair["refusal_agreement"] <= 1.0
    assert json.loads((tmp_path / "run" / "neurons" / "ablate.json").read_text())["judges"]["judges"] == cmp["judges"]
    bad = CliRunner().invoke(app, [*args[:-1], "--max-new-tokens", "0", "--judges", "phrase", "--json"])
    assert bad.exit_code != 0 and "--max-new-tokens" in bad.output
    sys.modules.pop("h18n_never", None)


def _results(judge: str | None, **more: int) -> Results:
    extra = ({} if judge is None else {"judge": judge}) | more
    d = DirectionSummary.from_json({"find": {"layer": 5, "position": -1, "ablation": "mean"},
                                    "ablate": {"harmful_refusal_before": {"rate": 0.75},
                                               "harmful_refusal_after": {"rate": 0.125},
                                               "kl_first_token": {"mean": 0.05}, **extra}})
    frag = FragilitySummary((CurvePoint("top_by_effect_size", 0, 0.8), CurvePoint("top_by_effect_size", 10, 0.3),
                             CurvePoint("random", 10, 0.8)),
                            (CurvePoint("direction", 0, 0.8), CurvePoint("direction", 1, 0.1),
                             CurvePoint("random direction", 1, 0.8)))
    return Results(direction=d, fragility=frag)


def test_map_report_names_the_judge_of_each_refusal_figure():
    from safetyscope.report.circuit import cards, headline, implications

    res = _results(None)
    assert res.direction is not None and res.direction.judge == "phrase"  # the map's stage uses the phrase judge
    rows = {r[0]: r for r in implications(res)}
    assert "75% → 12% (judge: phrase)" in rows["Circuit compactness"][1]
    assert "no judge" in rows["Fragility (neurons)"][2] and "no judge" in rows["Fragility (direction)"][2]
    assert "(judge: phrase) from 75%" in headline(res, "m")
    card = next(c for c in cards(res) if c.label == "refusal after direction ablation")
    assert "judge: phrase" in card.note
    named = _results("llm:large")
    assert "(judge: llm:large)" in {r[0]: r for r in implications(named)}["Circuit compactness"][1]
    counted = _results("phrase", n_harmful=43)
    assert counted.direction is not None and counted.direction.n_harmful == 43
    assert "(judge: phrase, 43 held-out prompts) from 75%" in headline(counted, "m")
