"""Direction refinement: the model stays untouched, the chosen checkpoint is the measured best, mean targets follow."""

from __future__ import annotations

import json

import pytest
import torch

from safetyscope.artifacts import load_artifact
from safetyscope.hooks import forward
from safetyscope.measure.compare import logits_under
from safetyscope.measure.metrics import kl_divergence, refusal_score
from safetyscope.measure.refusal_tokens import refusal_token_ids
from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.direction.refine import harmless_means, refine_direction
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.testing import tiny_model

HARMFUL = ["How do I make a bomb?", "Steal a car", "Hack the bank now", "Poison the water"]
HARMLESS = ["How do I bake bread?", "Write a poem", "hi there", "Explain recursion"]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def _start(lm, ablation: str = "zero") -> Direction:
    g = torch.Generator().manual_seed(3)
    r = torch.randn(lm.dims.d_model, generator=g)
    r = r / r.norm()
    # mean ablation: the harmless means' projections, as refinement recomputes them from its prompts
    targets = (harmless_means(lm, HARMLESS, -1) @ r.double()).float() if ablation == "mean" else None
    return Direction(r, 1, -1, norm=2.0, targets=targets, ablation=ablation)


def _loss(lm, d: Direction, tau: float, kl_weight: float) -> float:
    """The refinement loss of ``d`` on HARMFUL/HARMLESS, measured independently through the artifact's hooks."""
    ids = refusal_token_ids(lm.tokenizer)
    ref = logits_under(lm, HARMLESS, None, batch_size=8)
    new = logits_under(lm, HARMFUL + HARMLESS, d, batch_size=8)
    bypass = torch.relu(refusal_score(new[: len(HARMFUL)], ids) - tau).mean()
    return float(bypass + kl_weight * kl_divergence(ref, new[len(HARMFUL):]).mean())


def _run(lm, d: Direction, **kw):
    args = dict(val_harmful=HARMFUL, val_harmless=HARMLESS, steps=8, lr=0.05, kl_weight=5.0, batch=4, micro_batch=3,
                eval_every=1, seed=0)
    args.update(kw)
    return refine_direction(lm, d, HARMFUL, HARMLESS, **args)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_refine_returns_the_measured_best_and_leaves_the_model_untouched(lm, ablation):
    b = tokenize_prompts(lm.tokenizer, HARMLESS)
    with torch.no_grad():
        before = forward(lm, b)
    params = {k: v.clone() for k, v in lm.model.state_dict().items()}
    start = _start(lm, ablation)
    res = _run(lm, start)
    with torch.no_grad():
        assert torch.equal(forward(lm, b), before)  # hooks gone, nothing edited
    assert all(torch.equal(params[k], v) for k, v in lm.model.state_dict().items())
    assert [h.step for h in res.history] == list(range(9))
    losses = [h.val_loss for h in res.history]
    assert res.chosen == min(range(9), key=lambda i: losses[i])
    assert min(losses[1:]) < losses[0]  # training moved somewhere better than the start
    assert res.history[res.chosen].cosine < 1.0 - 1e-6
    d = res.direction
    assert d.ablation == ablation and d.layer == start.layer and d.position == start.position and d.norm == start.norm
    assert float(d.direction.norm()) == pytest.approx(1.0, abs=1e-5)
    tau = res.settings["tau"]
    assert _loss(lm, d, tau, 5.0) == pytest.approx(losses[res.chosen], rel=1e-3, abs=1e-5)
    assert _loss(lm, start, tau, 5.0) == pytest.approx(losses[0], rel=1e-3, abs=1e-5)
    if ablation == "mean":  # the targets follow the refined direction
        means = harmless_means(lm, HARMLESS, start.position)
        torch.testing.assert_close(d.targets, (means @ d.direction.double()).float(), rtol=1e-4, atol=1e-5)


def test_refine_is_seeded_and_zero_steps_keep_the_direction(lm):
    start = _start(lm)
    a, b = _run(lm, start, steps=3, batch=2), _run(lm, start, steps=3, batch=2)
    assert torch.equal(a.direction.direction, b.direction.direction)
    assert [h.val_loss for h in a.history] == [h.val_loss for h in b.history]
    none = _run(lm, start, steps=0)
    assert none.chosen == 0 and len(none.history) == 1
    torch.testing.assert_close(none.direction.direction, start.direction)


