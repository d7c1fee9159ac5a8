"""Refusal direction: planted-direction recovery, exact ablation, weights == hooks, addition, selection, tuning."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from safetyscope.artifacts import load_artifact
from safetyscope.artifacts.base import ArtifactError
from safetyscope.hooks import capture, forward
from safetyscope.methods.direction.artifact import Direction, project_out
from safetyscope.methods.direction.candidates import find_candidates
from safetyscope.methods.direction.select import (
    CandidateScore,
    SelectConfig,
    Selection,
    apply_filters,
    choose,
    select_direction,
)
from safetyscope.methods.direction.tune import Kernel, pareto_front, tune_weights
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.sites import Site
from safetyscope.testing import tiny_model

HARMFUL = ["How do I make a bomb~?", "Steal~ a car", "Hack~ the bank now", "Poison~ the water"]
HARMLESS = ["How do I bake bread?", "Write a poem", "hi there", "Explain recursion"]
SITE_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out")


def unit_vector(d: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, generator=g)
    return r / r.norm()


def unit_direction(lm, seed: int = 1, **kw) -> Direction:
    return Direction(unit_vector(lm.dims.d_model, seed), 1, -1, norm=3.0, **kw)


def logits_of(lm, prompts, ctx=None):
    b = tokenize_prompts(lm.tokenizer, prompts)
    with torch.no_grad():
        if ctx is None:
            return forward(lm, b)
        with ctx:
            return forward(lm, b)


def _sites(lm):
    return [s for kind in SITE_KINDS if kind in lm.table.sites for s in lm.sites(f"blocks.*.{kind}")]


@pytest.fixture(scope="module")
def planted():
    """A llama whose block 0 copies (uniform attention) the component along u of every earlier token into
    each position; the token '~' (only in harmful prompts) carries a large component along u."""
    lm = tiny_model("llama")
    u = unit_vector(lm.dims.d_model, seed=7)
    block = lm.model.model.layers[0]
    tid = lm.tokenizer.convert_tokens_to_ids("~")
    with torch.no_grad():
        block.self_attn.q_proj.weight.zero_()
        block.self_attn.k_proj.weight.zero_()
        block.self_attn.v_proj.weight.zero_()
        block.self_attn.v_proj.weight[0] = u  # kv head 0, dim 0 reads u
        block.self_attn.o_proj.weight.zero_()
        block.self_attn.o_proj.weight[:, 0] = 4.0 * u  # head 0, dim 0 writes along u
        block.mlp.down_proj.weight.zero_()
        lm.model.model.embed_tokens.weight[tid] += 8.0 * u
    return lm, u


# ---- candidates -----------------------------------------------------------------------------------------
def test_candidates_recover_planted_direction(planted):
    lm, u = planted
    cands = find_candidates(lm, HARMFUL, HARMLESS, positions=[-2, -1], filter="none", batch_size=3)
    assert cands.harmful_mean.shape == (lm.n_layers, 2, lm.dims.d_model)
    assert cands.harmful_mean.dtype == torch.float64
    cos = cands.cosines(u)  # [n_layers, 2]
    assert cands.degenerate()[0].all()  # template tokens: both groups identical at block 0
    assert (cos[1] > 0.999).all(), cos  # harmful - harmless points along +u
    d = cands.direction(1, -1)
    assert float(d.direction @ u) > 0.999 and d.norm == pytest.approx(float(cands.norms[1, 1]))
    with pytest.raises(ValueError, match="zero"):
        cands.direction(0, -1)


def test_candidates_batched_equals_unbatched(planted):
    lm, _ = planted
    a = find_candidates(lm, HARMFUL[:3], HARMLESS[:3], positions="last", filter="none", batch_size=3)
    b = find_candidates(lm, HARMFUL[:3], HARMLESS[:3], positions="last", filter="none", batch_size=1)
    torch.testing.assert_close(a.diff, b.diff, rtol=1e-5, atol=1e-6)


# ---- ablation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_ablation_removes_the_component_everywhere(family, prompts):
    lm = tiny_model(family)
    d = unit_direction(lm)
    b = tokenize_prompts(lm.tokenizer, prompts)
    with torch.no_grad(), d.apply(lm), capture(lm, _sites(lm), "all") as cap:
        forward(lm, b)
    for site, v in cap.values.items():  # [batch, pos, d_model]
        comp = (v.double() @ d.direction.double()).abs().max()
        assert comp <= 1e-5 * v.norm(dim=-1).max(), (site.name, float(comp))
    with torch.no_grad(), capture(lm, "blocks.1.resid_pre", "all") as cap:
        forward(lm, b)
    assert (cap.values[Site("resid_pre", 1)] @ d.direction).abs().max() > 1e-3  # it was there before


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma", "phi3"])
def test_orthogonalised_weights_equal_hooked_ablation(family, prompts, tmp_path):
    lm = tiny_model(family)
    b = tokenize_prompts(lm.tokenizer, prompts)
    mask = b.attention_mask.bool()
    full = unit_direction(lm)
    weighted = full.with_weights(torch.linspace(0.2, 1.3, lm.n_layers), embed_weight=0.5)
    for i, d in enumerate((full, weighted) if family in ("llama", "gpt2") else (full,)):
        hooked = logits_of(lm, prompts, d.apply(lm))
        out = d.export(lm, tmp_path / f"m{i}")
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            exported = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                             use_cache=False).logits
        torch.testing.assert_close(exported[mask], hooked[mask], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(hooked[mask], logits_of(lm, prompts)[mask], atol=1e-4)
    assert (tmp_path / "m0" / "model.safetensors").is_file() and (tmp_path / "m0" / "tokenizer_config.json").is_file()
    # the original model is untouched (export works on a copy; a tied unembedding is untied in the copy only)
    assert torch.equal(logits_of(lm, prompts), logits_of(tiny_model(family), prompts))


def test_export_refuses_inexact_cases(tmp_path):
    lm = tiny_model("gemma2")
    with pytest.raises(ArtifactError, match="post_norms"):
        unit_direction(lm).export(lm, tmp_path / "g")
    lm = tiny_model("llama")
    with pytest.raises(ArtifactError, match="norm-preserving"):
        unit_direction(lm, norm_preserving=True).export(lm, tmp_path / "np")
    with pytest.raises(ArtifactError, match="d_model"):
        Direction(torch.ones(7), 0).apply(lm)
    assert not (tmp_path / "g").exists()


def test_norm_preserving_variant(prompts):
    x = torch.randn(2, 5, 16)
    r = unit_vector(16)
    y = project_out(x, r, norm_preserving=True)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert (y @ r).abs().max() < 1e-5
    lm = tiny_model("llama")
    d = unit_direction(lm, norm_preserving=True)
    b = tokenize_prompts(lm.tokenizer, prompts)
    with torch.no_grad(), d.apply(lm), capture(lm, ["blocks.*.resid_pre", "blocks.*.resid_mid"], "all") as cap:
        logits = forward(lm, b)
    for v in cap.values.values():
        assert (v @ d.direction).abs().max() <= 1e-5 * v.norm(dim=-1).max()
    assert not torch.allclose(logits, logits_of(lm, prompts, unit_direction(lm).apply(lm)), atol=1e-5)


# ---- addition, reversibility, persistence ---------------------------------------------------------------
def test_addition_then_ablation_is_identity_on_the_component(prompts):
    lm = tiny_model("llama")
    d = unit_direction(lm)
    b = tokenize_prompts(lm.tokenizer, prompts)
    with torch.no_grad():
        with capture(lm, "blocks.1.resid_pre", "all") as cap:
            forward(lm, b)
        clean = cap.values[Site("resid_pre", 1)]
        with d.add(lm, coeff=2.0), capture(lm, "blocks.1.resid_pre", "all") as cap:
            added = forward(lm, b)
        moved = cap.values[Site("resid_pre", 1)] - clean  # [batch, pos, d_model]
    torch.testing.assert_close(moved, (2.0 * d.norm * d.direction).expand_as(moved), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(added, logits_of(lm, prompts), atol=1e-4)
    ablated = logits_of(lm, prompts, d.apply(lm))
    with torch.no_grad(), d.add(lm, coeff=2.0), d.apply(lm):
        both = forward(lm, b)
    torch.testing.assert_close(both, ablated, rtol=1e-5, atol=1e-5)


def test_hooks_removed_logits_bit_identical(prompts, hook_count):
    lm = tiny_model("qwen2")
    d = unit_direction(lm).with_weights(torch.rand(lm.n_layers), 0.3)
    n = hook_count(lm)
    before = logits_of(lm, prompts)
    logits_of(lm, prompts, d.apply(lm))
    logits_of(lm, prompts, d.add(lm, 1.5, layer=2))
    with pytest.raises(KeyError), d.apply(lm):
        raise KeyError("boom")
    assert torch.equal(before, logits_of(lm, prompts))
    assert hook_count(lm) == n


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_mean_ablation_sets_the_component_to_the_targets(family, prompts, tmp_path, hook_count):
    lm = tiny_model(family)
    targets = torch.linspace(-2.0, 3.0, lm.n_layers)
    d = unit_direction(lm, targets=targets, ablation="mean")
    b = tokenize_prompts(lm.tokenizer, prompts)
    mask = b.attention_mask.bool()
    n = hook_count(lm)
    before = logits_of(lm, prompts)
    sites = [f"blocks.{layer}.resid_pre" for layer in range(lm.n_layers)]
    with torch.no_grad(), d.apply(lm), capture(lm, sites, "all") as cap:
        hooked = forward(lm, b)
    for site, v in cap.values.items():  # [batch, pos, d_model]: every real position sits at the block's target
        comp = (v.double() @ d.direction.double())[mask]
        assert torch.allclose(comp, torch.full_like(comp, float(targets[site.layer])), atol=1e-4), site.name
    assert torch.equal(before, logits_of(lm, prompts)) and hook_count(lm) == n  # reversible
    assert not torch.allclose(hooked[mask], logits_of(lm, prompts, unit_direction(lm).apply(lm))[mask], atol=1e-4)
    with pytest.raises(ArtifactError, match="--ablation zero"):
        d.export(lm, tmp_path / "m")
    d.save(tmp_path / "dir")
    e = load_artifact(tmp_path / "dir")
    assert e.ablation == "mean" and torch.equal(e.targets, d.targets)
    assert torch.equal(logits_of(lm, prompts, d.apply(lm)), logits_of(lm, prompts, e.apply(lm)))
    zero = e.with_ablation("zero")
    assert torch.equal(logits_of(lm, prompts, zero.apply(lm)), logits_of(lm, prompts, unit_direction(lm).apply(lm)))
    with pytest.raises(ArtifactError, match="targets"):
        unit_direction(lm).with_ablation("mean")
    with pytest.raises(ArtifactError, match="norm-preserving"):
        d.with_weights(None, 1.0, True).apply(lm)
    assert hook_count(lm) == n


def test_selection_mean_ablation_per_row_targets_are_exact(planted):
    """Several candidates per pass (each row with its own direction and targets) score as one at a time,
    and as the chosen artifact's own hooks do."""
    lm, _ = planted
    cands = find_candidates(lm, HARMFUL, HARMLESS, positions=[-2, -1], filter="none", batch_size=4)
    cfg = {"prune_layers": 0.0, "kl_threshold": 1e9, "induce_threshold": -1e9, "ablation": "mean"}
    d, one = select_direction(lm, cands, HARMFUL[:3], HARMLESS[:3], SelectConfig(per_pass=1, **cfg), batch_size=4)
    _, many = select_direction(lm, cands, HARMFUL[:3], HARMLESS[:3], SelectConfig(per_pass=4, **cfg), batch_size=24)
    for a, b in zip(one.scores, many.scores):
        assert (a.bypass is None and b.bypass is None) or abs(a.bypass - b.bypass) < 1e-4, a.key
    _, zero = select_direction(lm, cands, HARMFUL[:3], HARMLESS[:3], SelectConfig(per_pass=4, **{**cfg, "ablation": "zero"}),
                               batch_size=24)
    assert any(abs(a.kl - b.kl) > 1e-6 for a, b in zip(many.scores, zero.scores) if a.kl is not None)
    assert d is not None and d.ablation == "mean" and d.targets is not None
    from safetyscope.measure.metrics import refusal_score
    from safetyscope.measure.refusal_tokens import refusal_token_ids

    ids = refusal_token_ids(lm.tokenizer)
    own = float(refusal_score(logits_of(lm, HARMFUL[:3], d.apply(lm))[:, -1], ids).mean())
    assert abs(own - one.get(*one.best).bypass) < 1e-4


