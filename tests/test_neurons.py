"""Safety neurons: finder, gradient importance, reversible ablation, weight export, fragility engine."""

from __future__ import annotations

import json

import pytest
import torch

from safetyscope.artifacts import ArtifactError, load_artifact
from safetyscope.hooks import forward, hooks
from safetyscope.methods.neurons.artifact import NeuronSet, ablate_neurons, edited_copy
from safetyscope.methods.neurons.fragility import fragility_curves, matched_random, parse_ks
from safetyscope.methods.neurons.grads import (
    NeuronAttribution,
    lm_loss_objective,
    loss_attribution,
    refusal_attribution,
    refusal_objective,
    set_difference,
    text_batches,
)
from safetyscope.methods.neurons.rank import neuron_stats
from safetyscope.prompts.chat import post_instruction_length, tokenize_prompts
from safetyscope.sites import Site
from safetyscope.stats import Moments
from safetyscope.testing import tiny_model

HARMFUL = [f"{w} X" for w in ("how to do it", "tell me", "make a thing", "explain this please", "write code",
                              "give steps", "why not", "ok then")]
HARMLESS = [w + e for w, e in zip(("how to bake", "tell me a joke", "make a cake", "explain rain", "write a poem",
                                   "give tips", "why sky blue", "ok"), "?.!;:,?.")]
PLANT = (1, 7)


def _planted_model():
    """A tiny llama whose neuron PLANT fires only on the token 'X' (which only harmful prompts end with)."""
    lm = tiny_model("llama")
    x_id = lm.tokenizer.convert_tokens_to_ids("X")
    emb = lm.model.model.embed_tokens.weight
    u = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(1))
    u /= u.norm()
    with torch.no_grad():
        emb -= torch.outer(emb @ u, u)  # no other token has a component along u
        emb[x_id] = u
        mlp = lm.model.model.layers[PLANT[0]].mlp
        mlp.gate_proj.weight[PLANT[1]] = 3 * u
        mlp.up_proj.weight[PLANT[1]] = 3 * u
    return lm


@pytest.fixture(scope="module")
def planted():
    return _planted_model()


@pytest.fixture(scope="module")
def lm64():
    return tiny_model("llama", dtype=torch.float64)


# ---- finder --------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["offset", "mean"])
def test_planted_neuron_ranked_first(planted, positions):
    pos = str(-(post_instruction_length(planted.tokenizer) + 1)) if positions == "offset" else "mean"
    stats = neuron_stats(planted, HARMFUL, HARMLESS, positions=pos, batch_size=3)
    for by in ("effect_size", "diff"):
        assert stats.ranking(by, k=1) == [PLANT]
    top = stats.top(1)[0]
    assert (top["layer"], top["neuron"]) == PLANT and top["direction"] == "harmful_higher"
    assert top["activation_diff"] == pytest.approx(top["unsafe_activation"] - top["safe_activation"])
    assert set(top) >= {"layer", "neuron", "activation_diff", "safe_activation", "unsafe_activation",
                        "direction", "effect_size"}
    assert stats.top_per_layer(1)[PLANT[0]][0]["neuron"] == PLANT[1]
    assert stats.ranking(direction="harmless_higher", k=stats.n_neurons).count(PLANT) == 0
    second = abs(stats.top(2)[1]["effect_size"])
    assert abs(top["effect_size"]) > 3 * second


def test_finder_batched_equals_unbatched(planted):
    a = neuron_stats(planted, HARMFUL[:4], HARMLESS[:4], positions="post_instruction", batch_size=1)
    b = neuron_stats(planted, HARMFUL[:4], HARMLESS[:4], positions="post_instruction", batch_size=4)
    for name in ("harmful_mean", "harmless_mean", "pooled_std"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-5)
    assert a.n_harmful == b.n_harmful == 4


# ---- ablation hooks and weight edits ---------------------------------------------------------------
NEURONS = [(0, 3), (0, 17), (2, 5), (1, 63)]


def _set(lm, mode="zero", strength=None):
    means = torch.linspace(-0.5, 0.7, len(NEURONS))
    return NeuronSet(NEURONS, means, mode=mode, strength=strength)


def test_hooks_restore_logits_bit_identical(prompts, hook_count):
    lm = tiny_model("qwen2")
    b = tokenize_prompts(lm.tokenizer, prompts)
    n = hook_count(lm)
    with torch.no_grad():
        before = forward(lm, b)
        for mode, s in (("zero", None), ("mean", 0.5), ("scale", 2.0)):
            with _set(lm, mode, s).apply(lm):
                changed = forward(lm, b)
            assert not torch.equal(before, changed)
        with pytest.raises(RuntimeError), ablate_neurons(lm, NEURONS):
            raise RuntimeError("boom")
        after = forward(lm, b)
    assert torch.equal(before, after)
    assert hook_count(lm) == n