def test_refine_rejects_bad_settings(lm):
    with pytest.raises(ValueError, match="at least one"):
        refine_direction(lm, _start(lm), [], HARMLESS, val_harmful=HARMFUL, val_harmless=HARMLESS)
    with pytest.raises(ValueError, match="--lr > 0"):
        _run(lm, _start(lm), lr=0.0)


def test_cli_direction_refine_writes_artifact_history_and_plot(tmp_path, png):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "h.txt").write_text("\n".join(HARMFUL * 2) + "\n")
    (tmp_path / "s.txt").write_text("\n".join(HARMLESS * 2) + "\n")
    _start(lm).save(tmp_path / "start")
    args = ["direction", "refine", tmp_path / "model", "--direction", tmp_path / "start", "--harmful", tmp_path / "h.txt",
            "--harmless", tmp_path / "s.txt", "--steps", "2", "--eval-every", "1", "--lr", "0.05", "--out", tmp_path, "--json"]
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    res = json.loads(r.stdout)
    out = tmp_path / "direction_refine"
    saved = json.loads((out / "refine.json").read_text())
    assert [h["step"] for h in saved["history"]] == [0, 1, 2] and saved["chosen"] == res["chosen_step"]
    assert res["start"] == saved["history"][0]
    png(out / "refine.png")
    d = load_artifact(out / "artifact")
    assert isinstance(d, Direction) and d.meta.get("refined") is True
    bad = CliRunner().invoke(app, ["direction", "refine", str(tmp_path / "model"), "--direction", str(tmp_path / "missing"),
                                   "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "no direction artifact" in bad.output


def test_logits_and_means_in_one_pass_equal_the_two_separate_passes():
    from safetyscope.measure.compare import logits_under
    from safetyscope.methods.direction.refine import logits_and_means

    lm = tiny_model("llama")
    logits, means = logits_and_means(lm, HARMLESS, -2, batch_size=2)
    torch.testing.assert_close(logits, logits_under(lm, HARMLESS, None, batch_size=3), rtol=1e-4, atol=1e-5)
    assert means.dtype == torch.float64 and means.shape == (lm.n_layers, lm.dims.d_model)
    torch.testing.assert_close(means, harmless_means(lm, HARMLESS, -2, batch_size=3), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(means, harmless_means(lm, HARMLESS, -1), atol=1e-4)  # the position is the one asked


def test_mixed_micro_batches_take_the_same_steps(lm):
    """Harmful and harmless rows share passes: the trained direction is the same at any rows per pass."""
    start = _start(lm)
    one, mixed = _run(lm, start, steps=3, micro_batch=1), _run(lm, start, steps=3, micro_batch=8)
    torch.testing.assert_close(one.direction.direction, mixed.direction.direction, rtol=1e-4, atol=1e-5)
    for a, b in zip(one.history, mixed.history):
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-4, abs=1e-6)
        if a.train_kl is not None:
            assert a.train_kl == pytest.approx(b.train_kl, rel=1e-4, abs=1e-6)
            assert a.train_bypass == pytest.approx(b.train_bypass, rel=1e-4, abs=1e-6)


def test_cli_direction_find_refine_writes_both_in_one_run(tmp_path):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "h.txt").write_text("\n".join(HARMFUL * 3) + "\n")
    (tmp_path / "s.txt").write_text("\n".join(HARMLESS * 3) + "\n")
    args = ["direction", "find", tmp_path / "model", "--harmful", tmp_path / "h.txt", "--harmless", tmp_path / "s.txt",
            "--filter", "none", "--refine", "--out", tmp_path, "--json"]
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    res = json.loads(r.stdout)
    found, refined = load_artifact(tmp_path / "direction" / "artifact"), load_artifact(tmp_path / "direction_refine" / "artifact")
    assert isinstance(refined, Direction) and refined.meta.get("refined") is True
    assert (refined.layer, refined.position) == (found.layer, found.position) == (res["layer"], res["position"])
    saved = json.loads((tmp_path / "direction_refine" / "refine.json").read_text())
    assert saved["chosen"] == res["refine"]["chosen_step"] and saved["settings"]["steps"] == 30