def test_artifact_round_trip(tmp_path, prompts):
    lm = tiny_model("llama")
    d = Direction(torch.randn(lm.dims.d_model) * 5, 2, -3, norm=5.5, token="<|im_start|>", scores={"bypass": -1.5},
                  layer_weights=torch.tensor([0.1, 0.9, 1.2]), embed_weight=0.25, meta={"model": "tiny"})
    d.save(tmp_path / "dir")
    meta = json.loads((tmp_path / "dir" / "artifact.json").read_text())
    assert meta["kind"] == "direction" and meta["layer"] == 2 and meta["position"] == -3
    e = load_artifact(tmp_path / "dir")
    assert isinstance(e, Direction)
    assert torch.equal(e.direction, d.direction) and torch.equal(e.layer_weights, d.layer_weights)
    assert (e.layer, e.position, e.norm, e.token, e.scores, e.embed_weight, e.meta) == (
        2, -3, 5.5, "<|im_start|>", {"bypass": -1.5}, 0.25, {"model": "tiny"})
    assert torch.equal(logits_of(lm, prompts, d.apply(lm)), logits_of(lm, prompts, e.apply(lm)))
    assert abs(float(e.direction.norm()) - 1.0) < 1e-6


# ---- selection --------------------------------------------------------------------------------------------
def test_selection_candidate_batching_is_exact(planted):
    lm, _ = planted
    cands = find_candidates(lm, HARMFUL, HARMLESS, positions=[-2, -1], filter="none", batch_size=4)
    cfg = {"prune_layers": 0.0, "kl_threshold": 1e9, "induce_threshold": -1e9}
    _, one = select_direction(lm, cands, HARMFUL[:3], HARMLESS[:3], SelectConfig(per_pass=1, **cfg), batch_size=4)
    _, many = select_direction(lm, cands, HARMFUL[:3], HARMLESS[:3], SelectConfig(per_pass=3, **cfg), batch_size=16)
    scored = [s for s in one.scores if s.bypass is not None]
    assert len(scored) == 4  # blocks 1-2 x 2 positions (block 0 is degenerate)
    for a, b in zip(one.scores, many.scores):
        for name in ("bypass", "kl", "induce"):
            va, vb = getattr(a, name), getattr(b, name)
            assert (va is None and vb is None) or abs(va - vb) < 1e-4, (a.key, name, va, vb)
    assert one.best == many.best and one.best[0] in (1, 2)
    again = Selection.from_json(json.loads(json.dumps(one.to_json())))
    assert again.best == one.best and again.get(*one.best).bypass == one.get(*one.best).bypass
    done = {f"{s.layer}:{s.position}": {"bypass": s.bypass, "bypass_refusing": s.bypass_refusing, "kl": s.kl,
                                        "induce": s.induce} for s in scored}
    _, resumed = select_direction(lm, cands, HARMFUL[:3], HARMLESS[:3], SelectConfig(**cfg), done=done,
                                  checkpoint=lambda _m: pytest.fail("nothing should be rescored"))
    assert resumed.best == one.best


