"""The direction's before/after measurements: the reply cache and the logits read from generations."""

from __future__ import annotations

import pytest

from safetyscope.testing import tiny_model
from test_direction import HARMFUL, HARMLESS, unit_direction


def test_reply_cache_serves_any_subset_of_stored_prompts_and_keeps_earlier_ones(tmp_path):
    from safetyscope.methods.direction.evaluate import ReplyCache

    cache = ReplyCache(tmp_path, {"m": 1}, {"d": 1})
    cache.put("harmless_base", ["a", "b", "c"], ["ra", "rb", "rc"])
    assert cache.get("harmless_base", ["c", "a"]) == ["rc", "ra"]  # a subset, in the caller's order
    assert cache.get("harmless_base", ["a", "z"]) is None  # one prompt missing: generate
    cache.put("harmless_base", ["z"], ["rz"])
    assert cache.get("harmless_base", ["a", "z"]) == ["ra", "rz"]  # merged, nothing lost
    assert ReplyCache(tmp_path, {"m": 2}).get("harmless_base", ["a"]) is None  # another model's replies are not served
    assert cache.get("harmful_ablated", ["a"]) is None
    other = ReplyCache(tmp_path, {"m": 1}, {"d": 2})  # base replies are shared across interventions
    assert other.get("harmless_base", ["b"]) == ["rb"]
    cache.put("harmful_ablated", ["a"], ["x"])
    assert other.get("harmful_ablated", ["a"]) is None


def test_evaluate_ablation_from_generation_logits_equals_separate_forward_passes(monkeypatch):
    """The scores and KL read from the generations' own passes (and the memo's shared unmodified logits)
    equal those of separate logits_under passes."""
    from safetyscope.measure.compare import logits_under
    from safetyscope.measure.metrics import kl_divergence, refusal_score
    from safetyscope.measure.refusal_tokens import refusal_token_ids
    from safetyscope.methods.direction.evaluate import evaluate_ablation

    lm = tiny_model("llama")
    d = unit_direction(lm)
    memo: dict = {}
    res = evaluate_ablation(lm, d, HARMFUL[:3], HARMLESS[:3], max_new_tokens=3, batch_size=2, memo=memo)
    ids = refusal_token_ids(lm.tokenizer)
    kl = kl_divergence(logits_under(lm, HARMLESS[:3], None), logits_under(lm, HARMLESS[:3], d))
    assert res["kl_first_token"]["mean"] == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-6)
    assert res["harmful_score_after"] == pytest.approx(float(refusal_score(logits_under(lm, HARMFUL[:3], d), ids).mean()), abs=1e-4)
    assert res["harmful_score_before"] == pytest.approx(float(refusal_score(logits_under(lm, HARMFUL[:3], None), ids).mean()), abs=1e-4)
    from safetyscope.methods.direction import evaluate as direction_eval

    calls: list[int] = []
    monkeypatch.setattr(direction_eval, "logits_under", lambda *a, **k: calls.append(1))
    again = evaluate_ablation(lm, d, HARMFUL[:3], HARMLESS[:3], max_new_tokens=3, batch_size=2, memo=memo)
    assert calls == [] and again["kl_first_token"] == res["kl_first_token"]  # nothing recomputed
    assert res["reply_perplexity"]["n_tokens"] > 0
    monkeypatch.setattr(direction_eval, "reply_nll", lambda *a, **k: calls.append(2))
    bare = evaluate_ablation(lm, d, HARMFUL[:3], HARMLESS[:3], max_new_tokens=3, batch_size=2, reply_perplexity=False)
    assert "reply_perplexity" not in bare and calls == [] and bare["kl_first_token"] == res["kl_first_token"]