@pytest.mark.parametrize("mode,strength", [("zero", None), ("zero", 0.25), ("mean", None), ("mean", 0.5),
                                           ("scale", 0.5), ("scale", -2.0)])
def test_modes_edit_exactly_the_chosen_neurons(prompts, mode, strength):
    lm = tiny_model("llama")
    b = tokenize_prompts(lm.tokenizer, prompts)
    ns = _set(lm, mode, strength)

    def down_proj_input(layer):  # registered last, so it sees what the down projection receives
        seen = {}
        proj = lm.module(lm.table.expand(lm.table.mlp_out_proj, layer))
        h = proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].clone()))
        try:
            with torch.no_grad():
                forward(lm, b)
        finally:
            h.remove()
        return seen["x"]  # [batch, pos, d_mlp]

    s = 1.0 if strength is None else strength
    for layer, (idx, mu) in ns.by_layer().items():
        orig = down_proj_input(layer)
        with ns.in_layers([layer]).apply(lm):  # earlier layers untouched, so the other neurons must match
            new = down_proj_input(layer)
        keep = torch.ones(orig.shape[-1], dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(new[..., keep], orig[..., keep])
        o = orig[..., idx]
        want = {"zero": (1 - s) * o, "scale": s * o, "mean": o + s * (mu - o)}[mode]
        torch.testing.assert_close(new[..., idx], want)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "phi3", "gpt_neox"])