def test_selection_screening_scores_all_and_keeps_the_best(planted):
    lm, _ = planted
    cands = find_candidates(lm, HARMFUL, HARMLESS, positions=[-2, -1], filter="none", batch_size=4)
    cfg = SelectConfig(prune_layers=0.0, kl_threshold=1e9, induce_threshold=-1e9, screen=1, keep=2)
    _, sel = select_direction(lm, cands, HARMFUL[:3], HARMLESS[:3], cfg, batch_size=8)
    live = [s for s in sel.scores if "zero difference" not in s.reasons]
    assert all(s.screen_bypass is not None for s in live)
    full = [s for s in live if s.bypass is not None]
    assert len(full) == 2 and sel.best in [s.key for s in full]
    best_screened = sorted(live, key=lambda s: s.screen_bypass)[:2]
    assert {s.key for s in full} == {s.key for s in best_screened}
    assert all("screened out" in " ".join(s.reasons) for s in live if s.bypass is None)
    assert not math.isnan(float(sel.grid("bypass", lm.n_layers, [-2, -1])[1:].max()))


def test_selection_verify_judges_replies_of_the_finalists(planted):
    lm, _ = planted
    cands = find_candidates(lm, HARMFUL, HARMLESS, positions=[-2, -1], filter="none", batch_size=4)
    calls: list[tuple[str, str]] = []

    def judge(prompt: str, reply: str) -> bool:  # deterministic in the reply, so ablation can change it
        calls.append((prompt, reply))
        return sum(map(ord, reply)) % 3 == 0

    cfg = SelectConfig(prune_layers=0.0, kl_threshold=1e9, induce_threshold=-1e9, verify=2, verify_tokens=4)
    d, sel = select_direction(lm, cands, HARMFUL[:3], HARMLESS[:3], cfg, batch_size=8, judge=judge)
    judged = [s for s in sel.scores if s.judged_bypass is not None]
    assert len(judged) == 2 and all(s.judged_induce is not None for s in judged)
    lowest = sorted((s for s in sel.scores if s.bypass is not None), key=lambda s: s.bypass)[:2]
    assert {s.key for s in judged} == {s.key for s in lowest}  # the finalists are the lowest bypass
    assert len(calls) == 3 * 2 + 3 * 2 * 2  # baselines of both groups + (ablation, addition) per finalist
    inducing = [s for s in judged if s.judged_induce > sel.baseline["judged_harmless"]]
    pool = inducing or judged
    assert sel.best == min(pool, key=lambda s: (s.judged_bypass, s.bypass)).key
    assert "verified on replies" in sel.note and d is not None and "judged_bypass" in d.scores
    again = Selection.from_json(json.loads(json.dumps(sel.to_json())))
    assert again.get(*sel.best).judged_bypass == sel.get(*sel.best).judged_bypass


