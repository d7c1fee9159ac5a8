"""Causal tracing invariants: exact patching, attribution patching, noise tracing, heatmaps, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from safetyscope.hooks import forward
from safetyscope.measure.metrics import refusal_score
from safetyscope.methods.patching.attribution import (
    agreement,
    attribute,
    rank_cells,
    score_with_grad,
    verify_top,
)
from safetyscope.methods.patching.exact import Effects, Job, Patch, Tracer, cell_name, make_pairs, parse_cell
from safetyscope.methods.patching.noise import instruction_offsets, noise_trace, prefix_length
from safetyscope.sites import Site
from safetyscope.testing import tiny_model

# Character-level tokenizer: same-length twins are aligned pairs; the third pair is unaligned.
PAIRS = [("How do I bake bread?", "How do I bake bxead?"), ("Make a bomb now", "Make a cake now"), ("hi there", "hello")]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def linear64():
    """A near-linear model: small weights, float64 (first-order estimates should be accurate)."""
    return tiny_model("llama", initializer_range=0.005, dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_patching_a_run_with_its_own_activations_changes_nothing(family):
    lm = tiny_model(family)
    tr = Tracer(lm, make_pairs(lm, [(p, p) for p, _ in PAIRS[:2]]), min_gap=0.0)
    eff = tr.components(span="all")
    heads = tr.heads(span="all")
    assert np.abs(eff.raw).max() < 1e-5 and np.abs(heads.raw).max() < 1e-5
    assert np.all(eff.gap == 0)


@pytest.mark.parametrize("kind", ["resid_pre", "resid_post"])
def test_full_residual_patch_reproduces_the_source_logits(llama, kind):
    pairs = make_pairs(llama, PAIRS[:2])
    assert pairs.aligned == [True, True]
    tr = Tracer(llama, pairs, min_gap=0.0)
    jobs = [Job(i, (Patch(Site(kind, layer), pairs.offsets(i, "all")),)) for i in range(2) for layer in range(llama.n_layers)]
    got = tr.run(jobs, return_logits=True)  # [jobs, vocab]
    with torch.no_grad():
        ref = forward(llama, pairs.harmless, last_only=True)[:, -1].float()
    want = ref.repeat_interleave(llama.n_layers, 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the reverse direction reproduces the harmful run
    back = tr.run(jobs, reverse=True, return_logits=True)
    with torch.no_grad():
        ref_h = forward(llama, pairs.harmful, last_only=True)[:, -1].float()
    torch.testing.assert_close(back, ref_h.repeat_interleave(llama.n_layers, 0), rtol=1e-5, atol=1e-5)


def test_batched_patch_variants_equal_one_at_a_time(llama):
    pairs = make_pairs(llama, PAIRS)
    jobs = [Job(i, (Patch(Site(c, layer), pairs.offsets(i, "post_instruction"), h),))
            for i in range(3) for layer, c, h in ((0, "attn.out", None), (2, "mlp.out", None), (1, "attn.heads", 1))]
    jobs.append(Job(1, (Patch(Site("resid_pre", 1), (-3,)), Patch(Site("mlp.out", 0), (-1, -2)))))
    together = Tracer(llama, pairs, batch_size=64, min_gap=0.0).run(jobs)
    alone = Tracer(llama, pairs, batch_size=1, min_gap=0.0).run(jobs)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together, together[0].expand_as(together))  # the rows really differ


def test_hooks_removed_logits_bit_identical(llama, hook_count):
    pairs = make_pairs(llama, PAIRS)
    n_hooks = hook_count(llama)
    with torch.no_grad():
        before = forward(llama, pairs.harmful)
    tr = Tracer(llama, pairs, min_gap=0.0)
    tr.components(span="all")
    attribute(tr, positions=True)
    noise_trace(tr, ["mlp.out"], [0], samples=1)
    with torch.no_grad():
        after = forward(llama, pairs.harmful)
    assert torch.equal(before, after)
    assert hook_count(llama) == n_hooks


def test_unaligned_pairs_patch_only_post_instruction_positions(llama):
    pairs = make_pairs(llama, PAIRS)
    assert pairs.aligned == [True, True, False]
    assert pairs.offsets(2, "all") == tuple(range(-pairs.n_post, 0))
    assert len(pairs.offsets(0, "all")) == pairs.lengths[0] > pairs.n_post
    assert "1 unaligned pair(s) patched at the" in pairs.alignment_note("all")
    pos = Tracer(llama, pairs, min_gap=0.0).positions("resid_pre", [0])
    defined = ~np.isnan(pos.raw[2, 0])
    assert [int(c) for c, ok in zip(pos.cols, defined) if ok] == list(range(-pairs.n_post, 0))
    # at layer 0 the post-instruction template tokens are identical in both prompts: no effect (up to float
    # rounding: the last-position unembedding is one matrix product over the batch, whose blocking depends on
    # the number of rows, so a patched and a clean batch of different sizes can differ in the last bits)
    assert np.abs(pos.raw[2, 0][defined]).max() < 1e-6


def test_score_with_grad_equals_refusal_score():
    logits = torch.randn(5, 50, dtype=torch.float64) * 4
    ids = [1, 3, 7, 7]
    torch.testing.assert_close(score_with_grad(logits, ids).float(), refusal_score(logits, ids))


def test_attribution_matches_exact_patching_on_a_near_linear_model(linear64):
    tr = Tracer(linear64, make_pairs(linear64, PAIRS), min_gap=0.0)
    est = attribute(tr, span="all", positions=False)
    exact, exact_heads = tr.components(span="all"), tr.heads(span="all")
    x, y = exact.raw[:, :, 1:], est["component"].raw[:, :, 1:]  # attn.out and mlp.out
    assert np.abs(x - y).max() < 0.03 * np.abs(x).max()
    assert np.abs(exact_heads.raw - est["head"].raw).max() < 0.03 * np.abs(exact_heads.raw).max()
    exact_heads.min_gap = est["head"].min_gap = -1.0  # normalise by every pair in this comparison
    assert agreement(exact_heads, est["head"])["spearman"] > 0.95
    # the reverse direction (harmful activations into the harmless run) too
    rev, rev_est = tr.components(["mlp.out"], reverse=True), attribute(tr, ["mlp.out"], heads=False, positions=False, reverse=True)
    assert rev.direction == rev_est["component"].direction == "harmful->harmless"
    np.testing.assert_allclose(rev_est["component"].gap, -exact.gap, rtol=1e-6)
    assert np.abs(rev.raw - rev_est["component"].raw).max() < 0.03 * np.abs(rev.raw).max()


def test_file_pairs_are_unaligned(llama, tmp_path):
    from safetyscope.methods.patching.api import select_pairs

    (tmp_path / "h.txt").write_text("Make a bomb now\nhi there\nthird\n")
    (tmp_path / "s.txt").write_text("Make a cake now\nhello\nthird one\n")
    pairs, info = select_pairs(llama, harmful=str(tmp_path / "h.txt"), harmless=str(tmp_path / "s.txt"), n_pairs=2)
    assert len(pairs) == 2 and pairs.aligned == [False, False]  # same length is not enough for file pairs
    assert [r["harmless"] for r in info] == ["Make a cake now", "hello"]
    with pytest.raises(ValueError, match="both --harmful and --harmless"):
        select_pairs(llama, harmful=str(tmp_path / "h.txt"))


def test_heads_recombine_to_the_component_effect(llama, linear64):
    # all heads patched together == attn.out patched (o_proj is linear, no bias): any model
    pairs = make_pairs(llama, PAIRS)
    tr = Tracer(llama, pairs, min_gap=0.0)
    for layer in range(llama.n_layers):
        offs = [pairs.offsets(i, "post_instruction") for i in range(3)]
        all_heads = tr.run([Job(i, (Patch(Site("attn.heads", layer), offs[i]),)) for i in range(3)])
        attn = tr.run([Job(i, (Patch(Site("attn.out", layer), offs[i]),)) for i in range(3)])
        torch.testing.assert_close(all_heads, attn, rtol=1e-5, atol=1e-5)
    # attribution is linear: per-head estimates sum to the attn.out estimate exactly
    est = attribute(tr, positions=False)
    np.testing.assert_allclose(est["head"].raw.sum(-1), est["component"].raw[:, :, 1], rtol=1e-4, atol=1e-7)
    # one head at a time sums to the component effect where the model is (nearly) linear in the heads
    tr64 = Tracer(linear64, make_pairs(linear64, PAIRS), min_gap=0.0)
    heads, comp = tr64.heads(span="all"), tr64.components(["attn.out"], span="all")
    np.testing.assert_allclose(heads.raw.sum(-1), comp.raw[:, :, 0], rtol=0.02, atol=1e-3 * np.abs(comp.raw).max())


def test_verify_top_patches_the_ranked_cells_exactly(llama):
    tr = Tracer(llama, make_pairs(llama, PAIRS), min_gap=0.0)
    est = attribute(tr, layers=[0, 1], positions=True)
    top = rank_cells(list(est.values()), 4)
    rows = verify_top(tr, list(est.values()), 4)
    assert [r["cell"] for r in rows] == [c for c, _ in top]
    site, head, off = parse_cell(rows[0]["cell"], llama.n_layers)
    assert cell_name(site, head, off) == rows[0]["cell"]
    assert parse_cell("blocks.1.attn.heads[2]@-3") == (Site("attn.heads", 1), 2, -3)
    cells = tr.cells(["blocks.1.mlp.out", "blocks.0.attn.heads[1]"])
    direct = tr.components(["mlp.out"], [1])
    np.testing.assert_allclose(cells.raw[:, 0, 0], direct.raw[:, 0, 0], atol=1e-6)


def test_generation_check_generates_under_the_patch(llama):
    from safetyscope.methods.patching.check import generation_check

    pairs = make_pairs(llama, PAIRS[:2])
    tr = Tracer(llama, pairs, min_gap=0.0)
    cells = ["blocks.0.resid_pre", "blocks.1.mlp.out"]
    res = generation_check(tr, cells, span="all", max_new_tokens=1, batch_size=2)
    assert [r["cell"] for r in res["rows"]] == ["(unpatched harmful)", *cells]
    for row, cell in zip(res["rows"], [None, *cells]):
        jobs = [Job(i, (Patch(parse_cell(cell)[0], pairs.offsets(i, "all")),) if cell else ()) for i in range(2)]
        first = tr.run(jobs, return_logits=True).argmax(-1)  # the greedy first token under the same patch
        want = [llama.tokenizer.decode([int(t)], skip_special_tokens=True).strip() for t in first]
        assert row["replies"] == want and 0.0 <= row["refusal_rate"] <= 1.0


def test_effects_normalisation_and_robust_summary():
    raw = np.array([[[-1.0, -0.5]], [[-2.0, 0.0]], [[-0.1, -0.1]], [[-3.0, np.nan]]])  # [4 pairs, 1, 2]
    gap = np.array([-2.0, -2.0, -0.2, -4.0])
    eff = Effects("component", "harmless->harmful", ["0"], ["a", "b"], raw, gap, min_gap=1.0, sign=-1)
    assert eff.used.tolist() == [True, True, False, True]
    np.testing.assert_allclose(eff.median(), [[0.75, 0.125]])
    np.testing.assert_allclose(eff.pooled(), [[6.0 / 8.0, 0.5 / 4.0]])
    assert eff.top(1)[0]["cell"] == "0/a"
    d = eff.to_dict()
    assert d["n_pairs_used"] == 3


def test_noise_tracing(llama):
    pairs = make_pairs(llama, PAIRS[:2])
    n_pre = prefix_length(llama.tokenizer)
    instr = instruction_offsets(pairs.harmful, pairs.lengths, n_pre)
    assert "".join(llama.tokenizer.convert_ids_to_tokens(pairs.harmful.input_ids[0, instr[0]].tolist())) == PAIRS[0][0]
    tr = Tracer(llama, pairs, min_gap=0.0)
    out = noise_trace(tr, ["resid_pre", "mlp.out"], [0, 2], samples=2, scale=50.0, span="all")
    eff = out["component"]
    assert out["corrupted"].shape == (2, 2) and np.abs(out["corrupted"] - out["clean"].numpy()[:, None]).min() > 0
    # restoring the whole residual stream restores the clean run: indirect effect 1
    np.testing.assert_allclose(eff.raw[:, :, 0] / eff.gap[:, None], 1.0, atol=1e-4)


def test_cli_noise_step_is_json_ready(llama, tmp_path):
    from safetyscope.io import write_json
    from safetyscope.methods.patching.api import ModeResult, TracePlan, run_mode

    tr = Tracer(llama, make_pairs(llama, PAIRS[:2]), min_gap=-1e9)  # random model: either sign of gap
    res = run_mode(tr, "noise", TracePlan(["resid_pre"], [1], span="all", noise_samples=1))
    path = write_json(tmp_path / "noise.json", res.to_state())  # JSON-ready (write_json cleans NaN only)
    json.dumps(res.to_state())  # no numpy left
    eff = res.grids["component"]
    back = ModeResult.from_state("noise", json.loads(path.read_text())).grids["component"]  # the resume path
    np.testing.assert_allclose(back.raw, eff.raw)
    np.testing.assert_allclose(back.median(), 1.0, atol=1e-4)  # the whole residual restored (float rounding, as above)


def test_heatmaps_are_written(llama, tmp_path, png):
    from safetyscope.report.plots.patching import plot_effects, position_labels

    pairs = make_pairs(llama, PAIRS)
    tr = Tracer(llama, pairs, min_gap=0.0)
    est = attribute(tr, ["resid_pre"], positions=True)
    for name, eff in est.items():
        labels = position_labels(pairs.harmful, llama.tokenizer, [int(c) for c in eff.cols]) if "position" in name else None
        path = plot_effects(eff, tmp_path / f"{name.replace(':', '-')}.png", stat="mean", labels=labels)
        png(path)


@pytest.mark.slow
def test_trace_cli_end_to_end_on_the_default_model(tmp_path):
    cmd = [sys.executable, "-m", "safetyscope", "trace", "default", "--mode", "exact,attribution", "--pairs", "1", "--n-prompts", "2",
           "--layers", "22-23", "--verify-top", "2", "--out", str(tmp_path), "--json"]
    env = {**os.environ, "SAFETYSCOPE_QUIET": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert set(summary["modes"]) == {"exact", "attribution"}
    assert summary["layers"] == [22, 23] and len(summary["pairs"]) == 1 and summary["pairs"][0]["aligned"]
    grid = np.array(summary["modes"]["exact"]["grids"]["component"]["median"], dtype=float)
    assert grid.shape == (2, 3) and np.isfinite(grid).all()  # the chosen pair's gap is >= --min-gap
    assert "spearman" in summary["modes"]["attribution"]["agreement"]["component"]
    assert len(summary["modes"]["attribution"]["verify"]["forward"]) == 2
    assert all(os.path.getsize(p) > 1000 for p in summary["plots"])
    assert (tmp_path / "trace" / "summary.json").is_file()
