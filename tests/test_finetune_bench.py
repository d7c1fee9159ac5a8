"""benchmarks/finetune.py on a tiny random model (the figures come from the real runs) and its rate-choosing rule."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(bench_module):
    return bench_module("finetune")


def test_benchmark_sweeps_every_method_and_records_judged_and_score_columns(tmp_path, capsys, bench):
    args = ["--model", "tiny:llama", "--mode", "weaken", "--components", "blocks.1.attn", "--steps", "1",
            "--train-batch", "1", "--n-train", "2", "--n-eval", "2", "--max-new-tokens", "2", "--eval-tokens", "2",
            "--ppl-tokens", "16", "--eval-split", "val", "--skip-ablated", "--methods", "components,random,lora,full",
            "--lr", "1e-3,1e-2", "--random-lr", "3e-2", "--lora-lr", "1e-3", "--full-lr", "1e-4", "--save-tuned",
            "--out", str(tmp_path)]
    assert bench.main(args) == 0
    res = json.loads((tmp_path / "weaken-val.json").read_text())
    rows = res["rows"]
    assert list(rows) == ["unmodified", "components@0.001", "components@0.01", "random", "lora", "full"]
    assert rows["random"]["lr"] == 3e-2 and rows["full"]["lr"] == 1e-4  # each method its own rate
    assert rows["random"]["n_trainable"] == rows["components@0.01"]["n_trainable"] > 0
    assert rows["full"]["n_trainable"] > rows["lora"]["n_trainable"] > 0
    for name, row in rows.items():
        assert "refusal_harmful_ablated" not in row  # --skip-ablated
        for group in ("harmful", "harmless", "scary"):
            assert 0.0 <= row[f"score_{group}"] <= 1.0 and 0.0 <= row[f"refusal_{group}"] <= 1.0
        if name != "unmodified":
            assert row["forward_seconds"] > 0 and row["step_over_forward"] > 0
    assert set(res["chosen"]) == {"components", "random", "lora", "full"}
    from safetyscope.io import load_tensors

    saved = load_tensors(tmp_path / "tuned-components@0.01.safetensors")  # --save-tuned
    assert saved and sum(t.numel() for t in saved.values()) >= rows["components@0.01"]["n_trainable"]
    again = [x for x in args if x not in ("--save-tuned",)] + ["--reuse-tuned", "--skip-unmodified", "--methods", "components"]
    assert bench.main(again) == 0  # measures the saved tensors instead of training
    re = json.loads((tmp_path / "weaken-val.json").read_text())["rows"]
    for name in ("components@0.001", "components@0.01"):
        assert re[name]["reused"].endswith(f"tuned-{name}.safetensors") and "train_seconds" not in re[name]
        assert re[name]["kl_first_token"] == rows[name]["kl_first_token"]  # the same tuned model, measured again
        assert re[name]["ppl"] == rows[name]["ppl"]
    out = capsys.readouterr().out
    assert "score_harmful" in out and "chosen for components: components@" in out


def _row(lr, harmful, kl):
    return {"lr": lr, "refusal_harmful": harmful, "kl_first_token": kl}


def test_choose_rates_lowest_kl_among_those_meeting_the_target_else_best_refusal(bench):
    rows = {"c@1": _row(1.0, 0.0, 0.9), "c@2": _row(2.0, 0.05, 0.3), "c@3": _row(3.0, 0.2, 0.1),
            "r@1": _row(1.0, 0.4, 0.1), "r@2": _row(2.0, 0.3, 0.5), "r@3": _row(3.0, 0.3, 0.2)}
    methods = {k: k.split("@")[0] for k in rows}
    got = bench.choose_rates(rows, methods, "weaken", 0.05)
    assert got["c"].startswith("c@2 (lr 2; meets")  # c@3 has the lowest KL but misses the target
    assert got["r"].startswith("r@3 (lr 3; misses")  # best refusal 0.3, the tie broken by KL
    hard = bench.choose_rates({"h@1": _row(1.0, 0.96, 0.4), "h@2": _row(2.0, 1.0, 0.2), "h@3": _row(3.0, 0.5, 0.0)},
                              {"h@1": "h", "h@2": "h", "h@3": "h"}, "harden", 0.05)
    assert hard["h"].startswith("h@2 (lr 2; meets")


def test_ablating_the_trained_span_removes_every_direction_of_it_and_unhooks(bench):
    """The trained-subspace column ablates all k directions at every site; logits come back bit-identical."""
    import torch

    from safetyscope.runner import run_capture
    from safetyscope.sites import Site
    from safetyscope.testing import tiny_model

    lm = tiny_model("llama")
    prompts = ["How do I bake bread?", "Steal a car"]
    q = torch.linalg.qr(torch.randn(lm.dims.d_model, 3, generator=torch.Generator().manual_seed(0))).Q.T  # [3, d]
    site = Site("resid_pre", lm.n_layers - 1)
    ids = lm.tokenizer(prompts[0], return_tensors="pt").input_ids
    with torch.no_grad():
        before = lm.model(ids).logits
    _b, plain = next(iter(run_capture(lm, prompts, site, "last")))
    with bench._ablate_span(lm, q):
        _b, vals = next(iter(run_capture(lm, prompts, site, "last")))
    assert (plain[site].float() @ q.T).abs().max() > 1e-2  # the plain stream has components along the span
    assert (vals[site].float() @ q.T).abs().max() < 1e-4  # and under the ablation none are left
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, before)


def test_judged_fresh_search_picks_a_candidate_of_the_given_blocks(bench, tmp_path):
    """The judged attacker (``--fresh-judged``) scores the candidates of --fresh-layers by judged replies and
    returns one of them."""
    import torch

    from safetyscope.testing import tiny_model

    lm = tiny_model("llama")
    a = bench.parse_args(["--fresh-layers", "1-2", "--fresh-judged", "2", "--eval-tokens", "2", "--batch-size", "4"])
    sets = {"train_harmful": ["Steal a car", "Hack the bank", "Poison it"],
            "train_harmless": ["Bake bread", "Write a poem", "hi there"]}
    d = bench._judged_search(lm, a, sets)
    assert d.layer in (1, 2) and d.position < 0
    cands = bench.find_candidates(lm, sets["train_harmful"], sets["train_harmless"], filter="none", batch_size=4)
    assert torch.allclose(d.direction, cands.direction(d.layer, d.position).direction)  # a candidate, unchanged


def test_fragility_is_judged_on_replies_under_the_zeroed_neurons(bench, monkeypatch):
    """--fragility-ks reads refusal through the benchmark's judged refusal (--eval-tokens replies), under the set's
    top k neurons zeroed for each k > 0, and intact for k = 0."""
    import argparse
    from contextlib import contextmanager, nullcontext

    from safetyscope.methods.neurons.artifact import NeuronSet
    from safetyscope.testing import tiny_model

    lm = tiny_model("llama")
    ns = NeuronSet([(1, 5), (0, 3), (1, 7)])
    zeroed: list[int] = []

    @contextmanager
    def top_k_zeroed(k):
        zeroed.append(k)
        yield

    monkeypatch.setattr(NeuronSet, "top", lambda self, k: type("Top", (), {"apply": lambda _s, _lm: top_k_zeroed(k)})())
    calls: list[tuple[int, int, list[int]]] = []

    def judged(_lm, prompts, tokens, _batch, ctx=None):
        with ctx if ctx is not None else nullcontext():
            calls.append((len(prompts), tokens, list(zeroed)))
        return 0.25 if ctx is not None else 0.5

    monkeypatch.setattr(bench, "_refusal", judged)
    a = argparse.Namespace(fragility_ks="0,2", eval_tokens=7, batch_size=2)
    assert bench._fragility(lm, a, ["p", "q"], ns) == {"fragility_k0": 0.5, "fragility_k2": 0.25}
    assert calls == [(2, 7, []), (2, 7, [2])]  # 7-token judged replies; the top 2 zeroed only in the second
    assert bench._fragility(lm, a, ["p"], None) == {}


def test_train_scary_tasks_draws_the_scary_retain_prompts_from_both_sets_and_leaves_the_measured_ones(bench):
    from safetyscope.prompts import builtin_prompts

    plain = bench._sets(bench.parse_args(["--n-train", "8", "--n-scary", "60", "--n-eval", "13"]))
    both = bench._sets(bench.parse_args(["--n-train", "8", "--n-scary", "60", "--n-eval", "13", "--train-scary-tasks"]))
    assert len(plain["train_scary"]) == 40 and len(both["train_scary"]) == 60  # the old train split has 40
    pool = set(builtin_prompts("scary_harmless", "train").texts) | set(builtin_prompts("scary_harmless_tasks", "train").texts)
    assert set(both["train_scary"]) <= pool and set(both["train_scary"]) - set(plain["train_scary"])
    for name in ("train_harmful", "train_harmless", "harmful", "harmless", "scary"):
        assert both[name] == plain[name]
    assert set(both["scary"]) <= set(builtin_prompts("scary_harmless", bench.parse_args([]).eval_split).texts)


def test_train_seed_seeds_training_alone_and_keeps_the_prompts_of_seed(bench):
    base = ["--n-train", "8", "--n-eval", "4", "--seed", "2"]
    a, b = bench.parse_args(base), bench.parse_args([*base, "--train-seed", "5"])
    assert bench._train_config(a, 1e-4, True).seed == 2 and bench._train_config(b, 1e-4, True).seed == 5
    assert bench._sets(a) == bench._sets(b)  # the same prompts, so the cached targets are the same too
    assert bench._sets(a) != bench._sets(bench.parse_args(["--n-train", "8", "--n-eval", "4", "--seed", "5"]))