def test_selection_filters_and_choice():
    cfg = SelectConfig(kl_threshold=0.1, induce_threshold=0.0)

    def cand(layer, bypass, kl, induce, *reasons):
        s = CandidateScore(layer, -1, "x", 1.0, bypass=bypass, bypass_refusing=0.0, kl=kl, induce=induce,
                           reasons=list(reasons))
        apply_filters(s, cfg)
        return s

    scores = [
        cand(3, -9.0, 0.5, 2.0),  # best bypass but KL too high
        cand(4, -8.0, 0.05, -1.0),  # fails to induce
        cand(9, -9.5, 0.01, 3.0, "late layer (>= 8)"),
        cand(5, -6.0, 0.02, 1.0),
        cand(6, -7.0, 0.09, 0.5),
    ]
    assert [bool(s.reasons) for s in scores] == [True, True, True, False, False]
    best, note = choose(scores)
    assert best.layer == 6 and note == ""
    best, note = choose(scores[:3])  # nothing eligible: relax induce first (keep KL), never late layers
    assert best.layer == 4 and "induce" in note
    best, note = choose([scores[0], scores[2]])  # then KL too
    assert best.layer == 3 and "caution" in note
    assert SelectConfig(prune_layers=0.2).cutoff(24) == 19


# ---- tuning -------------------------------------------------------------------------------------------------
def test_kernel_and_pareto_front():
    w = Kernel(peak=4, width=2, max_weight=1.2, min_weight=0.4).weights(8)
    assert w.tolist() == pytest.approx([0, 0, 0.4, 0.8, 1.2, 0.8, 0.4, 0])
    pts = [(1.0, 1.0), (0.5, 2.0), (2.0, 0.5), (1.5, 1.5), (0.5, 2.5), (math.nan, 0.0)]
    assert pareto_front(pts) == [1, 0, 2]


