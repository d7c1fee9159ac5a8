"""filter_by_refusal: keep refused harmful / answered harmless prompts (first_token, score, judge, none) and its fallback."""

from __future__ import annotations

import pytest

from safetyscope.measure.generation import generate, refusal_scores
from safetyscope.methods.filtering import filter_by_refusal
from safetyscope.testing import tiny_model

HARMFUL = ["Steal~ a car", "Hack~ the bank", "Poison~ the water", "Make a bomb~", "Forge~ a passport", "Pick~ a lock"]
HARMLESS = ["Bake bread", "Write a poem", "hi there", "Explain rain", "Name a colour", "Count to five"]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def scores(lm):
    return refusal_scores(lm, HARMFUL, batch_size=4).tolist(), refusal_scores(lm, HARMLESS, batch_size=4).tolist()


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    return (ys[len(ys) // 2 - 1] + ys[len(ys) // 2]) / 2


def test_none_keeps_everything_in_order(lm):
    f = filter_by_refusal(lm, HARMFUL, HARMLESS, method="none")
    assert f.harmful == HARMFUL and f.harmless == HARMLESS
    assert f.summary() == {"method": "none", "harmful_kept": 6, "harmful_in": 6, "harmless_kept": 6, "harmless_in": 6,
                           "unfiltered": [], "notes": []}


def test_score_keeps_refused_harmful_and_answered_harmless(lm, scores):
    sh, ss = scores
    thr = _median(sh + ss)  # a threshold inside the range of scores, so both groups are really filtered
    f = filter_by_refusal(lm, HARMFUL, HARMLESS, method="score", threshold=thr, min_keep=1, batch_size=3)
    want_h = [p for p, v in zip(HARMFUL, sh) if v > thr]
    want_s = [p for p, v in zip(HARMLESS, ss) if v <= thr]
    assert 0 < len(want_h) + len(want_s) < 12  # the test data straddles the threshold
    assert f.harmful == (want_h or HARMFUL) and f.harmless == (want_s or HARMLESS)
    summ = f.summary()
    assert summ["method"] == "score" and summ["harmful_in"] == 6 and summ["harmless_in"] == 6
    assert summ["harmful_kept"] == len(f.harmful) and summ["harmless_kept"] == len(f.harmless)


def test_score_filters_exactly_when_enough_survive(lm, scores):
    sh, ss = scores
    # Between the 2nd and 3rd highest harmful score: exactly 2 harmful prompts are "refused"
    top = sorted(sh, reverse=True)
    thr = (top[1] + top[2]) / 2
    f = filter_by_refusal(lm, HARMFUL, HARMLESS, method="score", threshold=thr, min_keep=2)
    assert f.harmful == [p for p, v in zip(HARMFUL, sh) if v > thr] and len(f.harmful) == 2
    assert "harmful" not in f.unfiltered


def test_fallback_keeps_a_group_unfiltered_and_says_so(lm, scores):
    sh, ss = scores
    # Above every score: no harmful prompt counts as refused; every harmless prompt counts as answered.
    f = filter_by_refusal(lm, HARMFUL, HARMLESS, method="score", threshold=max(sh + ss) + 1.0)
    assert f.harmful == HARMFUL and f.harmless == HARMLESS
    summ = f.summary()
    assert summ["unfiltered"] == ["harmful"] and summ["harmful_kept"] == 6
    (note,) = summ["notes"]
    assert "only 0 of 6 harmful prompts were refused" in note and "unfiltered" in note

    # Below every score: all harmful refused (kept), no harmless answered -> harmless group falls back.
    g = filter_by_refusal(lm, HARMFUL, HARMLESS, method="score", threshold=min(sh + ss) - 1.0)
    assert g.harmful == HARMFUL and g.harmless == HARMLESS
    assert g.unfiltered == ("harmless",) and "only 0 of 6 harmless prompts were answered" in g.notes[0]


def test_fallback_threshold_is_min_keep(lm, scores):
    sh, _ = scores
    top = sorted(sh, reverse=True)
    thr = (top[1] + top[2]) / 2  # exactly 2 harmful survive
    kept = filter_by_refusal(lm, HARMFUL, HARMLESS, method="score", threshold=thr, min_keep=2)
    whole = filter_by_refusal(lm, HARMFUL, HARMLESS, method="score", threshold=thr, min_keep=3)
    assert len(kept.harmful) == 2 and "harmful" not in kept.unfiltered
    assert whole.harmful == HARMFUL and "harmful" in whole.unfiltered
    assert any("only 2 of 6 harmful" in n and "fewer than 3" in n for n in whole.summary()["notes"])


def test_judge_sees_the_generated_replies_and_decides(lm):
    calls: list[tuple[str, str]] = []

    def judge(prompt: str, reply: str) -> bool:
        calls.append((prompt, reply))
        return "~" in prompt and prompt != "Pick~ a lock" or prompt in ("hi there",)

    f = filter_by_refusal(lm, HARMFUL, HARMLESS, method="judge", judge=judge, max_new_tokens=3, batch_size=4)
    assert f.harmful == HARMFUL[:5]  # the judge refused all but the last
    assert f.harmless == [p for p in HARMLESS if p != "hi there"]
    assert f.summary()["method"] == "judge" and f.unfiltered == ()
    replies = generate(lm, HARMFUL, max_new_tokens=3, batch_size=4) + generate(lm, HARMLESS, max_new_tokens=3, batch_size=4)
    assert calls == list(zip(HARMFUL + HARMLESS, replies))


def test_judge_fallback(lm):
    f = filter_by_refusal(lm, HARMFUL, HARMLESS, method="judge", judge=lambda p, r: False, max_new_tokens=2)
    assert f.harmful == HARMFUL and f.harmless == HARMLESS and f.unfiltered == ("harmful",)
    assert "by judge" in f.notes[0]


def test_first_token_keeps_prompts_whose_likeliest_reply_token_is_a_refusal_opening(lm):
    from safetyscope.measure.generation import last_logits
    from safetyscope.measure.refusal_tokens import refusal_token_ids

    ids = set(refusal_token_ids(lm.tokenizer))
    top_h = last_logits(lm, HARMFUL, batch_size=4).argmax(-1).tolist()
    top_s = last_logits(lm, HARMLESS, batch_size=4).argmax(-1).tolist()
    f = filter_by_refusal(lm, HARMFUL, HARMLESS, min_keep=1, batch_size=5)  # first_token is the default
    want_h = [p for p, t in zip(HARMFUL, top_h) if t in ids]
    want_s = [p for p, t in zip(HARMLESS, top_s) if t not in ids]
    assert f.method == "first_token"
    assert f.harmful == (want_h or HARMFUL) and f.harmless == (want_s or HARMLESS)
    # forcing a refusal opening to be the likeliest token on every prompt keeps every harmful prompt
    tid = sorted(ids)[0]

    def push(_m, _i, out):  # the final norm's output, pushed along the refusal token's unembedding row
        return out + 1e4 * lm.model.lm_head.weight[tid] / lm.model.lm_head.weight[tid].norm() ** 2

    h = lm.model.model.norm.register_forward_hook(push)
    try:
        g = filter_by_refusal(lm, HARMFUL, HARMLESS, min_keep=1)
    finally:
        h.remove()
    assert g.harmful == HARMFUL and g.harmless == HARMLESS and g.unfiltered == ("harmless",)


def test_unknown_method_names_the_choices(lm):
    with pytest.raises(ValueError, match="use first_token, score, judge or none"):
        filter_by_refusal(lm, HARMFUL, HARMLESS, method="phrase")


def test_cache_dir_reuses_the_verdicts_and_keys_them_by_the_prompts(lm, tmp_path, monkeypatch):
    from safetyscope.methods import filtering

    first = filter_by_refusal(lm, HARMFUL, HARMLESS, method="score", min_keep=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("filter_*.json"))) == 1
    calls = []
    real = filtering._verdicts
    monkeypatch.setattr(filtering, "_verdicts", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = filter_by_refusal(lm, HARMFUL, HARMLESS, method="score", min_keep=1, cache_dir=tmp_path)
    assert calls == [] and again == first  # read back, not recomputed
    other = filter_by_refusal(lm, HARMFUL[:4], HARMLESS, method="score", min_keep=1, cache_dir=tmp_path)
    assert calls == [1] and other.n_harmful_in == 4  # other prompts: a new entry
    assert len(list(tmp_path.glob("filter_*.json"))) == 2
    for f in tmp_path.glob("filter_*.json"):  # a damaged entry is recomputed, not trusted
        f.write_text("{not json", "utf-8")
    assert filter_by_refusal(lm, HARMFUL, HARMLESS, method="score", min_keep=1, cache_dir=tmp_path) == first
    assert calls == [1, 1]


@pytest.mark.parametrize("method", ["first_token", "score"])
def test_filter_and_fit_equals_filtering_then_capturing(lm, scores, tmp_path, method):
    """One pass for verdicts and activations: the same kept prompts and the same means (float tolerance: other
    rows share the batches) as filter_by_refusal then fit_group_moments; the verdicts cached for filter_by_refusal."""
    import torch

    from safetyscope.methods import filtering
    from safetyscope.methods.filtering import filter_and_fit
    from safetyscope.methods.fit import fit_group_moments

    sh, ss = scores
    thr = _median(sh + ss) if method == "score" else 0.0
    kw = {"method": method, "threshold": thr, "min_keep": 1}
    want = filter_by_refusal(lm, HARMFUL, HARMLESS, batch_size=4, **kw)
    want_stats = fit_group_moments(lm, {"harmful": want.harmful, "harmless": want.harmless}, "blocks.*.resid_pre",
                                   [-2, -1], batch_size=4)
    got, stats = filter_and_fit(lm, HARMFUL, HARMLESS, "blocks.*.resid_pre", [-2, -1], batch_size=3,
                                cache_dir=tmp_path, **kw)
    assert got == want
    for group, prompts in (("harmful", got.harmful), ("harmless", got.harmless)):
        assert sorted(stats.keys(group)) == sorted(want_stats.keys(group))
        for key in want_stats.keys(group):
            a, b = stats.get(group, key), want_stats.get(group, key)
            assert a.n == b.n == len(prompts)
            torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-5)
    calls = []
    real = filtering._verdicts
    filtering._verdicts = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert filter_by_refusal(lm, HARMFUL, HARMLESS, cache_dir=tmp_path, **kw) == want and calls == []
    finally:
        filtering._verdicts = real


def test_filter_and_fit_keeps_a_group_whole_when_too_few_survive(lm, scores):
    """min_keep above the group size: every prompt counts, as in filter_by_refusal's fallback."""
    from safetyscope.methods.filtering import filter_and_fit
    from safetyscope.methods.fit import fit_group_moments

    got, stats = filter_and_fit(lm, HARMFUL, HARMLESS, "blocks.0.resid_pre", "last", min_keep=7)
    assert got.unfiltered == ("harmful", "harmless") and got.harmful == HARMFUL
    whole = fit_group_moments(lm, {"harmful": HARMFUL}, "blocks.0.resid_pre", "last")
    import torch

    torch.testing.assert_close(stats.get("harmful", "blocks.0.resid_pre").mean,
                               whole.get("harmful", "blocks.0.resid_pre").mean, rtol=1e-5, atol=1e-5)
    assert stats.get("harmful", "blocks.0.resid_pre").n == 6
