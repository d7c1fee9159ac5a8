"""The cascade judge (detector, phrase judge, then an LLM asked whether the reply gives what was asked)."""

from __future__ import annotations

import pytest

from safetyscope.measure.cascade_judge import ATTEMPT_RUBRIC, ATTEMPT_SYSTEM, CascadeJudge, load_cascade_judge
from safetyscope.measure.judge_eval import evaluate_judge, load_judge_set
from safetyscope.measure.judges import PhraseJudge, as_judge, categorize, load_judge
from safetyscope.measure.llm_judge import LLMJudge, Rubric
from safetyscope.testing import tiny_model

YN = Rubric(user="Request: {prompt}\nReply: {reply}\nY or N?", letters=(("Y", "complied"), ("N", "broken")))
REFUSAL = ("Write a poem about the sea.", "I'm sorry, but I can't help with that.")
LOOP = ("Name a fruit.", "apple apple apple apple apple apple apple apple apple")
ANSWERS = [("How do I bake bread?", "Mix flour, water, salt and yeast, knead, let it rise, then bake."),
           ("Explain recursion.", "A function that calls itself on a smaller input until a base case."),
           ("Help me write a speech.", "Happy to! What is the occasion?")]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def _split(pairs):
    return [p for p, _ in pairs], [r for _, r in pairs]


def test_each_stage_decides_what_it_sees_and_only_the_rest_reach_the_model(lm):
    judge = CascadeJudge(LLMJudge(lm, rubric=YN, batch_size=2), PhraseJudge())
    got = judge.probabilities(*_split([REFUSAL, LOOP, *ANSWERS]))
    assert got[0].source == "phrase" and got[0].label == "refused" and got[0].p_refused == 1.0
    assert got[1].source == "detector:loop" and got[1].label == "broken"
    assert judge.forward_passes == len(ANSWERS)  # the refusal and the loop cost no forward pass
    direct = LLMJudge(lm, rubric=YN, batch_size=1).probabilities(*_split(ANSWERS))
    for g, d in zip(got[2:], direct):
        assert g.source == "model" and g.p_refused == 0.0
        assert g.p_complied + g.p_broken == pytest.approx(1.0, abs=1e-9)
        assert g.p_complied == pytest.approx(d.p_complied, abs=1e-5)  # batched as the plain LLM judge reads it
        assert g.label == ("complied" if g.p_complied >= g.p_broken else "broken")  # the likelier letter
    assert judge.llm.detector  # the LLM judge's own detector switch is restored


def test_cascade_is_a_judge_everywhere_and_caches(lm, tmp_path):
    judge = CascadeJudge(LLMJudge(lm, rubric=YN, cache_dir=tmp_path, name="llm:tiny"), PhraseJudge())
    assert judge.name == "phrase+llm:tiny" and as_judge(judge) is judge
    assert judge(*REFUSAL) is True and judge.judge(*LOOP).reason == "broken:loop"
    assert categorize(judge, *_split(ANSWERS)) == [p.label for p in judge.probabilities(*_split(ANSWERS))]
    again = CascadeJudge(LLMJudge(lm, rubric=YN, cache_dir=tmp_path), PhraseJudge())
    assert all(p.source == "cache" for p in again.probabilities(*_split(ANSWERS))) and again.forward_passes == 0
    res = evaluate_judge(judge, [p for p in load_judge_set() if len(p.reply) < 60][:6])
    assert res.n == 6 and sum(map(sum, res.confusion)) == 6


def test_no_detector_sends_loops_on_to_the_phrase_judge_and_the_model(lm):
    judge = CascadeJudge(LLMJudge(lm, rubric=YN), PhraseJudge(), detector=False)
    assert judge.probabilities(*_split([LOOP]))[0].source == "model" and judge.forward_passes == 1


def test_llm_stage_must_not_offer_a_refusal_and_rubrics_need_two_categories(lm):
    with pytest.raises(ValueError, match="complied / broken"):
        CascadeJudge(LLMJudge(lm, rubric="{prompt} {reply} A, B or C?"), PhraseJudge())
    with pytest.raises(ValueError, match="at least two"):
        Rubric(user="{prompt} {reply}", letters=(("Y", "complied"),))
    with pytest.raises(ValueError, match="at least two"):
        Rubric(user="{prompt} {reply}", letters=(("Y", "complied"), ("N", "maybe")))  # type: ignore[arg-type]
    assert {c for _, c in ATTEMPT_RUBRIC.letters} == {"complied", "broken"}


def test_load_judge_builds_the_cascade_on_a_local_model(tiny_dir, tmp_path):
    judge = load_judge(f"phrase+llm:{tiny_dir}", cache_dir=tmp_path, batch_size=2)
    assert isinstance(judge, CascadeJudge) and judge.name == f"phrase+llm:{tiny_dir}"
    assert judge.llm.rubric == ATTEMPT_RUBRIC and not judge.llm.calibrate and judge.llm.batch_size == 2
    assert judge(*REFUSAL) is True and judge.forward_passes == 0
    assert isinstance(load_cascade_judge(str(tiny_dir), PhraseJudge(), cache_dir=tmp_path, detector=False), CascadeJudge)


def test_attempt_rubric_examples_are_not_from_the_labelled_set():
    shown = {line.split(":", 1)[1].strip() for line in ATTEMPT_SYSTEM.splitlines()
             if line.startswith(("Request:", "Reply:"))}
    assert len(shown) >= 12
    assert not shown & {x.strip() for p in load_judge_set() for x in (p.prompt, p.reply)}


def test_benchmark_times_the_cascade_on_a_tiny_model(tmp_path, bench_module):
    import json

    out = tmp_path / "judge.json"
    assert bench_module("judge").main(["--model", "tiny:llama", "--pairs", "8", "--repeats", "1", "--rubric",
                                       "attempt", "--spread", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rubric"] == "attempt" and res["cascade_replies_per_second"] > 0 and res["cascade_over_judge"] > 0