def test_tune_weights_runs_and_reports_front(planted):
    lm, u = planted
    d = Direction(u, 1, -1, norm=2.0)
    res = tune_weights(lm, d, HARMFUL[:2], HARMLESS[:2], n_trials=4, seed=0, batch_size=4)
    assert len(res.trials) == 4 and res.trials[0].kernel is None
    assert res.front and all(res.trials[i].pareto for i in res.front)
    assert dataclasses.replace(res, chosen=0).direction(d, lm.n_layers).layer_weights is None  # full ablation
    kernel = next(t for t in res.trials if t.kernel is not None)
    tuned = dataclasses.replace(res, chosen=kernel.index).direction(d, lm.n_layers)
    assert tuned.layer_weights.shape == (lm.n_layers,) and tuned.meta["kernel"] == kernel.kernel
    assert all(t.kl >= 0 for t in res.trials)
    ok = [t for t in res.trials if t.refusal <= res.settings["target"]]
    assert res.settings["target_met"] == bool(ok)
    assert res.chosen == (min(ok, key=lambda t: t.kl) if ok else min(res.trials, key=lambda t: t.refusal)).index
    loose = tune_weights(lm, d, HARMFUL[:2], HARMLESS[:2], n_trials=2, target=1e9, batch_size=4)
    assert loose.settings["target_met"] and loose.chosen == min(loose.trials, key=lambda t: t.kl).index
    forced = tune_weights(lm, d, HARMFUL[:2], HARMLESS[:2], n_trials=2, target=-1e9, batch_size=4)
    assert not forced.settings["target_met"]
    assert forced.chosen == min(forced.trials, key=lambda t: t.refusal).index


