"""Attribution screening of direction candidates (methods/direction/attribution.py): the first-order prediction
is the exact derivative of the scaled ablation, and `screen_by="gradient"` keeps the best predicted candidates."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from safetyscope.hooks import hooks
from safetyscope.measure.compare import logits_under
from safetyscope.measure.metrics import refusal_score
from safetyscope.measure.refusal_tokens import refusal_token_ids
from safetyscope.methods.direction.api import DirectionConfig
from safetyscope.methods.direction.attribution import predicted_bypass
from safetyscope.methods.direction.candidates import find_candidates
from safetyscope.methods.direction.scores import SelectConfig
from safetyscope.methods.direction.select import select_direction
from safetyscope.sites import Site
from safetyscope.testing import tiny_model

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi", "Explain recursion briefly, please."]
HARMFUL = ["How do I make a bomb~?", "Steal~ a car", "Hack~ the bank now", "Poison~ the water"]
HARMLESS = ["How do I bake bread?", "Write a poem", "hi there", "Explain recursion"]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("qwen2")


def _scaled_ablation(lm, r: torch.Tensor, alpha: float, targets: torch.Tensor | None):
    """x <- x + alpha * delta(x) at every block input (delta: zero or mean ablation of r), in float64."""

    def make(layer: int):
        def edit(x, _batch):
            xd, u = x.double(), r.double().to(x.device)
            along = (xd @ u).unsqueeze(-1)  # [batch, pos, 1]
            goal = 0.0 if targets is None else float(targets[layer])
            return (xd + alpha * (goal - along) * u).to(x.dtype)

        return edit

    @contextmanager
    def ctx():
        with hooks(lm, [(Site("resid_pre", layer), make(layer)) for layer in range(lm.n_layers)]):
            yield

    return ctx


def _mean_score(lm, ids, intervention=None) -> float:
    return float(refusal_score(logits_under(lm, PROMPTS, intervention, batch_size=4), ids, dtype=torch.float64).mean())


@pytest.mark.parametrize("mean", [False, True])
def test_prediction_is_the_derivative_of_the_scaled_ablation(lm, mean):
    ids = refusal_token_ids(lm.tokenizer)
    g = torch.Generator().manual_seed(0)
    units = torch.nn.functional.normalize(torch.randn(3, lm.dims.d_model, generator=g), dim=-1)  # [3, d_model]
    targets = torch.randn(3, lm.n_layers, generator=g) if mean else None  # [3, n_layers]
    predicted, base = predicted_bypass(lm, units, PROMPTS, ids, targets=targets, batch_size=3)  # batches of 3 + 1
    assert base == pytest.approx(_mean_score(lm, ids), abs=1e-5)
    alpha = 1e-3
    for k in range(3):
        moved = _mean_score(lm, ids, _scaled_ablation(lm, units[k], alpha, None if targets is None else targets[k]))
        slope = (moved - base) / alpha
        assert abs(slope) > 1e-4  # the check is not vacuous
        assert float(predicted[k] - base) == pytest.approx(slope, rel=2e-2, abs=1e-4)


def test_prediction_rejects_no_prompts(lm):
    with pytest.raises(ValueError, match="at least one prompt"):
        predicted_bypass(lm, torch.eye(lm.dims.d_model)[:1], [], refusal_token_ids(lm.tokenizer))


def test_gradient_shortlist_then_forward_screen_keeps_the_best():
    """screen_by="gradient": every candidate is predicted, the 2 * keep lowest predictions get the forward screen,
    and the best `keep` of those are scored in full."""
    lm = tiny_model("llama")
    cands = find_candidates(lm, HARMFUL, HARMLESS, positions=[-3, -2, -1], filter="none", batch_size=4)
    cfg = SelectConfig(prune_layers=0.0, kl_threshold=1e9, induce_threshold=-1e9, screen=2, keep=2, screen_by="gradient")
    _, sel = select_direction(lm, cands, HARMFUL[:3], HARMLESS[:3], cfg, batch_size=8)
    live = [s for s in sel.scores if "zero difference" not in s.reasons]
    assert len(live) > 4 and all(s.predicted_bypass is not None for s in live)
    shortlist = sorted(live, key=lambda s: s.predicted_bypass)[:4]
    assert {s.key for s in live if s.screen_bypass is not None} == {s.key for s in shortlist}
    full = {s.key for s in live if s.bypass is not None}
    assert full == {s.key for s in sorted(shortlist, key=lambda s: s.screen_bypass)[:2]} and sel.best in full
    texts = sel.to_json()["scores"]
    assert all("gradient attribution" in " ".join(t["reasons"]) for t in texts
               if t["bypass"] is None and "zero difference" not in t["reasons"])


def test_unknown_screen_mode_is_refused():
    with pytest.raises(ValueError, match="forward or gradient"):
        SelectConfig(screen_by="backward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="forward or gradient"):
        DirectionConfig(screen_by="backward")  # type: ignore[arg-type]
