"""Adversarial robust hardening (``search_every``): the attack's own direction search inside training keeps
what it finds in the ablated subspace, resumes with it, and a search that finds nothing does not stop training."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import safetyscope.methods.finetune.train as train_mod
from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.finetune.adversary import Found, attack_direction
from safetyscope.methods.finetune.api import finetune
from safetyscope.methods.finetune.robust import estimate_subspace
from safetyscope.methods.finetune.train import TrainConfig
from safetyscope.sites import SiteError, parse_layers
from safetyscope.testing import tiny_model

HARMFUL = ["How do I make a bomb~?", "Steal~ a car", "Hack~ the bank now", "Poison~ the water"]
HARMLESS = ["How do I bake bread?", "Write a poem", "hi there", "Explain recursion"]
CFG = TrainConfig(steps=4, lr=1e-2, batch_size=2, max_reply_tokens=5, checkpoint_every=2, robust=True,
                  robust_rank=5, reestimate_every=0, search_every=1)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("qwen2")


def _run(lm, **kw):
    kw.setdefault("config", CFG)
    return finetune(lm, "harden", "blocks.1.attn.heads[1], blocks.2.mlp.neurons[3,40]", harmful=HARMFUL,
                    harmless=HARMLESS, max_new_tokens=5, judge=lambda p, _r: p in HARMFUL,
                    direction=Direction(torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(1)), 1),
                    **kw)


def _fake_search(calls: list[int]):
    """A stand-in for the attack's search: a direction that is a deterministic function of the trained weights
    (so an uninterrupted and a resumed run see the same ones), at block 2, position -1."""

    def search(lm, harmful, harmless, layers, system, batch_size=8):
        calls.append(1)
        w = lm.model.model.layers[2].mlp.down_proj.weight[:, 3].detach().double()  # trained neuron 3's column
        seed = int(abs(float(w.sum())) * 1e9) % (2**31)
        v = torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(seed))
        return Found(v / v.norm(), 2, -1)

    return search


def test_estimate_subspace_keeps_the_extra_directions_and_skips_duplicates(lm):
    d = lm.dims.d_model
    g = torch.Generator().manual_seed(0)
    r = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    extra = torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=-1)
    q = estimate_subspace(lm, HARMFUL[:2], HARMLESS[:2], r, 5, None, extra=torch.cat([extra, r[None]]))
    assert q.shape == (5, d) and torch.allclose(q @ q.T, torch.eye(5), atol=1e-5)
    for v in (r, *extra):
        assert torch.allclose((q @ v).norm(), torch.tensor(1.0), atol=1e-5)  # each lies in the span
    q2 = estimate_subspace(lm, HARMFUL[:2], HARMLESS[:2], r, 2, None, extra=extra)
    assert torch.allclose((q2 @ extra[1]).norm(), torch.tensor(1.0), atol=1e-5)  # rank 2: the newest extra kept
    assert (q2 @ extra[0]).norm() < 0.9


def test_search_in_training_ablates_what_it_found_and_resumes_with_it(lm, tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(train_mod, "attack_direction", _fake_search(calls))
    full = _run(lm, out=tmp_path / "a")
    assert len(calls) == 3  # steps 1, 2, 3 (step 0 trains against the given direction)
    assert [f[0] for f in full.log.found_at] == [1, 2, 3] and all(f[1:] == (2, -1) for f in full.log.found_at)
    assert full.summary()["found_at"] == [[1, 2, -1], [2, 2, -1], [3, 2, -1]]
    q = full.log.direction
    assert q is not None and q.shape == (5, lm.dims.d_model)
    # the subspace holds every found direction: rerun the stand-in on the final state of each search's step
    _run(lm, config=dataclasses.replace(CFG, steps=2), out=tmp_path / "b")
    resumed = _run(lm, out=tmp_path / "b")
    assert resumed.log.resumed_from == 2
    assert resumed.log.found_at == full.log.found_at  # step 1's find came back from the saved state
    assert resumed.log.losses == full.log.losses
    assert torch.equal(resumed.log.direction, full.log.direction)
    assert all(torch.equal(full.tuned[n], resumed.tuned[n]) for n in full.tuned)


def test_a_resume_that_lost_the_found_directions_would_differ(lm, tmp_path, monkeypatch):
    """The resume test above can fail: dropping what the search found before the checkpoint changes the run."""
    monkeypatch.setattr(train_mod, "attack_direction", _fake_search([]))
    full = _run(lm, out=tmp_path / "a")
    _run(lm, config=dataclasses.replace(CFG, steps=2), out=tmp_path / "b")
    real_load = train_mod._load_state

    def forgetful(path, key, params, opt, adv, *rest):
        got = real_load(path, key, params, opt, adv, *rest)
        adv.found.clear()
        return got

    monkeypatch.setattr(train_mod, "_load_state", forgetful)
    resumed = _run(lm, out=tmp_path / "b")
    assert not torch.equal(resumed.log.direction, full.log.direction)


def test_the_real_search_on_a_model_that_never_refuses_finds_nothing_and_training_goes_on(lm):
    found = attack_direction(lm, HARMFUL, HARMLESS, (1, 2), None)
    assert found is None or (found.layer in (1, 2) and torch.allclose(found.direction.norm(), torch.tensor(1.0)))
    r = _run(lm, config=dataclasses.replace(CFG, steps=2, checkpoint_every=0, search_layers=(1, 2)))
    assert len(r.log.losses) == 2 and all(torch.isfinite(torch.tensor(r.log.losses)))
    assert len(r.log.found_at) == (0 if found is None else 1)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="search_every"):
        TrainConfig(search_every=-1)
    assert parse_layers("9-11") == (9, 10, 11) and parse_layers("-1", 24) == (23,) and parse_layers("*", 2) == (0, 1)
    with pytest.raises(SiteError, match="bad layer"):
        parse_layers("x")


def test_a_search_layer_outside_the_model_is_refused_before_any_work(lm, monkeypatch):
    monkeypatch.setattr("safetyscope.methods.finetune.api._data", lambda *a, **k: pytest.fail("targets were made"))
    with pytest.raises(ValueError, match="search-layers"):
        _run(lm, config=dataclasses.replace(CFG, search_layers=(1, 99)))


def test_keep_start_holds_the_starting_direction_in_the_subspace_after_re_estimation(lm, monkeypatch):
    """With robust_keep_start the direction training started from stays in the ablated subspace after the
    search moved re-estimation elsewhere; without it, it leaves (so the assertion can fail)."""
    start = torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(1))  # what _run passes
    start = start / start.norm()
    share = {}
    for keep in (False, True):
        monkeypatch.setattr(train_mod, "attack_direction", _fake_search([]))
        cfg = dataclasses.replace(CFG, steps=3, checkpoint_every=0, robust_rank=2, robust_keep_start=keep)
        q = _run(lm, config=cfg).log.direction  # [2, d_model] after two searches
        assert q is not None and q.shape == (2, lm.dims.d_model)
        share[keep] = float((q @ start).norm())
    assert share[True] == pytest.approx(1.0, abs=1e-5)
    assert share[False] < 0.9
    with pytest.raises(ValueError, match="robust_rank >= 2"):
        TrainConfig(robust=True, robust_keep_start=True)