def test_tune_opens_with_uniform_strengths_for_the_gentle_end(planted):
    from safetyscope.methods.direction.tune import uniform_strengths

    assert uniform_strengths(1) == [] and uniform_strengths(2) == [0.5] and uniform_strengths(8) == [0.5, 0.25, 0.125]
    lm, u = planted
    d = Direction(u, 1, -1, norm=2.0)
    res = tune_weights(lm, d, HARMFUL[:2], HARMLESS[:2], n_trials=19, seed=0, batch_size=4)
    for t, s in zip(res.trials[1:4], (0.5, 0.25, 0.125), strict=True):
        w = res.trial_direction(d, lm.n_layers, t.index).layer_weights
        assert w.tolist() == pytest.approx([s] * lm.n_layers)
    assert res.trials[4].kernel["min_weight"] != res.trials[4].kernel["max_weight"]  # then random kernels
    # a weaker uniform ablation moves the harmless first token less than full ablation
    assert res.trials[3].kl < res.trials[1].kl < res.trials[0].kl


def test_plots_write_png(tmp_path, png):
    from safetyscope.methods.direction.tune import Trial, TuneResult
    from safetyscope.report.plots.direction import candidate_heatmaps, pareto_plot

    scores = [CandidateScore(layer, pos, "t", 1.0, bypass=-layer - pos, kl=0.01 * (layer + 1), induce=0.5 - layer)
              for layer in range(4) for pos in (-2, -1)]
    scores[0] = CandidateScore(0, -2, "t", 0.0, reasons=["zero difference"])
    sel = Selection(scores, (2, -1), {}, {}, 2, 2)
    png(candidate_heatmaps(sel, 4, [-2, -1], ["<|im_end|>", "\n"], tmp_path / "c.png"))
    trials = [Trial(0, None, -3.0, 0.0, 0.2), Trial(1, {"peak": 1, "width": 1, "max_weight": 1, "min_weight": 0}, 1.0, 0.5, 0.01)]
    png(pareto_plot(TuneResult(trials, 1, [1, 0], False), tmp_path / "p.png"))


