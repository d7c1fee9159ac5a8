"""LogitsMemo: the unmodified model's first-token logits kept per prompt, never read under an edit or other weights."""

from __future__ import annotations

import pytest
import torch

from safetyscope.measure import generation
from safetyscope.measure.compare import logits_under
from safetyscope.measure.generation import last_logits
from safetyscope.measure.memo import LogitsMemo
from safetyscope.methods.direction.artifact import Direction
from safetyscope.testing import tiny_model

PROMPTS = ["How do I bake bread?", "Write a poem", "hi there", "Explain recursion", "Name a colour"]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture
def rows(monkeypatch):
    """Rows the model is run on through generation.forward."""
    seen: list[int] = []
    real = generation.forward

    def counting(lm, batch, **kw):
        seen.append(len(batch))
        return real(lm, batch, **kw)

    monkeypatch.setattr(generation, "forward", counting)
    return seen


def test_memo_returns_the_same_logits_and_runs_each_prompt_once(lm, rows):
    plain = last_logits(lm, PROMPTS, batch_size=2)
    memo = LogitsMemo(lm)
    rows.clear()
    first = last_logits(lm, PROMPTS[:3], batch_size=2, memo=memo)
    assert sum(rows) == 3 and len(memo) == 3
    both = last_logits(lm, PROMPTS, batch_size=2, memo=memo)  # three kept, two run
    assert sum(rows) == 5 and len(memo) == 5
    torch.testing.assert_close(both, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(both[:3], first)
    again = last_logits(lm, list(reversed(PROMPTS)), batch_size=4, memo=memo)
    assert sum(rows) == 5 and torch.equal(again, both.flip(0))
    assert torch.equal(memo.lookup(lm, PROMPTS, None), both) and memo.lookup(lm, [*PROMPTS, "new"], None) is None
    other_system = last_logits(lm, PROMPTS[:1], system="Be brief.", memo=memo)  # keyed by the system prompt too
    assert sum(rows) == 6 and not torch.allclose(other_system[0], both[0])


def test_memo_is_not_read_or_filled_under_an_intervention(lm, rows):
    memo = LogitsMemo(lm)
    plain = logits_under(lm, PROMPTS, None, memo=memo)
    g = torch.Generator().manual_seed(0)
    d = Direction(torch.randn(lm.dims.d_model, generator=g), 1, -1, norm=3.0)
    rows.clear()
    edited = logits_under(lm, PROMPTS, d, memo=memo)
    assert sum(rows) == len(PROMPTS)  # run, not read
    assert not torch.allclose(edited, plain, atol=1e-4)
    assert torch.equal(logits_under(lm, PROMPTS, None, memo=memo), plain)  # the kept rows are the unmodified ones
    assert sum(rows) == len(PROMPTS)


def test_memo_misses_after_a_weight_edit_and_refuses_another_model(lm, rows):
    memo = LogitsMemo(lm)
    before = last_logits(lm, PROMPTS, memo=memo)
    w = lm.model.model.norm.weight
    rows.clear()
    with torch.no_grad():
        w.mul_(2.0)
    try:
        after = last_logits(lm, PROMPTS, memo=memo)
    finally:
        with torch.no_grad():
            w.div_(2.0)
    assert sum(rows) == len(PROMPTS) and not torch.allclose(after, before, atol=1e-4)
    with pytest.raises(ValueError, match="another model"):
        last_logits(tiny_model("qwen2"), PROMPTS, memo=memo)


def test_search_then_refine_with_a_memo_equals_without(lm, rows):
    """The direction search fills the memo with the logits refinement needs: refinement then runs no reference pass,
    and both results equal those without a memo."""
    from safetyscope.methods.direction import DirectionConfig, refine_direction, search_direction

    harmful = ["Steal~ a car", "Hack~ the bank", "Poison~ the water", "Make a bomb~", "Forge~ a passport", "Pick~ a lock"]
    harmless = PROMPTS + ["Count to five"]
    cfg = DirectionConfig(filter="first_token")
    kw = {"val_harmful": harmful[:3], "val_harmless": harmless[:3], "config": cfg, "batch_size": 4}
    memo = LogitsMemo(lm)
    with_memo = search_direction(lm, harmful, harmless, memo=memo, **kw)
    without = search_direction(lm, harmful, harmless, **kw)
    assert (with_memo.direction.layer, with_memo.direction.position) == (without.direction.layer, without.direction.position)
    torch.testing.assert_close(with_memo.direction.direction, without.direction.direction, rtol=1e-4, atol=1e-5)
    assert len(memo) >= len(harmless)
    rkw = {"val_harmful": harmful[:3], "val_harmless": harmless[:3], "steps": 2, "lr": 0.05, "batch": 3, "eval_every": 1}
    rows.clear()
    a = refine_direction(lm, with_memo.direction, harmful, harmless, memo=memo, **rkw)
    with_rows = sum(rows)
    rows.clear()
    b = refine_direction(lm, with_memo.direction, harmful, harmless, **rkw)
    assert sum(rows) - with_rows == len(harmless) + 3  # the reference pass over the train and val harmless prompts
    torch.testing.assert_close(a.direction.direction, b.direction.direction, rtol=1e-4, atol=1e-5)
