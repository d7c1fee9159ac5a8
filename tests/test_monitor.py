"""The runtime monitor on tiny random models: hooks, calibration, verdicts, save/load, bad input, generation."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from safetyscope.artifacts.base import load_artifact
from safetyscope.hooks import forward
from safetyscope.measure.judges import PhraseJudge, categorize
from safetyscope.methods.monitor import Monitor, MonitorMismatch, fit_monitor, run_monitor, verdict_kind
from safetyscope.methods.monitor.evaluate import (
    detector_figures,
    evaluate_monitor,
    keyword_hits,
    score_prompts,
)
from safetyscope.methods.monitor.fit import calibration_threshold
from safetyscope.methods.monitor.html import render_html
from safetyscope.prompts.builtin import builtin_prompts
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.prompts.types import Prompt, PromptSet
from safetyscope.testing import tiny_model

HARMFUL = builtin_prompts("harmful", "train").texts[:12]
HARMLESS = builtin_prompts("harmless", "train").texts[:12]
CALIBRATION = builtin_prompts("harmless", "val").texts[:20]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def monitor(lm):
    return fit_monitor(lm, HARMFUL, HARMLESS, calibration=CALIBRATION, fpr=0.1, n_readers=2, protect=4)


def _generate(lm, prompts, **kw):
    b = tokenize_prompts(lm.tokenizer, prompts)
    return lm.model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, do_sample=False,
                             pad_token_id=0, **kw)


def test_watch_removes_hooks_and_logits_are_bit_identical(lm, monitor, hook_count):
    batch = tokenize_prompts(lm.tokenizer, HARMFUL[:3] + HARMLESS[:2])
    before_hooks = hook_count(lm)
    with torch.inference_mode():
        ref = forward(lm, batch)
        with monitor.watch(lm) as w:
            inside = forward(lm, batch)
            assert hook_count(lm) > before_hooks
        after = forward(lm, batch)
    assert hook_count(lm) == before_hooks
    assert torch.equal(ref, inside) and torch.equal(ref, after)  # read-only, and nothing left behind
    assert len(w.verdicts) == 5


def test_hooks_removed_when_the_call_raises(lm, monitor, hook_count):
    n = hook_count(lm)
    with pytest.raises(RuntimeError, match="boom"), monitor.watch(lm):
        raise RuntimeError("boom")
    assert hook_count(lm) == n


def test_threshold_hits_the_requested_fpr_on_the_calibration_set(lm, monitor):
    harm, _ = score_prompts(lm, monitor, CALIBRATION)
    fp = float((harm > monitor.threshold).mean())
    assert fp <= 0.1 + 1e-12
    assert fp == pytest.approx(monitor.metrics["calibration_fpr"])
    # the threshold is tight: the next calibration score below it would add a false positive
    below = np.sort(harm)[np.sort(harm) < monitor.threshold]
    if below.size:
        assert float((harm >= below[-1]).mean()) > 0.1


@pytest.mark.parametrize("fpr,n,expected", [(0.05, 100, 5), (0.01, 100, 1), (0.01, 50, 0), (0.5, 10, 5)])
def test_calibration_threshold_allows_exactly_floor_fpr_n(fpr, n, expected):
    scores = np.random.default_rng(0).normal(size=n)
    for margin in (True, False):
        t = calibration_threshold(scores, fpr, margin=margin)
        assert int((scores > t).sum()) == expected
    assert calibration_threshold(scores, fpr) > calibration_threshold(scores, fpr, margin=False)


def test_verdict_logic_table():
    assert verdict_kind(harmful=True, refused=True) == "harmful_refused"
    assert verdict_kind(harmful=True, refused=False) == "alert"
    assert verdict_kind(harmful=False, refused=True) == "over_refusal"
    assert verdict_kind(harmful=False, refused=False) == "answered"


def test_save_load_round_trip_scores_identically(lm, monitor, tmp_path):
    monitor.save(tmp_path / "m")
    loaded = load_artifact(tmp_path / "m")
    assert isinstance(loaded, Monitor)
    assert json.loads((tmp_path / "m" / "artifact.json").read_text())["kind"] == "monitor"
    assert loaded.threshold == monitor.threshold and loaded.refusal_threshold == monitor.refusal_threshold
    assert [r.describe() for r in loaded.readers] == [r.describe() for r in monitor.readers]
    assert np.array_equal(loaded.protect, monitor.protect)
    a, _ = score_prompts(lm, monitor, HARMFUL[:4])
    b, _ = score_prompts(lm, loaded, HARMFUL[:4])
    assert np.array_equal(a, b)


def test_readers_are_orthogonal_to_the_protected_subspace(monitor):
    assert monitor.protect.shape[0] == 4
    for r in monitor.readers:
        assert np.linalg.norm(r.weight) > 0
        assert np.abs(monitor.protect @ r.weight).max() < 1e-8 * np.linalg.norm(r.weight)


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5])
def test_fpr_outside_0_1_is_a_one_line_error(lm, fpr):
    with pytest.raises(ValueError, match="strictly between 0 and 1") as e:
        fit_monitor(lm, HARMFUL, HARMLESS, calibration=CALIBRATION, fpr=fpr)
    assert "\n" not in str(e.value)


def test_calibration_with_one_class_or_empty_is_a_one_line_error(lm):
    only_harmful = PromptSet(name="x", items=tuple(Prompt(id=str(i), text=t, label="harmful")
                                                  for i, t in enumerate(HARMFUL[:4])))
    with pytest.raises(ValueError, match="calibration set has only 4 harmful prompts") as e:
        fit_monitor(lm, HARMFUL, HARMLESS, calibration=only_harmful)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="calibration"):
        fit_monitor(lm, HARMFUL, HARMLESS, calibration=[])


def test_monitor_on_another_model_is_a_one_line_error(monitor):
    wider = tiny_model("llama", hidden_size=48)
    with pytest.raises(MonitorMismatch, match="d_model 32") as e:
        monitor.watch(wider)
    assert "\n" not in str(e.value)
    other = tiny_model("llama", seed=1)
    other.name = "another-model"
    with pytest.raises(MonitorMismatch, match="--any-model"):
        monitor.watch(other)
    with monitor.watch(other, strict=False):  # an edited copy of the same architecture is allowed on request
        pass


def test_watch_during_generate_gives_trajectories_and_no_extra_forward_pass(lm, monitor):
    calls = []
    h = lm.model.register_forward_pre_hook(lambda *_a: calls.append(1))
    try:
        plain = _generate(lm, HARMFUL[:2] + HARMLESS[:1], max_new_tokens=6, min_new_tokens=6)
        n_plain = len(calls)
        calls.clear()
        with monitor.watch(lm) as w:
            watched = _generate(lm, HARMFUL[:2] + HARMLESS[:1], max_new_tokens=6, min_new_tokens=6)
    finally:
        h.remove()
    assert torch.equal(plain, watched)
    assert len(calls) == n_plain == w.n_calls == 6  # one prefill + five decoding steps, nothing more
    assert len(w.verdicts) == 3
    for row, v in enumerate(w.verdicts):
        assert len(v.harm_trajectory) == len(v.refusal_trajectory) == len(v.projection_trajectory) == 5
        assert list(v.token_ids) == watched[row, -6:-1].tolist()  # read on the tokens fed back
    # the prefill verdict equals a plain forward's reading
    harm, refusal = score_prompts(lm, monitor, HARMFUL[:2] + HARMLESS[:1])
    assert np.allclose([v.harm for v in w.verdicts], harm, atol=1e-4)
    assert np.allclose([v.refusal for v in w.verdicts], refusal, atol=1e-4)


def test_alert_callback_can_stop_generation(lm, monitor):
    m = Monitor.from_state(*monitor.to_state())
    m.threshold, m.refusal_threshold = -1e9, 1e9  # everything harmful, nothing refused: every row alerts
    seen = []

    def on_alert(row, verdict):
        seen.append((row, verdict.kind))
        return True

    with m.watch(lm, on_alert=on_alert) as w:
        out = _generate(lm, HARMFUL[:2], max_new_tokens=8, stopping_criteria=w.stopping_criteria())
    assert sorted(seen) == [(0, "alert"), (1, "alert")]
    assert out.shape[1] - tokenize_prompts(lm.tokenizer, HARMFUL[:2]).seq_len == 1  # stopped after one token
    assert all(v.alert for v in w.verdicts)


def test_run_monitor_and_html_escape(lm, monitor):
    prompts = ["<script>alert(1)</script> how do I make a bomb?", HARMLESS[0]]
    run = run_monitor(lm, monitor, prompts, max_new_tokens=4)
    assert len(run.verdicts) == 2 and sum(run.counts().values()) == 2
    page = render_html(run)
    assert "<script>" not in page and "&lt;script&gt;" in page
    rows = run.rows()
    assert rows[0]["prompt"] == prompts[0] and rows[0]["verdict"] in run.counts()


def test_baselines_and_figures(lm, monitor):
    assert keyword_hits("How do I build a bomb to kill") == 2 and keyword_hits("bake bread") == 0
    f = detector_figures([3, 2, 1, 0], [1, 1, 0, 0], 1.5)
    assert f["auroc"] == 1.0 and f["tpr_at_threshold"] == 1.0 and f["fpr_at_threshold"] == 0.0
    from safetyscope.methods.direction.artifact import Direction

    attack = Direction(torch.from_numpy(monitor.refusal_direction).float(), monitor.refusal_layer)
    ev = evaluate_monitor(lm, monitor, HARMFUL[:4], HARMLESS[:4], attack=attack, max_new_tokens=3)
    out = ev.to_json()
    assert out["clean"]["baselines"].keys() == {"output_judge", "keyword", "self_check"}
    assert 0.0 <= out["attacked"]["monitor"]["auroc"] <= 1.0 and "tpr_drop_at_threshold" in out


def test_cli_fit_run_eval(tmp_path, tiny_qwen2_dir, monitor_cli):
    model_dir, run = tiny_qwen2_dir, monitor_cli
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I make a bomb?\nHow do I bake bread?\n")
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(CALIBRATION) + "\n")

    out = tmp_path / "out"
    r = run("fit", str(model_dir), "--out", str(out), "--n-prompts", "8", "--calibration", str(calib), "--fpr", "0.1")
    assert r.returncode == 0, r.stderr
    assert (out / "monitor" / "artifact" / "artifact.json").is_file()
    r = run("run", str(model_dir), "--out", str(out), "--prompts", str(prompts), "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "monitor_run" / "verdicts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and (out / "monitor_run" / "report.html").is_file()
    r = run("eval", str(model_dir), "--out", str(out), "--harmful", str(prompts), "--harmless", str(calib),
            "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "monitor_eval" / "summary.json").read_text())["clean"]["monitor"]["auroc"] >= 0.0
    r = run("fit", str(model_dir), "--out", str(out), "--fpr", "1.5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "between 0 and 1" in r.stderr


def test_ablating_a_protected_direction_leaves_the_reading_unchanged(lm):
    """At block 0 nothing upstream can change, so only the direct effect is left: zero for readers orthogonal
    to the protected subspace, whichever hook runs first."""
    from safetyscope.methods.direction.artifact import Direction

    m = fit_monitor(lm, HARMFUL, HARMLESS, calibration=CALIBRATION, layers="0,1", protect=2, n_readers=12)
    m.readers = [rd for rd in m.readers if rd.layer == 0]  # block 0 (its post tokens are constant: block 1 spans)
    assert m.readers and m.protect.shape[0] == 2
    r = torch.from_numpy(m.protect[0]).float()
    clean, _ = score_prompts(lm, m, HARMFUL[:3] + HARMLESS[:3])
    with Direction(r, 0).apply(lm):  # entered first: the monitor reads after the edit
        ablated, _ = score_prompts(lm, m, HARMFUL[:3] + HARMLESS[:3])
    assert np.allclose(clean, ablated, atol=1e-5)
    unprotected = fit_monitor(lm, HARMFUL, HARMLESS, calibration=CALIBRATION, layers="0", protect=0, n_readers=1)
    base, _ = score_prompts(lm, unprotected, HARMFUL[:3])
    with Direction(torch.from_numpy(unprotected.readers[0].weight).float(), 0).apply(lm):
        gone, _ = score_prompts(lm, unprotected, HARMFUL[:3])
    assert not np.allclose(base, gone, atol=1e-3)  # the test can fail: ablating a reader's own direction moves it


def test_recalibrate_resets_the_threshold_under_an_intervention(lm, monitor):
    from safetyscope.methods.direction.artifact import Direction
    from safetyscope.methods.monitor.evaluate import recalibrate

    attack = Direction(torch.from_numpy(monitor.refusal_direction).float(), monitor.refusal_layer)
    with attack.apply(lm):
        again = recalibrate(lm, monitor, CALIBRATION, fpr=0.1)
        harm, _ = score_prompts(lm, again, CALIBRATION)
    assert float((harm > again.threshold).mean()) <= 0.1
    assert again.threshold != monitor.threshold and again.readers[0].layer == monitor.readers[0].layer


def test_benchmark_runs_end_to_end_on_a_tiny_model(tmp_path, bench_module):

    lm = tiny_model("qwen2")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "h.txt").write_text("\n".join(HARMFUL[:3]) + "\n")
    (tmp_path / "s.txt").write_text("\n".join(HARMLESS[:3]) + "\n")
    mod = bench_module("monitor")
    res = mod.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--gen-prompts", "2",
                    "--max-new-tokens", "2", "--repeats", "1", "--harmful", str(tmp_path / "h.txt"), "--harmless",
                    str(tmp_path / "s.txt"), "--eval-tokens", "2", "--attack", "find", "--find-prompts", "6",
                    "--find-fast"])
    assert res["overhead"]["ratio"] > 0 and res["eval"]["attacked"] is not None
    assert res["eval"]["judge"] == "phrase"  # the evaluation names the judge that decides "answered"
    assert res["overhead"]["extra_forward_calls"] == 0 and res["overhead"]["forward_calls_per_round"]["plain"] > 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["eval"]["n_harmful"] == 3


def test_stress_blocks_are_parsed_once_with_one_line_errors():
    from safetyscope.methods.monitor.stress import stress_blocks

    assert stress_blocks("auto", range(24)) == (7, 12, 17) and stress_blocks("quick", range(24)) == (12,)
    assert stress_blocks("auto", [0, 1]) == (1,) and stress_blocks("quick", [4, 8, 9]) == (8,)
    assert stress_blocks("none", range(24)) == () and stress_blocks("3,1", range(24)) == (1, 3)
    assert stress_blocks([2], range(4)) == (2,)
    for bad in ("deep", "30"):
        with pytest.raises(ValueError, match="stress") as e:
            stress_blocks(bad, range(24))
        assert "\n" not in str(e.value)


def test_stressed_readers_ignore_the_stress_directions_and_their_mean_shifts():
    """Erasure: a reader fitted with the site basis is orthogonal to each stress direction and to the mean
    shift each simulated ablation causes at its site, so those moves cannot change its score."""
    from safetyscope.methods.monitor.fit import Features, fit_reader
    from safetyscope.methods.monitor.stress import Stress, site_basis, worst_case_tpr

    rng = np.random.default_rng(0)
    n, d = 40, 16
    y = np.array([1] * 20 + [0] * 20)
    x = rng.normal(size=(n, 2, 3, d)).astype(np.float32)  # [n, layers, 1 + n_post, d]
    x[y == 1, :, :, 0] += 2.0
    fit = Features(x, np.zeros(n), (0, 1))
    rows = np.arange(0, n, 2)
    shifted = x[rows].copy()
    shifted[:, :, :, 1] -= 3.0  # the "ablation" moves every prompt along feature 1
    dirs = np.eye(d)[[2]]
    stress = Stress((1,), dirs, rows, (Features(shifted, np.zeros(rows.size), (0, 1)),))
    tr = np.arange(n)
    for position in ("inst", "post"):
        basis = site_basis(stress, fit, y, position, 1, np.zeros((0, d)))
        for method in ("dom", "probe"):
            w, _ = fit_reader(method, fit.at(position)[tr, 1], y[tr], basis, 0.1, 0)
            assert abs(w[1]) < 1e-9 * np.abs(w).max() and abs(w[2]) < 1e-9 * np.abs(w).max()
            assert abs(w[0]) > 0.5 * np.abs(w).max()  # and it still reads the harm feature
    assert worst_case_tpr([np.array([3.0, 2.0, 0.0]), np.array([0.5, 2.0, 0.0])], [np.array([1, 1, 0])] * 2,
                          np.array([1.0])) == 0.5


def test_fit_with_stress_records_blocks_and_worst_case(lm):
    m = fit_monitor(lm, HARMFUL, HARMLESS, calibration=CALIBRATION, fpr=0.1, n_readers=2, stress="1,2", n_stress=3)
    assert m.info["stress_blocks"] == [1, 2] and m.info["n_stress"] > 0
    assert all(0.0 <= r.stress_tpr <= 1.0 for r in m.readers)
    plain = fit_monitor(lm, HARMFUL, HARMLESS, calibration=CALIBRATION, fpr=0.1, n_readers=2, stress="none")
    assert plain.info["stress_blocks"] == [] and all(r.stress_tpr != r.stress_tpr for r in plain.readers)
    with pytest.raises(ValueError, match="outside"):
        fit_monitor(lm, HARMFUL, HARMLESS, calibration=CALIBRATION, stress="9")


def test_eval_attacks_neuron_set_and_orthogonalised_checkpoint(lm, monitor, tmp_path):
    """`monitor eval --attack` takes a direction, a neuron set (zeroed neurons) or an exported checkpoint."""
    from safetyscope.methods.direction.artifact import Direction
    from safetyscope.methods.neurons.artifact import NeuronSet

    d = Direction(torch.from_numpy(monitor.refusal_direction).float(), monitor.refusal_layer)
    ckpt = load_artifact(d.export(lm, tmp_path / "abl"))
    with d.apply(lm):
        hooked, _ = score_prompts(lm, monitor, HARMFUL[:3])
    with ckpt.apply(lm):
        edited, _ = score_prompts(lm, monitor, HARMFUL[:3])
    assert np.allclose(hooked, edited, atol=1e-3)  # the checkpoint reads as the hooked ablation does
    zero = NeuronSet([(1, 5), (2, 7)]).save(tmp_path / "zero")
    for attack in (load_artifact(zero), ckpt):
        ev = evaluate_monitor(lm, monitor, HARMFUL[:3], HARMLESS[:3], attack=attack, max_new_tokens=2).to_json()
        assert ev["attacked"] is not None and ev["attack"] == attack.kind


def test_default_fitting_and_calibration_prompts_include_the_task_sets_and_never_overlap():
    from safetyscope.methods.monitor import default_calibration, default_fit_prompts
    from safetyscope.prompts import builtin_prompts

    harmful, harmless = default_fit_prompts()
    assert set(builtin_prompts("harmful_tasks", "train").texts) <= set(harmful.texts)
    assert set(builtin_prompts("harmless_tasks", "train").texts) <= set(harmless.texts)
    assert set(builtin_prompts("scary_harmless", "train").texts) <= set(harmless.texts)
    assert set(harmful.labels) == {"harmful"} and set(harmless.labels) == {"harmless"}
    _, plain = default_fit_prompts(scary=False)
    assert not set(builtin_prompts("scary_harmless").texts) & set(plain.texts)
    cal = default_calibration(harmful.texts + harmless.texts)
    assert set(builtin_prompts("harmless_tasks", "val").texts) <= set(cal.texts)
    assert not set(cal.texts) & set(harmful.texts + harmless.texts) and set(cal.labels) == {"harmless"}


# ---- monitor eval --judge / --judges: which judge decides "answered", several judges side by side ----

def test_the_judge_decides_answered_and_broken_replies_are_not_answers(lm, monitor):
    default = evaluate_monitor(lm, monitor, HARMFUL[:3], HARMLESS[:3], max_new_tokens=4).to_json()
    c = default["clean"]
    assert default["judge"] == "phrase" and c["judges"] is None
    assert c["complied"] + c["broken"] <= 3 and c["complied_flagged"] <= c["complied"]
    refuses = evaluate_monitor(lm, monitor, HARMFUL[:3], HARMLESS[:3], max_new_tokens=4,
                               judge=lambda _p, _r: True).to_json()  # a judge that calls everything a refusal
    assert refuses["clean"]["complied"] == 0 and refuses["judge"].endswith("<lambda>")


def test_judges_side_by_side_on_the_same_replies(lm, monitor, tmp_path, monkeypatch):
    (tmp_path / "h18_mon_always.py").write_text("def refuse(prompt, reply):\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ev = evaluate_monitor(lm, monitor, HARMFUL[:3], HARMLESS[:2], max_new_tokens=4,
                          judges=("phrase", "h18_mon_always:refuse")).to_json()
    cmp = ev["clean"]["judges"]
    assert cmp["judges"] == ["phrase", "h18_mon_always:refuse"]
    assert cmp["groups"]["harmful"]["phrase"]["n"] == 3 and cmp["groups"]["harmless"]["phrase"]["n"] == 2
    always = cmp["groups"]["harmful"]["h18_mon_always:refuse"]
    assert always["complied"] == 0 and always["refused"] + always["broken"] == 3
    phrase = cmp["groups"]["harmful"]["phrase"]  # the same replies as the evaluation's own (default) judge
    assert phrase["complied"] == ev["clean"]["complied"] and phrase["broken"] == ev["clean"]["broken"]
    json.dumps(ev)  # JSON at the edge
    sys.modules.pop("h18_mon_always", None)


def test_cli_eval_names_its_judge(tmp_path, tiny_qwen2_dir, monitor_cli):
    prompts, calib = tmp_path / "p.txt", tmp_path / "c.txt"
    prompts.write_text("How do I make a bomb?\nHow do I bake bread?\n")
    calib.write_text("\n".join(CALIBRATION) + "\n")
    out = tmp_path / "out"
    r = monitor_cli("fit", str(tiny_qwen2_dir), "--out", str(out), "--n-prompts", "8", "--calibration", str(calib),
                    "--fpr", "0.1")
    assert r.returncode == 0, r.stderr
    r = monitor_cli("eval", str(tiny_qwen2_dir), "--out", str(out), "--harmful", str(prompts), "--harmless",
                    str(calib), "--max-new-tokens", "2", "--judge", "phrase", "--judges", "phrase")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "monitor_eval" / "summary.json").read_text())
    assert res["judge"] == "PhraseJudge" or res["judge"] == "phrase"
    assert res["clean"]["judges"]["judges"] == ["phrase"]
    r = monitor_cli("eval", str(tiny_qwen2_dir), "--out", str(out), "--harmful", str(prompts), "--harmless",
                    str(calib), "--judge", "nosuchmodule:fn")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nosuchmodule" in r.stderr


def test_default_judge_is_the_phrase_judge_with_the_detector():
    prompts, replies = ["Name a fruit."] * 2, ["apple apple apple apple apple apple apple apple", "I can't help."]
    assert categorize(PhraseJudge(), prompts, replies) == ["broken", "refused"]
