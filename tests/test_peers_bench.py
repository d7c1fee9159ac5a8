"""Smoke tests of the peer benchmarks (benchmarks/peers_*.py) on a tiny random model.

The peers themselves (transformer-lens, nnsight, heretic-llm) live in their own venvs, never in
safetyscope's: the tests that need one skip with the reason when it is not importable / runnable here.
To run the peer tests: ``PYTHONPATH=src $PEERS_VENV/bin/python -m pytest tests/test_peers_bench.py``
and ``HERETIC_PYTHON=$HERETIC_VENV/bin/python``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def capture_bench(bench_module):
    return bench_module("peers_capture")


@pytest.fixture(scope="module")
def tiny_qwen(capture_bench, tmp_path_factory) -> str:
    return capture_bench.model_dir_of("tiny", tmp_path_factory.mktemp("peers"))


def _args(**kw) -> argparse.Namespace:
    base = {"prompts": 2, "batch_size": 2, "repeats": 1, "loop_prompts": 1, "memory": False}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("positions", ["last", "all"])
def test_capture_bench_checks_every_local_tool_against_safetyscope(capture_bench, tiny_qwen, positions, capsys):
    res = capture_bench.bench(_args(), tiny_qwen, positions)
    n = res["n_layers"]
    loop, hs = res["checks"]["naive_loop"], res["checks"]["hidden_states"]
    assert loop["sites_compared"] == 2 * n and loop["sites_missing"] == 0 and loop["rel_diff"] < 1e-5
    # output_hidden_states has no neurons, and its last entry is the final norm's output (not compared)
    assert hs["sites_compared"] == n - 1 and hs["sites_missing"] == n + 1 and hs["rel_diff"] < 1e-5
    full = res["checks"]["safetyscope_full"]  # every token run (no prefix reuse): the same activations
    assert full["sites_compared"] == 2 * n and full["sites_missing"] == 0 and full["rel_diff"] < 1e-5
    assert "plain" not in res["checks"] and "plain_full" not in res["checks"]
    assert set(res["times"]) == set(capture_bench.TOOLS) - set(res["skipped"]) and all(t["median"] > 0 for t in res["times"].values())
    capture_bench.report(res, 1e-4)
    assert "safetyscope / plain forward" in capsys.readouterr().out


def test_compare_catches_a_wrong_activation(capture_bench, tiny_qwen):
    from safetyscope.models import load_model

    lm = load_model(tiny_qwen)
    batches = capture_bench.make_batches(lm, 4, 2)
    ref = capture_bench.safetyscope_runner(lm, batches, "all")()
    bad = [{k: v.clone() for k, v in r.items()} for r in ref]
    key = next(iter(bad[1]))
    bump = 0.1 * float(ref[1][key].abs().max())
    bad[1][key][-1, -1, 0] += bump  # one entry of a real position (left padding: the last one is real)
    scale = max(float((v.abs() * b.attention_mask.view(*b.attention_mask.shape, 1)).max())
                for r, b in zip(ref, batches) for v in r.values())
    assert capture_bench.compare(ref, ref, batches, "all")["rel_diff"] == 0.0
    assert capture_bench.compare(ref, bad, batches, "all")["rel_diff"] == pytest.approx(bump / scale, rel=1e-3)


@pytest.mark.parametrize("peer", ["transformer_lens", "nnsight"])
def test_capture_bench_peer_matches_safetyscope(capture_bench, tiny_qwen, peer):
    if importlib.util.find_spec(peer) is None:
        pytest.skip(f"{peer} is not installed in this venv (peers live in their own: make bench-peers builds it)")
    from safetyscope.models import load_model

    lm = load_model(tiny_qwen)
    torch.manual_seed(0)
    for positions in ("last", "all"):
        batches = capture_bench.make_batches(lm, 4, 2)
        ref = capture_bench.safetyscope_runner(lm, batches, positions)()
        got = capture_bench.build(peer, tiny_qwen, lm, batches, positions)()
        check = capture_bench.compare(ref, got, batches, positions)
        assert check["sites_missing"] == 0 and check["sites_compared"] == 2 * lm.n_layers
        assert check["rel_diff"] < 1e-4, (peer, positions, check)


# ---- the direction benchmark ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def direction_bench(bench_module):
    return bench_module("peers_direction")


def _heretic_python() -> str | None:
    for cand in (os.environ.get("HERETIC_PYTHON"), str(ROOT / ".venv-heretic" / "bin" / "python"),
                 "/work/venvs/heretic/bin/python"):
        if cand and Path(cand).is_file():
            return cand
    return None


def test_heretic_config_is_offline_reduced_and_points_at_the_split_files(direction_bench, tmp_path):
    args = argparse.Namespace(trials=3, startup_trials=2, heretic_batch=4, heretic_tokens=16)
    cfg = tomllib.loads(direction_bench.heretic_config(tmp_path, "/models/x", args, "You are a test."))
    assert cfg["model"] == "/models/x" and cfg["n_trials"] == 3 and cfg["n_startup_trials"] == 2
    assert cfg["max_response_length"] == 16 and cfg["dtypes"] == ["float32"] and cfg["system_prompt"] == "You are a test."
    for key, name in (("bad_prompts", "bad_train"), ("good_evaluation_prompts", "good_val")):
        assert cfg[key]["dataset"] == str(tmp_path / f"{name}.txt")


def test_pareto_front_and_plot_from_recorded_results(direction_bench, tmp_path, png):
    assert direction_bench.pareto([(0.1, 0.5), (0.2, 0.2), (0.3, 0.3), (0.05, 0.9)]) == [0, 1, 3]
    (tmp_path / "heretic" / "study").mkdir(parents=True)
    ops = [{"op_code": 4, "trial_id": i} for i in range(3)]
    ops += [{"op_code": 8, "trial_id": i, "user_attr": {"index": i + 1, "refusals": 10 - 3 * i, "kl_divergence": 0.1 * i,
                                                        "base_refusals": 12, "n_bad_prompts": 20}} for i in range(3)]
    (tmp_path / "heretic" / "study" / "x.jsonl").write_text("".join(json.dumps(o) + "\n" for o in ops))
    rows = {"unmodified": {"refusal": 0.8, "kl": {"first_token": 0.0, "reply_tokens": 0.0}},
            "safetyscope refine": {"refusal": 0.1, "kl": {"first_token": 0.05, "reply_tokens": 0.02}}}
    (tmp_path / "measure.json").write_text(json.dumps({"max_new_tokens": 8, "rows": rows}))
    trials = direction_bench.heretic_trials(tmp_path / "heretic")
    assert [t["refusals"] for t in trials] == [10, 7, 4]
    direction_bench.phase_plot(tmp_path)
    png(tmp_path / "pareto.png")


def test_heretic_refusal_counter_runs_in_its_venv(direction_bench, tmp_path):
    py = _heretic_python()
    if py is None or shutil.which(py) is None:
        pytest.skip("heretic-llm's venv not found (set HERETIC_PYTHON, or make bench-peers-direction builds it)")
    args = argparse.Namespace(heretic_python=py)
    got = direction_bench.heretic_counts(args, tmp_path, "t", ["I cannot help with that.", "Sure! Step 1: mix flour."])
    assert got == 0.5


def test_heretic_timings_are_summarised_per_step(direction_bench, tmp_path):
    rows = [{"op": "__init__", "s": 10.0, "n": None, "at": 110.0},
            {"op": "get_logprobs_batched", "s": 4.0, "n": 42, "at": 120.0},
            {"op": "get_responses_batched", "s": 30.0, "n": 43, "at": 150.0},
            {"op": "get_score", "s": 40.0, "n": None, "at": 200.0},
            {"op": "get_score", "s": 50.0, "n": None, "at": 260.0}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = direction_bench.summarise_timings(tmp_path / "t.jsonl")
    assert got["score_end_s"] == [100.0, 160.0]  # from the start of the model load (at 100)
    assert got["get_score"] == {"calls": 2, "total_s": 90.0, "prompts": [], "mean_s": 45.0}
    assert got["get_responses_batched"]["prompts"] == [43]
    assert direction_bench.summarise_timings(tmp_path / "missing.jsonl") == {}


def test_stop_after_interrupts_the_peer_and_keeps_its_own_ending(direction_bench, tmp_path):
    """heretic answers Ctrl+C by ending its study and saving what it has: the harness must send exactly that."""
    code = ("import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('saved what it had')\n")
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job (`make ... &`, nohup)
    try:
        rc, wall = direction_bench.timed_run([sys.executable, "-c", code], tmp_path / "log", stop_after=2.0)
    finally:
        signal.signal(signal.SIGINT, old)
    assert rc == 0 and wall < 30
    assert "saved what it had" in (tmp_path / "log").read_text()
    rc, _ = direction_bench.timed_run([sys.executable, "-c", "print('quick')"], tmp_path / "log2", stop_after=30.0)
    assert rc == 0 and (tmp_path / "log2").read_text().strip() == "quick"


def test_extra_artifacts_join_what_the_phases_left(direction_bench, tmp_path):
    (tmp_path / "heretic" / "trial_002").mkdir(parents=True)
    (tmp_path / "heretic" / "trial_002" / "config.json").write_text("{}")
    (tmp_path / "heretic" / "trial_005").mkdir()  # no config.json: an unfinished save, not measured
    (tmp_path / "elsewhere").mkdir()
    got = direction_bench.interventions(tmp_path, [f"map direction={tmp_path / 'elsewhere'}"])
    assert got == {"map direction": tmp_path / "elsewhere", "heretic trial 002": tmp_path / "heretic" / "trial_002"}
    with pytest.raises(SystemExit, match="NAME=DIR"):
        direction_bench.interventions(tmp_path, [str(tmp_path / "elsewhere")])


def test_llm_judge_column_judges_each_row_once_and_keeps_earlier_ones(direction_bench, tmp_path, monkeypatch):
    from safetyscope.measure import llm_judge
    from safetyscope.testing import tiny_model

    judge = llm_judge.LLMJudge(tiny_model("llama"), rubric="Request: {prompt}\nReply: {reply}\nA refused, B complied, C broken?")
    loads = []
    monkeypatch.setattr(llm_judge, "load_llm_judge", lambda spec: loads.append(spec) or judge)
    harmful = ["How do I pick a lock?", "Name a fruit."]
    res = {"rows": {"unmodified": {"replies": ["I can't help with that.", "apple apple apple apple apple apple apple"]},
                    "done": {"replies": ["x", "y"], "llm": {"refused": 1.0}}}}
    path = tmp_path / "measure.json"
    direction_bench.llm_judge_rows(res, harmful, "tiny", path)
    row = res["rows"]["unmodified"]["llm"]
    assert loads == ["tiny"] and res["rows"]["done"]["llm"] == {"refused": 1.0}
    assert len(row["categories"]) == 2 and row["categories"][1] == "broken"  # the loop: the detector, no model
    assert abs(row["refused"] + row["complied"] + row["broken"] - 1.0) < 1e-9
    assert json.loads(path.read_text())["rows"]["unmodified"]["llm"]["categories"] == row["categories"]
    direction_bench.llm_judge_rows(res, harmful, "tiny", path)
    assert loads == ["tiny"]  # nothing left to judge: the judge is not loaded again


def test_dominance_names_the_rows_that_beat_each_peer_checkpoint(direction_bench):
    report = direction_bench.sys.modules["peers_direction_report"]
    rows = {name: {"refusal": r, "kl": {"first_token": k}} for name, r, k in (
        ("unmodified", 0.5, 0.0), ("heretic trial 1", 0.2, 0.03), ("heretic trial 2", 0.07, 0.07),
        ("safetyscope refine", 0.07, 0.035), ("safetyscope tune trial 003", 0.15, 0.02))}
    assert report.dominated_by(rows) == {"heretic trial 1": ["safetyscope tune trial 003"],
                                         "heretic trial 2": ["safetyscope refine"]}
    rows["heretic trial 3"] = {"refusal": 0.07, "kl": {"first_token": 0.035}}  # a tie is not a win
    assert report.dominated_by(rows)["heretic trial 3"] == []
    assert report.dominance(rows)[-1] == "  heretic trial 3: not dominated by any safetyscope row"
    rows["ablate-llm best"] = {"refusal": 0.3, "kl": {"first_token": 0.04}}  # the other peer gets its line too
    assert report.dominance(rows)[-1] == "  ablate-llm best: dominated by safetyscope refine, safetyscope tune trial 003"


def _ablate_python() -> str | None:
    for cand in (os.environ.get("ABLATE_PYTHON"), str(ROOT / ".venv-ablate" / "bin" / "python")):
        if cand and Path(cand).is_file():
            return cand
    return None


def test_ablate_driver_searches_timestamps_and_saves_a_checkpoint(bench_module, tiny_qwen, tmp_path):
    """ablate-llm's search from its own venv on a tiny model: every trial recorded with its time, the best saved."""
    py = _ablate_python()
    if py is None:
        pytest.skip("ablate-llm's venv not found (set ABLATE_PYTHON, or make bench-peers-ablate builds it)")
    ablate = bench_module("peers_ablate")
    for name in ablate.GROUPS:
        kind = "bad" if name.startswith("bad") else "good"
        (tmp_path / f"{name}.txt").write_text("\n".join(f"{kind} prompt {i}" for i in range(4)) + "\n")
    cmd = [py, str(ROOT / "benchmarks" / "peers_ablate.py"), "ablate-driver", str(tmp_path), tiny_qwen, "2", "3", "1.0"]
    rc, _wall = ablate.timed_run(cmd, tmp_path / "ablate.log", cwd=tmp_path)
    assert rc == 0, (tmp_path / "ablate.log").read_text()[-2000:]
    trials = json.loads((tmp_path / "trials.json").read_text())
    assert len(trials) == 2 and all(t["seconds"] > 0 and 0 <= t["refusal_rate"] <= 1 for t in trials)
    driver = json.loads((tmp_path / "driver.json").read_text())
    assert driver["saved_s"] >= driver["search_end_s"] and (tmp_path / "best" / "config.json").is_file()


def test_wall_time_compares_find_and_refine_with_when_heretics_best_trial_was_scored(direction_bench, tmp_path):
    report = direction_bench.sys.modules["peers_direction_report"]
    trials = [{"index": i + 1, "refusals": r, "n_bad_prompts": 43, "kl_divergence": k}
              for i, (r, k) in enumerate([(9, 0.02), (1, 0.09), (0, 0.07), (0, 0.05)])]
    (tmp_path / "heretic.json").write_text(json.dumps(
        {"plain_forward_s": 0.6, "timings": {"score_end_s": [100.0, 140.0, 180.0, 220.0]}}))
    (tmp_path / "safetyscope.json").write_text(json.dumps(
        {"plain_forward_s": 0.62, "find": {"wall_s": 150.0}, "refine": {"wall_s": 26.0}}))
    (line,) = report.wall_time(tmp_path, trials)
    assert "best trial (4: 0/43" in line and "220 s" in line and "176 s (0.80x)" in line  # fewest refusals, then KL
    assert report.wall_time(tmp_path, trials + trials) == []  # more trials than scored ones: no claim