def test_reply_perplexity_batched_equals_unbatched():
    from safetyscope.methods.direction.evaluate import reply_nll

    lm = tiny_model("llama")
    replies = ["Sure, here it is.", "No.", "", "Bread needs flour and water"]
    a = reply_nll(lm, HARMLESS, replies, batch_size=4)
    b = reply_nll(lm, HARMLESS, replies, batch_size=1)
    assert a[1] == b[1] == sum(len(lm.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
    assert a[0] == pytest.approx(b[0], rel=1e-4)
    c = reply_nll(lm, HARMLESS, replies, unit_direction(lm), batch_size=4)
    assert c[1] == a[1] and c[0] != pytest.approx(a[0], rel=1e-6)


def test_replies_together_split_back_per_group_and_fill_the_cache(tmp_path, monkeypatch):
    from safetyscope.methods.direction import evaluate as direction_eval
    from safetyscope.methods.direction.evaluate import ReplyCache, replies_together

    lm = tiny_model("llama")
    kw = {"max_new_tokens": 3, "batch_size": 4, "system": None}
    calls = []
    real = direction_eval.generate
    monkeypatch.setattr(direction_eval, "generate", lambda lm_, prompts, **k: calls.append(list(prompts)) or real(lm_, prompts, **k))
    cache = ReplyCache(tmp_path, {"m": 1})
    got = replies_together(lm, {"harmful_base": HARMFUL[:2], "harmless_base": HARMLESS[:3]}, None, cache, **kw)
    assert calls == [HARMFUL[:2] + HARMLESS[:3]]  # one generation call for both groups
    assert got["harmful_base"] == real(lm, HARMFUL[:2], **kw) and got["harmless_base"] == real(lm, HARMLESS[:3], **kw)
    calls.clear()
    again = replies_together(lm, {"harmful_base": HARMFUL[:2], "harmless_base": HARMLESS[:3]}, None, cache, **kw)
    assert calls == [] and again == got  # both read back from the cache
    d = unit_direction(lm)
    part = replies_together(lm, {"harmless_base": HARMLESS[:3], "harmful_ablated": HARMFUL[:2]}, d, cache, **kw)
    assert calls == [HARMFUL[:2]] and part["harmless_base"] == got["harmless_base"]  # only the uncached group runs
    with d.apply(lm):
        assert part["harmful_ablated"] == real(lm, HARMFUL[:2], **kw)


@pytest.mark.slow
def test_cli_find_ablate_e2e_default_model(tmp_path):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    out = tmp_path / "run"
    # A budget at which the difference of means is a real estimate: 16 prompts per group, unfiltered (the score
    # filter keeps only ~1 in 4 harmful prompts of this model), candidates at the last position of the middle
    # blocks. With 4 prompts the candidate was noise and ablating it could raise the refusal score.
    r = CliRunner().invoke(app, ["direction", "find", "default", "--n-prompts", "16", "--n-val", "4", "--layers", "10-15",
                                 "--positions", "-1", "--filter", "none", "--induce", "lazy", "--batch-size", "8",
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert 10 <= res["layer"] <= 15 and res["position"] == -1
    assert res["scores"]["bypass"] < res["scores"]["baseline_harmful_score"]  # selection: lower refusal on validation
    assert (out / "direction" / "plots" / "candidates.png").is_file()
    d = load_artifact(out / "direction" / "artifact")
    assert isinstance(d, Direction) and d.direction.numel() == 896
    r = CliRunner().invoke(app, ["direction", "ablate", "default", "--n-prompts", "2", "--max-new-tokens", "4",
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["harmful_score_after"] < res["harmful_score_before"] - 0.25  # held-out test prompts, not used to select
    assert 0 <= res["kl_first_token"]["mean"] < 5


# ---- CLI: export, tune, add on a tiny model ------------------------------------------------------------
