"""Extended refusals as harden targets: the model's own one-sentence overview of the request, then its
own refusal (methods.finetune.data.extend_refusals), on a tiny random model with stubbed generation."""

from __future__ import annotations

import pytest

from safetyscope.measure.capability import decode_reply
from safetyscope.methods.finetune import data as data_mod
from safetyscope.methods.finetune.data import Example, TrainingData, extend_refusals, first_sentence
from safetyscope.testing import tiny_model


@pytest.fixture(scope="module")
def lm():
    return tiny_model("qwen2")


def test_first_sentence_takes_one_plain_sentence():
    assert first_sentence("The request is about stealing cars. It could hurt people.") == "The request is about stealing cars."
    assert first_sentence("  Short. The rest of a longer sentence follows here.") is None  # under 20 characters
    assert first_sentence("1. Buy the parts you need for the thing.") is None  # a list is not an overview
    assert first_sentence("No full stop anywhere in this reply at all") is None
    assert first_sentence("A line that breaks\nbefore its full stop ends.") is None


def _squash(text):  # the tiny model's tokenizer is per character and decodes with spaces between them
    return text.replace(" ", "")


def _ids(lm, text):
    return tuple(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_targets_get_the_overview_then_their_own_refusal(lm, monkeypatch):
    stop = lm.tokenizer.eos_token_id
    refusal = _ids(lm, "Sorry, I cannot help.") + (stop,)
    examples = (Example("steal a car", refusal, "target", "harmful:own"),
                Example("make poison", refusal, "target", "harmful:added"),
                Example("bake bread", _ids(lm, "Mix flour and water."), "retain", "harmless:own"))
    data = TrainingData(examples, {"harmful:own": 1})
    overviews = {"steal a car": "The request is about taking a car that is not yours. More text.",
                 "make poison": "Sorry, I will not describe that at all."}  # itself a refusal: not used

    def replies(self, prompts, under=None):
        assert under is None
        out = []
        for p in prompts:
            key = next(k for k in overviews if f'"{k}"' in p)  # the request is quoted in OVERVIEW_REQUEST
            out.append(_ids(lm, overviews[key]))
        return out

    monkeypatch.setattr(data_mod._Gen, "replies", replies)
    judge = lambda _p, reply: "Sorry" in _squash(reply)  # noqa: E731
    ext = extend_refusals(lm, data, judge=judge)
    by_prompt = {e.prompt: e for e in ext.examples}
    first = by_prompt["steal a car"]
    assert first.source == "harmful:own+extended" and first.kind == "target"
    assert _squash(decode_reply(lm, first.reply)) == _squash("The request is about taking a car that is not yours. Sorry, I cannot help.")
    assert first.reply[-1] == stop  # the stop token the refusal ended with is kept
    assert by_prompt["make poison"] == examples[1]  # overview judged a refusal: the plain refusal stays
    assert by_prompt["bake bread"] == examples[2]  # retain examples are never touched
    assert ext.counts["target:extended"] == 1 and ext.counts["harmful:own"] == 1
    assert [e.prompt for e in ext.examples] == [e.prompt for e in examples]  # order kept


def test_a_joined_reply_not_judged_a_refusal_is_not_used(lm, monkeypatch):
    refusal = _ids(lm, "Sorry, I cannot help.")
    data = TrainingData((Example("steal a car", refusal, "target", "harmful:own"),), {})
    monkeypatch.setattr(data_mod._Gen, "replies",
                        lambda self, prompts, under=None: [_ids(lm, "The request is about a car theft plan.")] * len(prompts))
    ext = extend_refusals(lm, data, judge=lambda _p, reply: _squash(reply).startswith("Sorry"))  # the opening decides
    assert ext.examples == data.examples and ext.counts["target:extended"] == 0


def test_a_joined_reply_longer_than_the_training_cut_is_not_used(lm, monkeypatch):
    refusal = _ids(lm, "Sorry, I cannot help.")
    data = TrainingData((Example("steal a car", refusal, "target", "harmful:own"),), {})
    overview = "The request is about a car theft plan."
    monkeypatch.setattr(data_mod._Gen, "replies", lambda self, prompts, under=None: [_ids(lm, overview)] * len(prompts))
    judge = lambda _p, reply: "Sorry" in _squash(reply)  # noqa: E731
    n = len(extend_refusals(lm, data, judge=judge).examples[0].reply)  # the joined reply's length, uncut
    assert n > len(refusal)
    assert extend_refusals(lm, data, judge=judge, max_reply_tokens=n - 1).counts["target:extended"] == 0
    assert extend_refusals(lm, data, judge=judge, max_reply_tokens=n).counts["target:extended"] == 1


def test_finetune_rejects_an_unknown_refusal_style(lm):
    from safetyscope.methods.finetune.api import finetune

    with pytest.raises(ValueError, match="unknown refusal style 'long'; use own or extended"):
        finetune(lm, "harden", "blocks.1.attn", harmful=["a"], harmless=["b"], refusal_style="long")  # type: ignore[arg-type]


def test_restate_opens_every_reply_and_keeps_each_kinds_verdict(lm, monkeypatch):
    """style="restate": targets and retain replies both open with the neutral sentence; a retain reply is
    rewritten only when the joined reply is still judged an answer, a target only when still a refusal."""
    refusal = _ids(lm, "Sorry, I cannot help.")
    answer = _ids(lm, "Mix flour and water.")
    examples = (Example("steal a car", refusal, "target", "harmful:own"),
                Example("bake bread", answer, "retain", "harmless:own"),
                Example("kill a process", answer, "retain", "scary:own"),
                Example("track a phone", refusal, "target", "harmful:added"))
    sentences = {"steal a car": "The request is about taking a car.", "bake bread": "The request is about baking bread.",
                 "kill a process": "The request is about Sorry business here.",  # would read as a refusal
                 "track a phone": "To track a phone, you can install an app on it."}  # starts answering instead
    asked: list[str] = []

    def replies(self, prompts, under=None):
        asked.extend(prompts)
        return [_ids(lm, sentences[next(k for k in sentences if f'"{k}"' in p)]) for p in prompts]

    monkeypatch.setattr(data_mod._Gen, "replies", replies)
    judge = lambda _p, reply: "Sorry" in _squash(reply)  # noqa: E731
    ext = extend_refusals(lm, TrainingData(examples, {}), judge=judge, style="restate")
    assert all("Without answering it" in p for p in asked) and len(asked) == 4  # the neutral request, every example
    got = {e.prompt: e for e in ext.examples}
    assert got["steal a car"].source == "harmful:own+restate"
    assert got["bake bread"].source == "harmless:own+restate" and got["bake bread"].kind == "retain"
    assert _squash(decode_reply(lm, got["bake bread"].reply)) == _squash("The request is about baking bread. Mix flour and water.")
    assert got["kill a process"] == examples[2]  # its sentence is judged a refusal: the answer stays as it was
    assert got["track a phone"] == examples[3]  # no restatement (it opens an answer): the plain refusal stays
    assert ext.counts["target:restate"] == 1 and ext.counts["retain:restate"] == 1
    with pytest.raises(ValueError, match="extended or restate"):
        extend_refusals(lm, TrainingData(examples, {}), judge=judge, style="own")


def test_restate_can_leave_the_over_refusals_answered_under_ablation_plain(lm, monkeypatch):
    """restate_changed=False (the "mixed" retain loss): a retain row the model refused and answered only under
    ablation keeps its plain answer; its own answers and every target, its own or added, are restated."""
    refusal, answer = _ids(lm, "Sorry, I cannot help."), _ids(lm, "Mix flour and water.")
    examples = (Example("steal a car", refusal, "target", "harmful:own"),
                Example("track a phone", refusal, "target", "harmful:added"),
                Example("bake bread", answer, "retain", "harmless:own"),
                Example("kill a process", answer, "retain", "scary:ablated"))
    monkeypatch.setattr(data_mod._Gen, "replies", lambda self, prompts, under=None: [
        _ids(lm, "The request is about something.")] * len(prompts))
    judge = lambda _p, reply: "Sorry" in _squash(reply)  # noqa: E731
    for changed, plain in ((True, set()), (False, {"kill a process"})):
        ext = extend_refusals(lm, TrainingData(examples, {}), judge=judge, style="restate", restate_changed=changed)
        got = {e.prompt: e for e in ext.examples}
        assert {p for p, e in got.items() if not e.source.endswith("+restate")} == plain
        assert (got["kill a process"].reply == answer) == bool(plain)
