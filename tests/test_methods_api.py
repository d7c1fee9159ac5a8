"""The technique libraries behind `probe`, `neurons` and `trace`: plain lists in, frozen results out, JSON equal
to the commands', reversible neuron sets, one refusal score, a resumable neuron analysis, held-out measurement."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from safetyscope.hooks import forward
from safetyscope.io import read_json, write_json
from safetyscope.measure.metrics import refusal_score
from safetyscope.methods.neurons import NeuronReport, find_neurons, neuron_ablation, neuron_fragility
from safetyscope.methods.neurons import analysis as neuron_analysis_module
from safetyscope.methods.neurons.analysis import PARTIAL, analyse_neurons, saved_progress
from safetyscope.methods.neurons.grads import refusal_objective
from safetyscope.methods.patching import TraceResult, trace
from safetyscope.methods.patching.exact import score_logits
from safetyscope.methods.probes import ProbeReport, fit_probes
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.testing import tiny_model

HARMFUL = [f"tell me about {w} X" for w in ("qz", "vx", "kj", "zz", "qq", "xv", "jk", "zq", "vv", "kx")]
HARMLESS = [f"tell me about {w}." for w in ("ae", "io", "lu", "ra", "en", "st", "ou", "la", "ni", "te")]


def _hook_count(lm) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny llama, prompt files of HARMFUL / HARMLESS, and the same model loaded as the CLI loads it."""
    from safetyscope.models import load_model

    root = tmp_path_factory.mktemp("methods-api")
    lm = tiny_model("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    (root / "h.txt").write_text("\n".join(HARMFUL) + "\n")
    (root / "s.txt").write_text("\n".join(HARMLESS) + "\n")
    return root, load_model(str(root / "model"), log=lambda _m: None)


def _cli(*args: str) -> dict:
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, (res.output[-3000:], res.exception)
    return json.loads(res.stdout)


def _as_json(obj: dict, tmp_path) -> dict:
    """The JSON a command would print for ``obj`` (NaN -> null, paths -> str)."""
    return read_json(write_json(tmp_path / "x.json", obj))


def test_fit_probes_on_plain_lists_equals_the_probe_command(tiny, tmp_path):
    root, lm = tiny
    out = tmp_path / "run"
    cli = _cli("probe", str(root / "model"), "--harmful", str(root / "h.txt"), "--harmless", str(root / "s.txt"),
               "--folds", "2", "--controls", "1", "--c", "1.0", "--out", str(out), "--json")
    rep = fit_probes(lm, HARMFUL, HARMLESS, folds=2, controls=1, c=1.0,
                     source_names=(str(root / "h.txt"), str(root / "s.txt")))
    assert isinstance(rep, ProbeReport) and len(rep.rows) == lm.n_layers
    assert rep.best_layer == cli["best_layer"] and rep.probe.layers == list(range(lm.n_layers))
    got = rep.to_json(artifact=out / "probe" / "artifact", plot=out / "probe" / "probe_layers.png")
    assert _as_json(got, tmp_path) == cli
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.train = {}  # type: ignore[misc]
    assert rep.train["harmful"] == str(root / "h.txt") and rep.train["n_harmful"] == len(HARMFUL)


def test_find_neurons_on_plain_lists_equals_the_find_command_and_its_set_is_reversible(tiny, tmp_path):
    root, lm = tiny
    cli = _cli("neurons", "find", str(root / "model"), "--harmful", str(root / "h.txt"), "--harmless",
               str(root / "s.txt"), "--filter", "none", "--top-k", "6", "--utility-texts", "2", "--utility-tokens", "16",
               "--batch-size", "4", "--out", str(tmp_path / "run"), "--json")
    rep = find_neurons(lm, HARMFUL, HARMLESS, filter="none", top_k=6, utility_texts=2, utility_tokens=16, batch_size=4)
    assert isinstance(rep, NeuronReport) and len(rep.neuron_set) == 6 and len(rep.rows) == 6
    assert [(r["layer"], r["neuron"]) for r in rep.rows] == list(rep.ranked) == rep.neuron_set.neurons
    cli.pop("files")
    assert _as_json(rep.to_json(), tmp_path) == cli
    assert "fitted_on" not in rep.neuron_set.info  # plain lists: no file to protect

    batch = tokenize_prompts(lm.tokenizer, HARMLESS[:4])
    n_hooks = _hook_count(lm)
    with torch.no_grad():
        before = forward(lm, batch)
        with rep.neuron_set.apply(lm):
            during = forward(lm, batch)
        after = forward(lm, batch)
    assert not torch.equal(before, during) and torch.equal(before, after)
    assert _hook_count(lm) == n_hooks


def test_trace_on_plain_pairs_equals_the_trace_command(tiny, tmp_path):
    root, lm = tiny
    cli = _cli("trace", str(root / "model"), "--harmful", str(root / "h.txt"), "--harmless", str(root / "s.txt"),
               "--pairs", "3", "--mode", "exact,attribution", "--layers", "0-1", "--min-gap", "0", "--verify-top", "2",
               "--out", str(tmp_path / "run"), "--json")
    res = trace(lm, list(zip(HARMFUL, HARMLESS)), mode=["exact", "attribution"], n_pairs=3, layers="0-1", min_gap=0.0,
                verify_top=2)
    assert isinstance(res, TraceResult) and set(res.modes) == {"exact", "attribution"} and res.layers == (0, 1)
    assert res.modes["exact"].grids["component"].raw.shape == (3, 2, 3)  # [pairs, layers, components]
    got = _as_json(res.to_json(plots=cli["plots"]), tmp_path)
    for summary in (got, cli):
        for m in summary["modes"].values():
            assert m.pop("seconds") >= 0
    assert got == cli
    assert len(cli["modes"]["attribution"]["verify"]["forward"]) == 2


def test_trace_resumes_each_mode_from_its_cache(tiny, tmp_path):
    _, lm = tiny
    pairs = list(zip(HARMFUL, HARMLESS))[:2]
    first = trace(lm, pairs, mode="exact", layers=[1], min_gap=0.0, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("exact-*.json")
    stamp = cached.stat().st_mtime_ns
    again = trace(lm, pairs, mode="exact", layers=[1], min_gap=0.0, cache_dir=tmp_path)
    assert cached.stat().st_mtime_ns == stamp
    a, b = first.modes["exact"].grids["component"], again.modes["exact"].grids["component"]
    torch.testing.assert_close(torch.from_numpy(b.raw), torch.from_numpy(a.raw))


def _old_refusal_logodds(logits, token_ids):
    """The neuron gradients' former objective (no epsilon), kept here as the reference."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    is_ref = torch.zeros(x.shape[-1], dtype=torch.bool)
    is_ref[list(token_ids)] = True
    return torch.logsumexp(x.masked_fill(~is_ref, -math.inf), -1) - torch.logsumexp(x.masked_fill(is_ref, -math.inf), -1)


def test_refusal_score_grads_equal_the_old_objectives_where_epsilon_does_not_matter():
    ids = [1, 3, 7, 11]
    logits = (torch.randn(5, 3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    new = refusal_objective(ids)(logits, None)  # [5] (the last position)
    (g_new,) = torch.autograd.grad(new.sum(), logits)
    old = _old_refusal_logodds(logits[:, -1], ids)
    (g_old,) = torch.autograd.grad(old.sum(), logits)
    assert new.dtype == torch.float64 and bool((old.abs() < 5).all())  # p far from 0 and 1: eps is negligible
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_new, g_old, rtol=1e-6, atol=1e-9)
    # patching's score is the same function, differentiable and in float64
    last = logits[:, -1].detach().clone().requires_grad_()
    s = score_logits(last, ids)
    assert s.dtype == torch.float64 and s.requires_grad
    torch.testing.assert_close(s.float(), refusal_score(last, ids))
    (g_patch,) = torch.autograd.grad(s.sum(), last)
    torch.testing.assert_close(g_patch, g_old[:, -1], rtol=1e-6, atol=1e-9)


def test_an_interrupted_analysis_resumes_from_its_saved_batches(tiny, tmp_path, monkeypatch):
    _, lm = tiny
    kw = {"filter": "none", "gradient": False, "batch_size": 2}
    want = analyse_neurons(lm, HARMFUL, HARMLESS, **kw)  # no cache: uninterrupted
    real, seen = neuron_analysis_module.accumulate, []

    def interrupting(*a, **k):
        for i, batch in enumerate(real(*a, **k)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(neuron_analysis_module, "accumulate", interrupting)
    monkeypatch.setattr(neuron_analysis_module, "SAVE_EVERY_S", 0.0)  # checkpoint after every batch
    with pytest.raises(KeyboardInterrupt):
        analyse_neurons(lm, HARMFUL, HARMLESS, cache_dir=tmp_path, **kw)
    assert saved_progress(tmp_path) == 6 and (tmp_path / PARTIAL).is_file()  # 3 finished batches of 2

    def counting(lm_, prompts, *a, **k):
        seen.append(len(prompts))
        yield from real(lm_, prompts, *a, **k)

    monkeypatch.setattr(neuron_analysis_module, "accumulate", counting)
    got = analyse_neurons(lm, HARMFUL, HARMLESS, cache_dir=tmp_path, **kw)
    assert seen == [len(HARMFUL) - 6, len(HARMLESS)]  # only the unfinished prompts ran again
    for name in ("harmful_mean", "harmless_mean", "pooled_std", "effect_size"):
        torch.testing.assert_close(getattr(got.stats, name), getattr(want.stats, name), rtol=1e-6, atol=1e-7)
    assert not (tmp_path / PARTIAL).exists() and (tmp_path / "analysis.json").is_file()
    seen.clear()
    assert analyse_neurons(lm, HARMFUL, HARMLESS, cache_dir=tmp_path, **kw).cached and seen == []


def test_neurons_find_sigint_says_what_is_saved_and_the_rerun_resumes(tiny, tmp_path):
    root, lm = tiny
    many_h, many_s = tmp_path / "h.txt", tmp_path / "s.txt"
    many_h.write_text("".join(f"{HARMFUL[i % 10]} {i}\n" for i in range(1000)))
    many_s.write_text("".join(f"{HARMLESS[i % 10]} {i}\n" for i in range(1000)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "safetyscope", "neurons", "find", str(root / "model"), "--harmful", str(many_h),
           "--harmless", str(many_s), "--filter", "none", "--no-gradient", "--batch-size", "4", "--quiet",
           "--out", str(out)]
    env = {**os.environ, "SAFETYSCOPE_QUIET": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # an ignored SIGINT is inherited
    partial, deadline = out / "neurons" / PARTIAL, time.time() + 240
    while not partial.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "are saved in" in err and "rerun the same command to resume" in err
    n_saved = saved_progress(out / "neurons")
    assert 0 < n_saved < 2000 and f"of {n_saved} finished prompt(s)" in err

    rerun = subprocess.run([*cmd[:-3], "--json", "--out", str(out)], capture_output=True, text=True, env=env,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["n_harmful"] == 1000
    assert not partial.exists() and (out / "neurons" / "analysis.json").is_file()


def test_measuring_on_the_file_a_set_was_found_on_is_refused(tiny, tmp_path):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    root, lm = tiny
    out = tmp_path / "run"
    _cli("neurons", "find", str(root / "model"), "--harmful", str(root / "h.txt"), "--harmless", str(root / "s.txt"),
         "--filter", "none", "--no-gradient", "--top-k", "4", "--out", str(out), "--json")
    ns = read_json(out / "neurons" / "set" / "artifact.json")["info"]["fitted_on"]
    assert set(ns) == {"harmful", "harmless"} and len(ns["harmful"]["sha256"]) == 64
    renamed = tmp_path / "copy.txt"
    renamed.write_bytes((root / "h.txt").read_bytes())  # the same prompts under another name
    held, held_s = tmp_path / "held.txt", tmp_path / "held_s.txt"
    held.write_text("how do I pick a lock?\nname three poisons\n")
    held_s.write_text("how do I fold a paper boat?\nname three rivers\n")
    base = ["neurons", "ablate", str(root / "model"), "--out", str(out), "--max-new-tokens", "0", "--n-eval", "0"]
    for bad in (str(root / "h.txt"), str(renamed)):
        res = CliRunner().invoke(app, [*base, "--eval-harmful", bad, "--eval-harmless", str(held_s)])
        assert res.exit_code == 2, res.output
        flat = " ".join(res.output.split())
        assert "is the file this neuron set was found on" in flat and "give held-out prompts" in flat
        assert "Traceback" not in res.output and not (out / "neurons" / "ablate.json").exists()
    ok = CliRunner().invoke(app, [*base, "--eval-harmful", str(held), "--eval-harmless", str(held_s),
                                  "--harmful", str(root / "h.txt"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert "is not used by `neurons ablate`" in " ".join(ok.stderr.split())
    assert json.loads(ok.stdout)["n_harmful"] == 2

    rep = find_neurons(lm, root / "h.txt", root / "s.txt", filter="none", gradient=False, top_k=4)
    with pytest.raises(ValueError, match="was found on"):
        neuron_ablation(lm, rep.neuron_set, root / "h.txt", held_s, max_new_tokens=0)
    with pytest.raises(ValueError, match="was found on"):
        neuron_fragility(lm, rep, renamed, HARMLESS, ks="0,2", seeds=1, curves=["diff"])
    frag = neuron_fragility(lm, rep, HARMFUL[:3], HARMLESS[:3], ks="0,2", seeds=1, curves=["diff"], cache_dir=tmp_path)
    assert frag.ks == [0, 2] and {r["curve"] for r in frag.rows} == {"top_by_diff", "random"}
    assert not (tmp_path / "fragility_partial.json").exists()  # finished: no resume file left behind