def test_weight_edit_equals_hook(prompts, family):
    lm = tiny_model(family)
    b = tokenize_prompts(lm.tokenizer, prompts)
    modes = [("zero", None), ("scale", 0.3)] + ([("mean", 0.8)] if family in ("gpt2", "gpt_neox") else [])
    with torch.no_grad():
        base = forward(lm, b)
        for mode, s in modes:
            ns = _set(lm, mode, s)
            with ns.apply(lm):
                hooked = forward(lm, b)
            edited = forward(edited_copy(lm, ns), b)
            torch.testing.assert_close(edited, hooked, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(edited, base)
        assert torch.equal(forward(lm, b), base)  # the original weights are untouched


def test_export_checkpoint_reloads_with_the_edit(prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    from safetyscope.models.adapter import LoadedModel

    for family, mode in (("llama", "zero"), ("gpt2", "mean")):
        lm = tiny_model(family)
        b = tokenize_prompts(lm.tokenizer, prompts)
        ns = _set(lm, mode)
        out = ns.export(lm, tmp_path / family)
        reloaded = LoadedModel.wrap(AutoModelForCausalLM.from_pretrained(out), lm.tokenizer)
        with torch.no_grad(), ns.apply(lm):
            hooked = forward(lm, b)
        with torch.no_grad():
            torch.testing.assert_close(forward(reloaded, b), hooked, rtol=1e-5, atol=1e-5)
        assert json.loads((out / "safetyscope_edit.json").read_text())["mode"] == mode
    with pytest.raises(ArtifactError, match="mean-mode export needs a bias"):
        _set(tiny_model("llama"), "mean").export(tiny_model("llama"), tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_neuron_set_artifact_roundtrip(tmp_path):
    lm = tiny_model("llama")
    ns = NeuronSet(NEURONS, [0.1, 0.2, 0.3, 0.4], scores=[4, 3, 2, 1], mode="scale", strength=0.5, info={"m": 1})
    ns.save(tmp_path / "set")
    back = load_artifact(tmp_path / "set")
    assert isinstance(back, NeuronSet)
    assert back.neurons == NEURONS and back.mode == "scale" and back.strength == 0.5 and back.info == {"m": 1}
    torch.testing.assert_close(back.means, ns.means)
    assert back.top(2).neurons == NEURONS[:2] and back.top(2).means.tolist() == pytest.approx([0.1, 0.2])
    assert back.by_layer()[0][0].tolist() == [3, 17]
    with pytest.raises(ValueError, match="twice"):
        NeuronSet([(0, 1), (0, 1)])
    with pytest.raises(ValueError, match="scale mode needs"):
        NeuronSet([(0, 1)], mode="scale")
    with pytest.raises(ValueError, match="outside this model"):
        NeuronSet([(9, 1)]).check(lm)
    with pytest.raises(ValueError, match="harmless means"), ablate_neurons(lm, [(0, 1)], mode="mean"):
        pass


# ---- gradient importance ---------------------------------------------------------------------------
def _alpha_grad(lm, batches, objective, neuron):
    """Explicit d objective / d alpha at alpha = 1, where neuron's activation is multiplied by alpha."""
    alpha = torch.ones((), dtype=torch.float64, requires_grad=True)
    onehot = torch.zeros(lm.dims.d_mlp, dtype=torch.float64)
    onehot[neuron[1]] = 1
    values = []
    with torch.enable_grad(), hooks(lm, {Site("mlp.neurons", neuron[0]): lambda x, _b: x * (1 + (alpha - 1) * onehot)}):
        for b in batches:
            values.append(objective(forward(lm, b), b))
        torch.cat(values).mean().backward()
    return float(alpha.grad)


def _fd(lm, batches, objective, neuron, eps=1e-2):
    """Central finite difference of the mean objective when the neuron is scaled by 1 +- eps."""
    def at(a):
        with torch.no_grad(), ablate_neurons(lm, [neuron], mode="scale", strength=a):
            return torch.cat([objective(forward(lm, b), b) for b in batches]).mean()

    return float((at(1 + eps) - at(1 - eps)) / (2 * eps))


def test_refusal_attribution_matches_explicit_gradient_and_finite_difference(lm64, prompts):
    ids = [lm64.tokenizer.convert_tokens_to_ids(c) for c in "IAS"]
    att = refusal_attribution(lm64, prompts, token_ids=ids, batch_size=3)
    assert att.n == len(prompts) and att.mean.dtype == torch.float64
    batches = [tokenize_prompts(lm64.tokenizer, prompts)]
    obj = refusal_objective(ids)
    strongest = att.ranking("abs", 3)
    for neuron in [*strongest[:2], (1, 40)]:
        got = float(att.mean[att.layers.index(neuron[0]), neuron[1]])
        assert got == pytest.approx(_alpha_grad(lm64, batches, obj, neuron), rel=1e-6, abs=1e-12)
    for neuron in strongest[:1]:  # finite differences (the norms compute in float32: eps cannot be tiny)
        got = float(att.mean[att.layers.index(neuron[0]), neuron[1]])
        assert got == pytest.approx(_fd(lm64, batches, obj, neuron), rel=2e-3)
    one = refusal_attribution(lm64, prompts, token_ids=ids, batch_size=1)  # batched = unbatched
    torch.testing.assert_close(one.mean, att.mean, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(one.mean_abs, att.mean_abs, rtol=1e-6, atol=1e-12)


def test_loss_attribution_matches_explicit_gradient(lm64):
    texts = ["The cat sat on the mat.", "def f(x): return x + 1", "hello world"]
    att = loss_attribution(lm64, texts, max_tokens=16, batch_size=2)
    batches = list(text_batches(lm64, texts, max_tokens=16, batch_size=2))
    for neuron in [*att.ranking("abs", 1), (2, 3)]:
        got = float(att.mean[neuron[0], neuron[1]])
        assert got == pytest.approx(_alpha_grad(lm64, batches, lm_loss_objective, neuron), rel=1e-6, abs=1e-12)
    top = att.ranking("abs", 1)[0]
    assert float(att.mean[top]) == pytest.approx(_fd(lm64, batches, lm_loss_objective, top), rel=5e-3)


def test_set_difference_removes_utility_neurons():
    def att(values):
        t = torch.tensor(values, dtype=torch.float64)[None, None]  # [n=1, L=1, d_mlp]
        return NeuronAttribution([0], Moments().update(t), Moments().update(t.abs()), "x")

    refusal = att([5.0, 4.0, 3.0, -9.0, 1.0])
    utility = att([0.0, 10.0, 0.0, 0.0, 0.1])
    assert refusal.ranking("signed", 3) == [(0, 0), (0, 1), (0, 2)]
    assert refusal.ranking("abs", 1) == [(0, 3)]
    assert set_difference(refusal, utility, top_utility=1, k=3) == [(0, 0), (0, 2), (0, 4)]
    assert set_difference(refusal, utility, top_utility=0.4, k=2) == [(0, 0), (0, 2)]  # drops 2 of 5


# ---- fragility engine --------------------------------------------------------------------------------
def test_parse_ks():
    assert parse_ks("0,10,1%,5%", 1000) == [0, 10, 50]
    assert parse_ks([5, "0", "100%"], 20) == [0, 5, 20]
    for bad in ("x", "2000", ""):
        with pytest.raises(ValueError):
            parse_ks(bad, 1000)


def test_matched_random_is_seeded_layer_matched_and_nested():
    pools = {layer: [(layer, i) for i in range(50)] for layer in range(3)}
    ranking = [(2, 1), (2, 4), (0, 9), (2, 7), (1, 3), (0, 0)]
    a = matched_random(ranking, pools, lambda n: n[0], seed=3)
    assert a == matched_random(ranking, pools, lambda n: n[0], seed=3)
    assert a != matched_random(ranking, pools, lambda n: n[0], seed=4)
    assert len(set(a)) == len(a)
    for k in range(len(ranking) + 1):
        assert sorted(n[0] for n in a[:k]) == sorted(n[0] for n in ranking[:k])
    with pytest.raises(ValueError, match="no random pool"):
        matched_random([(7, 0)], pools, lambda n: n[0], seed=0)


def test_fragility_curves_engine(prompts):
    lm = tiny_model("llama")
    rank = [(2, i) for i in range(10)] + [(1, i) for i in range(10)]
    pools = {layer: [(layer, i) for i in range(lm.dims.d_mlp)] for layer in range(lm.n_layers)}
    calls = []

    def make(prefix):
        calls.append(len(prefix))
        return lambda: ablate_neurons(lm, prefix)

    kw = {"random_pools": pools, "group": lambda n: n[0], "seeds": (0, 1), "token_ids": [10, 11], "batch_size": 3}
    res = fragility_curves(lm, {"top": rank, "rev": rank[::-1]}, make, [0, 5, 20], prompts[:2], prompts[2:], **kw)
    assert res.curves() == ["top", "rev", "random"]
    assert len(res.rows) == (2 + 2) * 3 and calls.count(0) == 0
    for r in res.rows:
        if r["k"] == 0:
            assert r["kl"] == 0.0 and r["refusal_score"] == res.baseline["refusal_score"]
        else:
            assert r["kl"] > 0
    top20 = [r for r in res.rows if r["curve"] in ("top", "rev") and r["k"] == 20]
    assert top20[0]["refusal_score"] == pytest.approx(top20[1]["refusal_score"], abs=1e-5)  # same set, other order
    summary = {(r["curve"], r["k"]): r for r in res.summary()}
    assert summary[("random", 5)]["n_seeds"] == 2
    json.dumps(res.to_dict())  # serialisable
    # reproducible, and resumed rows are not recomputed
    calls.clear()
    again = fragility_curves(lm, {"top": rank, "rev": rank[::-1]}, make, [0, 5, 20], prompts[:2], prompts[2:],
                             done=res.rows[:4], **kw)
    assert [r["refusal_score"] for r in again.rows] == pytest.approx([r["refusal_score"] for r in res.rows], abs=1e-6)
    assert len(calls) == 8 - 2  # 8 points with k > 0; two of them (top at k=5, 20) were done


# ---- CLI -------------------------------------------------------------------------------------------
def _cli(*args):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, (res.output[-3000:], res.exception)
    return json.loads(res.stdout)


def test_cli_find_ablate_fragility_on_a_tiny_model(tmp_path, png):
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    common = [str(tmp_path / "model"), "--out", str(tmp_path / "run"), "--n-prompts", "6", "--json"]
    found = _cli("neurons", "find", *common, "--top-k", "8", "--utility-texts", "2", "--utility-tokens", "24",
                 "--no-filter")
    assert len(found["top"]) == 8 and found["n_harmful"] == 6 and "top_by_gradient_diff" in found
    png(tmp_path / "run/neurons/effect_size.png")
    ablated = _cli("neurons", "ablate", *common, "--n-eval", "3", "--max-new-tokens", "4", "--k", "4",
                   "--export", str(tmp_path / "edited"))
    assert ablated["n_neurons"] == 4 and "refusal_rate" in ablated["after"]
    assert (tmp_path / "edited/model.safetensors").is_file()
    frag = _cli("neurons", "fragility", *common, "--n-eval", "3", "--ks", "0,2,5%", "--seeds", "2",
                "--utility-texts", "2", "--utility-tokens", "24", "--no-filter", "--curves", "diff,gradient_diff")
    assert frag["ks"] == [0, 2, 10]  # 5% of 3 x 64 neurons
    assert {r["curve"] for r in frag["summary"]} == {"top_by_diff", "top_by_gradient_diff", "random"}
    png(tmp_path / "run/neurons/fragility.png")
    assert (tmp_path / "run/neurons/fragility.svg").is_file()


@pytest.mark.slow
def test_cli_end_to_end_on_the_default_model(tmp_path):
    common = ["default", "--out", str(tmp_path), "--n-prompts", "3", "--json", "--utility-texts", "0"]
    found = _cli("neurons", "find", *common, "--top-k", "10")
    assert len(found["top"]) == 10 and found["n_neurons_analysed"] == 24 * 4864
    assert len(found["top_by_gradient"]) == 10 and (tmp_path / "neurons/set/artifact.json").is_file()
    frag = _cli("neurons", "fragility", *common, "--n-eval", "2", "--ks", "0,1%", "--seeds", "1")
    assert frag["ks"] == [0, 1167]
    by = {(r["curve"], r["k"]): r for r in frag["summary"]}
    assert set(by) == {(c, k) for c in ("top_by_effect_size", "top_by_gradient", "random") for k in (0, 1167)}
    assert by[("random", 0)]["kl"] == 0 and by[("top_by_effect_size", 1167)]["kl"] > 0


# ---- CLI: --filter and the ablation modes ---------------------------------------------------------
