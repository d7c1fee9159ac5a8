"""The benchmarks run end to end (on a tiny random model; the figures themselves come from the real runs)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_patching_benchmark_compares_every_grid(tmp_path, capsys, bench_module):
    out = tmp_path / "patching.json"
    assert bench_module("patching").main(["--model", "tiny:llama", "--heads", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["grid_cells"]) == {"component", "position", "head"}
    n_layers = 3  # the tiny llama: 3 blocks x 3 components, at each post-instruction position
    assert res["grid_cells"]["component"] == n_layers * 3
    assert res["grid_cells"]["position"] > res["grid_cells"]["component"]
    for grid, a in res["agreement"].items():
        assert -1.0 <= a["spearman"] <= 1.0 and a["n_cells"] == res["grid_cells"][grid]
        assert res["speedup"][grid]["wall"] > 0
    assert "exact position" in capsys.readouterr().out


def test_direction_variants_benchmark_measures_every_variant(tmp_path, capsys, bench_module):
    out = tmp_path / "variants.json"
    variants = "zero,mean,partial:0.5,blocks:1-2,cap,template"
    assert bench_module("direction_variants").main(["--model", "tiny:llama", "--candidates", "1:-1,2:-2", "--variants", variants,
                                             "--n-val", "3", "--max-new-tokens", "3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["layer"], r["variant"]) for r in res["rows"]] == [(b, v) for b in (1, 2) for v in variants.split(",")]
    for r in res["rows"]:
        assert 0.0 <= r["judged_refusal"] <= 1.0 and 0.0 <= r["kl_median"] <= r["kl_max"]
    assert any(r["kl_mean"] > 0 for r in res["rows"])  # the interventions change the model
    assert "template" in capsys.readouterr().out


def test_direction_variants_benchmark_measures_saved_artifacts(tmp_path, bench_module):
    from safetyscope.methods.direction.artifact import Direction

    torch.manual_seed(0)
    Direction(torch.randn(32), 1, -1, meta={"refined": True}).save(tmp_path / "art")
    out = tmp_path / "variants.json"
    assert bench_module("direction_variants").main(["--model", "tiny:llama", "--candidates", "", "--artifacts", str(tmp_path / "art"),
                                             "--n-val", "3", "--max-new-tokens", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layer"], r["variant"]) for r in rows] == [(1, "artifact:refined zero")] and rows[0]["kl_mean"] > 0


def test_direction_variants_benchmark_measures_on_given_prompt_files(tmp_path, bench_module):
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": p, "label": "harmful"}) + "\n" for p in ("Hack~ a bank", "Steal~ a car")))
    out = tmp_path / "variants.json"
    assert bench_module("direction_variants").main(["--model", "tiny:llama", "--candidates", "1:-1", "--variants", "mean",
                                             "--harmful", str(harmful), "--n-val", "3", "--max-new-tokens", "2",
                                             "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_val"] == [2, 3]  # the file's 2 harmful prompts, 3 built-in harmless ones


def test_refine_pool_benchmark_measures_each_variant_on_unseen_val_prompts(tmp_path, capsys, bench_module):
    from safetyscope.methods.direction.artifact import Direction

    torch.manual_seed(0)
    Direction(torch.randn(32), 1, -1, ablation="mean", targets=torch.zeros(3)).save(tmp_path / "unrefined")
    out = tmp_path / "rows.jsonl"
    assert bench_module("refine_pool").main(["--model", "tiny:llama", "--direction", str(tmp_path / "unrefined"),
                                             "--variants", "none,4:20,all:40", "--steps", "1", "--n-val", "3",
                                             "--max-new-tokens", "2", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["none", "4:20", "all:40"]
    assert all(r["refusal_after"]["n"] == 43 - 3 for r in rows)  # the built-in val split less the chooser's 3
    assert rows[1]["kl_first_token"] != rows[0]["kl_first_token"]  # refinement moved the direction
    assert "decision prompts 40 harmful" in capsys.readouterr().out


def test_monitor_benchmark_times_both_ways_and_the_time_inside_the_hooks(tmp_path, tiny_qwen2_dir, bench_module):
    from safetyscope.methods.monitor import fit_monitor
    from safetyscope.models import load_model
    from test_monitor import CALIBRATION, HARMFUL, HARMLESS

    lm = load_model(str(tiny_qwen2_dir))
    fit_monitor(lm, HARMFUL, HARMLESS, calibration=CALIBRATION, fpr=0.1, n_readers=2, protect=4).save(tmp_path / "m")
    res = bench_module("monitor").main(["--model", str(tiny_qwen2_dir), "--monitor", str(tmp_path / "m"), "--out",
                                        str(tmp_path), "--gen-prompts", "2", "--max-new-tokens", "3", "--batch-size", "2",
                                        "--repeats", "1"])
    o = res["overhead"]
    assert o["extra_forward_calls"] == 0 and o["forward_calls_per_round"]["plain"] == 3  # prefill + 2 steps
    assert 0 < o["hook_s"] < o["hook_round_s"] and 0 < o["hook_share"] < 1
    from safetyscope.methods.monitor import watch

    assert watch.Watch._before.__name__ == "_before"  # the timing wrappers were removed
